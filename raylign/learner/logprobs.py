"""Per-token logprobs of target tokens, with the LM head applied a chunk of tokens at a time.

Only target positions (``completion_mask``) go through the LM head: their hidden states are picked
out first (the state at ``i - 1`` predicts token ``i``), then projected ``chunk_size`` tokens at a
time. With gradients, each chunk runs under activation checkpointing, so no more than one chunk's
``[chunk, vocab]`` logits ever exist, in the forward pass or the backward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from raylign.data.collate import pack_targets

# Keys of a collated batch that are not model inputs.
NON_MODEL_KEYS = frozenset({"completion_mask"})


@dataclass(frozen=True)
class TokenLogprobs:
    """Target-token logprobs packed left (row ``b``'s ``t``-th target at ``[b, t]``)."""

    logprobs: torch.Tensor  # [B, T] float32, 0 where mask is False
    mask: torch.Tensor  # [B, T] bool
    entropy: torch.Tensor | None = None  # [B, T] float32 entropy of the (tempered) distribution, detached


def model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's keyword inputs from a collated batch, on ``device``."""
    return {
        k: v.to(device) for k, v in batch.items() if k not in NON_MODEL_KEYS and isinstance(v, torch.Tensor)
    }


def _chunk(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob of ``targets`` [n] (and entropy [n]) from hidden states [n, H], in float32."""
    logp = (head(hidden).float() / temperature).log_softmax(-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return picked, picked.new_zeros(())
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy


def head_logprobs(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(head(hidden) / temperature)[targets]`` for ``hidden [N, H]``, ``targets [N]``, chunked.

    Returns ``([N] logprobs, [N] entropy or None)``.
    """
    pieces, entropies = [], []
    use_checkpoint = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk_size):
        args = (
            head,
            hidden[start : start + chunk_size],
            targets[start : start + chunk_size],
            temperature,
            with_entropy,
        )
        lp, ent = checkpoint(_chunk, *args, use_reentrant=False) if use_checkpoint else _chunk(*args)
        pieces.append(lp)
        entropies.append(ent)
    if not pieces:
        empty = hidden.new_zeros((0,), dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    return torch.cat(pieces), (torch.cat(entropies) if with_entropy else None)


def target_logprobs(
    backbone: nn.Module,
    head: nn.Module,
    batch: Mapping[str, torch.Tensor],
    device: torch.device,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> TokenLogprobs:
    """Logprobs of a collated batch's target tokens under the model (gradients flow when enabled).

    ``batch`` is what ``raylign.data.collate`` builds: model inputs plus ``completion_mask [B, L]``.
    Logits are divided by ``temperature`` before the softmax (TRL's semantics for GRPO).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    inputs = model_inputs(batch, device)
    hidden = backbone(**inputs, use_cache=False).last_hidden_state  # [B, L, H]
    index, mask = pack_targets(batch["completion_mask"].to(device))  # [B, T]
    if bool((index[mask] == 0).any()):
        raise ValueError(
            "completion_mask marks position 0 as a target, but no position precedes it to predict it"
        )
    rows = torch.arange(index.shape[0], device=device).unsqueeze(1).expand_as(index)
    flat_hidden = hidden[rows[mask], index[mask] - 1]  # [N, H]
    flat_targets = inputs["input_ids"][rows[mask], index[mask]]  # [N]
    lp, ent = head_logprobs(head, flat_hidden, flat_targets, temperature, chunk_size, with_entropy)
    logprobs = torch.zeros(mask.shape, dtype=lp.dtype, device=device).masked_scatter(mask, lp)
    entropy = (
        None
        if ent is None
        else torch.zeros(mask.shape, dtype=ent.dtype, device=device).masked_scatter(mask, ent)
    )
    return TokenLogprobs(logprobs=logprobs, mask=mask, entropy=entropy)
