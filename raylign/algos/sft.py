"""Supervised fine-tuning loss: negative log-likelihood of the completion tokens."""

from __future__ import annotations

from typing import Literal

import torch

from raylign.algos._common import Normaliser, normaliser, zero_masked

SFTAggregation = Literal["token_mean", "sequence_mean"]


def sft_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    aggregation: SFTAggregation = "token_mean",
    num_tokens: Normaliser = None,
    num_sequences: Normaliser = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level NLL over completion tokens.

    Args:
        logprobs: ``[B, T]`` log-probability of each target token under the policy.
        mask: ``[B, T]`` 1/True on completion tokens that count, 0 on prompt and padding. Masked
            positions never affect the loss or its gradient, whatever they hold.
        aggregation: ``"token_mean"``: sum of token NLL / ``num_tokens``. ``"sequence_mean"``:
            each sequence's mean token NLL, summed, / ``num_sequences`` (a sequence with no
            completion token counts as 0).
        num_tokens, num_sequences: GLOBAL normalisers (all micro-batches and data-parallel ranks of
            one optimizer step), so that summing the returned losses of every call equals the loss of
            the whole batch. ``None`` uses this call's local count, i.e. a plain mean. An engine that
            averages gradients over ranks must multiply by the world size to keep that sum.

    Returns:
        ``(loss, metrics)``: a 0-d loss; metrics ``nll`` (local token-mean NLL) and ``num_tokens``
        (local completion token count), detached 0-d tensors.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    if mask.shape != logprobs.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(logprobs.shape)}")
    m = mask.bool()
    nll = -zero_masked(logprobs, m)
    local_tokens = m.sum()
    if aggregation == "token_mean":
        loss = nll.sum() / normaliser(num_tokens, local_tokens, nll)
    elif aggregation == "sequence_mean":
        per_seq = nll.sum(-1) / m.sum(-1).to(nll.dtype).clamp(min=1.0)
        local_seqs = torch.tensor(logprobs.shape[0])
        loss = per_seq.sum() / normaliser(num_sequences, local_seqs, nll)
    else:
        raise ValueError(f"unknown SFT aggregation {aggregation!r}; use 'token_mean' or 'sequence_mean'")
    tokens = local_tokens.to(nll.dtype)
    metrics = {
        "nll": (nll.sum() / tokens.clamp(min=1.0)).detach(),
        "num_tokens": tokens.detach(),
    }
    return loss, metrics
