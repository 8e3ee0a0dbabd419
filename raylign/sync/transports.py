"""How weights travel from the learner to the rollout engines: one small interface, three transports.

- ``inprocess``: learner and engine live in one process, so each bucket is loaded straight into
  the engine: this process (``num_learners == 0`` and rollout ``num_workers == 0``), or every
  learner actor with its own engine (``rollout.colocate``; ``raylign.sync.group.ColocatedTransport``).
- ``collective``: a torch.distributed group of learner rank 0 and every engine (gloo on CPU, NCCL
  on GPU); each bucket is one broadcast of one flat buffer (``raylign.sync.group``).
- ``object_store``: learner rank 0 ``ray.put`` s each bucket; each engine gets the list of
  references in one call and loads them one at a time (``raylign.sync.group``).

``auto`` picks ``inprocess`` when both sides are local or colocated, ``object_store`` when only the
engine is local (the driver holds it, so there is no process to broadcast to), else ``collective``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from raylign.config import SyncConfig
from raylign.sync.buckets import iter_bucket_views

Target = tuple[str, Any]  # (rollout worker id, its actor handle; or the in-process RolloutWorker)


class SyncError(RuntimeError):
    """A weight sync did not reach every engine.

    ``worker_ids``: the rollout workers at fault (every worker that missed the sync when no one
    is clearly at fault); ``unsynced``: every worker that missed it, collateral failures included.
    They get no work until a later sync reaches them; ``replaced`` maps a dead or stalled worker to
    the id of the worker started in its place.
    """

    def __init__(
        self,
        message: str,
        worker_ids: Sequence[str] = (),
        replaced: dict[str, str | None] | None = None,
        unsynced: Sequence[str] = (),
    ):
        super().__init__(message)
        self.worker_ids = list(worker_ids)
        self.replaced = dict(replaced or {})
        self.unsynced = list(unsynced)


@dataclass
class SendResult:
    """What one ``Transport.send`` achieved."""

    synced: list[str] = field(default_factory=list)  # workers that loaded every bucket and took the version
    failed: dict[str, str] = field(default_factory=dict)  # worker id -> what went wrong
    lost: list[str] = field(default_factory=list)  # failed workers that died or stalled (to be replaced)
    at_fault: list[str] = field(default_factory=list)  # failed by their own error, not a peer's
    sender_error: str | None = None  # the learner side failed
    bytes: int = 0  # weight bytes in this sync (sent once per engine)
    buckets: int = 0
    control_calls: int = 0  # remote method calls made for this sync (learner ranks and engines)


@dataclass
class Readiness:
    """Which targets have finished starting (a sync only goes to those; the others are not blamed)."""

    ready: list[Target] = field(default_factory=list)
    starting: list[str] = field(default_factory=list)  # still being constructed: synced by a later call
    dead: dict[str, str] = field(default_factory=dict)  # worker id -> why (found dead by its ping)
    control_calls: int = 0


class Transport(Protocol):
    """Moves the learner's current weights into rollout engines."""

    name: str

    def ready(self, targets: Sequence[Target], wait_s: float) -> Readiness:
        """Split ``targets`` by whether their engine is up, waiting up to ``wait_s`` for the starting ones."""
        ...

    def send(self, targets: Sequence[Target], version: int) -> SendResult:
        """Load the learner's weights into every target and set their version; never raises for a target's fault."""
        ...

    def close(self) -> None:
        """Release what the transport holds (process groups, stores)."""
        ...


class InProcessTransport:
    """The learner and the engine share this process: buckets go straight into ``engine.load_weights``.

    Under ZeRO 0-2 the engine copies straight out of the learner's tensors (no intermediate copy).
    """

    name = "inprocess"

    def __init__(self, learners: Any, rollouts: Any, cfg: SyncConfig, trainable_only: bool):
        if learners.local_learner is None or rollouts.local is None:
            raise ValueError(
                "sync.transport=inprocess needs learner.num_learners=0 and rollout.num_workers=0; "
                "use 'auto', 'collective' or 'object_store'"
            )
        self.learner, self.worker = learners.local_learner, rollouts.local
        self.bucket_mb, self.trainable_only = cfg.bucket_mb, trainable_only

    def ready(self, targets: Sequence[Target], wait_s: float) -> Readiness:
        return Readiness(ready=list(targets))

    def send(self, targets: Sequence[Target], version: int) -> SendResult:
        result = load_in_process(self.learner, self.worker, self.bucket_mb, self.trainable_only, version)
        result.synced = [worker_id for worker_id, _ in targets]
        return result

    def close(self) -> None:
        pass


def load_in_process(
    learner: Any, worker: Any, bucket_mb: float, trainable_only: bool, version: int
) -> SendResult:
    """Load ``learner``'s current weights into ``worker``'s engine, then set ``version`` (same process).

    Under ZeRO 0-2 the engine copies straight out of the learner's tensors; under ZeRO-3 each
    bucket is gathered first, a collective every learner rank must run. Returns bytes and buckets.
    """
    result = SendResult()
    if learner.learner_cfg.zero_stage == 3:
        buckets = learner.iter_weight_buckets(bucket_mb, trainable_only)
    else:
        buckets = iter_bucket_views(learner.policy, bucket_mb, trainable_only)
    for bucket in buckets:
        worker.load_weights(bucket)
        result.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        result.buckets += 1
        del bucket
    worker.set_version(version)
    return result


def resolve_transport(kind: str, learners_local: bool, rollouts_local: bool, colocated: bool = False) -> str:
    """The transport ``kind`` means for this placement (``auto`` resolved; impossible choices refused).

    ``colocated``: every engine lives inside a learner actor (``rollout.colocate``), so only
    ``inprocess`` fits: there is no second process to send to.
    """
    if colocated:
        if kind not in ("auto", "inprocess"):
            raise ValueError(
                f"sync.transport={kind} cannot reach engines that live inside the learner actors "
                "(rollout.colocate); use 'auto' or 'inprocess'"
            )
        return "inprocess"
    if kind == "auto":
        if rollouts_local:
            return "inprocess" if learners_local else "object_store"
        return "collective"
    if kind == "inprocess" and not (learners_local and rollouts_local):
        raise ValueError(
            "sync.transport=inprocess needs learner.num_learners=0 and rollout.num_workers=0, or "
            "rollout.colocate; use 'auto'"
        )
    if kind == "collective" and rollouts_local:
        raise ValueError(
            "sync.transport=collective needs rollout workers in their own processes (rollout.num_workers > 0); "
            "with an in-process engine use 'auto' or 'object_store'"
        )
    if kind not in ("inprocess", "collective", "object_store"):
        raise ValueError(f"unknown sync.transport {kind!r}; use auto, collective, object_store or inprocess")
    return kind


def make_transport(learners: Any, rollouts: Any, cfg: SyncConfig, trainable_only: bool) -> Transport:
    """The transport ``cfg.transport`` names for these groups (Ray is imported only for the remote ones)."""
    colocated = rollouts.colocated
    local = (learners.local_learner is not None, rollouts.local is not None)
    kind = resolve_transport(cfg.transport, *local, colocated)
    if kind == "inprocess" and not colocated:
        return InProcessTransport(learners, rollouts, cfg, trainable_only)
    from raylign.sync.group import CollectiveTransport, ColocatedTransport, ObjectStoreTransport

    if colocated:
        return ColocatedTransport(learners, rollouts, cfg, trainable_only)
    cls = CollectiveTransport if kind == "collective" else ObjectStoreTransport
    return cls(learners, rollouts, cfg, trainable_only)
