"""A torch.distributed group of its own for weight sync: learner rank 0 sends, every engine receives.

Learner rank 0 already belongs to the default process group (its DeepSpeed data-parallel group),
so the sync group is built beside it, not through ``init_process_group``: a ``TCPStore`` on learner
rank 0's node and a ``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL`` (GPU) over it, rank 0 the
sender and ranks 1..N the engines. Each bucket is one broadcast of one flat buffer
(``raylign.sync.buckets``).

Failure handling, because a collective with a dead member blocks everyone else:
- every operation has the group's timeout, so a stalled peer costs at most that long;
- a process whose operation fails drops its group at once; closing its sockets makes the others'
  pending operations fail within milliseconds instead of waiting for their own timeouts;
- the sender keeps *iterating* the buckets after a failure (without sending): under ZeRO-3 each
  bucket is a gather that every learner rank must reach, so stopping early would wedge the others.
A failed group is never reused; the broadcaster builds a new one (new store, new ranks).
"""

from __future__ import annotations

import datetime
import gc
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from raylign.sync.buckets import Bucket, WeightLayout, check_bucket, pack, unpack

Backend = Literal["gloo", "nccl"]


class GroupError(RuntimeError):
    """A sync group operation failed: often only because another member failed first."""


@dataclass(frozen=True)
class GroupSpec:
    """How every member joins one sync group (picklable: it travels in the join calls)."""

    host: str  # the store's address (learner rank 0's node)
    port: int
    world_size: int  # 1 sender + the receiving engines
    backend: Backend = "gloo"
    timeout_s: float = 120.0  # per operation, and for the rendezvous
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # store key prefix; unique per group


def open_store(timeout_s: float, host: str = "0.0.0.0") -> dist.TCPStore:
    """The group's rendezvous store, listening on a port the OS picks (``store.port``); keep it alive."""
    return dist.TCPStore(
        host, 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
    )


class WeightGroup:
    """This process's membership (``rank``) in one sync group; ``store`` is the master store on rank 0.

    ``local_ip``: the address gloo binds to (this node's IP as the cluster sees it); None lets gloo
    pick from the hostname, which can be a loopback address inside containers.
    """

    def __init__(
        self, spec: GroupSpec, rank: int, store: dist.Store | None = None, local_ip: str | None = None
    ):
        self.spec, self.rank = spec, rank
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        if store is None:
            store = dist.TCPStore(spec.host, spec.port, is_master=False, timeout=timeout)
        self._store = store  # the master store must outlive the group on rank 0
        prefixed = dist.PrefixStore(f"raylign-sync/{spec.tag}/", store)
        self._pg: Any = _make_pg(spec, rank, prefixed, timeout, local_ip)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if spec.backend == "nccl"
            else torch.device("cpu")
        )

    @property
    def alive(self) -> bool:
        return self._pg is not None

    def start(self, flat: torch.Tensor) -> Any:
        """Begin broadcasting ``flat`` (on ``self.device``) from rank 0; returns the pending work for ``finish``."""
        if self._pg is None:
            raise GroupError(f"sync group {self.spec.tag} was closed after an earlier failure")
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        return self._pg.broadcast([flat], opts)

    def finish(self, work: Any) -> None:
        """Wait for a started broadcast; raises ``GroupError`` on failure or time-out (the caller closes the group).

        NCCL: ``wait(timeout)`` blocks this thread and raises on time-out, before NCCL's watchdog
        (whose own timeout is set longer) would tear the process down.
        """
        try:
            work.wait(datetime.timedelta(seconds=self.spec.timeout_s))
            return
        except Exception as err:  # noqa: BLE001 - raised below as a GroupError
            message = str(err)
        del work  # the traceback must not keep the work (and its connections) alive
        raise GroupError(f"sync group {self.spec.tag}, rank {self.rank}: {message}")

    def broadcast(self, flat: torch.Tensor) -> None:
        """``start`` + ``finish``; on failure the group is closed, then the error raised."""
        try:
            self.finish(self.start(flat))
        except GroupError:
            self.close()
            raise

    def close(self) -> None:
        """Drop the process group now (closes its connections, so peers fail fast); idempotent."""
        pg, self._pg = self._pg, None
        if pg is None:
            return
        if self.spec.backend == "nccl":
            pg.abort()  # gloo has nothing to abort; dropping it closes its sockets
        del pg
        gc.collect()  # a traceback may still reference it through a cycle
        self._store = None


