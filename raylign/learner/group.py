"""``LearnerGroup``: N learner actors in one placement group and one torch.distributed group.

Each actor runs a ``LearnerWorker`` (one data-parallel rank). The group shards every global batch
evenly and in order over the ranks, calls them together (DeepSpeed's collectives need every rank),
and returns rank 0's answer, which all ranks agree on since metrics are reduced across ranks.
``num_learners=0`` runs one ``Learner`` in this process, without Ray. ``colocated=True`` makes each
actor a ``ColocatedWorker``, which can also hold a rollout engine (``RolloutGroup(actors=...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raylign.config import LearnerConfig, ModelConfig, TrainConfig
from raylign.learner.objectives import Objective
from raylign.learner.worker import Bucket, ColocatedWorker, LearnerWorker
from raylign.placement import DEFAULT_RESOURCE_TIMEOUT_S, ResourceRequest, reserve
from raylign.protocol import TrainBatch, UpdateResult

# The one place the learner workers become actor classes.
RemoteLearnerWorker = ray.remote(LearnerWorker)
RemoteColocatedWorker = ray.remote(ColocatedWorker)

T = TypeVar("T")


def shard(items: Sequence[T], world_size: int) -> list[list[T]]:
    """Split ``items`` into ``world_size`` equal consecutive shards; the size must divide evenly."""
    if len(items) % world_size:
        raise ValueError(
            f"a global batch of {len(items)} rows does not split evenly over {world_size} learners; "
            f"use a batch size that is a multiple of learner.num_learners"
        )
    k = len(items) // world_size
    return [list(items[r * k : (r + 1) * k]) for r in range(world_size)]


def padded_shards(items: Sequence[T], world_size: int) -> tuple[list[list[T]], int]:
    """Shards for forward-only work: repeat the last item to a multiple of ``world_size``; returns the pad count."""
    pad = (-len(items)) % world_size
    return shard(list(items) + [items[-1]] * pad, world_size), pad


def _bundle(cfg: LearnerConfig, num_gpus: float) -> dict[str, float]:
    """One learner's placement-group bundle (zero amounts left out, as Ray wants)."""
    bundle = {"CPU": cfg.num_cpus_per_learner, "GPU": num_gpus, **cfg.resources}
    bundle = {k: float(v) for k, v in bundle.items() if v}
    if not bundle:
        raise ValueError(
            "a learner must ask for some resource; set learner.num_cpus_per_learner or num_gpus_per_learner > 0"
        )
    return bundle


def learner_request(cfg: LearnerConfig, num_gpus: float) -> ResourceRequest:
    """The learners' placement group, with the keys that size it (for the error when it cannot be had)."""
    return ResourceRequest(
        f"{cfg.num_learners} learner(s)",
        (_bundle(cfg, num_gpus),) * cfg.num_learners,
        {"CPU": "learner.num_cpus_per_learner", "GPU": "learner.num_gpus_per_learner"},
        "learner.resources",
        cfg.placement_strategy,
    )


