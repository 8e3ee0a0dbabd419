"""Preference losses: DPO and its variants, and MPO as a weighted mix of them.

Semantics follow TRL 1.16 ``DPOTrainer`` (``f_divergence_type="reverse_kl"``, no ``ld_alpha``,
no WPO weighting). Notation, per pair ``i``:

- ``chosen_logratio = policy_chosen_logps - ref_chosen_logps`` (same for rejected);
- ``delta = chosen_logratio - rejected_logratio``;
- implicit rewards ``beta * chosen_logratio`` and ``beta * rejected_logratio``.

Each loss type gives a per-pair loss; its batch mean is the component, and the total is the
weighted sum of components (MPO: ``loss_type=("sigmoid", "bco_pair", "sft")``,
``loss_weights=(0.8, 0.2, 1.0)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sft", "apo_zero", "apo_down"]
LOSS_TYPES: tuple[str, ...] = get_args(DPOLossType)


@dataclass(frozen=True)
class DPOLossConfig:
    """Configuration of the preference loss (names as TRL's ``DPOConfig``).

    Attributes:
        beta: strength of the implicit KL to the reference (for ``"ipo"`` it is tau; > 0).
        loss_type: one or more of ``LOSS_TYPES``; a plain string is accepted for one type.
        loss_weights: one weight per loss type; ``None`` weights every type 1.0.
        label_smoothing: probability that a preference label is flipped, used by ``"robust"``
            only (must be in [0, 0.5)). As in TRL 1.16, ``"sigmoid"`` has no label smoothing, so a
            non-zero value without ``"robust"`` is rejected rather than silently ignored.
    """

    beta: float = 0.1
    loss_type: tuple[DPOLossType, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        # Accept YAML lists and a bare string; store tuples so the config stays hashable.
        types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        object.__setattr__(self, "loss_type", types)
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        if not types:
            raise ValueError("loss_type must name at least one loss type")
        unknown = [t for t in types if t not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"unknown DPO loss_type {unknown}; choose from {list(LOSS_TYPES)}")
        if len(set(types)) != len(types):
            raise ValueError(f"loss_type {list(types)} repeats a type; give it a larger weight instead")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} entries but loss_type has {len(types)}; "
                "give one weight per loss type"
            )
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing != 0.0 and "robust" not in types:
            raise ValueError(
                "label_smoothing is only used by loss_type 'robust' (TRL 1.16 has no label smoothing for "
                "'sigmoid'); add 'robust' or set label_smoothing=0"
            )

    @property
    def weights(self) -> tuple[float, ...]:
        """The weight of each loss type (1.0 each when ``loss_weights`` is None)."""
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_type)


@dataclass(frozen=True)
class _Pairs:
    """Per-pair quantities every loss type reads, all ``[B]``."""

    chosen: torch.Tensor  # policy_chosen_logps - ref_chosen_logps
    rejected: torch.Tensor  # policy_rejected_logps - ref_rejected_logps
    beta: float
    label_smoothing: float
    chosen_nll: torch.Tensor | None
    bco_reward_mean: torch.Tensor | None
    chosen_lengths: torch.Tensor | None
    rejected_lengths: torch.Tensor | None

    @property
    def delta(self) -> torch.Tensor:
        return self.chosen - self.rejected


def _sigmoid(p: _Pairs) -> torch.Tensor:
    return -F.logsigmoid(p.beta * p.delta)


def _hinge(p: _Pairs) -> torch.Tensor:
    return torch.relu(1 - p.beta * p.delta)


def _ipo(p: _Pairs) -> torch.Tensor:
    # TRL 1.16 length-normalises the IPO margin by each completion's token count.
    if p.chosen_lengths is None or p.rejected_lengths is None:
        raise ValueError(
            "loss_type 'ipo' needs chosen_lengths and rejected_lengths (completion tokens per pair)"
        )
    margin = p.chosen / p.chosen_lengths.clamp(min=1) - p.rejected / p.rejected_lengths.clamp(min=1)
    return (margin - 1 / (2 * p.beta)) ** 2


def _robust(p: _Pairs) -> torch.Tensor:
    eps, z = p.label_smoothing, p.beta * p.delta
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(p: _Pairs) -> torch.Tensor:
    shift = 0.0 if p.bco_reward_mean is None else p.bco_reward_mean.detach()
    chosen_rewards = p.beta * p.chosen - shift
    rejected_rewards = p.beta * p.rejected - shift
    return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)


def _sft(p: _Pairs) -> torch.Tensor:
    if p.chosen_nll is None:
        raise ValueError(
            "loss_type 'sft' needs chosen_nll (e.g. sft_loss(chosen_token_logps, chosen_mask)[0])"
        )
    return p.chosen_nll


def _apo_zero(p: _Pairs) -> torch.Tensor:
    return (1 - torch.sigmoid(p.beta * p.chosen)) + torch.sigmoid(p.beta * p.rejected)


def _apo_down(p: _Pairs) -> torch.Tensor:
    return torch.sigmoid(p.beta * p.chosen) + (1 - torch.sigmoid(p.beta * p.delta))


_LOSSES: dict[str, Callable[[_Pairs], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "ipo": _ipo,
    "hinge": _hinge,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sft": _sft,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    cfg: DPOLossConfig,
    *,
    chosen_nll: torch.Tensor | None = None,
    bco_reward_mean: torch.Tensor | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Preference loss of a batch of B (chosen, rejected) pairs.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed log-probability of each
            completion's tokens (completion tokens only) under the policy; gradients flow here.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the frozen reference
            (treated as constants: they are detached).
        cfg: loss types, weights, beta, label smoothing.
        chosen_nll: for ``"sft"``: the NLL term, a 0-d tensor or ``[B]`` (its mean is used). TRL
            1.16 uses the token mean over all chosen completion tokens of the batch, i.e.
            ``sft_loss(chosen_token_logps, chosen_mask)[0]``; a ``[B]`` of per-sequence mean NLLs
            gives the per-sequence variant instead.
        bco_reward_mean: for ``"bco_pair"``: running mean of implicit rewards subtracted from both
            rewards (the BCO paper's delta). ``None`` means no shift, which is TRL 1.16. The caller
            keeps the running mean, updating it from ``metrics["bco/reward_mean"]``.
        chosen_lengths, rejected_lengths: for ``"ipo"``: ``[B]`` completion token counts, because
            TRL's IPO divides each log-ratio by its completion length.

    Returns:
        ``(loss, metrics)``: 0-d loss, the weighted sum of each type's batch mean. Metrics
        (detached 0-d): ``loss``, ``loss/<type>`` (unweighted component), ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/accuracies`` (fraction with chosen reward > rejected),
        ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, and with ``"bco_pair"``
        ``bco/reward_mean`` (mean of this batch's chosen and rejected rewards).
    """
    for name, t in (
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        if t.shape != policy_chosen_logps.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {tuple(policy_chosen_logps.shape)}"
            )
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"logps must be [B], got shape {tuple(policy_chosen_logps.shape)}")
    pairs = _Pairs(
        chosen=policy_chosen_logps - ref_chosen_logps.detach(),
        rejected=policy_rejected_logps - ref_rejected_logps.detach(),
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        chosen_nll=chosen_nll,
        bco_reward_mean=bco_reward_mean,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    metrics: dict[str, torch.Tensor] = {}
    loss = policy_chosen_logps.new_zeros(())
    for loss_type, weight in zip(cfg.loss_type, cfg.weights):
        component = _LOSSES[loss_type](pairs).mean()
        metrics[f"loss/{loss_type}"] = component.detach()
        loss = loss + weight * component
    metrics["loss"] = loss.detach()
    metrics.update(_reward_metrics(pairs, policy_chosen_logps, policy_rejected_logps))
    if "bco_pair" in cfg.loss_type:
        metrics["bco/reward_mean"] = (cfg.beta * torch.cat([pairs.chosen, pairs.rejected])).detach().mean()
    return loss, metrics


def _reward_metrics(
    p: _Pairs, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor
) -> dict[str, torch.Tensor]:
    """TRL's reward and logp metrics (batch means), detached."""
    chosen_rewards = p.beta * p.chosen.detach()
    rejected_rewards = p.beta * p.rejected.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
