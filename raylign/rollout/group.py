"""``RolloutGroup``: spread prompt requests over N rollout worker actors, exactly once, elastically.

The driver submits requests and collects rollouts later, so generation overlaps training::

    tickets = group.submit(requests)       # returns at once
    ...                                    # train on the previous batch
    rollouts = group.wait(timeout=60.0)    # what has finished (submission order)

or ``group.generate(requests)`` for a blocking call that returns rollouts in request order.

Work moves in *chunks* (up to ``chunk_size`` prompts; a prompt's ``n`` samples never split), at most
``max_inflight_per_worker`` chunks queued per actor; the rest waits here, so ``submit``, ``wait``
and ``poll`` keep the workers fed (call ``poll()`` from a long loop that does not ``wait``).

Exactly once: every request has a ticket that is outstanding until one result is recorded. A worker
that dies (``RayActorError``) is replaced and the tickets of its unfinished calls go back to the
front of the queue (``requeued``); a result for a ticket that is already done is dropped and
counted (``duplicates_dropped``). ``remove_workers`` drains: a removed worker gets no new work and
is killed once its calls have returned.

Weights: a new or replacement worker starts from the checkpoint (``initial_version``). While the
group's policy version is newer, that worker is listed by ``workers_needing_sync()`` and gets no
work until ``mark_synced(ids, version)``; the weight broadcaster uses these plus ``workers``. A
worker is only sent work while its version equals the group's (latest synced) version.

``num_workers=0`` runs one engine in this process, without Ray; ``wait``/``generate`` then run the
queued requests synchronously. ``actors=`` runs the engines inside existing actors instead (the
learner actors of ``rollout.colocate``, each given ``start_engine(spec, worker_id)``): the group
never starts, replaces or kills one, and a dead one is dropped (its learner died with it).
Not thread-safe: one driver thread uses a group.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError

from raylign.placement import DEFAULT_RESOURCE_TIMEOUT_S, ResourceRequest, bundle, release, reserve
from raylign.protocol import Rollout, RolloutRequest
from raylign.rollout.engine import EngineSpec, NamedTensors
from raylign.rollout.worker import RolloutWorker, WorkerResources, start_rollout_worker

logger = logging.getLogger(__name__)


@dataclass
class _Worker:
    id: str
    handle: ray.actor.ActorHandle
    version: int
    inflight: dict = field(default_factory=dict)  # ObjectRef -> tickets of that generate call
    draining: bool = False


class RolloutGroup:
    """N rollout worker actors (or one in-process engine) behind one submit/wait interface."""

    def __init__(
        self,
        num_workers: int,
        spec: EngineSpec,
        resources: WorkerResources | None = None,
        chunk_size: int = 4,
        max_inflight_per_worker: int = 2,
        max_consecutive_failures: int = 3,
        resource_timeout_s: float = DEFAULT_RESOURCE_TIMEOUT_S,
        actors: Sequence[ray.actor.ActorHandle] | None = None,
    ):
        if num_workers < 0 or chunk_size < 1 or max_inflight_per_worker < 1:
            raise ValueError("need num_workers >= 0, chunk_size >= 1, max_inflight_per_worker >= 1")
        if actors is not None and len(actors) != num_workers:
            raise ValueError(f"num_workers={num_workers} but {len(actors)} actors to host the engines")
        self.spec = spec
        self.resources = resources or WorkerResources()
        self.chunk_size = chunk_size
        self.max_inflight_per_worker = max_inflight_per_worker
        self.max_consecutive_failures = max_consecutive_failures
        self.resource_timeout_s = resource_timeout_s  # bound on reserving each worker's resources
        self._placements: dict[str, object] = {}  # worker id -> its reserved placement group
        self.initial_version = int(spec.kwargs.get("version", 0))
        self.version = self.initial_version  # latest version marked synced
        self.restarts = 0  # workers replaced after dying
        self.requeued = 0  # requests sent again because their worker died
        self.duplicates_dropped = 0
        self._failures_in_a_row = 0
        self._requests: dict[int, RolloutRequest] = {}  # outstanding tickets (queued or in flight)
        self._pending: deque[int] = deque()
        self._done: dict[int, Rollout] = {}
        self._next_ticket = 0
        self._next_worker = 0
        self._workers: list[_Worker] = []
        self._owner: dict = {}  # ObjectRef -> _Worker
        self.colocated = actors is not None  # the engines live in actors someone else owns
        self.local: RolloutWorker | None = (
            RolloutWorker(spec, "local") if num_workers == 0 and not self.colocated else None
        )
        if self.colocated:  # engines built in place, now: a bad spec fails here, with its own error
            ray.get([self._adopt(handle) for handle in actors or ()])
        else:
            self.add_workers(num_workers)

    # ---- membership -------------------------------------------------------------------------

    @property
    def workers(self) -> list[tuple[str, ray.actor.ActorHandle]]:
        """``(worker_id, actor handle)`` of every worker that takes work (draining ones excluded)."""
        return [(w.id, w.handle) for w in self._workers if not w.draining]

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def resizable(self) -> bool:
        """Whether workers can be added and removed (not in-process, not inside the learner actors)."""
        return self.local is None and not self.colocated

    def add_workers(self, k: int) -> list[str]:
        """Start ``k`` workers; they take work once synced (at once while no update has happened)."""
        if self.local is not None and k:
            raise ValueError("an in-process RolloutGroup (num_workers=0) cannot add workers")
        if self.colocated and k:
            raise ValueError("colocated engines live in the learner actors, one each: there is none to add")
        return [self._start_worker().id for _ in range(k)]

    def remove_workers(self, k: int = 0, worker_ids: Sequence[str] = ()) -> list[str]:
        """Stop sending work to ``worker_ids``, or to ``k`` workers (unsynced, then least busy first).

        Each is killed once its in-flight calls have returned (their results are kept).
        """
        if self.colocated:
            raise ValueError("colocated engines live in the learner actors, one each: none can be removed")
        live = [w for w in self._workers if not w.draining]
        if worker_ids:
            unknown = set(worker_ids) - {w.id for w in live}
            if unknown:
                raise KeyError(f"no live rollout workers {sorted(unknown)}; current: {[w.id for w in live]}")
            chosen = [w for w in live if w.id in set(worker_ids)]
        else:
            live.sort(key=lambda w: (w.version == self.version, len(w.inflight)))
            chosen = live[:k]
        if k > len(live):
            raise ValueError(f"cannot remove {k} of {len(live)} rollout workers")
        if self._requests and len(chosen) == len(live):
            raise ValueError(
                f"cannot remove every rollout worker while {len(self._requests)} requests are outstanding"
            )
        for w in chosen:
            w.draining = True
            self._retire_if_idle(w)
        return [w.id for w in chosen]

    def replace_worker(self, worker_id: str, reason: str = "reported dead") -> str | None:
        """Replace a worker found dead elsewhere (e.g. by the weight broadcaster); returns the new id.

        Its unfinished requests are re-queued, as when the group notices a death itself. A draining
        worker is not replaced (None).
        """
        w = next((w for w in self._workers if w.id == worker_id), None)
        if w is None:
            raise KeyError(f"unknown rollout worker {worker_id!r}; current: {[w.id for w in self._workers]}")
        new = self._fail(w, RuntimeError(reason))
        return None if new is None else new.id

    def workers_needing_sync(self) -> list[str]:
        """Ids of workers whose weights are older than the group's version (they get no work)."""
        return [w.id for w in self._workers if not w.draining and w.version != self.version]

    def mark_synced(self, worker_ids: Sequence[str], version: int) -> None:
        """Record that ``worker_ids`` now hold ``version`` (the group's version becomes at least that)."""
        by_id = {w.id: w for w in self._workers}
        unknown = [i for i in worker_ids if i not in by_id]
        if unknown:
            raise KeyError(f"unknown rollout workers {unknown}; current: {sorted(by_id)}")
        for i in worker_ids:
            by_id[i].version = int(version)
        self.version = max(self.version, int(version))
        self._dispatch()

    def load_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """Simple sync: put the tensors in the object store once, load them into every worker.

        Blocks until each worker finished its queued calls and loaded. Workers that die meanwhile are
        replaced and loaded too. (The ``WeightBroadcaster`` streams buckets instead.)
        """
        if self.local is not None:
            self.local.load_weights(named_tensors, version)
            self.version = int(version)
            return
        ref = ray.put(list(named_tensors))
        self.version = max(self.version, int(version))
        for _ in range(self.max_consecutive_failures + 1):
            targets = [w for w in self._workers if not w.draining and w.version != version]
            if not targets:
                break
            calls = {w.handle.load_weights.remote(ref, version): w for w in targets}
            for call, w in calls.items():
                try:
                    ray.get(call)
                    w.version = int(version)
                except RayActorError as err:
                    self._fail(w, err)
        self._dispatch()

    def sleep(self) -> None:
        """Ask every engine to release accelerator memory (after its queued calls have run)."""
        self._on_all("sleep")

    def wake(self) -> None:
        """Reacquire what ``sleep`` released, on every engine."""
        self._on_all("wake")

    def _on_all(self, method: str) -> None:
        if self.local is not None:
            getattr(self.local, method)()
            return
        ray.get([getattr(h, method).remote() for _, h in self.workers])

    def shutdown(self) -> None:
        """Kill every worker (colocated ones are left to their owner); outstanding requests are dropped."""
        for w in self._workers if not self.colocated else ():
            self._kill(w)
        self._workers.clear()
        self._owner.clear()

    # ---- requests ---------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Requests submitted and not finished (queued here or in flight)."""
        return len(self._requests)

    def submit(self, requests: Sequence[RolloutRequest]) -> list[int]:
        """Queue requests; returns one ticket per request and starts as many calls as capacity allows."""
        tickets = []
        for r in requests:
            self._requests[self._next_ticket] = r
            self._pending.append(self._next_ticket)
            tickets.append(self._next_ticket)
            self._next_ticket += 1
        self._dispatch()
        return tickets

    def poll(self) -> None:
        """Collect finished calls and start new ones, without blocking."""
        self._pump(lambda: True, timeout=0.0)

    def wait(self, timeout: float | None = None, num: int | None = None) -> list[Rollout]:
        """Finished rollouts not yet returned, in submission order.

        Blocks until ``num`` are finished (default: everything outstanding) or ``timeout`` seconds pass.
        """
        everything = len(self._done) + len(self._requests)
        target = everything if num is None else min(num, everything)
        self._pump(lambda: len(self._done) >= target, timeout)
        return [self._done.pop(t) for t in sorted(self._done)]

    def generate(self, requests: Sequence[RolloutRequest]) -> list[Rollout]:
        """Blocking: one Rollout per request, in request order (other finished results stay queued)."""
        tickets = self.submit(requests)
        self._pump(lambda: all(t in self._done for t in tickets), timeout=None)
        return [self._done.pop(t) for t in tickets]

    def stats(self) -> dict[str, int]:
        return {
            "workers": self.num_workers,
            "restarts": self.restarts,
            "requeued": self.requeued,
            "duplicates_dropped": self.duplicates_dropped,
            "outstanding": self.outstanding,
            "inflight_calls": sum(len(w.inflight) for w in self._workers),
        }

    # ---- internals --------------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        def start(worker_id: str) -> ray.actor.ActorHandle:
            return start_rollout_worker(self.spec, worker_id, self.resources, self._reserve(worker_id))

        return self._add(start)

    def _adopt(self, handle: ray.actor.ActorHandle) -> ray.ObjectRef:
        """Build an engine inside an existing actor; returns the ref of that call."""
        w = self._add(lambda worker_id: handle)
        return handle.start_engine.remote(self.spec, w.id)

    def _add(self, start: Callable[[str], ray.actor.ActorHandle]) -> _Worker:
        worker_id = f"rollout-{self._next_worker}"
        self._next_worker += 1
        w = _Worker(worker_id, start(worker_id), version=self.initial_version)
        self._workers.append(w)
        return w

    def _reserve(self, worker_id: str):
        """Reserve one worker's resources within ``resource_timeout_s`` (``ResourcesUnavailable`` names the keys)."""
        r = self.resources
        request = ResourceRequest(
            f"rollout worker {worker_id}",
            (bundle(r.num_cpus, r.num_gpus, r.resources),),
            {"CPU": "rollout.num_cpus_per_worker", "GPU": "rollout.num_gpus_per_worker"},
            "rollout.resources",
        )
        pg = reserve(request, self.resource_timeout_s)
        self._placements[worker_id] = pg
        return pg

    def _kill(self, w: _Worker) -> None:
        """Kill a worker's actor and give back its reservation."""
        ray.kill(w.handle, no_restart=True)
        release(self._placements.pop(w.id, None))

    def _dispatch(self) -> None:
        """Hand queued tickets to synced workers, a chunk at a time, round robin."""
        ready = [w for w in self._workers if not w.draining and w.version == self.version]
        while self._pending and ready:
            chunk_size = min(self.chunk_size, math.ceil(len(self._pending) / len(ready)))
            progressed = False
            for w in sorted(ready, key=lambda w: len(w.inflight)):
                if not self._pending or len(w.inflight) >= self.max_inflight_per_worker:
                    continue
                chunk = [self._pending.popleft() for _ in range(min(chunk_size, len(self._pending)))]
                ref = w.handle.generate.remote([self._requests[t] for t in chunk])
                w.inflight[ref] = chunk
                self._owner[ref] = w
                progressed = True
            if not progressed:
                break

    def _pump(self, finished: Callable[[], bool], timeout: float | None) -> None:
        """Collect results and keep dispatching until ``finished()`` or the timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._dispatch()
            if self.local is not None:
                self._run_local(finished)
                return
            self._collect_ready(0.0)
            self._dispatch()
            remaining = None if deadline is None else deadline - time.monotonic()
            if finished() or (remaining is not None and remaining <= 0):
                return
            if not self._owner:
                if self._pending:
                    raise RuntimeError(
                        f"{len(self._pending)} rollout requests are queued but no worker may take them: "
                        f"workers {self.workers_needing_sync()} need weights of version {self.version} "
                        "(sync them, then mark_synced)"
                    )
                return
            self._collect_ready(remaining)

    def _collect_ready(self, timeout: float | None) -> None:
        """Collect every finished call, waiting up to ``timeout`` for the first one."""
        refs = list(self._owner)
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            self._collect(ref)

    def _run_local(self, finished: Callable[[], bool]) -> None:
        while self._pending and not finished():
            chunk = [self._pending.popleft() for _ in range(min(self.chunk_size, len(self._pending)))]
            for t, rollout in zip(chunk, self.local.generate([self._requests[t] for t in chunk])):
                self._record(t, rollout)

    def _collect(self, ref) -> None:
        w = self._owner.pop(ref, None)
        if w is None:  # its worker already failed and was handled
            return
        tickets = w.inflight.pop(ref)
        try:
            rollouts = ray.get(ref)
        except RayActorError as err:
            w.inflight[ref] = tickets
            self._owner[ref] = w
            self._fail(w, err)
            return
        except Exception as err:
            self._pending.extendleft(reversed(tickets))  # keep them outstanding; the error is the caller's
            uids = [self._requests[t].uid for t in tickets]
            raise RuntimeError(f"rollout worker {w.id} failed on requests {uids}: {err}") from err
        self._failures_in_a_row = 0
        for t, rollout in zip(tickets, rollouts):
            self._record(t, rollout)
        self._retire_if_idle(w)

    def _record(self, ticket: int, rollout: Rollout) -> None:
        if ticket not in self._requests:
            self.duplicates_dropped += 1
            return
        del self._requests[ticket]
        self._done[ticket] = rollout

    def _fail(self, w: _Worker, err: Exception) -> _Worker | None:
        """A worker died: keep what it finished, re-queue the rest, start a replacement.

        A colocated worker is a learner actor, so its learner died too: it is dropped, not replaced,
        and the actor's own error is raised when a call found it dead (the driver then ends the run
        with the resume command; after a failed sync the learners' next call does).
        """
        fate = "dropped: its learner died with it" if self.colocated else "replacing it"
        logger.warning("rollout worker %s died (%s); %s, re-queueing its requests", w.id, err, fate)
        lost: list[int] = []
        for ref, tickets in list(w.inflight.items()):
            self._owner.pop(ref, None)
            try:
                ready, _ = ray.wait([ref], timeout=0)
                results = ray.get(ref) if ready else None
            except RayActorError:
                results = None
            if results is None:
                lost.extend(tickets)
            else:
                for t, rollout in zip(tickets, results):
                    self._record(t, rollout)
        w.inflight.clear()
        lost = [t for t in lost if t in self._requests]
        self._pending.extendleft(sorted(lost, reverse=True))
        self.requeued += len(lost)
        self._workers.remove(w)
        if self.colocated:
            if isinstance(err, RayActorError):
                raise err
            return None
        self._kill(w)
        self.restarts += 1
        self._failures_in_a_row += 1
        if self._failures_in_a_row > self.max_consecutive_failures:
            raise RuntimeError(
                f"rollout workers died {self._failures_in_a_row} times in a row without finishing a call "
                f"(last: {err}); check the engine spec ({self.spec.kind}, {self.spec.model_path}) and resources"
            )
        return None if w.draining else self._start_worker()

    def _retire_if_idle(self, w: _Worker) -> None:
        if w.draining and not w.inflight and w in self._workers:
            self._workers.remove(w)
            self._kill(w)
