"""``WeightBroadcaster``: stream the policy's weights from the learners to every rollout engine.

    broadcaster = WeightBroadcaster(learners, rollouts, cfg.sync, trainable_only=freeze_vision_tower)
    metrics = broadcaster.broadcast(version)   # after each update; also brings stale workers up
    broadcaster.close()

A sync makes one control call per engine (and per learner rank), not one per tensor; the weights
move in buckets of ``cfg.bucket_mb`` over the transport ``cfg.transport`` names
(``raylign.sync.transports``). Only what training can change is sent with ``trainable_only`` (the
frozen vision tower stays as loaded from the checkpoint); LoRA adapters arrive merged, under the
plain Hugging Face names every engine's loader takes.

Versions: each sync carries one; an engine takes it only after its last bucket is loaded, and
``rollouts.mark_synced`` records the workers that made it. The group's version moves to ``version``
even when a worker missed it, so a worker whose weights may be half-loaded gets no work until a
later sync reaches it (``RolloutGroup.workers_needing_sync``; every ``broadcast`` includes them).

Failures: a receiver that dies or stalls past ``cfg.timeout_s`` is replaced through the rollout
group and named in a ``SyncError``; the next ``broadcast`` (or ``sync_workers``) brings its
replacement up to date over a newly built group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from raylign.config import SyncConfig
from raylign.sync.transports import SendResult, SyncError, Target, make_transport

logger = logging.getLogger(__name__)

LOCAL_ID = "local"  # the target id of an in-process engine (not a RolloutGroup worker id)


def sleep_discards_weights(kind: str, engine_kwargs: Any) -> bool:
    """A vLLM engine sleeping at level 2 drops every weight, frozen ones included, so a sync of the
    trainable weights only would leave the rest undefined after ``wake``."""
    kwargs = dict(engine_kwargs)
    return kind == "vllm" and bool(kwargs.get("enable_sleep_mode")) and int(kwargs.get("sleep_level", 1)) == 2


class WeightBroadcaster:
    """Learner -> rollout engines weight sync (see the module docstring).

    Args:
        learners: a ``LearnerGroup`` (actors, or one in-process learner with ``num_learners=0``).
        rollouts: a ``RolloutGroup`` (worker actors, or one in-process engine with ``num_workers=0``).
        cfg: the ``sync`` config section (transport, bucket_mb, timeout_s).
        trainable_only: send only weights that require gradients (set when the vision tower is frozen);
            ignored (every weight is sent) when the engines sleep at level 2.
    """

    def __init__(self, learners: Any, rollouts: Any, cfg: SyncConfig, trainable_only: bool = False):
        self.learners, self.rollouts, self.cfg = learners, rollouts, cfg
        spec = getattr(rollouts, "spec", None)
        if trainable_only and spec is not None and sleep_discards_weights(spec.kind, spec.kwargs):
            logger.info("rollout engines sleep at level 2 (weights discarded): every sync sends every weight")
            trainable_only = False
        self.trainable_only = trainable_only
        self.transport = make_transport(learners, rollouts, cfg, trainable_only)
        self.version = int(rollouts.version)  # the last version broadcast
        self.syncs = 0
        self.failures = 0

    def _targets(self, worker_ids: Sequence[str] | None = None) -> list[Target]:
        if self.rollouts.local is not None:
            return [(LOCAL_ID, self.rollouts.local)]
        live = self.rollouts.workers
        if worker_ids is None:
            return live
        unknown = set(worker_ids) - {w for w, _ in live}
        if unknown:
            raise KeyError(f"no live rollout workers {sorted(unknown)}; current: {[w for w, _ in live]}")
        return [(w, h) for w, h in live if w in set(worker_ids)]

    def broadcast(self, version: int) -> dict[str, float]:
        """Send the learner's current weights, tagged ``version``, to every live rollout engine.

        An engine seen for the first time gets up to ``cfg.timeout_s`` to finish starting; one
        still starting then is left for a later call (it gets no work meanwhile). Returns
        ``sync/*`` metrics; raises ``SyncError`` when an engine that was up did not get them.
        """
        self.version = int(version)
        return self._sync(self._targets(), self.version)

    def sync_workers(self, worker_ids: Sequence[str], version: int | None = None) -> dict[str, float]:
        """Bring ``worker_ids`` (e.g. ``rollouts.workers_needing_sync()``) to ``version`` (default: the last broadcast).

        Sends the learner's *current* weights: call it before the next update changes them.
        """
        if self.rollouts.local is not None or not worker_ids:
            return self._metrics(SendResult(), 0.0, self.version, 0, 0)
        version = self.version if version is None else int(version)
        return self._sync(self._targets(worker_ids), version)

    def _sync(self, targets: list[Target], version: int) -> dict[str, float]:
        start = time.perf_counter()
        readiness = self.transport.ready(targets, self.cfg.timeout_s)
        result = self.transport.send(readiness.ready, version) if readiness.ready else SendResult()
        seconds = time.perf_counter() - start
        result.control_calls += readiness.control_calls
        for worker_id, why in readiness.dead.items():
            result.failed[worker_id] = f"died: {why}"
            result.lost.append(worker_id)
            result.at_fault.append(worker_id)
        self.syncs += 1
        local = self.rollouts.local is not None
        synced = [] if local else [w for w in result.synced if w != LOCAL_ID]
        # Also when some worker missed it: the group version moves on, so they get no work until synced.
        self.rollouts.mark_synced(synced, version)
        if result.sender_error or result.failed:
            self.failures += 1
            raise self._error(result, version, seconds)
        if readiness.starting:
            logger.info("weight sync v%d: %s still starting; synced later", version, readiness.starting)
        return self._metrics(result, seconds, version, len(readiness.ready), len(readiness.starting))

    def _error(self, result: SendResult, version: int, seconds: float) -> SyncError:
        """Replace the workers that died or stalled, and say what happened."""
        live = {w for w, _ in self.rollouts.workers}
        replaced = {
            w: self.rollouts.replace_worker(w, f"weight sync: {result.failed[w]}")
            for w in result.lost
            if w in live
        }
        parts = [f"weight sync of version {version} over {self.transport.name} failed after {seconds:.1f}s"]
        if result.sender_error:
            parts.append(f"learner side: {result.sender_error}")
        for worker_id, why in result.failed.items():
            new = replaced.get(worker_id)
            fate = f"; replaced by {new}, synced by the next broadcast" if new else ""
            parts.append(f"rollout worker {worker_id}: {why}{fate}")
        if not result.sender_error and not replaced:
            parts.append("check the rollout worker logs")
        logger.warning("; ".join(parts))
        return SyncError(
            "; ".join(parts), result.at_fault or list(result.failed), replaced, list(result.failed)
        )

    def _metrics(
        self, result: SendResult, seconds: float, version: int, engines: int, starting: int
    ) -> dict[str, float]:
        return {
            "sync/seconds": seconds,
            "sync/bytes": float(result.bytes),
            "sync/gb_per_s": result.bytes / seconds / 1e9 if seconds > 0 else 0.0,
            "sync/control_calls": float(result.control_calls),
            "sync/buckets": float(result.buckets),
            "sync/version": float(version),
            "sync/engines": float(engines),
            "sync/engines_starting": float(starting),
        }

    def close(self) -> None:
        """Release the transport (process groups, stores)."""
        self.transport.close()
