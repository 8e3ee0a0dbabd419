"""The wire format of a weight sync: bucket layouts, and packing a bucket into one flat byte buffer.

A *bucket* is a list of ``(hf_name, tensor)`` pairs, as ``Learner.iter_weight_buckets`` yields
them. Its *layout* (names, shapes, dtypes and byte offsets) is known before any weight is
gathered, so the receivers get it once per sync in their one control call, and each bucket then
travels as a single contiguous ``uint8`` buffer (one collective per bucket, not one per tensor).
Offsets are aligned to ``ALIGN`` bytes, because viewing bytes as a wider dtype needs an aligned
storage offset. Packing is a byte copy, so a tensor arrives bitwise identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from raylign.learner.model import export_name, is_lora_param
from raylign.learner.weights import group_entries, weight_entries

ALIGN = 64  # bytes; a multiple of every dtype's size, and of a cache line
Bucket = list[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in its bucket's buffer."""

    name: str  # HF parameter name, as the engine's loader expects it
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # byte offset in the bucket buffer (a multiple of ALIGN)
    nbytes: int


@dataclass(frozen=True)
class BucketSpec:
    """One bucket: its tensors in order and the size of its packed buffer."""

    tensors: tuple[TensorSpec, ...]
    nbytes: int  # buffer size, padding included


@dataclass(frozen=True)
class WeightLayout:
    """Every bucket of one sync, in send order, and where the sender's tensors live."""

    buckets: tuple[BucketSpec, ...]
    device_type: str = "cpu"  # "cuda" when the learner holds its weights on a GPU

    @property
    def nbytes(self) -> int:
        """Bytes of weights (padding excluded)."""
        return sum(t.nbytes for b in self.buckets for t in b.tensors)

    @property
    def max_bucket_bytes(self) -> int:
        return max((b.nbytes for b in self.buckets), default=0)

    @property
    def num_tensors(self) -> int:
        return sum(len(b.tensors) for b in self.buckets)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def bucket_spec(items: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> BucketSpec:
    """Lay out ``(name, shape, dtype)`` triples back to back at aligned offsets."""
    specs, offset = [], 0
    for name, shape, dtype in items:
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * dtype.itemsize
        specs.append(TensorSpec(name, tuple(int(d) for d in shape), dtype, offset, nbytes))
        offset = _aligned(offset + nbytes)
    return BucketSpec(tuple(specs), offset)


def spec_of(bucket: Bucket) -> BucketSpec:
    """The layout of an actual bucket."""
    return bucket_spec((name, tuple(t.shape), t.dtype) for name, t in bucket)


def layout_of(policy: nn.Module, bucket_mb: float, trainable_only: bool = False) -> tuple[BucketSpec, ...]:
    """The buckets ``iter_weight_buckets(bucket_mb, trainable_only)`` will yield, without gathering anything.

    Uses the learner's own grouping (``raylign.learner.weights``); shapes and dtypes come from each
    exported weight's base parameter (its full shape under ZeRO-3; a LoRA-merged weight has its
    base layer's shape and dtype).
    """
    if bucket_mb <= 0:
        raise ValueError(f"sync.bucket_mb must be > 0, got {bucket_mb}")
    base = {export_name(n): p for n, p in policy.named_parameters() if not is_lora_param(n)}
    groups = group_entries(weight_entries(policy, trainable_only), int(bucket_mb * 2**20))
    return tuple(
        bucket_spec(
            (e.name, tuple(getattr(base[e.name], "ds_shape", base[e.name].shape)), base[e.name].dtype)
            for e in group
        )
        for group in groups
    )


def iter_bucket_views(policy: nn.Module, bucket_mb: float, trainable_only: bool = False) -> Iterator[Bucket]:
    """``iter_buckets`` of an unpartitioned policy (ZeRO 0-2), without copying: plain weights come as views.

    A sync packs each bucket into its buffer at once, so the learner's own clone of every weight
    (needed under ZeRO-3, where a gathered weight is freed after its bucket) is avoidable here; it
    was the largest cost of a CPU sync. LoRA-merged weights are still computed fresh.
    """
    groups = group_entries(weight_entries(policy, trainable_only), int(bucket_mb * 2**20))
    with torch.no_grad():
        for group in groups:
            yield [(e.name, e.params[0].detach() if len(e.params) == 1 else e.make()) for e in group]


def check_bucket(bucket: Bucket, spec: BucketSpec) -> None:
    """Raise, naming the first difference, when ``bucket`` does not have the announced layout."""
    got = spec_of(bucket)
    if got == spec:
        return
    pairs = list(zip(got.tensors, spec.tensors))
    diff = next(((g, s) for g, s in pairs if g != s), None)
    detail = (
        f"{diff[0].name} {diff[0].shape} {diff[0].dtype} vs announced {diff[1].name} {diff[1].shape} {diff[1].dtype}"
        if diff
        else f"{len(got.tensors)} tensors vs {len(spec.tensors)} announced"
    )
    raise RuntimeError(f"a weight bucket differs from the layout sent to the rollout engines: {detail}")


def pack(bucket: Bucket, spec: BucketSpec, out: torch.Tensor) -> torch.Tensor:
    """Copy ``bucket``'s bytes into ``out[:spec.nbytes]`` (a ``uint8`` buffer, any device); returns that slice."""
    if out.dtype != torch.uint8 or out.numel() < spec.nbytes:
        raise ValueError(
            f"need a uint8 buffer of at least {spec.nbytes} bytes, got {out.dtype}[{out.numel()}]"
        )
    flat = out[: spec.nbytes]
    for (_, tensor), t in zip(bucket, spec.tensors):
        flat[t.offset : t.offset + t.nbytes].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
    return flat


def unpack(flat: torch.Tensor, spec: BucketSpec, copy: bool = False) -> Bucket:
    """The bucket inside a packed buffer: views into ``flat``, or their own copies with ``copy``.

    Views are valid until ``flat`` is reused; copy when the tensors outlive it or get pickled (a
    pickled view would carry the whole buffer).
    """
    out = []
    for t in spec.tensors:
        view = flat[t.offset : t.offset + t.nbytes].view(t.dtype).view(t.shape)
        out.append((t.name, view.clone() if copy else view))
    return out


def layout_summary(buckets: Sequence[BucketSpec]) -> str:
    """``"N tensors in B buckets, X MiB"``: for log lines and errors."""
    tensors = sum(len(b.tensors) for b in buckets)
    mib = sum(t.nbytes for b in buckets for t in b.tensors) / 2**20
    return f"{tensors} tensors in {len(buckets)} buckets, {mib:.1f} MiB"


def layout_to_plain(layout: WeightLayout) -> list:
    """``layout`` as lists of str/int only: what vLLM's ``collective_rpc`` can carry to its workers (msgpack)."""
    return [
        layout.device_type,
        [
            [b.nbytes, [[t.name, list(t.shape), str(t.dtype).removeprefix("torch."), t.offset, t.nbytes] for t in b.tensors]]
            for b in layout.buckets
        ],
    ]


def layout_from_plain(plain: Sequence) -> WeightLayout:
    """The inverse of ``layout_to_plain``."""
    device_type, buckets = plain
    return WeightLayout(
        tuple(
            BucketSpec(
                tuple(
                    TensorSpec(str(name), tuple(int(d) for d in shape), getattr(torch, dtype), int(offset), int(nbytes))
                    for name, shape, dtype, offset, nbytes in tensors
                ),
                int(nbytes_total),
            )
            for nbytes_total, tensors in buckets
        ),
        str(device_type),
    )