def _make_pg(
    spec: GroupSpec, rank: int, store: dist.Store, timeout: datetime.timedelta, local_ip: str | None
):
    """A process group that is not registered with torch.distributed (no default group involved)."""
    if spec.backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        device = (
            dist.ProcessGroupGloo.create_device(hostname=local_ip)
            if local_ip
            else (dist.ProcessGroupGloo.create_default_device())
        )
        opts._devices = [device]
        return dist.ProcessGroupGloo(store, rank, spec.world_size, opts)
    if spec.backend == "nccl":
        from torch.distributed import ProcessGroupNCCL  # only in CUDA builds of torch

        opts = ProcessGroupNCCL.Options()
        opts._timeout = timeout * 2 + datetime.timedelta(seconds=30)  # our own wait() times out first
        opts.is_high_priority_stream = False
        return ProcessGroupNCCL(store, rank, spec.world_size, opts)
    raise ValueError(f"unknown sync backend {spec.backend!r}; use 'gloo' or 'nccl'")


def send_buckets(buckets: Iterable[Bucket], layout: WeightLayout, group: WeightGroup | None) -> int:
    """Iterate every bucket; with ``group`` (learner rank 0) pack and broadcast each; returns bytes sent.

    Two buffers alternate: bucket k+1 is gathered and packed while bucket k is on the wire. After a
    failure the remaining buckets are still iterated, not sent (see the module docstring), and the
    first error is raised at the end.
    """
    error: str | None = None
    buffers: list[torch.Tensor] = []
    pending: tuple[Any, int] | None = None  # the previous bucket's broadcast, and its index
    sent, index, at = 0, -1, 0
    for index, bucket in enumerate(buckets):
        if group is not None and error is None:
            try:
                at = index
                if index >= len(layout.buckets):
                    raise RuntimeError(
                        f"the learner produced more than the {len(layout.buckets)} announced buckets"
                    )
                spec = layout.buckets[index]
                check_bucket(bucket, spec)
                if len(buffers) < 2:
                    buffers.append(
                        torch.empty(layout.max_bucket_bytes, dtype=torch.uint8, device=group.device)
                    )
                # Bucket k's buffer was last used by bucket k-2, whose broadcast finished at step k-1.
                work = (group.start(pack(bucket, spec, buffers[index % 2])), index)
                if pending is not None:
                    at = pending[1]
                    group.finish(pending[0])
                pending, work = work, None
                sent += sum(t.nbytes for t in spec.tensors)
            except Exception as err:  # noqa: BLE001 - raised below, once every bucket has been iterated
                error, pending, work = f"bucket {at}: {err}", None, None
                group.close()
        del bucket  # free it before the next one is gathered
    if group is not None and error is None:
        try:
            if pending is not None:
                at = pending[1]
                group.finish(pending[0])
            if index + 1 != len(layout.buckets):
                raise RuntimeError(
                    f"the learner produced {index + 1} buckets, {len(layout.buckets)} were announced"
                )
        except Exception as err:  # noqa: BLE001 - raised below
            error, pending = f"bucket {at}: {err}", None
            group.close()
    if error is not None:
        raise RuntimeError(f"weight sync send failed at {error}")
    return sent


def receive_buckets(
    group: WeightGroup, layout: WeightLayout, load: Callable[[Bucket], int], copy: bool = False
) -> int:
    """Receive every bucket of ``layout`` and hand each to ``load`` (an engine's ``load_weights``); returns its count.

    Bucket k+1 is received into the other of two buffers while bucket k is loaded. ``copy``: give
    ``load`` tensors of their own instead of views into the reused buffers. On failure the group is
    closed (so the sender stops at once) and the error raised.
    """
    specs = layout.buckets
    buffers = [
        torch.empty(layout.max_bucket_bytes, dtype=torch.uint8, device=group.device) for _ in specs[:2]
    ]
    loaded, pending = 0, None
    try:
        pending = group.start(buffers[0][: specs[0].nbytes]) if specs else None
        for k, spec in enumerate(specs):
            group.finish(pending)
            pending = None
            if k + 1 < len(specs):
                pending = group.start(buffers[(k + 1) % 2][: specs[k + 1].nbytes])
            loaded += load(unpack(buffers[k % 2][: spec.nbytes], spec, copy))
    except Exception:  # close the group so the sender stops at once, then re-raise
        pending = None
        group.close()
        raise
    return loaded
