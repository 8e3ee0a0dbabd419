"""Held-out evaluation of the policy the rollout engines serve: greedy answers, scored by the job's rewards."""

from __future__ import annotations

import math
from collections.abc import Sequence

from raylign.config import GRPOConfig
from raylign.data.datasets import VLMDataset
from raylign.driver.batching import make_request, sampling_params
from raylign.protocol import ScoredGroup


def eval_rows(dataset: VLMDataset, limit: int) -> list[int]:
    """The first ``limit`` rows: the same held-out prompts at every evaluation."""
    return list(range(min(limit, len(dataset))))


def evaluate(rollouts, rewards, dataset: VLMDataset, g: GRPOConfig) -> tuple[dict[str, float], list[ScoredGroup]]:
    """Greedy-decode up to ``g.eval_num_prompts`` held-out prompts; mean reward and accuracy.

    ``eval/accuracy`` is the mean of the ``accuracy`` reward over prompts it had an opinion on.
    """
    indices = eval_rows(dataset, g.eval_num_prompts)
    greedy = sampling_params(g, greedy=True)
    requests = [make_request(f"eval/r{i}", row, greedy, None) for i, row in zip(indices, dataset.rows(indices))]
    scored = rewards.score(rollouts.generate(requests))
    return eval_metrics(scored), scored


def eval_metrics(scored: Sequence[ScoredGroup]) -> dict[str, float]:
    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    out = {"eval/reward/mean": mean([grp.rewards[0] for grp in scored])}
    for name in scored[0].per_function if scored else ():
        out[f"eval/reward/{name}/mean"] = mean([v for grp in scored if (v := grp.per_function[name][0]) is not None])
    if "eval/reward/accuracy/mean" in out:
        out["eval/accuracy"] = out["eval/reward/accuracy/mean"]
    return out
