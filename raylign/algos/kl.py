"""Per-token estimators of KL(policy || reference) from sampled-token logprobs (Schulman's k1/k2/k3)."""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """Per-token KL estimate, same shape as the inputs (e.g. ``[B, T]``); no masking here.

    With ``d = ref_logprobs - logprobs`` (log of pi_ref / pi at the sampled token):

    - ``"k1"``: ``-d`` (unbiased, can be negative, high variance);
    - ``"k2"``: ``d**2 / 2`` (biased, non-negative);
    - ``"k3"``: ``exp(d) - d - 1`` (unbiased, non-negative); TRL GRPO's estimator.

    Gradients flow into both arguments; pass a detached ``ref_logprobs`` for a frozen reference.
    The caller masks padding (see ``policy_loss``).
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"ref_logprobs has shape {tuple(ref_logprobs.shape)}, expected {tuple(logprobs.shape)}"
        )
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1', 'k2' or 'k3'")
