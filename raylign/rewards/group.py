"""``RewardGroup``: N Ray actors, each wrapping a ``RewardWorker``; ``num_workers=0`` scores in-process.

A worker actor that dies (killed, its node lost) is replaced on the next result that shows it,
and the groups it held are scored once more on the replacement; ``restarts`` counts replacements.
Resolve refs from ``score_async`` with ``get`` to get that retry (a plain ``ray.get`` raises instead).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raylign.placement import DEFAULT_RESOURCE_TIMEOUT_S, ResourceRequest, bundle, release, reserve
from raylign.protocol import Rollout, ScoredGroup
from raylign.rewards.loader import as_spec, load_reward_functions
from raylign.rewards.worker import RewardWorker

logger = logging.getLogger(__name__)

# The one place RewardWorker becomes an actor class.
RemoteRewardWorker = ray.remote(RewardWorker)
_CONTROL_TIMEOUT_S = 60.0  # stats/close: quick calls on a live actor


@dataclass
class _Slot:
    """A worker position; ``generation`` grows each time its actor is replaced."""

    handle: ActorHandle
    generation: int = 0
    inflight: int = 0  # submitted calls not yet collected by ``get`` / ``score``


@dataclass
class _Pending:
    """A submitted call: what it scores, where it runs, and the ref that will hold its answer."""

    rollouts: list[Rollout]
    slot: _Slot
    generation: int  # of the slot's actor when sent
    single: bool  # sent to score() (resolves to one ScoredGroup), else score_many() (a list)
    current: ray.ObjectRef  # the ref to wait on (a resent call's, after its worker died)
    retried: bool = False


class RewardGroup:
    """Scores rollout groups on ``num_workers`` reward-worker actors.

    Args mirror ``RewardWorker``; plus ``num_workers`` (0 = in-process), ``max_concurrency``
    (overlapping requests one actor serves; its pool runs ``num_processes`` calls at once) and
    ``num_cpus_per_worker`` (the Ray resource each actor asks for, reserved within
    ``resource_timeout_s`` or ``ResourcesUnavailable``; see ``raylign.placement``).
    """

    def __init__(
        self,
        reward_funcs: Sequence[str | Callable[..., Any]],
        reward_weights: Sequence[float] | None = None,
        *,
        num_workers: int = 1,
        timeout_s: float = 10.0,
        num_processes: int = 2,
        output_lines: int = 20,
        max_memory_mb: int | None = None,
        max_concurrency: int = 4,
        num_cpus_per_worker: float = 1.0,
        resource_timeout_s: float = DEFAULT_RESOURCE_TIMEOUT_S,
    ):
        specs = [as_spec(f) for f in ([reward_funcs] if isinstance(reward_funcs, str) else reward_funcs)]
        load_reward_functions(specs, reward_weights)  # a bad spec fails here, before any actor starts
        self._worker_kwargs = dict(
            reward_funcs=specs,
            reward_weights=reward_weights,
            timeout_s=timeout_s,
            num_processes=num_processes,
            output_lines=output_lines,
            max_memory_mb=max_memory_mb,
        )
        self._actor_options = dict(max_concurrency=max_concurrency, num_cpus=num_cpus_per_worker)
        self._resource_timeout_s = resource_timeout_s
        self._placements: dict[ActorHandle, Any] = {}  # actor -> its reserved placement group
        self._slots: list[_Slot] = []
        self._pending: dict[ray.ObjectRef, _Pending] = {}
        self._local: RewardWorker | None = None
        self._started = 0  # actors started so far, for names
        self.restarts = 0  # dead actors replaced
        self.scale(num_workers)

    # ------------------------------------------------------------------ size

    @property
    def num_workers(self) -> int:
        """Remote worker actors (0 when scoring in-process)."""
        return len(self._slots)

    @property
    def actors(self) -> list[ActorHandle]:
        """The current worker actors (for inspection and fault-injection tests)."""
        return [s.handle for s in self._slots]

    def _new_actor(self) -> ActorHandle:
        self._started += 1
        name = f"reward-{self._started}"
        request = ResourceRequest(
            f"reward worker {name}", (bundle(self._actor_options["num_cpus"], 0, {}),),
            {"CPU": "reward.num_workers"}, "reward",
        )
        pg = reserve(request, self._resource_timeout_s)
        strategy = {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg)} if pg else {}
        handle = RemoteRewardWorker.options(**self._actor_options, **strategy).remote(**self._worker_kwargs, name=name)
        self._placements[handle] = pg
        return handle

    def _stop_actors(self, handles: list[ActorHandle]) -> None:
        _stop(handles)
        for handle in handles:
            release(self._placements.pop(handle, None))

    def scale(self, num_workers: int) -> None:
        """Grow or shrink to ``num_workers`` actors while running; 0 switches to an in-process worker.

        Removed actors finish the calls they hold (their refs still resolve through ``get``).
        """
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if num_workers == 0 and self._local is None:
            self._local = RewardWorker(**self._worker_kwargs, name="reward-local")
        elif num_workers > 0 and self._local is not None:
            self._local.close()
            self._local = None
        new = [_Slot(self._new_actor()) for _ in range(num_workers - len(self._slots))]
        removed, self._slots = self._slots[num_workers:], self._slots[:num_workers] + new
        # Wait for new actors and their pools so a worker that cannot start fails here, with its cause.
        ray.get([s.handle.wait_ready.remote() for s in new], timeout=self._resource_timeout_s)
        for slot in removed:
            slot.generation = -1  # marks it retired: closed once its last call is collected
            self._retire_if_idle(slot)

    def _retire_if_idle(self, slot: _Slot) -> None:
        if slot.generation == -1 and slot.inflight == 0:
            slot.generation = -2  # retired for good; never closed twice
            self._stop_actors([slot.handle])

    # ------------------------------------------------------------------ scoring

    def _least_loaded(self) -> _Slot:
        return min(self._slots, key=lambda s: s.inflight)  # first among equals: stable, round-robin-like

    def _send(self, rollouts: list[Rollout], slot: _Slot, single: bool) -> ray.ObjectRef:
        slot.inflight += 1
        if single:
            return slot.handle.score.remote(rollouts[0])
        return slot.handle.score_many.remote(rollouts)

    def _submit(self, rollouts: list[Rollout], slot: _Slot, single: bool) -> ray.ObjectRef:
        ref = self._send(rollouts, slot, single)
        self._pending[ref] = _Pending(rollouts, slot, slot.generation, single, ref)
        return ref

    def score_async(self, rollout: Rollout) -> ray.ObjectRef:
        """Start scoring one group; the ref resolves to a ``ScoredGroup`` (use ``get`` for the retry).

        In-process (``num_workers=0``) it scores now and returns a ``ray.put`` ref. Collect every ref
        with ``get``: until then it counts as load on its worker (the least-loaded choice reads it).
        """
        if self._local is not None:
            return ray.put(self._local.score(rollout))
        return self._submit([rollout], self._least_loaded(), single=True)

    def score(self, rollouts: Sequence[Rollout]) -> list[ScoredGroup]:
        """Score groups, spread over the workers in one call each; results keep the input order."""
        rollouts = list(rollouts)
        if self._local is not None:
            return self._local.score_many(rollouts)
        if not rollouts:
            return []
        k = min(len(self._slots), len(rollouts))
        order = sorted(self._slots, key=lambda s: s.inflight)[:k]
        # Interleave (i -> worker i % k) so equal shares stay equal whatever the group sizes are.
        refs = [self._submit(rollouts[j::k], slot, single=False) for j, slot in enumerate(order)]
        chunks = [self._collect(ref) for ref in refs]
        out: list[ScoredGroup | None] = [None] * len(rollouts)
        for j, chunk in enumerate(chunks):
            out[j::k] = chunk
        return out  # type: ignore[return-value]

    def get(self, refs: Sequence[ray.ObjectRef]) -> list[ScoredGroup]:
        """Resolve ``score_async`` refs in order, replacing a dead worker and retrying its groups once."""
        return [self._collect(ref) for ref in refs]

    def _collect(self, ref: ray.ObjectRef) -> Any:
        pending = self._pending.pop(ref, None)
        if pending is None:  # an in-process ray.put ref, or one collected before
            return ray.get(ref)
        try:
            while True:
                try:
                    return ray.get(pending.current)
                except RayActorError as err:
                    if pending.retried:
                        uids = [r.request.uid for r in pending.rollouts]
                        raise RuntimeError(
                            f"reward worker died twice while scoring groups {uids}; check the actor "
                            "logs (out of memory? a reward function that brings down its host process?)"
                        ) from err
                    self._on_death(pending, err)
        finally:
            pending.slot.inflight -= 1
            self._retire_if_idle(pending.slot)

    def _on_death(self, pending: _Pending, err: RayActorError) -> None:
        """Replace the dead actor (once) and resend every call it held, so retries overlap."""
        slot = pending.slot
        if slot.generation != pending.generation:  # already replaced, or retired by scale()
            self._resend(pending, slot if slot.generation >= 0 else None)
            return
        logger.warning("reward worker died (%s); starting a replacement", type(err).__name__)
        ray.kill(slot.handle)  # a no-op when dead; stops an unreachable one for good
        release(self._placements.pop(slot.handle, None))
        slot.handle = self._new_actor()
        slot.generation += 1
        self.restarts += 1
        for other in [pending, *self._pending.values()]:
            if other.slot is slot and other.generation == slot.generation - 1 and not other.retried:
                self._resend(other, slot)

    def _resend(self, pending: _Pending, slot: _Slot | None) -> None:
        """Send ``pending`` again, to ``slot`` or (None) the least-loaded worker; at most once."""
        pending.retried = True
        if slot is None and not self._slots:  # scaled down to in-process meanwhile
            scored = self._local.score_many(pending.rollouts)  # type: ignore[union-attr]
            pending.current = ray.put(scored[0] if pending.single else scored)
            return
        target = slot or self._least_loaded()
        pending.slot.inflight -= 1
        self._retire_if_idle(pending.slot)
        pending.current = self._send(pending.rollouts, target, pending.single)
        pending.slot, pending.generation = target, target.generation

    # ------------------------------------------------------------------ bookkeeping

    def stats(self) -> dict[str, int]:
        """Totals over current workers (groups, calls, timeouts, errors, process_restarts), restarts."""
        per_worker = (
            [self._local.stats()]
            if self._local
            else ray.get([s.handle.stats.remote() for s in self._slots], timeout=_CONTROL_TIMEOUT_S)
        )
        keys = ("groups", "calls", "timeouts", "errors", "process_restarts")
        totals = {k: sum(w[k] for w in per_worker) for k in keys}
        return {**totals, "num_workers": self.num_workers, "restarts": self.restarts}

    def close(self) -> None:
        """Stop every worker (and its process pool)."""
        if self._local is not None:
            self._local.close()
            self._local = None
        handles = [s.handle for s in self._slots] + [p.slot.handle for p in self._pending.values()]
        self._slots, self._pending = [], {}
        self._stop_actors(list({id(h): h for h in handles}.values()))


def _stop(handles: list[ActorHandle], timeout_s: float = 10.0) -> None:
    """Close the workers' pools, then kill the actors.

    A dead or stuck actor cannot close its pool; its pool processes see their parent gone and exit.
    """
    if not handles:
        return
    ray.wait([h.close.remote() for h in handles], num_returns=len(handles), timeout=timeout_s)
    for handle in handles:
        ray.kill(handle)
