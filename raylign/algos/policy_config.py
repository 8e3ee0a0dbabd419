"""``PolicyLossConfig``: the settings of ``policy_loss`` (grpo.py): TRL 1.16's names, defaults, checks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, get_args

from raylign.algos.importance import IMPORTANCE_SAMPLING_MODES, ImportanceSamplingMode
from raylign.algos.kl import KLEstimator

PolicyLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
POLICY_LOSS_TYPES: tuple[str, ...] = get_args(PolicyLossType)
ImportanceSamplingLevel = Literal["token", "sequence"]

_TOKEN_SUM_TYPES = ("bnpo", "dr_grpo", "dapo", "cispo")  # TRL warns for these at sequence level


@dataclass(frozen=True)
class PolicyLossConfig:
    """Configuration of ``policy_loss`` (names and defaults as TRL 1.16's ``GRPOConfig``).

    Attributes:
        epsilon: lower clip range, ratio clipped below at ``1 - epsilon``; in (0, 1].
        epsilon_high: upper clip range, ratio clipped above at ``1 + epsilon_high`` (DAPO's
            clip-higher); ``None`` means ``epsilon``. For ``"cispo"`` it is the absolute cap on the
            ratio (ScaleRL recommends 5.0).
        delta: optional upper bound on the unclipped ratio (two-sided clipping, INTELLECT-2);
            must be > 1, TRL recommends > 1 + epsilon.
        importance_sampling_level: ``"token"`` (one ratio per token) or ``"sequence"`` (GSPO:
            one ratio per sequence, exp of the mean token log-ratio).
        loss_type: the surrogate and its aggregation (see ``AGGREGATION``): ``"grpo"``, ``"bnpo"``,
            ``"dr_grpo"``, ``"dapo"`` and ``"luspo"`` use PPO's clip; ``"cispo"`` a capped detached
            ratio times ``log pi``; ``"sapo"`` a soft sigmoid gate; ``"vespo"`` a Gamma weight of the
            sequence ratio times ``log pi``.
        beta: KL coefficient; > 0 needs ``ref_logprobs``.
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (TRL's), see ``kl_penalty``.
        use_bias_correction_kl: multiply the per-token KL by the (differentiable) importance
            ratio, TRL 1.16's default; it changes the KL gradient even on-policy.
        max_completion_length: the generation length cap; required by ``"dr_grpo"``.
        vllm_importance_sampling_correction: weight each token by the behaviour ratio
            ``pi_prox / pi_behaviour`` (``old_logprobs`` over ``sampler_logprobs``), see
            ``importance.behaviour_weights``; needs ``sampler_logprobs``.
        vllm_importance_sampling_mode: ``token_truncate``, ``token_mask``, ``sequence_truncate`` or
            ``sequence_mask`` (TRL's default).
        vllm_importance_sampling_clip_max / vllm_importance_sampling_clip_min: the bounds
            ``[C_min, C_max]`` the behaviour ratio is truncated to, or masked outside of; None = open.
        off_policy_mask_threshold: drop negative-advantage sequences whose mean
            ``log pi_behaviour - log pi`` exceeds it (DeepSeek-V3.2's off-policy sequence mask); None = off.
        sapo_temperature_pos / sapo_temperature_neg: SAPO's gate temperatures for positive / other advantages.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's Gamma-weight power and
            decay for non-negative / negative advantages.
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
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: ImportanceSamplingMode = "sequence_mask"
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None
    off_policy_mask_threshold: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in (0, 1], got {self.epsilon}")
        if self.epsilon_high is not None and not self.epsilon_high > 0.0:
            raise ValueError(f"epsilon_high must be > 0 (or None to reuse epsilon), got {self.epsilon_high}")
        if self.delta is not None and not self.delta > 1.0:
            raise ValueError(f"delta must be > 1 (TRL recommends > 1 + epsilon), got {self.delta}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                f"unknown importance_sampling_level {self.importance_sampling_level!r}; "
                "use 'token' or 'sequence'"
            )
        if self.loss_type not in POLICY_LOSS_TYPES:
            raise ValueError(
                f"unknown loss_type {self.loss_type!r}; use one of {', '.join(POLICY_LOSS_TYPES)}"
            )
        if not self.beta >= 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"unknown kl_estimator {self.kl_estimator!r}; use 'k1', 'k2' or 'k3'")
        if self.loss_type == "dr_grpo" and (
            self.max_completion_length is None or self.max_completion_length < 1
        ):
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length (a positive int)")
        self._check_behaviour_correction()
        self._check_soft_losses()
        self._warn_unusual_combinations()

    def _check_behaviour_correction(self) -> None:
        mode, low, high = (
            self.vllm_importance_sampling_mode,
            self.vllm_importance_sampling_clip_min,
            self.vllm_importance_sampling_clip_max,
        )
        if mode not in IMPORTANCE_SAMPLING_MODES:
            raise ValueError(
                f"unknown vllm_importance_sampling_mode {mode!r}; "
                f"use one of {', '.join(IMPORTANCE_SAMPLING_MODES)}"
            )
        if high is not None and not high > 0.0:
            raise ValueError(f"vllm_importance_sampling_clip_max must be > 0 (or None), got {high}")
        if low is not None and not low >= 0.0:
            raise ValueError(f"vllm_importance_sampling_clip_min must be >= 0 (or None), got {low}")
        if low is not None and high is not None and not low < high:
            raise ValueError(
                f"vllm_importance_sampling_clip_min ({low}) must be below "
                f"vllm_importance_sampling_clip_max ({high})"
            )
        unbounded = low is None and high is None
        if self.vllm_importance_sampling_correction and mode.endswith("truncate") and unbounded:
            raise ValueError(
                f"vllm_importance_sampling_mode {mode!r} needs vllm_importance_sampling_clip_min or _max"
            )
        if self.off_policy_mask_threshold is not None and not self.off_policy_mask_threshold >= 0.0:
            raise ValueError(
                f"off_policy_mask_threshold must be >= 0 (or None), got {self.off_policy_mask_threshold}"
            )

    def _check_soft_losses(self) -> None:
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if (
            self.loss_type == "vespo"
            and self.vllm_importance_sampling_correction
            and not self.vllm_importance_sampling_mode.startswith("token")
        ):
            raise ValueError(
                "loss_type 'vespo' folds token behaviour weights into its sequence weight: set "
                "vllm_importance_sampling_mode to token_truncate or token_mask"
            )

    def _warn_unusual_combinations(self) -> None:
        level, loss_type = self.importance_sampling_level, self.loss_type
        if level == "sequence" and loss_type in _TOKEN_SUM_TYPES:
            self._warn(
                f"importance_sampling_level='sequence' with loss_type={loss_type!r} weights each sequence "
                "by its length; the GSPO paper uses loss_type='grpo' (PolicyLossConfig.gspo())"
            )
        if loss_type == "luspo" and level != "sequence":
            self._warn("loss_type 'luspo' is meant for importance_sampling_level='sequence' (LUSPO)")
        if loss_type == "vespo" and level != "token":
            self._warn("loss_type 'vespo' weighs sequences itself: keep importance_sampling_level token")
        if loss_type == "cispo" and self.clip_high < 1.0:
            self._warn(
                f"loss_type 'cispo' caps the ratio at epsilon_high itself (ScaleRL uses 5.0); "
                f"{self.clip_high} "
                "down-weights every on-policy token"
            )

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(message, stacklevel=5)

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
