"""rollout.colocate on a local Ray: 2 ZeRO-3 learner actors, each with its own transformers engine.

The engines live in the learner actors' processes, so a weight sync is a copy inside each process:
no weight group is built, no byte crosses a process boundary, and after the sync each engine's
logits on a fixed image+text input are bitwise equal (fp32, CPU) to its learner's. Generation,
training and syncing then take turns in the same actors, with versions advancing.
"""

from __future__ import annotations

import os
import sys

import pytest
import ray
import torch
from PIL import Image
from ray.exceptions import RayActorError

from raylign.config import LearnerConfig, ModelConfig, SFTConfig, SyncConfig, TrainConfig
from raylign.data.chat import encode_for_generation
from raylign.learner.group import LearnerGroup
from raylign.learner.objectives import SFTObjective
from raylign.models.loading import load_model, load_processor
from raylign.protocol import RolloutRequest, SamplingParams
from raylign.rollout.engine import EngineSpec
from raylign.rollout.group import RolloutGroup
from raylign.sync.broadcaster import WeightBroadcaster
from raylign.sync.group import ColocatedTransport

IMG = Image.new("RGB", (48, 40), (200, 30, 30))
BUCKET_MB = 0.05  # many buckets for the tiny model, as a real sync has

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the functions run inside actors


def sft_rows(n: int) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it?"}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "<answer>red</answer>"}]}
    return [{"messages": [user, answer], "images": [IMG]} for _ in range(n)]


def requests(k: int, prefix: str) -> list[RolloutRequest]:
    s = SamplingParams(n=2, max_tokens=4)
    return [RolloutRequest(f"{prefix}{i}", f"colour? {i}", images=(IMG,), sampling=s) for i in range(k)]


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Eval-mode logits with one thread, so both models reduce in the same order."""
    threads, was = torch.get_num_threads(), model.training
    torch.set_num_threads(1)
    model.eval()
    with torch.no_grad():
        out = model(**inputs).logits
    model.train(was)
    torch.set_num_threads(threads)
    return out


def in_actor(worker, inputs: dict) -> dict:
    """What one colocated actor holds: both models' logits, its pid, and any weight-sync group or store."""
    return {
        "learner": logits(worker.learner.policy, inputs),
        "engine": logits(worker.rollout.engine.model, inputs),
        "pid": os.getpid(),
        "sync_state": (
            worker.weight_sender.group, worker.weight_sender._store, worker.rollout.weight_receiver.group
        ),
    }


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("stage", [3], ids=["zero3"])  # gathered buckets; ZeRO-2 views: tests/e2e
def test_colocated_sync_stays_in_each_learner_process(ray_session, tiny_qwen_dir, stage):
    inputs = dict(encode_for_generation(load_processor(tiny_qwen_dir), ["what colour is it?"], [[IMG]]))
    learners = LearnerGroup(
        ModelConfig(name_or_path=str(tiny_qwen_dir)),
        TrainConfig(learning_rate=2e-2, per_device_train_batch_size=1),
        LearnerConfig(num_learners=2, zero_stage=stage, num_cpus_per_learner=1),
        10,
        colocated=True,
    )
    rollouts = RolloutGroup(2, EngineSpec("transformers", str(tiny_qwen_dir), {"batch_size": 2}),
                            actors=learners.actors)
    broadcaster = WeightBroadcaster(learners, rollouts, SyncConfig(bucket_mb=BUCKET_MB, timeout_s=60))
    try:
        assert [h for _, h in rollouts.workers] == learners.actors  # the engines live in the learner actors
        transport = broadcaster.transport
        assert isinstance(transport, ColocatedTransport) and transport.name == "inprocess"
        first = rollouts.generate(requests(4, "a"))
        assert {r.policy_version for r in first} == {0}
        assert {r.worker for r in first} == {"rollout-0", "rollout-1"}

        total = sum(p.numel() * 4 for p in load_model(tiny_qwen_dir).parameters())
        for version in (1, 2):
            learners.update(sft_rows(2), SFTObjective(SFTConfig()))
            rollouts.sleep()  # what the driver does around an update; a no-op on CPU, but it must not break
            rollouts.wake()
            metrics = broadcaster.broadcast(version)
            # One call per learner actor (plus a first readiness ping each); every byte loaded in-process.
            assert metrics["sync/control_calls"] == 2 + (2 if version == 1 else 0)
            assert metrics["sync/bytes"] == total and metrics["sync/buckets"] > 5
            assert rollouts.version == version and rollouts.workers_needing_sync() == []
            held = ray.get([a.__ray_call__.remote(in_actor, inputs) for a in learners.actors])
            pings = ray.get([a.ping.remote() for a in learners.actors])
            for rank, (got, ping) in enumerate(zip(held, pings)):
                assert torch.equal(got["engine"], got["learner"]), (stage, version, rank)
                assert got["sync_state"] == (None, None, None), "a weight-sync group or store was created"
                assert (ping["pid"], ping["version"], ping["weight_group"]) == (got["pid"], version, False)
            assert held[0]["pid"] != held[1]["pid"]
            assert not torch.equal(held[0]["engine"], logits(load_model(tiny_qwen_dir), inputs))  # it trained
            later = rollouts.generate(requests(2, f"v{version}-"))
            assert {r.policy_version for r in later} == {version}
    finally:
        broadcaster.close()
        rollouts.shutdown()  # leaves the actors to the learner group
        learners.shutdown()


def test_a_colocated_engine_is_never_resized_nor_replaced(ray_session, tiny_qwen_dir):
    learners = LearnerGroup(ModelConfig(name_or_path=str(tiny_qwen_dir)),
                            TrainConfig(per_device_train_batch_size=1),
                            LearnerConfig(num_learners=1, num_cpus_per_learner=1), 1, colocated=True)
    spec = EngineSpec("transformers", str(tiny_qwen_dir))
    alive = True
    try:
        rollouts = RolloutGroup(1, spec, actors=learners.actors)
        assert not rollouts.resizable
        with pytest.raises(ValueError, match="colocated engines live in the learner actors"):
            rollouts.add_workers(1)
        with pytest.raises(ValueError, match="colocated engines live in the learner actors"):
            rollouts.remove_workers(1)
        rollouts.shutdown()
        assert ray.get(learners.actors[0].step.remote()) == 0  # the rollouts' shutdown left the learner up

        rollouts = RolloutGroup(1, spec, actors=learners.actors)
        ray.kill(learners.actors[0], no_restart=True)  # the learner dies, and its engine with it
        alive = False
        with pytest.raises(RayActorError):  # raised to the driver, which names the resume command
            rollouts.generate(requests(1, "dead"))
        assert rollouts.num_workers == 0 and rollouts.restarts == 0  # dropped, nothing started in its place
    finally:
        if alive:
            learners.shutdown()
