"""The two ends of a weight sync, as the learner and rollout worker processes run them (no Ray here).

``LearnerWorker`` holds a ``SenderEndpoint`` and ``RolloutWorker`` a ``ReceiverEndpoint`` (the
collective transport's group membership, kept between calls); ``put_buckets`` / ``unpack_put`` are
the object-store transport's two ends. The workers' weight-sync methods are one-line calls into
these, so the logic stays here, testable without Ray, while ``raylign.sync.group`` drives both ends
through the actors.

Under ZeRO 0-2 the sender reads the learner's own tensors (``iter_bucket_views``): packing a bucket
is the one copy. Under ZeRO-3 it takes the learner's gathered copies, one bucket at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist

from raylign.sync.buckets import (
    Bucket,
    BucketSpec,
    WeightLayout,
    iter_bucket_views,
    layout_of,
    pack,
    spec_of,
    unpack,
)
from raylign.sync.collective import GroupSpec, WeightGroup, open_store, receive_buckets, send_buckets


class _Endpoint:
    """The current sync group of this process, if any."""

    def __init__(self) -> None:
        self.group: WeightGroup | None = None

    def leave(self) -> None:
        """Drop the current group (its peers' pending operations fail fast)."""
        if self.group is not None:
            self.group.close()
            self.group = None

    def _current(self, tag: str) -> WeightGroup:
        if self.group is None or self.group.spec.tag != tag or not self.group.alive:
            have = "none" if self.group is None else f"{self.group.spec.tag} (alive={self.group.alive})"
            raise RuntimeError(
                f"this process is not in live sync group {tag} (it has: {have}); rebuild the group"
            )
        return self.group


class SenderEndpoint(_Endpoint):
    """Learner side. Rank 0 opens the store and sends; other ranks only iterate buckets (ZeRO-3 gathers)."""

    def __init__(self) -> None:
        super().__init__()
        self._store: dist.TCPStore | None = None

    def open_store(self, timeout_s: float) -> int:
        """Start the next group's rendezvous store in this process; returns its port."""
        self._store = open_store(timeout_s)
        return int(self._store.port)

    def join(self, spec: GroupSpec, local_ip: str | None = None) -> None:
        """Join ``spec`` as rank 0 (blocks until every engine has joined), replacing any earlier group."""
        if self._store is None:
            raise RuntimeError("open_store() must come before join() on the sending learner")
        self.leave()
        store, self._store = self._store, None
        self.group = WeightGroup(spec, 0, store, local_ip)

    @staticmethod
    def layout(learner: Any, bucket_mb: float, trainable_only: bool) -> WeightLayout:
        """What ``learner.iter_weight_buckets(bucket_mb, trainable_only)`` will yield."""
        return WeightLayout(layout_of(learner.policy, bucket_mb, trainable_only), learner.device.type)

    def send(
        self, learner: Any, tag: str, layout: WeightLayout, bucket_mb: float, trainable_only: bool
    ) -> int:
        """Stream the learner's weights to group ``tag``; returns bytes sent (0 on ranks other than 0).

        Every learner rank must call this under ZeRO-3; other stages need rank 0 only.
        """
        zero3 = learner.learner_cfg.zero_stage == 3
        if learner.rank != 0:
            if zero3:
                send_buckets(learner.iter_weight_buckets(bucket_mb, trainable_only), layout, None)
            return 0
        return send_buckets(_source(learner, bucket_mb, trainable_only), layout, self._current(tag))


def _source(learner: Any, bucket_mb: float, trainable_only: bool) -> Iterator[Bucket]:
    """The learner's buckets: gathered copies under ZeRO-3, else views of its own tensors (packing copies them)."""
    if learner.learner_cfg.zero_stage == 3:
        return learner.iter_weight_buckets(bucket_mb, trainable_only)
    return iter_bucket_views(learner.policy, bucket_mb, trainable_only)


def put_buckets(
    learner: Any, bucket_mb: float, trainable_only: bool, put: Callable[[Any], Any]
) -> list[tuple[Any, int]]:
    """Object-store sync, learner side: each bucket packed into one byte array and ``put`` with its layout.

    Returns ``(put's result, weight bytes)`` per bucket on rank 0, [] elsewhere (where only ZeRO-3
    ranks need to iterate, to take part in the gathers). ``put`` (``ray.put``) must copy the array,
    as one buffer is reused for every bucket.
    """
    zero3 = learner.learner_cfg.zero_stage == 3
    if learner.rank != 0:
        for bucket in learner.iter_weight_buckets(bucket_mb, trainable_only) if zero3 else ():
            del bucket
        return []
    out, buffer = [], torch.empty(0, dtype=torch.uint8)
    for bucket in _source(learner, bucket_mb, trainable_only):
        spec = spec_of(bucket)
        if buffer.numel() < spec.nbytes:
            buffer = torch.empty(spec.nbytes, dtype=torch.uint8)
        flat = pack(bucket, spec, buffer)
        out.append((put((spec, flat.numpy())), sum(t.nbytes for t in spec.tensors)))
        del bucket
    return out


def unpack_put(obj: tuple[BucketSpec, np.ndarray], copy: bool = False) -> Bucket:
    """A bucket from what ``put_buckets`` stored; views into the (read-only, shared) array unless ``copy``."""
    spec, array = obj
    with warnings.catch_warnings():  # the object store's arrays are read-only; the views are only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        flat = torch.from_numpy(array)
    return unpack(flat, spec, copy)


class ReceiverEndpoint(_Endpoint):
    """Engine side: join a group, receive a sync into the engine, then take its version."""

    def join(self, spec: GroupSpec, rank: int, local_ip: str | None = None) -> None:
        """Join ``spec`` as ``rank`` (>= 1), replacing any earlier group."""
        self.leave()
        self.group = WeightGroup(spec, rank, None, local_ip)

    def receive(
        self,
        tag: str,
        layout: WeightLayout,
        load: Callable[[Bucket], int],
        set_version: Callable[[int], None],
        version: int,
        copy: bool = False,
    ) -> int:
        """Receive every bucket into ``load``, then ``set_version(version)``; returns the tensors loaded.

        On failure the group is closed (the sender learns at once) and the version is left alone.
        """
        loaded = receive_buckets(self._current(tag), layout, load, copy)
        if loaded != layout.num_tensors:
            raise RuntimeError(f"the engine loaded {loaded} of {layout.num_tensors} tensors")
        set_version(version)
        return loaded


@runtime_checkable
class EngineReceiver(Protocol):
    """An engine whose own processes receive a sync (vLLM's workers); its rollout worker only relays.

    ``weight_ranks``: how many members it adds to a sync group (vLLM: its tensor x pipeline parallel
    world), so the sender knows the group's size.
    """

    weight_ranks: int

    def join_weight_group(self, spec: GroupSpec, first_rank: int, local_ip: str | None = None) -> None: ...

    def receive_weights(self, tag: str, layout: WeightLayout, version: int) -> int: ...

    def leave_weight_group(self) -> None: ...
