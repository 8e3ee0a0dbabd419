"""Advantages against TRL 1.16 and hand-computed values.

TRL computes these inline in ``GRPOTrainer._generate_and_score_completions`` and
``RLOOTrainer._generate_and_score_completions``; both are driven (tests/trl_reference.py) on
trainers whose generation, reward and logprob calls are stubs returning our tensors. The
rollout-side behaviour weights are checked in test_algos_importance.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from trl_reference import stub_trainer, trl_grpo_rollout

from raylign.algos import group_advantages, rloo_advantages

pytest.importorskip("trl.trainer.grpo_trainer")
rloo_module = pytest.importorskip("trl.trainer.rloo_trainer")

F64 = torch.float64


def trl_rloo_advantages(rewards, num_generations):
    n = rewards.shape[0]
    mask = torch.ones(n, 2, dtype=torch.long)
    tr, cids = stub_trainer(
        rloo_module.RLOOTrainer, rewards, num_generations, torch.zeros(n, 2, dtype=F64), mask
    )
    tr._generate = lambda prompts: ([[5, 6]] * n, cids, ["c"] * n)
    return tr._generate_and_score_completions([{"prompt": "p"}] * n)["advantages"]


def _rewards(seed, n, with_nan):
    r = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    if with_nan:
        r[1] = float("nan")  # one unscorable completion
        r[-2:] = float("nan")  # a group (of 2) with nothing scorable when num_generations == 2
    return r


@pytest.mark.parametrize("with_nan", [False, True])
@pytest.mark.parametrize("num_generations", [1, 2, 4])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale_rewards, num_generations, with_nan):
    rewards = _rewards(num_generations, 8, with_nan)
    expected = trl_grpo_rollout(rewards, num_generations, scale_rewards)[0]["advantages"]
    torch.testing.assert_close(
        group_advantages(rewards, num_generations, scale_rewards), expected, rtol=1e-6, atol=1e-12
    )


@pytest.mark.parametrize("with_nan", [False, True])
@pytest.mark.parametrize("num_generations", [1, 2, 4])
def test_rloo_advantages_match_trl(num_generations, with_nan):
    rewards = _rewards(10 + num_generations, 8, with_nan)
    expected = trl_rloo_advantages(rewards, num_generations)
    torch.testing.assert_close(rloo_advantages(rewards, num_generations), expected, rtol=1e-6, atol=1e-12)


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 1.0, 2.0, 2.0, 2.0], dtype=F64)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 1): sqrt(((1/3)^2 * 2 + (2/3)^2) / 2)
    expected = [1 / 3 / (std + 1e-4), -2 / 3 / (std + 1e-4), 1 / 3 / (std + 1e-4), 0.0, 0.0, 0.0]
    assert group_advantages(rewards, 3).tolist() == pytest.approx(expected, rel=1e-12)
    assert group_advantages(rewards, 3, "none").tolist() == pytest.approx(
        [1 / 3, -2 / 3, 1 / 3, 0, 0, 0], rel=1e-12
    )
    batch_std = torch.tensor([1.0, 0.0, 1.0, 2.0, 2.0, 2.0]).std().item()
    got = group_advantages(rewards, 3, "batch", eps=0.0)
    assert got.tolist() == pytest.approx([1 / 3 / batch_std, -2 / 3 / batch_std, 1 / 3 / batch_std, 0, 0, 0])


def test_rloo_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 1.0, 3.0, float("nan"), 1.0], dtype=F64)
    # group 1 baselines: (0+1)/2, (1+1)/2, (1+0)/2; group 2 ignores the NaN: baselines 1 and 3
    assert rloo_advantages(rewards, 3).tolist() == pytest.approx([0.5, -1.0, 0.5, 2.0, 0.0, -2.0])


def test_advantages_are_detached_and_validate_layout():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    assert not group_advantages(rewards, 2).requires_grad
    assert not rloo_advantages(rewards, 2).requires_grad
    with pytest.raises(ValueError, match="num_generations=3"):
        group_advantages(rewards, 3)
    with pytest.raises(ValueError, match=r"\[N\]"):
        rloo_advantages(rewards.view(2, 2), 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 2, "std")
