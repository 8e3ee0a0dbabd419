"""Behaviour-policy correction (raylign/algos/importance.py): every mode against TRL 1.16's rollout code,
DeepSeek-V3.2's off-policy mask against TRL's, hand-computed cases, and the decoupled-PPO split of roles."""

from __future__ import annotations

import math

import pytest
import torch
from trl_reference import trl_grpo_rollout

from raylign.algos import PolicyLossConfig, policy_loss
from raylign.algos.importance import (
    behaviour_weights,
    mismatch_metrics,
    off_policy_keep,
    weight_metrics,
)

GRPOTrainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer

F64 = torch.float64
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])


def _logps(seed: int, spread: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(proximal, sampler) ``[5, 5]``; sampler values are float32 (as engines report them), one is NaN."""
    g = torch.Generator().manual_seed(seed)
    proximal = -torch.rand(5, 5, generator=g, dtype=F64)
    sampler = (proximal + spread * torch.randn(5, 5, generator=g, dtype=F64)).float().double()
    sampler[0, 2] = float("nan")  # a token the engine could not score
    return proximal, sampler


BOUNDS = [(None, 1.3), (0.8, 1.3), (0.5, None), (0.6, 2.5)]


@pytest.mark.parametrize(("low", "high"), BOUNDS)
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_behaviour_weights_and_metrics_match_trl_rollout(mode, low, high):
    proximal, sampler = _logps(seed=0)  # the inputs test_bounds_cases_actually_bind checks
    out, trl_metrics = trl_grpo_rollout(
        torch.zeros(5, dtype=F64), 1, "none", proximal, MASK, sampler, mode, low, high
    )
    mask = MASK.bool()
    weights = behaviour_weights(proximal, sampler, mask, mode, low, high)
    expected = out["importance_sampling_ratio"]
    assert weights.shape == expected.shape  # [B, T] per token, [B, 1] per sequence
    on = mask if mode.startswith("token") else torch.ones_like(weights, dtype=torch.bool)
    torch.testing.assert_close(weights[on], expected[on], rtol=1e-6, atol=1e-12)
    ours = {**weight_metrics(weights, mask, mode), **mismatch_metrics(proximal, sampler, mask)}
    for key, value in trl_metrics.items():
        if key.startswith("sampling/"):
            assert ours[key].item() == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_bounds_cases_actually_bind():
    """Guard for the grid above: with these inputs each bound truncates or masks something."""
    proximal, sampler = _logps(seed=0)
    mask = MASK.bool()
    for low, high in BOUNDS:
        for mode in ("token_truncate", "token_mask"):
            w = behaviour_weights(proximal, sampler, mask, mode, low, high)[mask]
            raw = torch.exp(torch.nan_to_num(proximal - sampler, nan=0.0))[mask]
            assert not torch.equal(w, raw), (mode, low, high)


def test_hand_computed_modes():
    proximal = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]], dtype=F64)
    sampler = torch.tensor([[-0.5, 0.2, float("nan")], [-0.1, -0.2, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()  # the 5.0 is padding: ignored
    e = math.exp
    token = behaviour_weights(proximal, sampler, mask, "token_truncate", None, 1.5)
    torch.testing.assert_close(token, torch.tensor([[1.5, e(-0.2), 1.0], [e(0.1), e(0.2), 1.0]], dtype=F64))
    masked = behaviour_weights(proximal, sampler, mask, "token_mask", 0.9, 1.5)
    torch.testing.assert_close(masked, torch.tensor([[0.0, 0.0, 1.0], [e(0.1), e(0.2), 1.0]], dtype=F64))
    # a sequence's ratio is the product of its token ratios: exp(0.5 - 0.2) and exp(0.1 + 0.2)
    seq = behaviour_weights(proximal, sampler, mask, "sequence_truncate", 0.5, 1.3)
    torch.testing.assert_close(seq, torch.tensor([[1.3], [1.3]], dtype=F64))
    seq_mask = behaviour_weights(proximal, sampler, mask, "sequence_mask", None, 1.36)
    torch.testing.assert_close(seq_mask, torch.tensor([[e(0.3)], [e(0.3)]], dtype=F64))
    metrics = weight_metrics(masked, mask, "token_mask")
    assert metrics["sampling/is_masked_frac"].item() == pytest.approx(2 / 5)


def test_mismatch_kl_is_the_k3_estimate_over_scored_tokens():
    proximal = torch.tensor([[0.0, -1.0, -2.0]], dtype=F64)
    sampler = torch.tensor([[-0.3, -1.0, float("nan")]], dtype=F64)
    metrics = mismatch_metrics(proximal, sampler, torch.ones(1, 3, dtype=torch.bool))
    log_r = torch.tensor([0.3, 0.0], dtype=F64)  # log pi_prox - log pi_behaviour, NaN token left out
    k3 = (torch.exp(log_r) - log_r - 1).mean()
    assert metrics["sampling/mismatch_kl"].item() == pytest.approx(k3.item(), rel=1e-12)
    assert metrics["sampling/sampling_logp_difference/max"].item() == pytest.approx(0.3)
    assert metrics["sampling/sampling_logp_difference/mean"].item() == pytest.approx(0.15)


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.3])
def test_off_policy_keep_matches_trl(threshold):
    proximal, sampler = _logps(seed=7, spread=0.4)
    current = proximal + 0.1 * torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    adv = torch.tensor([1.0, -0.5, -1.0, 0.0, -2.0], dtype=F64)
    keep = off_policy_keep(adv, current, sampler, MASK.bool(), threshold)
    expected = GRPOTrainer.get_off_policy_mask(adv.unsqueeze(1), current, sampler, MASK.to(F64), threshold)
    torch.testing.assert_close(keep, expected)
    assert keep[adv >= 0].eq(1).all()  # only negative advantages are ever dropped


def test_decoupled_roles_clip_against_proximal_weight_by_behaviour():
    """The clip reads pi / pi_prox, never the sampler; the sampler only sets each token's weight.

    One token per sequence, A = +1, dapo over 3 tokens. The sampler is far off (ratio e^2 to pi_prox,
    truncated to 3): the weight is 3 while the clip does not act; once pi moves 50% above pi_prox
    the clip (epsilon 0.2) zeroes the gradient whatever the weight.
    """
    proximal = torch.zeros(3, 1, dtype=F64)
    sampler = torch.full((3, 1), -2.0, dtype=F64)
    current = torch.tensor([[0.0], [math.log(1.1)], [math.log(1.5)]], dtype=F64, requires_grad=True)
    cfg = PolicyLossConfig(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=3.0)
    loss, metrics = policy_loss(current, proximal, torch.ones(3, dtype=F64), torch.ones(3, 1), cfg,
                                sampler_logprobs=sampler)
    loss.backward()
    expected = torch.tensor([[-3.0 * 1.0 / 3], [-3.0 * 1.1 / 3], [0.0]], dtype=F64)
    torch.testing.assert_close(current.grad, expected, rtol=1e-12, atol=1e-15)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert metrics["sampling/importance_sampling_ratio/max"].item() == 3.0
    assert loss.item() == pytest.approx(-3.0 * (1.0 + 1.1 + 1.2) / 3, rel=1e-12)
