"""Small tensor helpers shared by the loss files (torch only)."""

from __future__ import annotations

import torch

Normaliser = torch.Tensor | float | int | None


def check_same_shape(name: str, x: torch.Tensor, ref: torch.Tensor) -> None:
    """Raise a ValueError naming ``name`` when ``x`` does not have ``ref``'s shape."""
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(ref.shape)} (same as mask)")


def zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with masked-out positions replaced by 0.

    Done with ``torch.where`` on the inputs, before any exp/square, so that garbage in padding
    (huge values) can neither overflow in the forward pass nor leak NaN into the gradient.
    """
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def normaliser(value: Normaliser, local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The denominator of a sum-reduced loss, at least 1.

    ``value`` is the caller's global count (over all micro-batches and ranks); ``None`` falls back
    to ``local``, the count in this call.
    """
    count = local if value is None else torch.as_tensor(value)
    return count.to(dtype=like.dtype, device=like.device).clamp(min=1.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (0 when the mask is empty); detached, for metrics."""
    x = x.detach()
    total = zero_masked(x, mask).sum()
    return total / mask.sum().to(x.dtype).clamp(min=1.0)