class LearnerGroup:
    """Data-parallel learners (see the module docstring).

    Args:
        model_cfg, train_cfg, learner_cfg: config sections; ``learner_cfg.num_learners`` actors
            (0 = in-process), each with ``num_cpus_per_learner`` CPUs, ``num_gpus_per_learner``
            GPUs (None: 1 when the cluster has GPUs) and ``resources``.
        num_training_steps: length of the learning-rate schedule.
        reference: keep a frozen reference model (KL, DPO without precomputed reference logprobs).
        seed: model-building seed (identical on every rank).
        resource_timeout_s: how long to wait for the learners' resources before
            ``ResourcesUnavailable`` (naming the request, its keys and what the cluster offers).
        colocated: the actors can also hold a rollout engine each (``rollout.colocate``).
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        learner_cfg: LearnerConfig,
        num_training_steps: int,
        *,
        resource_timeout_s: float = DEFAULT_RESOURCE_TIMEOUT_S,
        reference: bool = False,
        seed: int = 0,
        colocated: bool = False,
    ):
        self.num_learners = learner_cfg.num_learners
        self.resource_timeout_s = resource_timeout_s
        self.colocated = colocated
        self.actors: list[Any] = []
        self._pg: PlacementGroup | None = None
        self._local = None
        args = (model_cfg, train_cfg, learner_cfg, num_training_steps)
        if self.num_learners == 0:
            self._local = LearnerWorker()
            self._local.setup(*args, rank=0, world_size=1, init_method=None, reference=reference, seed=seed)
            return
        self._start_actors(learner_cfg)
        init_method = ray.get(self.actors[0].address.remote())
        ray.get(
            [
                actor.setup.remote(*args, rank, self.num_learners, init_method, reference, seed)
                for rank, actor in enumerate(self.actors)
            ]
        )

    def _start_actors(self, cfg: LearnerConfig) -> None:
        gpus = cfg.num_gpus_per_learner
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        self._pg = reserve(learner_request(cfg, gpus), self.resource_timeout_s)
        threads = max(1, int(cfg.num_cpus_per_learner))
        for i in range(cfg.num_learners):
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i)
            actor_cls = RemoteColocatedWorker if self.colocated else RemoteLearnerWorker
            actor = actor_cls.options(
                num_cpus=cfg.num_cpus_per_learner,
                num_gpus=gpus,
                resources=dict(cfg.resources),
                scheduling_strategy=strategy,
            ).remote(threads)
            self.actors.append(actor)

    @property
    def world_size(self) -> int:
        return max(1, self.num_learners)

    @property
    def weights_actor(self) -> Any:
        """Rank 0's actor handle (None in-process): the one that holds full weights after a gather."""
        return self.actors[0] if self.actors else None

    @property
    def local_learner(self):
        """The in-process ``Learner`` when ``num_learners == 0``, else None."""
        return self._local.learner if self._local is not None else None

    @property
    def local_worker(self) -> LearnerWorker | None:
        """The in-process ``LearnerWorker`` when ``num_learners == 0`` (the weight sync drives it), else None."""
        return self._local

    def _all(
        self, method: Callable[[Any], Any], per_rank_args: Sequence[tuple] | None = None, *args: Any
    ) -> list[Any]:
        """Call ``method(worker)`` on every rank at once (rank ``r`` gets ``per_rank_args[r]`` first) and wait.

        ``method`` picks the bound method, e.g. ``lambda w: w.update``: on an actor handle that is
        its remote method, in-process the ``LearnerWorker``'s own.
        """
        if self._local is not None:
            return [method(self._local)(*(per_rank_args[0] if per_rank_args else ()), *args)]
        refs = [
            method(actor).remote(*(per_rank_args[r] if per_rank_args else ()), *args)
            for r, actor in enumerate(self.actors)
        ]
        return ray.get(refs)

    def update(self, batch: Sequence[Any] | TrainBatch, objective: Objective) -> UpdateResult:
        """One optimizer step over the global ``batch`` (rows, ``TrainSample`` list or ``TrainBatch``)."""
        items = list(batch.samples) if isinstance(batch, TrainBatch) else list(batch)
        results = self._all(lambda w: w.update, [(s,) for s in shard(items, self.world_size)], objective)
        return results[0]

    def logprobs(
        self, items: Sequence[Any], objective: Objective, temperature: float = 1.0, reference: bool = False
    ) -> list:
        """Target logprobs (1-D CPU tensors), ``objective.rows_per_item`` per item, item-major, on all ranks.

        See ``Learner.item_logprobs``; items are spread over the ranks (ZeRO-3 needs every rank).
        """
        if not items:
            return []
        shards, pad = padded_shards(items, self.world_size)
        parts = self._all(
            lambda w: w.item_logprobs, [(s,) for s in shards], objective, temperature, reference
        )
        flat = [row for part in parts for row in part]
        return flat[: len(flat) - pad * objective.rows_per_item]

    def sequence_logps(self, items: Sequence[Any], objective: Objective, reference: bool = False):
        """``[len(items), rows_per_item]`` summed logprobs (e.g. to precompute DPO reference logprobs)."""
        import torch

        rows = self.logprobs(items, objective, reference=reference)
        if not rows:
            return torch.zeros(0, objective.rows_per_item)
        return torch.stack([r.sum() for r in rows]).view(-1, objective.rows_per_item)

    def weight_buckets(self, bucket_mb: float = 64.0, trainable_only: bool = False) -> list[Bucket]:
        """All weights as HF-named CPU tensors in buckets, gathered on rank 0 (every rank takes part)."""
        return self._all(lambda w: w.weight_buckets, None, bucket_mb, trainable_only)[0]

    def save(self, directory: str | Path, data_state: dict[str, Any] | None = None) -> Path:
        """Checkpoint (HF model + exact-resume state) to ``directory``, reachable by every learner."""
        self._all(lambda w: w.save, None, str(directory), data_state)
        return Path(directory)

    def restore(self, directory: str | Path) -> dict[str, Any]:
        """Load a checkpoint written by ``save`` into every learner; returns the saved data position."""
        return self._all(lambda w: w.restore, None, str(directory))[0]

    @property
    def step(self) -> int:
        return self._all(lambda w: w.step)[0]

    def shutdown(self) -> None:
        """Leave the process group on every rank (barrier first), then stop the actors."""
        if self._local is not None:
            self._local.learner.close()
            self._local.learner = None
            return
        try:
            if self.actors:
                ray.get([a.shutdown.remote() for a in self.actors])
        finally:  # also after a learner died (its node lost): a placement group left behind would be
            # rescheduled onto the next learner node and hold the bundles a resumed run needs there
            for a in self.actors:
                ray.kill(a)
            self.actors = []
            if self._pg is not None:
                remove_placement_group(self._pg)
                self._pg = None
