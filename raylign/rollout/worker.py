"""``RolloutWorker``: one rollout engine in one process; ``start_rollout_worker`` makes it a Ray actor.

The class is plain (usable in-process, as ``RolloutGroup(num_workers=0)`` does); the remote class is
made here and nowhere else. Actors run one call at a time, so a weight load queued behind a
``generate`` call never changes the weights under it, and every Rollout's version is exact.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raylign.protocol import Rollout, RolloutRequest
from raylign.rollout.engine import EngineSpec, NamedTensors, make_engine
from raylign.sync.buckets import WeightLayout
from raylign.sync.collective import GroupSpec
from raylign.sync.endpoints import EngineReceiver, ReceiverEndpoint, unpack_put


@dataclass(frozen=True)
class WorkerResources:
    """Ray resources of one rollout worker actor (vLLM with TP=k wants ``num_gpus=k``)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict)  # custom ones, e.g. {"rollout": 1}


class RolloutWorker:
    """Builds an engine from ``spec`` and exposes it, stamping rollouts with ``worker_id``."""

    def __init__(self, spec: EngineSpec, worker_id: str):
        self.worker_id = worker_id
        self.engine = make_engine(spec)
        self.weight_receiver = ReceiverEndpoint()  # weight sync from the learner (raylign.sync)

    def generate(self, requests: Sequence[RolloutRequest]) -> list[Rollout]:
        return [replace(r, worker=self.worker_id) for r in self.engine.generate(requests)]

    def load_weights(self, named_tensors: NamedTensors, version: int | None = None) -> int:
        return self.engine.load_weights(named_tensors, version)

    def set_version(self, version: int) -> None:
        self.engine.set_version(version)

    def version(self) -> int:
        return self.engine.version

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def model_fingerprint(self) -> float:
        return self.engine.model_fingerprint()

    # ---- weight sync (driven by raylign.sync.group; see raylign.sync.endpoints)

    def join_weight_group(self, spec: GroupSpec, rank: int) -> None:
        """Join sync group ``spec`` from ``rank`` on (returns once every member has joined).

        An engine that receives in its own processes (vLLM: ``EngineReceiver``) joins with those,
        as ranks ``rank .. rank + weight_ranks - 1``; otherwise this process joins as ``rank``.
        """
        ip = ray.util.get_node_ip_address()
        if isinstance(self.engine, EngineReceiver):
            self.engine.join_weight_group(spec, rank, ip)
        else:
            self.weight_receiver.join(spec, rank, ip)

    def receive_weights(self, tag: str, layout: WeightLayout, version: int) -> int:
        """Receive one whole sync over group ``tag`` into the engine, then take ``version``; returns the version."""
        if isinstance(self.engine, EngineReceiver):
            self.engine.receive_weights(tag, layout, version)
        else:
            self.weight_receiver.receive(tag, layout, self.engine.load_weights, self.engine.set_version, version)
        return self.engine.version

    def load_weight_refs(self, refs: Sequence[ray.ObjectRef], version: int) -> int:
        """Load buckets put by ``LearnerWorker.put_weights`` one at a time, then take ``version``; returns the version."""
        for ref in refs:
            self.engine.load_weights(unpack_put(ray.get(ref)))
        self.engine.set_version(version)
        return self.engine.version

    def leave_weight_group(self) -> None:
        """Drop this process's (or the engine's) sync group, if any."""
        if isinstance(self.engine, EngineReceiver):
            self.engine.leave_weight_group()
        self.weight_receiver.leave()

    def ping(self) -> dict:
        """Liveness and identity: worker id, weights version, process id, how many ranks its engine takes in a
        sync group, and the Ray node it runs on ("" without Ray)."""
        return {
            "worker_id": self.worker_id,
            "version": self.engine.version,
            "pid": os.getpid(),
            "weight_ranks": int(getattr(self.engine, "weight_ranks", 1)),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
        }


_RemoteRolloutWorker = ray.remote(RolloutWorker)


def start_rollout_worker(
    spec: EngineSpec, worker_id: str, resources: WorkerResources, placement: PlacementGroup | None = None
) -> ray.actor.ActorHandle:
    """Start a ``RolloutWorker`` actor (never restarted by Ray: its group replaces it and re-queues).

    ``placement``: a ready placement group reserved for it (``raylign.placement.reserve``).
    """
    strategy = {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement)} if placement else {}
    return _RemoteRolloutWorker.options(
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
        resources=dict(resources.resources),
        max_restarts=0,
        max_concurrency=1,
        **strategy,
    ).remote(spec, worker_id)
