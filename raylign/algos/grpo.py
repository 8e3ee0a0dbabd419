"""Policy-gradient losses for GRPO and GSPO: TRL 1.16's eight ``loss_type``s and its off-policy corrections.

Semantics follow TRL 1.16 ``GRPOTrainer._compute_loss`` (and, for the behaviour weights, its
``_generate_and_score_completions``). The settings live in ``policy_config.py``, the per-token
surrogates in ``surrogates.py``, the behaviour-policy correction in ``importance.py``; this file
combines the pieces in TRL's order and reduces token losses to one number.
"""

from __future__ import annotations

import torch

from raylign.algos import surrogates
from raylign.algos._common import Normaliser, check_same_shape, masked_mean, normaliser, zero_masked
from raylign.algos.importance import behaviour_weights, mismatch_metrics, off_policy_keep, weight_metrics
from raylign.algos.kl import kl_penalty
from raylign.algos.policy_config import (  # noqa: F401  (re-exported: the config of policy_loss)
    POLICY_LOSS_TYPES,
    ImportanceSamplingLevel,
    PolicyLossConfig,
    PolicyLossType,
)

CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # PPO's clipped surrogate

# How each loss type reduces its token losses to one number (TRL 1.16):
#   sequence_mean: mean over each sequence's tokens, then over sequences;  sequence_sum: token sum per
#   sequence, mean over sequences (LUSPO: a sequence weighs by its length);  token_mean: sum over the
#   global token count (DAPO);  local_token_mean: mean over this call's tokens (BNPO);
#   constant: sum / (sequences * max_completion_length) (Dr. GRPO).
AGGREGATION: dict[str, str] = {
    "grpo": "sequence_mean",
    "sapo": "sequence_mean",
    "luspo": "sequence_sum",
    "dapo": "token_mean",
    "cispo": "token_mean",
    "vespo": "token_mean",
    "bnpo": "local_token_mean",
    "dr_grpo": "constant",
}


def _log_importance_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """``[B, T]`` token log-ratios (0 on padding) -> ``[B, T]`` (token) or ``[B, 1]`` (sequence mean)."""
    if level == "token":
        return log_ratio
    lengths = mask.sum(-1, keepdim=True).to(log_ratio.dtype).clamp(min=1.0)
    return log_ratio.sum(-1, keepdim=True) / lengths


def _metric_mask(coef_1: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """What ratio metrics average over, as TRL: tokens, or every sequence at sequence level."""
    return torch.ones_like(coef_1, dtype=torch.bool) if level == "sequence" else mask


def _aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    num_tokens: Normaliser,
    num_sequences: Normaliser,
) -> torch.Tensor:
    """Reduce ``[B, T]`` token losses (0 on padding) to the scalar loss of ``cfg.loss_type``."""
    how = AGGREGATION[cfg.loss_type]
    sequences = normaliser(num_sequences, torch.tensor(per_token.shape[0]), per_token)
    if how == "sequence_mean":
        per_seq = per_token.sum(-1) / mask.sum(-1).to(per_token.dtype).clamp(min=1.0)
        return per_seq.sum() / sequences
    if how == "sequence_sum":
        return per_token.sum() / sequences
    if how == "local_token_mean":
        return per_token.sum() / normaliser(None, mask.sum(), per_token)
    if how == "constant":
        return per_token.sum() / (sequences * cfg.max_completion_length)
    return per_token.sum() / normaliser(num_tokens, mask.sum(), per_token)  # token_mean


