"""The Ray side of weight sync: the transports that drive learner and rollout actors.

Each makes ONE control call per engine per sync (and one per learner rank, every rank taking part
under ZeRO-3); the weights themselves move in buckets, over a process group (``collective``),
through the object store (``object_store``), or not between processes at all (``ColocatedTransport``:
each learner actor loads the engine it holds). Each phase waits at most ``cfg.timeout_s``; a call
that has not answered by then is *stalled*. The outcome is a ``SendResult``: receivers that died
or stalled are listed in ``lost`` (the broadcaster replaces them), other failures in ``failed``,
and a learner-side failure in ``sender_error``. A group that saw any failure is never reused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
import torch.distributed as dist
from ray.exceptions import RayActorError

from raylign.config import SyncConfig
from raylign.sync.buckets import WeightLayout
from raylign.sync.collective import Backend, GroupError, GroupSpec
from raylign.sync.transports import Readiness, SendResult, Target

logger = logging.getLogger(__name__)

# Share of cfg.timeout_s one collective operation may take: it times out, and the others learn
# of it, before the driver's own deadline, so the driver can tell who stalled.
OP_TIMEOUT_SHARE = 0.8


def _short(err: BaseException) -> str:
    """An error's type and the last line of its message (where Ray states the reason), without Ray's wrapper."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def _collateral(err: BaseException) -> bool:
    """True for a group failure that another member's failure can cause (closed connection, rendezvous timeout)."""
    cause = getattr(err, "cause", None) or err
    return isinstance(cause, (GroupError, dist.DistError))


