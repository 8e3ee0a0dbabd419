"""Per-token surrogate losses of TRL 1.16's policy-gradient family, before masking, weighting and aggregation.

Each takes the importance ratio ``coef_1 = pi / pi_prox`` (``[B, T]`` per token or ``[B, 1]`` per
sequence, with grad) and the advantages ``adv [B, 1]``, and returns a per-token loss that broadcasts
to ``[B, T]``. ``policy_loss`` (grpo.py) picks one by ``loss_type`` and aggregates it.
"""

from __future__ import annotations

import math

import torch

_LOG_MIN_WEIGHT = math.log(1e-8)  # VESPO's floor on log weights, as its reference implementation
_LOG_MAX_WEIGHT = 20.0


def _by_sign(positive: torch.Tensor, values: tuple[float, float], like: torch.Tensor) -> torch.Tensor:
    """``values[0]`` where ``positive``, else ``values[1]``, in ``like``'s dtype and device."""
    pos, neg = (torch.tensor(v, dtype=like.dtype, device=like.device) for v in values)
    return torch.where(positive, pos, neg)


def clipped(
    coef_1: torch.Tensor, adv: torch.Tensor, epsilon: float, clip_high: float, delta: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic clipped surrogate ``-min(r A, clip(r, 1-eps, 1+eps_high) A)``.

    ``delta`` bounds the unclipped ratio from above (INTELLECT-2's two-sided clip). Returns the
    per-token loss and the ratio after the ``delta`` bound (which the clip metrics read, as TRL).
    """
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + clip_high)
    bounded = coef_1 if delta is None else torch.clamp(coef_1, max=delta)
    return -torch.min(bounded * adv, coef_2 * adv), bounded


def cispo(coef_1: torch.Tensor, adv: torch.Tensor, logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """MiniMax-M1's CISPO: REINFORCE weighted by the detached, capped ratio: ``-sg(min(r, cap)) A log pi``.

    Unlike PPO's clip, no token loses its gradient: a large ratio only stops growing the weight.
    """
    return -torch.clamp(coef_1, max=cap).detach() * adv * logprobs


def sapo(
    coef_1: torch.Tensor, adv: torch.Tensor, temperature_pos: float, temperature_neg: float
) -> torch.Tensor:
    """SAPO's soft gate ``-(4 / tau) sigmoid(tau (r - 1)) A``, ``tau`` by the advantage's sign.

    Its gradient is ``A r sigmoid'(...) * 4``: equal to the plain policy gradient at ``r = 1`` and
    decaying smoothly as ``r`` moves away, instead of PPO's hard cut-off.
    """
    tau = _by_sign(adv > 0, (temperature_pos, temperature_neg), coef_1)
    return -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv


@torch.no_grad()
def vespo_weights(
    adv: torch.Tensor,
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    behaviour: torch.Tensor | None,
    k: tuple[float, float],
    lam: tuple[float, float],
) -> torch.Tensor:
    """VESPO's detached Gamma weight ``phi(w) = e^lam w^k e^(-lam w)`` of each sequence, ``[B, 1]``.

    ``w`` is the sequence ratio ``exp(sum_t log pi/pi_prox)`` times the product of the token
    behaviour weights (``[B, T]``, or None without a behaviour correction), both in log space with the
    reference implementation's clamps. ``k``/``lam`` are ``(non-negative A, negative A)`` pairs.
    ``phi(1) = 1``; it falls off both for ``w << 1`` (power ``k``) and ``w >> 1`` (decay ``lam``).
    """
    clamped = torch.clamp(log_ratio, -_LOG_MAX_WEIGHT, _LOG_MAX_WEIGHT)
    log_w = torch.where(mask, clamped, torch.zeros_like(clamped)).sum(-1, keepdim=True)
    if behaviour is not None:
        log_behaviour = torch.clamp(torch.log(behaviour), _LOG_MIN_WEIGHT, _LOG_MAX_WEIGHT)
        log_w = log_w + log_behaviour.sum(-1, keepdim=True)
    log_w = torch.clamp(log_w, _LOG_MIN_WEIGHT, _LOG_MAX_WEIGHT)
    k_seq = _by_sign(adv >= 0, k, log_w)
    lam_seq = _by_sign(adv >= 0, lam, log_w).clamp(min=1e-4)
    log_phi = lam_seq + k_seq * log_w - lam_seq * torch.exp(log_w)
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo(phi: torch.Tensor, adv: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """VESPO's loss ``-phi(w) A log pi`` (``phi`` detached, so it only scales the policy gradient)."""
    return -phi * adv * logprobs
