"""Pure steps of the online loop: prompts -> requests, scored groups -> train samples and metrics.

No Ray and no models here, so each step is unit-tested on hand-built records.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from raylign.algos import group_advantages, rloo_advantages
from raylign.config import GRPOConfig
from raylign.protocol import RolloutRequest, SamplingParams, ScoredGroup, TrainSample


def request_seed(seed: int, uid: str) -> int:
    """A per-prompt sampling seed: the same prompt samples the same way on any worker, after any restart."""
    digest = hashlib.blake2b(f"{seed}/{uid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sampling_params(g: GRPOConfig, n: int | None = None, greedy: bool = False) -> SamplingParams:
    if greedy:
        return SamplingParams(n=1, temperature=0.0, max_tokens=g.max_completion_length)
    return SamplingParams(
        n=n or g.num_generations,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        max_tokens=g.max_completion_length,
    )


def make_request(uid: str, row: Mapping[str, Any], sampling: SamplingParams, seed: int | None) -> RolloutRequest:
    """A dataset row (``prompt`` + ``images`` + extra columns) as a rollout request."""
    columns = {k: v for k, v in row.items() if k not in ("prompt", "images")}
    params = sampling if seed is None else SamplingParams(**{**sampling.__dict__, "seed": request_seed(seed, uid)})
    return RolloutRequest(uid=uid, prompt=row["prompt"], images=tuple(row.get("images") or ()), columns=columns,
                          sampling=params)


def is_informative(group: ScoredGroup) -> bool:
    """False when every completion got the same reward: its advantages are all 0 (DAPO's dynamic sampling)."""
    return len(set(group.rewards)) > 1


def advantages(groups: Sequence[ScoredGroup], g: GRPOConfig) -> torch.Tensor:
    """Flat ``[sum n]`` advantages, group by group, from the groups' weighted rewards."""
    rewards = torch.tensor([r for grp in groups for r in grp.rewards], dtype=torch.float64)
    n = len(groups[0].rewards)
    if any(len(grp.rewards) != n for grp in groups):
        raise ValueError("every prompt group must hold grpo.num_generations completions")
    if g.advantage_estimator == "rloo":
        return rloo_advantages(rewards, n)
    return group_advantages(rewards, n, scale_rewards=g.scale_rewards)


def train_samples(groups: Sequence[ScoredGroup], g: GRPOConfig) -> list[TrainSample]:
    """One ``TrainSample`` per completion, carrying its group's advantage and the behaviour logprobs."""
    adv = advantages(groups, g).tolist()
    out: list[TrainSample] = []
    for grp in groups:
        request = grp.rollout.request
        for completion in grp.rollout.completions:
            out.append(
                TrainSample(
                    uid=request.uid,
                    prompt=request.prompt,
                    images=request.images,
                    completion_ids=completion.token_ids,
                    old_logprobs=completion.logprobs,
                    advantage=adv[len(out)],
                    policy_version=grp.rollout.policy_version,
                    truncated=completion.finish_reason == "length",
                )
            )
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def batch_metrics(groups: Sequence[ScoredGroup], version: int, num_iterations: int = 1) -> dict[str, float]:
    """Reward (overall and per function), accuracy, lengths, truncation and staleness of one step's batch.

    Staleness counts optimizer steps between the weights that sampled a group and the weights
    it updates: ``version`` is the learner's version before this step's update.
    """
    rewards = [r for grp in groups for r in grp.rewards]
    lengths = [len(c.token_ids) for grp in groups for c in grp.rollout.completions]
    truncated = [c.finish_reason == "length" for grp in groups for c in grp.rollout.completions]
    stale = [(version - grp.rollout.policy_version) // num_iterations for grp in groups]
    mean = _mean(rewards)
    out = {
        "reward/mean": mean,
        "reward/std": math.sqrt(_mean([(r - mean) ** 2 for r in rewards])) if rewards else math.nan,
        "completion_length/mean": _mean(lengths),
        "completion_length/max": float(max(lengths, default=0)),
        "completion/truncated_frac": _mean([float(t) for t in truncated]),
        "staleness/mean": _mean(stale),
        "staleness/max": float(max(stale, default=0)),
        "groups/zero_std_frac": _mean([float(not is_informative(grp)) for grp in groups]),
    }
    for name in groups[0].per_function if groups else ():
        scored = [v for grp in groups for v in grp.per_function[name] if v is not None]
        out[f"reward/{name}/mean"] = _mean(scored)
        out[f"reward/{name}/none_frac"] = 1 - len(scored) / len(rewards) if rewards else math.nan
        out[f"reward/{name}/timeouts"] = float(sum(grp.timeouts.get(name, 0) for grp in groups))
        out[f"reward/{name}/errors"] = float(sum(grp.errors.get(name, 0) for grp in groups))
    if "reward/accuracy/mean" in out:
        out["accuracy"] = out["reward/accuracy/mean"]
    out.update(logged_metrics(groups, reserved=set(out)))
    return out


def logged_metrics(groups: Sequence[ScoredGroup], reserved: set[str] = frozenset()) -> dict[str, float]:
    """What reward functions passed to ``log_metric``, averaged over the step (TRL's name; ``reward_fn/<name>``
    when it would overwrite one of raylign's own metrics)."""
    values: dict[str, list[float]] = {}
    for grp in groups:
        for name, logged in grp.logged_metrics.items():
            values.setdefault(name, []).extend(logged)
    return {(f"reward_fn/{k}" if k in reserved else k): _mean(v) for k, v in values.items()}


def prompt_text(prompt: Any) -> str:
    """The text parts of a prompt (images shown as ``[image]``), for logs and reports."""
    if isinstance(prompt, str):
        return prompt
    parts = []
    for message in prompt:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
            continue
        for part in content or ():
            parts.append(part.get("text", "") if part.get("type") == "text" else "[image]")
    return " ".join(p for p in parts if p)


def thumbnail_b64(image: Any, size: int = 96) -> str | None:
    """A small PNG of the first prompt image, base64, for ``samples.jsonl`` and the report."""
    if image is None:
        return None
    thumb = image.copy()
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def sample_rows(groups: Sequence[ScoredGroup], k: int) -> list[dict[str, Any]]:
    """The first completion of the first ``k`` groups, with its rewards, for ``samples.jsonl``."""
    rows = []
    for grp in groups[:k]:
        request, completion = grp.rollout.request, grp.rollout.completions[0]
        rows.append(
            {
                "uid": request.uid,
                "prompt": prompt_text(request.prompt),
                "completion": completion.text,
                "reward": grp.rewards[0],
                "rewards": {name: values[0] for name, values in grp.per_function.items()},
                "solution": request.columns.get("solution"),
                "policy_version": grp.rollout.policy_version,
                "image": thumbnail_b64(request.images[0] if request.images else None),
                **({"extra": {col: vals[0] for col, vals in grp.logged_extra.items() if vals}}
                   if grp.logged_extra else {}),
            }
        )
    return rows
