"""Export the policy's weights as HF-named full tensors, in buckets, for weight sync and checkpoints.

Names are those of the plain Hugging Face model (``model.named_parameters()`` of a fresh load), so
a rollout engine can load them directly. LoRA adapters are merged into their base layer's weight
(``W + scale * B @ A``), and their own parameters are not exported. Under ZeRO-3 every parameter is
partitioned across ranks: each bucket's parameters are gathered together, copied out, and
released before the bucket is yielded, so at most one bucket is ever gathered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from raylign.learner.model import export_name, is_lora_param

Bucket = list[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class _Entry:
    """One exported tensor: its HF name, the parameters it is made of, and how to make it."""

    name: str
    params: tuple[nn.Parameter, ...]
    make: Callable[[], torch.Tensor]  # called while ``params`` are gathered; returns a new tensor
    nbytes: int


def _numel(p: nn.Parameter) -> int:
    """Full element count, also for a ZeRO-3 partitioned parameter (whose ``numel()`` is 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def _lora_layers(policy: nn.Module) -> dict[str, nn.Module]:
    """Module name -> PEFT LoRA layer, for every layer with adapters."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft absent: no model can carry LoRA layers
        return {}
    return {name: m for name, m in policy.named_modules() if isinstance(m, LoraLayer)}


def _merged(layer: nn.Module, base: nn.Parameter) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
        return (base.data + delta.to(base.dtype)).detach().clone()

    return make


def _plain(p: nn.Parameter) -> Callable[[], torch.Tensor]:
    return lambda: p.data.detach().clone()


def weight_entries(policy: nn.Module, trainable_only: bool = False) -> list[_Entry]:
    """The exported tensors of ``policy`` in ``named_parameters`` order."""
    layers = _lora_layers(policy)
    entries = []
    for name, p in policy.named_parameters():
        if is_lora_param(name):
            continue
        size = _numel(p) * p.element_size()
        layer = layers.get(name.rsplit(".base_layer.", 1)[0]) if name.endswith(".base_layer.weight") else None
        if layer is not None:
            entries.append(_Entry(export_name(name), tuple(layer.parameters()), _merged(layer, p), size))
        elif not trainable_only or p.requires_grad:
            entries.append(_Entry(export_name(name), (p,), _plain(p), size))
    return entries


def group_entries(entries: list[_Entry], bucket_bytes: int) -> list[list[_Entry]]:
    """Consecutive entries in groups of at most ``bucket_bytes`` (a bigger entry forms a group alone)."""
    groups: list[list[_Entry]] = []
    current: list[_Entry] = []
    size = 0
    for e in entries:
        if current and size + e.nbytes > bucket_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    if current:
        groups.append(current)
    return groups


def gathered(params: list[nn.Parameter], zero3: bool):
    """Context in which ZeRO-3 partitioned ``params`` hold their full data (a no-op otherwise)."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def iter_buckets(
    policy: nn.Module, bucket_mb: float, trainable_only: bool = False, zero3: bool = False
) -> Iterator[Bucket]:
    """Yield ``[(hf_name, tensor), ...]`` buckets of about ``bucket_mb`` MiB (see the module docstring)."""
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
    for group in group_entries(weight_entries(policy, trainable_only), int(bucket_mb * 2**20)):
        params = list({id(p): p for e in group for p in e.params}.values())
        with torch.no_grad(), gathered(params, zero3):
            bucket = [(e.name, e.make()) for e in group]
        yield bucket
