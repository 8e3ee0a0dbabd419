"""The pure steps of the online loop: seeds, requests, advantages, samples and step metrics."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from raylign.algos import group_advantages
from raylign.config import GRPOConfig
from raylign.driver.batching import (
    batch_metrics,
    is_informative,
    make_request,
    prompt_text,
    request_seed,
    sample_rows,
    sampling_params,
    train_samples,
)
from raylign.protocol import Completion, Rollout, RolloutRequest, ScoredGroup


def _group(uid: str, rewards, version=0, acc=None, lengths=None):
    n = len(rewards)
    lengths = lengths or [3] * n
    comps = tuple(
        Completion(tuple(range(k)), tuple([-0.5] * k), f"c{i}", "length" if k >= 5 else "stop")
        for i, k in enumerate(lengths)
    )
    req = RolloutRequest(uid, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q?"}]}],
                         (Image.new("RGB", (40, 30), "red"),), {"solution": "2"})
    acc = acc if acc is not None else [None] * n
    return ScoredGroup(Rollout(req, comps, version, "w0", 0.5), tuple(rewards),
                       {"format": tuple(rewards), "accuracy": tuple(acc)}, {"format": 0, "accuracy": 1}, {})


def test_request_seed_is_stable_and_distinct():
    assert request_seed(1, "e0/r3") == request_seed(1, "e0/r3")
    assert request_seed(1, "e0/r3") != request_seed(1, "e0/r4") != request_seed(2, "e0/r3")
    assert 0 <= request_seed(7, "x") < 2**63


def test_make_request_carries_columns_images_and_seed():
    g = GRPOConfig(num_generations=4, max_completion_length=16, temperature=0.7)
    row = {"prompt": "how many?", "images": [Image.new("RGB", (8, 8))], "solution": "3"}
    req = make_request("e0/r1", row, sampling_params(g), seed=5)
    assert req.columns == {"solution": "3"} and len(req.images) == 1
    assert (req.sampling.n, req.sampling.temperature, req.sampling.max_tokens) == (4, 0.7, 16)
    assert req.sampling.seed == request_seed(5, "e0/r1")
    assert make_request("e0/r1", row, sampling_params(g), seed=None).sampling.seed is None
    assert sampling_params(g, greedy=True).temperature == 0.0


def test_train_samples_carry_group_advantages_in_order():
    g = GRPOConfig(num_generations=3)
    groups = [_group("a", [1.0, 0.0, 0.0], version=2), _group("b", [0.5, 0.5, 1.5], lengths=[3, 5, 1])]
    samples = train_samples(groups, g)
    expected = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 1.5], dtype=torch.float64), 3)
    assert [s.advantage for s in samples] == pytest.approx(expected.tolist())
    assert [s.uid for s in samples] == ["a"] * 3 + ["b"] * 3
    assert samples[4].truncated and not samples[3].truncated
    assert samples[0].policy_version == 2 and samples[4].old_logprobs == (-0.5,) * 5
    rloo = train_samples(groups, GRPOConfig(num_generations=3, advantage_estimator="rloo"))
    assert rloo[0].advantage == pytest.approx(1.0)  # 1 - mean(0, 0)


def test_batch_metrics():
    groups = [_group("a", [1.0, 0.0], version=3, acc=[1.0, None]), _group("b", [1.0, 1.0], version=1, acc=[0.0, 0.0])]
    m = batch_metrics(groups, version=4)
    assert m["reward/mean"] == pytest.approx(0.75)
    assert m["reward/accuracy/mean"] == pytest.approx(1 / 3) == pytest.approx(m["accuracy"])
    assert m["reward/accuracy/none_frac"] == pytest.approx(0.25)
    assert m["reward/accuracy/timeouts"] == 2.0
    assert (m["staleness/mean"], m["staleness/max"]) == (2.0, 3.0)
    assert m["groups/zero_std_frac"] == 0.5
    assert not is_informative(groups[1]) and is_informative(groups[0])
    assert batch_metrics(groups, version=4, num_iterations=2)["staleness/max"] == 1.0
    assert math.isnan(batch_metrics([], 0)["reward/mean"])


def test_sample_rows_and_prompt_text():
    rows = sample_rows([_group("a", [1.0, 0.0])], k=4)
    assert rows[0]["prompt"] == "[image] q?" and rows[0]["completion"] == "c0"
    assert rows[0]["rewards"] == {"format": 1.0, "accuracy": None} and rows[0]["image"]
    assert prompt_text("plain") == "plain"