class _Calls:
    """The remote (or inline, in-process) calls of one phase, by label, with their outcome."""

    def __init__(self) -> None:
        self.refs: dict[Any, str] = {}
        self.results: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}

    def __len__(self) -> int:
        return len(self.refs) + len(self.results) + len(self.errors)

    def add(self, label: str, ref: Any) -> None:
        self.refs[ref] = label

    def run_inline(self, label: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run a local worker's method now (after the remote calls it needs were started)."""
        try:
            self.results[label] = fn(*args)
        except Exception as err:  # noqa: BLE001 - recorded; the transport reports it as a sync failure
            self.errors[label] = err

    def wait(self, deadline: float) -> list[str]:
        """Collect answers until all are in or ``deadline`` (monotonic) passes; returns the labels still pending."""
        pending = list(self.refs)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
            for ref in ready:
                label = self.refs[ref]
                try:
                    self.results[label] = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - recorded; classified by the transport
                    self.errors[label] = err
        return [self.refs[ref] for ref in pending]


class _RemoteTransport:
    """What both remote transports share: the learner ranks, deadlines and the outcome of a phase."""

    name = ""

    def __init__(self, learners: Any, rollouts: Any, cfg: SyncConfig, trainable_only: bool):
        self.learners, self.rollouts, self.cfg = learners, rollouts, cfg
        self.trainable_only = trainable_only
        self.local_learner = learners.local_worker  # a LearnerWorker in this process, or None
        self._up: set[str] = set()  # rollout workers known to have finished starting
        self._ranks: dict[str, int] = {}  # worker id -> sync-group ranks its engine takes (from its ping)
        self._pings: dict[str, Any] = {}  # worker id -> its pending readiness ping

    def ready(self, targets: Sequence[Target], wait_s: float) -> Readiness:
        """Ping each worker not seen up yet, once; wait up to ``wait_s`` for the new pings (not for older ones).

        A ping answers once the worker's constructor and earlier calls are done, so a worker that
        stays silent is *starting*: it is left out of this sync, and never blamed for it.
        """
        if self.rollouts.local is not None:
            return Readiness(ready=list(targets))
        out = Readiness()
        live = {w for w, _ in self.rollouts.workers}  # forget workers that left the group
        self._pings = {w: ref for w, ref in self._pings.items() if w in live}
        self._up &= live
        new = []
        for worker_id, handle in targets:
            if worker_id not in self._up and worker_id not in self._pings:
                self._pings[worker_id] = handle.ping.remote()
                new.append(self._pings[worker_id])
        out.control_calls = len(new)
        if new:
            ray.wait(new, num_returns=len(new), timeout=wait_s)
        for worker_id, handle in targets:
            ref = self._pings.get(worker_id)
            if ref is not None and ray.wait([ref], timeout=0)[0]:
                del self._pings[worker_id]
                try:
                    info = ray.get(ref)
                    self._ranks[worker_id] = int(info.get("weight_ranks", 1))
                    self._up.add(worker_id)
                except RayActorError as err:
                    out.dead[worker_id] = _short(err)
            if worker_id in self._up:
                out.ready.append((worker_id, handle))
            elif worker_id not in out.dead:
                out.starting.append(worker_id)
        return out

    def _deadline(self) -> float:
        return time.monotonic() + self.cfg.timeout_s

    def _on_learners(
        self, calls: _Calls, method: Callable[[Any], Callable[..., Any]], *args: Any, rank0_only: bool = False
    ) -> None:
        """Call ``method(worker)(*args)`` on every learner rank (or rank 0), remote or inline."""
        if self.local_learner is not None:
            calls.run_inline("learner rank 0", method(self.local_learner), *args)
            return
        actors = self.learners.actors[:1] if rank0_only else self.learners.actors
        for rank, actor in enumerate(actors):
            calls.add(f"learner rank {rank}", method(actor).remote(*args))

    def _outcome(
        self,
        calls: _Calls,
        pending: list[str],
        targets: Sequence[Target],
        result: SendResult,
        expect: Callable[[Any], bool] = lambda _: True,
    ) -> bool:
        """Fill ``result`` from one phase; True when every learner and target succeeded."""
        learner_stalled = False
        labels = sorted({*calls.refs.values(), *calls.results, *calls.errors})
        for label in [lb for lb in labels if lb.startswith("learner")]:
            if label in calls.errors and result.sender_error is None:
                result.sender_error = f"{label}: {_short(calls.errors[label])}"
            elif label in pending:
                learner_stalled = True
                result.sender_error = result.sender_error or (
                    f"{label} did not finish within sync.timeout_s={self.cfg.timeout_s:g}s"
                )
        for worker_id, _ in targets:
            if worker_id in calls.results and expect(calls.results[worker_id]):
                continue
            if worker_id in calls.results:
                result.failed[worker_id] = f"unexpected answer {calls.results[worker_id]!r}"
            elif worker_id in calls.errors:
                err = calls.errors[worker_id]
                dead = isinstance(err, RayActorError)
                result.failed[worker_id] = ("died: " if dead else "") + _short(err)
                result.lost += [worker_id] if dead else []
                if dead or not _collateral(err):
                    result.at_fault.append(worker_id)
            elif worker_id in pending:
                result.failed[worker_id] = f"stalled: no answer within sync.timeout_s={self.cfg.timeout_s:g}s"
                if not learner_stalled:  # it was not just waiting for a stalled sender
                    result.lost.append(worker_id)
                    result.at_fault.append(worker_id)
        return result.sender_error is None and not result.failed

    def close(self) -> None:
        pass


class CollectiveTransport(_RemoteTransport):
    """Learner rank 0 broadcasts each bucket over a process group with every engine (gloo or NCCL)."""

    name = "collective"

    def __init__(self, learners: Any, rollouts: Any, cfg: SyncConfig, trainable_only: bool):
        super().__init__(learners, rollouts, cfg, trainable_only)
        self.gpu_engines = rollouts.resources.num_gpus > 0
        self.layout: WeightLayout | None = None
        self.members: tuple[str, ...] | None = None  # worker ids of the live group, in rank order
        self.spec: GroupSpec | None = None
        self._handles: list[Any] = []  # everyone in the live group, to leave it on close()

    def _backend(self, layout: WeightLayout) -> Backend:
        """NCCL when the learner and every engine hold GPUs, else gloo (through host memory)."""
        return "nccl" if layout.device_type == "cuda" and self.gpu_engines else "gloo"

    def _fetch_layout(self, result: SendResult) -> WeightLayout | None:
        calls = _Calls()
        self._on_learners(
            calls, lambda w: w.weight_layout, self.cfg.bucket_mb, self.trainable_only, rank0_only=True
        )
        result.control_calls += len(calls)
        pending = calls.wait(self._deadline())
        if not self._outcome(calls, pending, [], result):
            return None
        self.layout = calls.results["learner rank 0"]
        return self.layout

    def _build_group(self, targets: Sequence[Target], layout: WeightLayout, result: SendResult) -> bool:
        """A new group: a store on learner rank 0, then everyone joins at once (rank 0 = the learner)."""
        self.members, self.spec = None, None
        calls = _Calls()
        self._on_learners(
            calls, lambda w: w.open_weight_store, self.cfg.timeout_s * OP_TIMEOUT_SHARE, rank0_only=True
        )
        result.control_calls += 1
        if not self._outcome(calls, calls.wait(self._deadline()), [], result):
            return False
        host, port = calls.results["learner rank 0"]
        ranks = [self._ranks.get(worker_id, 1) for worker_id, _ in targets]  # vLLM: one per worker process
        spec = GroupSpec(
            host,
            port,
            sum(ranks) + 1,
            self._backend(layout),
            self.cfg.timeout_s * OP_TIMEOUT_SHARE,
        )
        calls = _Calls()
        first = 1
        for (worker_id, handle), n in zip(targets, ranks):
            calls.add(worker_id, handle.join_weight_group.remote(spec, first))
            first += n
        self._on_learners(calls, lambda w: w.join_weight_group, spec, rank0_only=True)
        result.control_calls += len(calls)
        if not self._outcome(calls, calls.wait(self._deadline()), targets, result):
            return False
        self.members, self.spec = tuple(w for w, _ in targets), spec
        self._handles = [h for _, h in targets]
        logger.info(
            "weight sync group %s: learner rank 0 + %d engines (%s)", spec.tag, len(targets), spec.backend
        )
        return True

    def send(self, targets: Sequence[Target], version: int) -> SendResult:
        result = SendResult()
        layout = self.layout or self._fetch_layout(result)
        if layout is None or not targets:
            return result
        if self.members != tuple(w for w, _ in targets) and not self._build_group(targets, layout, result):
            return result
        assert self.spec is not None
        calls = _Calls()
        for worker_id, handle in targets:  # the receivers first: an in-process sender blocks
            calls.add(worker_id, handle.receive_weights.remote(self.spec.tag, layout, version))
        self._on_learners(
            calls, lambda w: w.send_weights, self.spec.tag, layout, self.cfg.bucket_mb, self.trainable_only
        )
        result.control_calls += len(calls)
        ok = self._outcome(calls, calls.wait(self._deadline()), targets, result, lambda v: v == version)
        result.synced = (
            [w for w, _ in targets if w not in result.failed] if result.sender_error is None else []
        )
        result.bytes, result.buckets = layout.nbytes, len(layout.buckets)
        if not ok:
            self.members, self.spec = None, None  # never reuse a group that saw a failure
        return result

    def close(self) -> None:
        """Every member drops the group (a member that is gone is skipped, and logged)."""
        calls = _Calls()
        for i, handle in enumerate(self._handles):
            calls.add(f"engine {i}", handle.leave_weight_group.remote())
        if self.layout is not None:  # the learner was reached, so it may hold a group
            self._on_learners(calls, lambda w: w.leave_weight_group, rank0_only=True)
        pending = calls.wait(time.monotonic() + min(self.cfg.timeout_s, 10.0))
        for label, err in calls.errors.items():
            logger.warning("weight sync close: %s could not leave its group (%s)", label, _short(err))
        if pending:
            logger.warning("weight sync close: %s did not answer; leaving them", pending)
        self.members, self.spec, self._handles = None, None, []


class ObjectStoreTransport(_RemoteTransport):
    """Learner rank 0 puts each bucket in the object store; each engine loads the references in one call."""

    name = "object_store"

    def send(self, targets: Sequence[Target], version: int) -> SendResult:
        result = SendResult()
        if not targets:
            return result
        calls = _Calls()
        self._on_learners(calls, lambda w: w.put_weights, self.cfg.bucket_mb, self.trainable_only)
        result.control_calls += len(calls)
        if not self._outcome(calls, calls.wait(self._deadline()), [], result):
            return result
        put: list[tuple[Any, int]] = calls.results["learner rank 0"]
        refs = [ref for ref, _ in put]
        result.bytes, result.buckets = sum(n for _, n in put), len(put)
        calls = _Calls()
        local = self.rollouts.local
        if local is not None:  # the engine is in this process
            calls.run_inline(targets[0][0], local.load_weight_refs, refs, version)
        else:
            for worker_id, handle in targets:
                calls.add(worker_id, handle.load_weight_refs.remote(refs, version))
        result.control_calls += len(calls.refs)
        self._outcome(calls, calls.wait(self._deadline()), targets, result, lambda v: v == version)
        result.synced = [w for w, _ in targets if w not in result.failed]
        return result


class ColocatedTransport(_RemoteTransport):
    """``rollout.colocate``: each learner actor loads the engine it holds, from its own rank's weights.

    One call per learner actor (every rank: ZeRO-3 gathers need all of them); the weights never
    leave a process, so there is no weight group and nothing crosses the network. Each rank's
    engine gets the full weights (ZeRO 0-2 hold them; ZeRO-3 gathers them over the learners'
    own group, as for a checkpoint).
    """

    name = "inprocess"

    def send(self, targets: Sequence[Target], version: int) -> SendResult:
        result = SendResult()
        if not targets:
            return result
        calls, args = _Calls(), (self.cfg.bucket_mb, self.trainable_only, version)
        for worker_id, handle in self.rollouts.workers:  # every rank takes part, synced or not
            calls.add(worker_id, handle.load_engine_weights.remote(*args))
        result.control_calls += len(calls)
        self._outcome(calls, calls.wait(self._deadline()), targets, result, lambda v: v[0] == version)
        result.synced = [w for w, _ in targets if w not in result.failed]
        answers = [calls.results[w] for w in result.synced]
        if answers:  # (version, bytes, buckets) per engine; every engine loads the same weights
            _, result.bytes, result.buckets = answers[0]
        return result
