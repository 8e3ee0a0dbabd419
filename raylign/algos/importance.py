"""Behaviour-policy correction for off-policy samples (decoupled PPO), with TRL 1.16's modes and names.

Three policies meet in an asynchronous step: the *behaviour* policy that sampled a completion (a
rollout engine, possibly stale by up to ``max_staleness`` versions and possibly numerically different,
e.g. vLLM in bf16), the *proximal* policy (the learner's weights when the step starts, recomputed by
the learner) and the current policy being updated. The PPO clip acts on ``pi / pi_prox``; each token
is weighted by the behaviour ratio ``pi_prox / pi_behaviour``, truncated or masked so that one
far-off sample cannot dominate a step (AReaL's and verl's decoupled loss; TRL's
``vllm_importance_sampling_*``). Everything here is constant with respect to the policy (detached).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from raylign.algos._common import masked_mean, zero_masked

ImportanceSamplingMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def behaviour_log_ratio(proximal: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` detached ``log pi_prox - log pi_behaviour``; 0 on padding and where the sampler gave NaN.

    A NaN sampler logprob means the engine could not score that token: it gets no correction
    (weight 1) instead of poisoning the whole step.
    """
    diff = zero_masked(proximal.detach() - sampler.detach(), mask)
    return torch.nan_to_num(diff, nan=0.0)


def behaviour_weights(
    proximal: torch.Tensor,
    sampler: torch.Tensor,
    mask: torch.Tensor,
    mode: ImportanceSamplingMode,
    clip_min: float | None,
    clip_max: float | None,
) -> torch.Tensor:
    """The behaviour-correction weight of each token: ``[B, T]`` (token modes) or ``[B, 1]`` (sequence modes).

    The ratio is ``pi_prox / pi_behaviour`` per token, or per sequence the exp of the SUMMED token
    log-ratios (the sequence likelihood ratio, as TRL). ``*_truncate`` clamps it to
    ``[clip_min, clip_max]``; ``*_mask`` sets it to 0 outside that range (a ``None`` bound is open).
    Padding carries weight 1 (the loss masks it anyway).
    """
    log_ratio = behaviour_log_ratio(proximal, sampler, mask)
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(-1, keepdim=True)
    ratio = torch.exp(log_ratio)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def off_policy_keep(
    advantages: torch.Tensor,
    logprobs: torch.Tensor,
    sampler: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask: ``[B, 1]`` 1.0 = keep, 0.0 = drop.

    A sequence is dropped when its advantage is negative AND the mean over its tokens of
    ``log pi_behaviour - log pi`` (current policy, detached) exceeds ``threshold``: negative samples
    the current policy has already moved far away from teach little and destabilise. NaN sampler
    logprobs count as 0 (no evidence of divergence).
    """
    diff = torch.nan_to_num(zero_masked(sampler.detach() - logprobs.detach(), mask), nan=0.0)
    mean_kl = diff.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).to(diff.dtype).clamp(min=1.0)
    keep = (advantages.unsqueeze(-1) >= 0) | (mean_kl <= threshold)
    return keep.to(logprobs.dtype).detach()


def _masked_extreme(x: torch.Tensor, mask: torch.Tensor, largest: bool) -> torch.Tensor:
    """Max (or min) of ``x`` over ``mask``; 0 when the mask is empty."""
    fill = -math.inf if largest else math.inf
    values = torch.where(mask, x.detach(), torch.full((), fill, dtype=x.dtype, device=x.device))
    out = values.amax() if largest else values.amin()
    return torch.where(mask.any(), out, torch.zeros((), dtype=x.dtype, device=x.device))


def mismatch_metrics(
    proximal: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the behaviour policy is from the proximal one, over the tokens the sampler scored.

    ``sampling/mismatch_kl``: k3 estimate of KL(pi_behaviour || pi_prox) per token (samples come from
    the behaviour policy; unbiased and >= 0); ``sampling/sampling_logp_difference/{mean,max}``:
    ``|log pi_prox - log pi_behaviour|`` (TRL's keys). Staleness and engine mismatch both show here.
    """
    scored = mask & ~torch.isnan(sampler)
    log_r = behaviour_log_ratio(proximal, sampler, scored)
    diff = log_r.abs()
    return {
        "sampling/mismatch_kl": masked_mean(torch.exp(log_r) - log_r - 1, scored),
        "sampling/sampling_logp_difference/mean": masked_mean(diff, scored),
        "sampling/sampling_logp_difference/max": _masked_extreme(diff, scored, largest=True),
    }


def weight_metrics(
    weights: torch.Tensor, mask: torch.Tensor, mode: ImportanceSamplingMode
) -> dict[str, torch.Tensor]:
    """Statistics of the behaviour weights as TRL logs them: over tokens, or over sequences in sequence modes.

    ``sampling/is_masked_frac`` is the fraction of tokens (token modes) or sequences (sequence modes)
    whose weight is 0; it stays 0 for the truncating modes unless ``clip_max`` is 0.
    """
    over = torch.ones_like(weights, dtype=torch.bool) if mode.startswith("sequence") else mask
    return {
        "sampling/importance_sampling_ratio/min": _masked_extreme(weights, over, largest=False),
        "sampling/importance_sampling_ratio/mean": masked_mean(weights, over),
        "sampling/importance_sampling_ratio/max": _masked_extreme(weights, over, largest=True),
        "sampling/is_masked_frac": masked_mean((weights == 0).to(weights.dtype), over),
    }
