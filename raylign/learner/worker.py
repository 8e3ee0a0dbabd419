"""``LearnerWorker``: what one learner actor runs (``LearnerGroup`` makes it a Ray actor in one place).

A plain class around a ``Learner``: it is created first, so the group can ask rank 0 for an address
to rendezvous on, then ``setup`` builds the learner inside the joined process group. It also keeps
the objective between calls, because an objective can hold state (the bco_pair running mean) while
every call ships a fresh pickled copy.

``ColocatedWorker`` adds a rollout engine to the same process (``rollout.colocate``), as verl's and
OpenRLHF's hybrid engines do: generation and training take turns on one device, and a weight sync
is a copy inside the process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raylign.config import LearnerConfig, ModelConfig, TrainConfig
from raylign.learner import checkpoint
from raylign.learner.distributed import free_port, shutdown_process_group
from raylign.learner.learner import Learner
from raylign.learner.objectives import Objective
from raylign.protocol import UpdateResult
from raylign.sync.buckets import WeightLayout
from raylign.sync.collective import GroupSpec
from raylign.sync.endpoints import SenderEndpoint, put_buckets
from raylign.sync.transports import load_in_process

if TYPE_CHECKING:
    from raylign.protocol import Rollout, RolloutRequest
    from raylign.rollout.engine import EngineSpec
    from raylign.rollout.worker import RolloutWorker

Bucket = list[tuple[str, torch.Tensor]]


class LearnerWorker:
    """One data-parallel rank, as driven by ``LearnerGroup``."""

    def __init__(self, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)  # one actor's share of the node's cores
        self.learner: Learner | None = None
        self.objective: Objective | None = None
        self.weight_sender = SenderEndpoint()  # weight sync to the rollout engines (raylign.sync)

    def node_id(self) -> str:
        """The Ray node this learner runs on (placement checks)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def address(self) -> str:
        """``tcp://<this node's IP>:<free port>``: the rendezvous point when this is rank 0."""
        import ray

        ip = ray.util.get_node_ip_address()
        return f"tcp://{ip}:{free_port('')}"

    def setup(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        learner_cfg: LearnerConfig,
        num_training_steps: int,
        rank: int,
        world_size: int,
        init_method: str | None,
        reference: bool,
        seed: int,
    ) -> None:
        """Join the process group and build the learner (all ranks at once: it rendezvous)."""
        self.learner = Learner(
            model_cfg,
            train_cfg,
            learner_cfg,
            num_training_steps,
            rank=rank,
            world_size=world_size,
            init_method=init_method,
            reference=reference,
            seed=seed,
        )

    def _learner(self) -> Learner:
        if self.learner is None:
            raise RuntimeError("LearnerWorker.setup() has not run")
        return self.learner

    def _objective(self, objective: Objective) -> Objective:
        """The kept objective when ``objective`` has the same config, else ``objective`` (now kept)."""
        if (
            self.objective is None
            or type(self.objective) is not type(objective)
            or self.objective != objective
        ):
            self.objective = objective
        return self.objective

    def update(self, items: Sequence[Any], objective: Objective) -> UpdateResult:
        return self._learner().update(items, self._objective(objective))

    def item_logprobs(
        self, items: Sequence[Any], objective: Objective, temperature: float, reference: bool
    ) -> list[torch.Tensor]:
        return self._learner().item_logprobs(items, self._objective(objective), temperature, reference)

    def weight_buckets(self, bucket_mb: float, trainable_only: bool) -> list[Bucket]:
        """Every bucket on rank 0 (on CPU), nothing elsewhere; all ranks must call it under ZeRO-3."""
        learner = self._learner()
        buckets = [
            [(n, t.cpu()) for n, t in b] for b in learner.iter_weight_buckets(bucket_mb, trainable_only)
        ]
        return buckets if learner.rank == 0 else []

    # ---- weight sync (driven by raylign.sync.group; see raylign.sync.endpoints)

    def weight_layout(self, bucket_mb: float, trainable_only: bool) -> WeightLayout:
        """Names, shapes and dtypes of every bucket ``send_weights`` will send (nothing is gathered)."""
        return self.weight_sender.layout(self._learner(), bucket_mb, trainable_only)

    def open_weight_store(self, timeout_s: float) -> tuple[str, int]:
        """Rank 0: start a sync group's rendezvous store here; returns ``(node ip, port)``."""
        import ray

        return ray.util.get_node_ip_address(), self.weight_sender.open_store(timeout_s)

    def join_weight_group(self, spec: GroupSpec) -> None:
        """Rank 0: join sync group ``spec`` as its sender (returns once every engine has joined)."""
        import ray

        self.weight_sender.join(spec, ray.util.get_node_ip_address())

    def send_weights(self, tag: str, layout: WeightLayout, bucket_mb: float, trainable_only: bool) -> int:
        """Broadcast the weights to sync group ``tag`` (rank 0); every rank must call it under ZeRO-3."""
        return self.weight_sender.send(self._learner(), tag, layout, bucket_mb, trainable_only)

    def put_weights(self, bucket_mb: float, trainable_only: bool) -> list[tuple[Any, int]]:
        """Rank 0: each bucket packed and put in the object store, as ``(ObjectRef, bytes)``; [] elsewhere.

        Every rank must call it under ZeRO-3 (see ``raylign.sync.endpoints.put_buckets``).
        """
        import ray

        return put_buckets(self._learner(), bucket_mb, trainable_only, ray.put)

    def leave_weight_group(self) -> None:
        """Drop this process's sync group, if any."""
        self.weight_sender.leave()

    def save(self, directory: str, data_state: dict[str, Any] | None) -> str:
        return str(checkpoint.save(self._learner(), Path(directory), data_state))

    def restore(self, directory: str) -> dict[str, Any]:
        return checkpoint.restore(self._learner(), Path(directory))

    def step(self) -> int:
        return self._learner().step

    def shutdown(self) -> None:
        """Free the learner and leave the process group (barrier first)."""
        if self.learner is not None:
            self.learner.close()
            self.learner = None
        shutdown_process_group()