def _surrogate(
    cfg: PolicyLossConfig,
    coef_1: torch.Tensor,
    adv: torch.Tensor,
    logp: torch.Tensor,
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    behaviour: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token loss of ``cfg.loss_type`` (broadcastable to ``[B, T]``) and its own metrics."""
    over = _metric_mask(coef_1, mask, cfg.importance_sampling_level)
    if cfg.loss_type in CLIPPED_LOSS_TYPES:
        per_token, bounded = surrogates.clipped(coef_1, adv, cfg.epsilon, cfg.clip_high, cfg.delta)
        return per_token, _clip_metrics(bounded, adv, over, cfg)
    if cfg.loss_type == "cispo":
        high = (coef_1.detach() > cfg.clip_high) & (adv > 0)
        metrics = {"cispo_clip_ratio": masked_mean(high.to(coef_1.dtype), over)}
        return surrogates.cispo(coef_1, adv, logp, cfg.clip_high), metrics
    if cfg.loss_type == "sapo":
        return surrogates.sapo(coef_1, adv, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg), {}
    phi = surrogates.vespo_weights(
        adv,
        log_ratio,
        mask,
        behaviour,
        (cfg.vespo_k_pos, cfg.vespo_k_neg),
        (cfg.vespo_lambda_pos, cfg.vespo_lambda_neg),
    )
    return surrogates.vespo(phi, adv, logp), {"vespo/phi_seq_mean": phi.mean()}


def _check_inputs(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    optional: dict[str, torch.Tensor | None],
) -> None:
    check_same_shape("logprobs", logprobs, mask)
    check_same_shape("old_logprobs", old_logprobs, mask)
    for name, value in optional.items():
        if value is not None:
            check_same_shape(name, value, mask)
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B]={tuple(logprobs.shape[:1])}, got {tuple(advantages.shape)}")
    if cfg.beta > 0 and optional["ref_logprobs"] is None:
        raise ValueError("cfg.beta > 0 needs ref_logprobs; pass the reference model's logprobs or set beta=0")
    if cfg.vllm_importance_sampling_correction and optional["sampler_logprobs"] is None:
        raise ValueError(
            "cfg.vllm_importance_sampling_correction needs sampler_logprobs (the behaviour policy's); "
            "pass them or set vllm_importance_sampling_correction=False"
        )


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
    """The policy-gradient loss of ``cfg.loss_type`` on a micro-batch of completions (decoupled PPO).

    Order of terms as TRL: surrogate on the ratio ``pi / pi_old`` -> off-policy sequence mask ->
    behaviour weight ``pi_old / pi_sampler`` (folded into VESPO's weight instead) -> ``+ beta * KL``
    -> aggregation.

    Args:
        logprobs: ``[B, T]`` current policy log-probability of each completion token (with grad).
        old_logprobs: ``[B, T]`` the proximal policy's: the learner's logprobs for the weights that
            started this optimizer step's batch (``logprobs.detach()`` on its first pass); constant.
        advantages: ``[B]`` one advantage per completion (e.g. ``group_advantages``); constant.
        mask: ``[B, T]`` 1/True on completion tokens that count. Masked positions never affect the
            loss or its gradient, whatever the tensors hold there.
        cfg: surrogate, importance-sampling level, aggregation, KL and behaviour-correction settings.
        ref_logprobs: ``[B, T]`` reference-model logprobs; required when ``cfg.beta > 0``, and
            when given the ``kl`` metric is reported even with ``beta == 0``.
        sampler_logprobs: ``[B, T]`` the behaviour policy's logprobs, reported by the rollout engine
            at generation time (NaN = unknown: no correction there). Required by
            ``cfg.vllm_importance_sampling_correction``; also read by the off-policy mask (which
            falls back to ``old_logprobs``) and, when given, the ``sampling/*`` mismatch metrics.
        num_tokens: global completion-token count for the token-mean aggregations (``dapo``,
            ``cispo``, ``vespo``); num_sequences: global sequence count for the per-sequence ones
            (``grpo``, ``sapo``, ``luspo``, ``dr_grpo``). Global means over all micro-batches and
            data-parallel ranks of one optimizer step, so that the SUM of the returned losses
            equals the full-batch loss; ``None`` uses the local count (a plain mean here).
            ``"bnpo"`` always uses the local token count (TRL then divides by the accumulation
            steps). An engine that averages gradients over ranks must multiply by the world size.
        entropy: ``[B, T]`` per-token entropy, only for the ``entropy`` metric.

    Returns:
        ``(loss, metrics)``: 0-d loss; detached 0-d metrics ``loss``, ``ratio/mean``, ``num_tokens``
        (local); the clipped family's ``clip_ratio/{low,high,region}_mean`` (fraction of tokens, or
        of sequences at sequence level, whose clipped branch is active), ``cispo_clip_ratio``,
        ``vespo/phi_seq_mean``; ``kl``, ``entropy`` when computed; with ``sampler_logprobs`` the
        mismatch metrics of ``importance.mismatch_metrics``, with the correction on those of
        ``importance.weight_metrics``, with the off-policy mask ``sampling/off_policy_masked_frac``.
        Metric means are local to this call.
    """
    optional = {"ref_logprobs": ref_logprobs, "sampler_logprobs": sampler_logprobs, "entropy": entropy}
    _check_inputs(logprobs, old_logprobs, advantages, mask, cfg, optional)
    m = mask.bool()
    logp = zero_masked(logprobs, m)
    old = zero_masked(old_logprobs, m).detach()
    log_ratio = logp - old
    coef_1 = torch.exp(_log_importance_weights(log_ratio, m, cfg.importance_sampling_level))
    adv = advantages.detach().unsqueeze(-1).to(logp.dtype)
    metrics: dict[str, torch.Tensor] = {}
    behaviour = None
    if sampler_logprobs is not None:
        metrics.update(mismatch_metrics(old, sampler_logprobs, m))
    if cfg.vllm_importance_sampling_correction:
        mode = cfg.vllm_importance_sampling_mode
        low, high = cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max
        behaviour = behaviour_weights(old, sampler_logprobs, m, mode, low, high)
        metrics.update(weight_metrics(behaviour, m, mode))
    per_token, own = _surrogate(cfg, coef_1, adv, logp, log_ratio, m, behaviour)
    metrics.update(own)
    if cfg.off_policy_mask_threshold is not None:
        sampled = old if sampler_logprobs is None else sampler_logprobs
        keep = off_policy_keep(advantages.to(logp.dtype), logp, sampled, m, cfg.off_policy_mask_threshold)
        per_token = per_token * keep
        metrics["sampling/off_policy_masked_frac"] = 1 - keep.mean()
    if behaviour is not None and cfg.loss_type != "vespo":
        per_token = per_token * behaviour
    if ref_logprobs is not None:
        kl = kl_penalty(logp, zero_masked(ref_logprobs, m).detach(), cfg.kl_estimator)
        if cfg.use_bias_correction_kl:
            kl = kl * coef_1
        if cfg.beta > 0:
            per_token = per_token + cfg.beta * kl
        metrics["kl"] = masked_mean(kl, m)
    loss = _aggregate(zero_masked(per_token.expand_as(logp), m), m, cfg, num_tokens, num_sequences)
    metrics["ratio/mean"] = masked_mean(coef_1, _metric_mask(coef_1, m, cfg.importance_sampling_level))
    metrics["loss"] = loss.detach()
    metrics["num_tokens"] = m.sum().to(logp.dtype)
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy, m)
    return loss, metrics


def _clip_metrics(
    bounded: torch.Tensor, adv: torch.Tensor, over: torch.Tensor, cfg: PolicyLossConfig
) -> dict[str, torch.Tensor]:
    """Clip fractions as TRL logs them, over ``over`` (tokens, or every sequence at sequence level).

    As in TRL, the low/high tests read the ratio after the ``delta`` bound.
    """
    bounded = bounded.detach()
    low = (bounded < 1 - cfg.epsilon) & (adv < 0)
    high = (bounded > 1 + cfg.clip_high) & (adv > 0)
    dtype = bounded.dtype
    return {
        "clip_ratio/low_mean": masked_mean(low.to(dtype), over),
        "clip_ratio/high_mean": masked_mean(high.to(dtype), over),
        "clip_ratio/region_mean": masked_mean((low | high).to(dtype), over),
    }
