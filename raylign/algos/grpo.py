"""Clipped policy-gradient loss for GRPO and GSPO (and the DAPO / Dr. GRPO / BNPO aggregations).

Semantics follow TRL 1.16 ``GRPOTrainer._compute_loss`` for the loss types named here, with
truncated importance sampling as TRL's ``vllm_importance_sampling_mode="token_truncate"``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from raylign.algos._common import Normaliser, check_same_shape, masked_mean, normaliser, zero_masked
from raylign.algos.kl import KLEstimator, kl_penalty

PolicyLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]


@dataclass(frozen=True)
class PolicyLossConfig:
    """Configuration of ``policy_loss`` (names as TRL's ``GRPOConfig``).

    Attributes:
        epsilon: lower clip range, ratio clipped below at ``1 - epsilon``; in (0, 1].
        epsilon_high: upper clip range, ratio clipped above at ``1 + epsilon_high`` (DAPO's
            clip-higher); ``None`` means ``epsilon``.
        delta: optional upper bound on the unclipped ratio (two-sided clipping, INTELLECT-2);
            must be > 1, TRL recommends > 1 + epsilon.
        importance_sampling_level: ``"token"`` (one ratio per token) or ``"sequence"`` (GSPO:
            one ratio per sequence, exp of the mean token log-ratio).
        loss_type: how token losses become one number: ``"grpo"`` (mean per sequence, then mean
            over sequences), ``"bnpo"`` (token mean over the local batch), ``"dr_grpo"`` (token sum
            / (sequences * max_completion_length)), ``"dapo"`` (token sum / global token count).
        beta: KL coefficient; > 0 needs ``ref_logprobs``.
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (TRL's), see ``kl_penalty``.
        use_bias_correction_kl: multiply the per-token KL by the (differentiable) importance
            ratio, TRL 1.16's default; it changes the KL gradient even on-policy.
        max_completion_length: the generation length cap; required by ``"dr_grpo"``.
        tis_cap: truncated importance sampling: multiply each token loss by
            ``min(exp(old_logprobs - sampler_logprobs), tis_cap)`` (detached), correcting for the
            sampler (e.g. vLLM) differing from the learner. ``None`` disables it.
    """

    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: ImportanceSamplingLevel = "token"
    loss_type: PolicyLossType = "dapo"
    beta: float = 0.0
    kl_estimator: KLEstimator = "k3"
    use_bias_correction_kl: bool = True
    max_completion_length: int | None = None
    tis_cap: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in (0, 1], got {self.epsilon}")
        if self.epsilon_high is not None and not self.epsilon_high > 0.0:
            raise ValueError(f"epsilon_high must be > 0 (or None to reuse epsilon), got {self.epsilon_high}")
        if self.delta is not None and not self.delta > 1.0:
            raise ValueError(f"delta must be > 1 (TRL recommends > 1 + epsilon), got {self.delta}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                f"unknown importance_sampling_level {self.importance_sampling_level!r}; use 'token' or 'sequence'"
            )
        if self.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
            raise ValueError(f"unknown loss_type {self.loss_type!r}; use 'grpo', 'bnpo', 'dr_grpo' or 'dapo'")
        if not self.beta >= 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"unknown kl_estimator {self.kl_estimator!r}; use 'k1', 'k2' or 'k3'")
        if self.loss_type == "dr_grpo" and (
            self.max_completion_length is None or self.max_completion_length < 1
        ):
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length (a positive int)")
        if self.tis_cap is not None and not self.tis_cap > 0.0:
            raise ValueError(f"tis_cap must be > 0 (or None to disable), got {self.tis_cap}")
        if self.importance_sampling_level == "sequence" and self.loss_type != "grpo":
            warnings.warn(
                f"importance_sampling_level='sequence' with loss_type={self.loss_type!r} weights each sequence "
                "by its length; the GSPO paper uses loss_type='grpo' (PolicyLossConfig.gspo())",
                stacklevel=3,
            )

    @property
    def clip_high(self) -> float:
        """The effective upper clip range: ``epsilon_high``, or ``epsilon`` when unset."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @classmethod
    def gspo(cls, **overrides) -> PolicyLossConfig:
        """GSPO paper defaults as in TRL's recipe: sequence-level ratio, clip 3e-4 / 4e-4, no KL, 'grpo'."""
        base = {
            "importance_sampling_level": "sequence",
            "epsilon": 3e-4,
            "epsilon_high": 4e-4,
            "beta": 0.0,
            "loss_type": "grpo",
        }
        return cls(**{**base, **overrides})


def _log_importance_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """``[B, T]`` token log-ratios (0 on padding) -> ``[B, T]`` (token) or ``[B, 1]`` (sequence mean)."""
    if level == "token":
        return log_ratio
    lengths = mask.sum(-1, keepdim=True).to(log_ratio.dtype).clamp(min=1.0)
    return log_ratio.sum(-1, keepdim=True) / lengths


def _aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    num_tokens: Normaliser,
    num_sequences: Normaliser,
) -> torch.Tensor:
    """Reduce ``[B, T]`` token losses (0 on padding) to the scalar loss of ``cfg.loss_type``."""
    local_seqs = torch.tensor(per_token.shape[0])
    if cfg.loss_type == "grpo":
        per_seq = per_token.sum(-1) / mask.sum(-1).to(per_token.dtype).clamp(min=1.0)
        return per_seq.sum() / normaliser(num_sequences, local_seqs, per_token)
    if cfg.loss_type == "bnpo":
        return per_token.sum() / normaliser(None, mask.sum(), per_token)
    if cfg.loss_type == "dr_grpo":
        return per_token.sum() / (
            normaliser(num_sequences, local_seqs, per_token) * cfg.max_completion_length
        )
    return per_token.sum() / normaliser(num_tokens, mask.sum(), per_token)  # dapo


def _tis_weights(old: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """Detached ``min(exp(old - sampler), cap)`` per token; 1 on padding and where sampler is NaN."""
    diff = torch.nan_to_num(zero_masked(old - sampler, mask), nan=0.0)
    return torch.exp(diff).clamp(max=cap).detach()


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    *,
    ref_logprobs: torch.Tensor | None = None,
    sampler_logprobs: torch.Tensor | None = None,
    num_tokens: Normaliser = None,
    num_sequences: Normaliser = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-style clipped surrogate loss of a micro-batch of completions.

    Args:
        logprobs: ``[B, T]`` current policy log-probability of each completion token (with grad).
        old_logprobs: ``[B, T]`` the same under the policy that the ratio is taken against (the
            learner's recomputation for the weights that sampled); constant.
        advantages: ``[B]`` one advantage per completion (e.g. ``group_advantages``); constant.
        mask: ``[B, T]`` 1/True on completion tokens that count. Masked positions never affect the
            loss or its gradient, whatever the tensors hold there.
        cfg: clipping, importance-sampling level, aggregation, KL and TIS settings.
        ref_logprobs: ``[B, T]`` reference-model logprobs; required when ``cfg.beta > 0``, and
            when given the ``kl`` metric is reported even with ``beta == 0``.
        sampler_logprobs: ``[B, T]`` logprobs reported by the sampler at generation time; used
            for truncated importance sampling when ``cfg.tis_cap`` is set (NaN entries mean
            "unknown" and get weight 1).
        num_tokens: global completion-token count for ``"dapo"``; num_sequences: global sequence
            count for ``"grpo"`` and ``"dr_grpo"``. Global means over all micro-batches and
            data-parallel ranks of one optimizer step, so that the SUM of the returned losses
            equals the full-batch loss; ``None`` uses the local count (a plain mean here).
            ``"bnpo"`` always uses the local token count (TRL then divides by the accumulation
            steps). An engine that averages gradients over ranks must multiply by the world size.
        entropy: ``[B, T]`` per-token entropy, only for the ``entropy`` metric.

    Returns:
        ``(loss, metrics)``: 0-d loss; detached 0-d metrics ``loss``, ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (fraction of tokens, or of sequences
        at sequence level, whose clipped branch is active), ``ratio/mean``, ``num_tokens`` (local),
        and ``kl``, ``entropy``, ``tis/ratio_mean`` when computed. Metric means are local to this call.
    """
    check_same_shape("logprobs", logprobs, mask)
    check_same_shape("old_logprobs", old_logprobs, mask)
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B]={tuple(logprobs.shape[:1])}, got {tuple(advantages.shape)}")
    if cfg.beta > 0 and ref_logprobs is None:
        raise ValueError("cfg.beta > 0 needs ref_logprobs; pass the reference model's logprobs or set beta=0")
    if cfg.tis_cap is not None and sampler_logprobs is None:
        raise ValueError(
            "cfg.tis_cap is set but sampler_logprobs is None; pass the sampling logprobs or tis_cap=None"
        )
    m = mask.bool()
    logp = zero_masked(logprobs, m)
    log_ratio = logp - zero_masked(old_logprobs, m).detach()
    coef_1 = torch.exp(_log_importance_weights(log_ratio, m, cfg.importance_sampling_level))
    adv = advantages.detach().unsqueeze(-1).to(logp.dtype)
    coef_2 = torch.clamp(coef_1, 1 - cfg.epsilon, 1 + cfg.clip_high)
    coef_1_bounded = coef_1 if cfg.delta is None else torch.clamp(coef_1, max=cfg.delta)
    per_token = -torch.min(coef_1_bounded * adv, coef_2 * adv).expand_as(logp)
    metrics: dict[str, torch.Tensor] = {}
    if cfg.tis_cap is not None:
        check_same_shape("sampler_logprobs", sampler_logprobs, mask)
        tis = _tis_weights(old_logprobs.detach(), sampler_logprobs.detach(), m, cfg.tis_cap)
        per_token = per_token * tis
        metrics["tis/ratio_mean"] = masked_mean(tis, m)
    if ref_logprobs is not None:
        check_same_shape("ref_logprobs", ref_logprobs, mask)
        kl = kl_penalty(logp, zero_masked(ref_logprobs, m).detach(), cfg.kl_estimator)
        if cfg.use_bias_correction_kl:
            kl = kl * coef_1
        if cfg.beta > 0:
            per_token = per_token + cfg.beta * kl
        metrics["kl"] = masked_mean(kl, m)
    loss = _aggregate(zero_masked(per_token, m), m, cfg, num_tokens, num_sequences)
    metrics.update(_clip_metrics(coef_1, coef_1_bounded, adv, m, cfg))
    metrics["loss"] = loss.detach()
    metrics["num_tokens"] = m.sum().to(logp.dtype)
    if entropy is not None:
        check_same_shape("entropy", entropy, mask)
        metrics["entropy"] = masked_mean(entropy, m)
    return loss, metrics


def _clip_metrics(
    coef_1: torch.Tensor,
    coef_1_bounded: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
) -> dict[str, torch.Tensor]:
    """Clip fractions as TRL logs them: over tokens, or over sequences at sequence level.

    As in TRL, the low/high tests read the ratio after the ``delta`` bound; ``ratio/mean`` is
    the raw importance ratio.
    """
    coef_1_bounded = coef_1_bounded.detach()
    low = (coef_1_bounded < 1 - cfg.epsilon) & (adv < 0)
    high = (coef_1_bounded > 1 + cfg.clip_high) & (adv > 0)
    if cfg.importance_sampling_level == "sequence":  # one value per sequence, every sequence counts
        mask = torch.ones_like(coef_1, dtype=torch.bool)
    dtype = coef_1.dtype
    return {
        "clip_ratio/low_mean": masked_mean(low.to(dtype), mask),
        "clip_ratio/high_mean": masked_mean(high.to(dtype), mask),
        "clip_ratio/region_mean": masked_mean((low | high).to(dtype), mask),
        "ratio/mean": masked_mean(coef_1, mask),
    }