class ColocatedWorker(LearnerWorker):
    """A learner rank with a rollout engine in the same process (``rollout.colocate``).

    ``RolloutGroup(actors=...)`` drives it like a rollout worker (``start_engine``, ``generate``,
    ``sleep``, ``wake``, ``ping``) and ``raylign.sync.group.ColocatedTransport`` syncs it with
    ``load_engine_weights``: the learner's buckets go straight into the engine, no process group
    and no copy between processes. A Ray actor runs one call at a time, so generating, training
    and syncing take turns on the device; the engine sleeps through updates where it can.
    """

    def __init__(self, num_threads: int | None = None):
        super().__init__(num_threads)
        self.rollout: RolloutWorker | None = None

    def start_engine(self, spec: EngineSpec, worker_id: str) -> None:
        """Build the engine on this learner's device (call after ``setup``)."""
        from raylign.rollout.worker import RolloutWorker

        kwargs = dict(spec.kwargs)
        if spec.kind == "transformers":
            kwargs["device"] = str(self._learner().device)
        else:  # vLLM's model runner in this process, so a bucket loads without leaving it
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.rollout = RolloutWorker(replace(spec, kwargs=kwargs), worker_id)

    def _engine(self) -> RolloutWorker:
        if self.rollout is None:
            raise RuntimeError("ColocatedWorker.start_engine() has not run")
        return self.rollout

    def generate(self, requests: Sequence[RolloutRequest]) -> list[Rollout]:
        return self._engine().generate(requests)

    def sleep(self) -> None:
        self._engine().sleep()

    def wake(self) -> None:
        self._engine().wake()

    def ping(self) -> dict:
        """The engine's liveness and identity, plus whether any weight-sync group exists here (never)."""
        groups = self.weight_sender.group is not None or self._engine().weight_receiver.group is not None
        return {**self._engine().ping(), "weight_group": groups}

    def version(self) -> int:
        return self._engine().version()

    def model_fingerprint(self) -> float:
        return self._engine().model_fingerprint()

    def load_engine_weights(
        self, bucket_mb: float, trainable_only: bool, version: int
    ) -> tuple[int, int, int]:
        """Copy this rank's weights into the engine and take ``version``: ``(version, bytes, buckets)``.

        Every rank must call it under ZeRO-3 (each bucket is gathered).
        """
        sent = load_in_process(self._learner(), self._engine(), bucket_mb, trainable_only, version)
        return self._engine().version(), sent.bytes, sent.buckets
