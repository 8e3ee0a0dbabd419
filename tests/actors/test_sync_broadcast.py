"""WeightBroadcaster on a local Ray: 2 learners (ZeRO-2, ZeRO-3) -> 2 rollout workers, over gloo and the object store.

After a sync every engine's logits on a fixed image+text input are bitwise equal (fp32, CPU) to the
learner policy's own, computed inside the learner actors. The learners train first, so the weights
differ from the checkpoint the engines start from. The rollout group is shared (actor start-up is
the slow part); each case first puts the checkpoint back into the engines.
"""

from __future__ import annotations

import itertools
import sys

import pytest
import ray
import torch
from PIL import Image

from raylign.config import LearnerConfig, ModelConfig, SFTConfig, SyncConfig, TrainConfig
from raylign.data.chat import encode_for_generation
from raylign.learner.group import LearnerGroup
from raylign.learner.objectives import SFTObjective
from raylign.models.loading import load_model, load_processor, vision_module_prefixes
from raylign.rollout.engine import EngineSpec
from raylign.rollout.group import RolloutGroup
from raylign.sync.broadcaster import WeightBroadcaster

IMG = Image.new("RGB", (48, 40), (200, 30, 30))
VERSIONS = itertools.count(1)
BUCKET_MB = 0.05  # ~15 buckets for the tiny model; the embedding is bigger and goes alone

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the functions run inside actors


def sft_rows(n: int) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it?"}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "<answer>red</answer>"}]}
    return [{"messages": [user, answer], "images": [IMG]} for _ in range(n)]


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Eval-mode logits with one thread, so every process reduces in the same order."""
    threads, was = torch.get_num_threads(), model.training
    torch.set_num_threads(1)
    model.eval()
    with torch.no_grad():
        out = model(**inputs).logits
    model.train(was)
    torch.set_num_threads(threads)
    return out


def learner_logits(learners: LearnerGroup, inputs: dict) -> torch.Tensor:
    """The policy's logits, computed by every learner rank at once (a collective under ZeRO-3)."""
    calls = [a.__ray_call__.remote(lambda w, x: logits(w.learner.policy, x), inputs) for a in learners.actors]
    return ray.get(calls)[0]


def engine_logits(handle, inputs: dict) -> torch.Tensor:
    return ray.get(handle.__ray_call__.remote(lambda w, x: logits(w.engine.model, x), inputs))


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def rollouts(ray_session, tiny_qwen_dir):
    group = RolloutGroup(2, EngineSpec("transformers", str(tiny_qwen_dir), {"batch_size": 2}))
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tiny_qwen_dir):
    model = load_model(tiny_qwen_dir)
    inputs = dict(
        encode_for_generation(load_processor(tiny_qwen_dir), ["what colour is the circle?"], [[IMG]])
    )
    return model, inputs


def reset_engines(rollouts: RolloutGroup, model: torch.nn.Module) -> None:
    rollouts.load_weights(list(model.named_parameters()), next(VERSIONS))


@pytest.mark.parametrize(
    "stage,freeze",
    [(2, True), (2, False), (3, True), (3, False)],
    ids=["zero2-frozen", "zero2", "zero3-frozen", "zero3"],
)
def test_engines_equal_the_learner_after_a_sync(tiny_qwen_dir, rollouts, checkpoint, stage, freeze):
    model, inputs = checkpoint
    learners = LearnerGroup(
        ModelConfig(name_or_path=str(tiny_qwen_dir), freeze_vision_tower=freeze),
        TrainConfig(learning_rate=2e-2, per_device_train_batch_size=1),
        LearnerConfig(num_learners=2, zero_stage=stage, num_cpus_per_learner=1),
        10,
    )
    learners.update(sft_rows(2), SFTObjective(SFTConfig()))
    want = learner_logits(learners, inputs)
    assert not torch.equal(want, logits(model, inputs))  # the learner moved away from the checkpoint
    vision = vision_module_prefixes(model)
    total = sum(p.numel() * 4 for p in model.parameters())
    frozen = sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith(vision))
    for transport in ("collective", "object_store"):
        reset_engines(rollouts, model)
        cfg = SyncConfig(transport=transport, bucket_mb=BUCKET_MB, timeout_s=60)
        broadcaster = WeightBroadcaster(learners, rollouts, cfg, trainable_only=freeze)
        for sync in range(2):
            version = next(VERSIONS)
            metrics = broadcaster.broadcast(version)
            for worker_id, handle in rollouts.workers:
                assert torch.equal(engine_logits(handle, inputs), want), (transport, worker_id)
                assert ray.get(handle.version.remote()) == version
            assert rollouts.workers_needing_sync() == [] and rollouts.version == version
            # One call per engine and per learner rank; a first sync also pings the engines it has
            # not seen, and over collective builds the group (layout, store, 3 joins).
            setup = (2 + (5 if transport == "collective" else 0)) if sync == 0 else 0
            assert metrics["sync/control_calls"] == 2 + 2 + setup, (transport, sync)
            assert metrics["sync/bytes"] == (total - frozen if freeze else total)
            assert metrics["sync/buckets"] > 5 and metrics["sync/version"] == version
        broadcaster.close()
    learners.shutdown()


def test_an_in_process_learner_broadcasts_to_remote_engines(tiny_qwen_dir, rollouts, checkpoint):
    """num_learners=0: the driver itself is rank 0 of the gloo group ('auto' picks collective)."""
    model, inputs = checkpoint
    reset_engines(rollouts, model)
    learners = LearnerGroup(
        ModelConfig(name_or_path=str(tiny_qwen_dir)),
        TrainConfig(learning_rate=2e-2, per_device_train_batch_size=2),
        LearnerConfig(num_learners=0),
        10,
    )
    learners.update(sft_rows(2), SFTObjective(SFTConfig()))
    want = logits(learners.local_learner.policy, inputs)
    broadcaster = WeightBroadcaster(learners, rollouts, SyncConfig(bucket_mb=BUCKET_MB, timeout_s=60))
    assert broadcaster.transport.name == "collective"
    version = next(VERSIONS)
    broadcaster.broadcast(version)
    for _, handle in rollouts.workers:
        assert torch.equal(engine_logits(handle, inputs), want)
    broadcaster.close()
    learners.shutdown()
