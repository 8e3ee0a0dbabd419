"""In-process weight sync (num_learners=0, num_workers=0): after a sync the engine computes the learner's logits."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from raylign.config import LearnerConfig, LoraConfig, ModelConfig, SFTConfig, SyncConfig, TrainConfig
from raylign.data.chat import encode_for_generation
from raylign.learner.group import LearnerGroup
from raylign.learner.objectives import SFTObjective
from raylign.protocol import RolloutRequest, SamplingParams
from raylign.rollout.engine import EngineSpec
from raylign.rollout.group import RolloutGroup
from raylign.sync.broadcaster import WeightBroadcaster

IMG = Image.new("RGB", (48, 40), (200, 30, 30))


def sft_rows(n: int) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it?"}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "<answer>red</answer>"}]}
    return [{"messages": [user, answer], "images": [IMG]} for _ in range(n)]


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(**inputs).logits
    model.train(was)
    return out


@pytest.mark.parametrize(
    "stage,freeze,lora", [(2, True, 0), (3, False, 0), (2, False, 4)], ids=["zero2-frozen", "zero3", "lora"]
)
def test_inprocess_sync_gives_the_engine_the_learners_logits(tiny_qwen_dir, stage, freeze, lora):
    model_cfg = ModelConfig(
        name_or_path=str(tiny_qwen_dir), freeze_vision_tower=freeze, lora=LoraConfig(r=lora)
    )
    train = TrainConfig(learning_rate=2e-2, per_device_train_batch_size=2)
    learners = LearnerGroup(model_cfg, train, LearnerConfig(num_learners=0, zero_stage=stage), 10)
    rollouts = RolloutGroup(0, EngineSpec("transformers", str(tiny_qwen_dir), {"batch_size": 2}))
    engine = rollouts.local.engine
    inputs = dict(encode_for_generation(engine.processor, ["what colour is the circle?"], [[IMG]]))
    initial = logits(engine.model, inputs)
    learners.update(sft_rows(2), SFTObjective(SFTConfig()))
    learners.update(sft_rows(2), SFTObjective(SFTConfig()))
    want = logits(learners.local_learner.policy, inputs)
    assert not torch.equal(want, initial)  # training moved the policy away from the checkpoint

    trainable_only = freeze or bool(lora)  # with LoRA only the adapter-merged layers can change
    broadcaster = WeightBroadcaster(
        learners, rollouts, SyncConfig(bucket_mb=0.05), trainable_only=trainable_only
    )
    assert broadcaster.transport.name == "inprocess"
    metrics = broadcaster.broadcast(7)
    got = logits(engine.model, inputs)
    if lora:  # the engine runs merged weights, the learner W x + B A x: equal up to rounding
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)
    total = sum(p.numel() * 4 for p in engine.model.parameters())
    assert metrics["sync/version"] == 7 and metrics["sync/control_calls"] == 0 and metrics["sync/buckets"] > 1
    assert (metrics["sync/bytes"] < total) == trainable_only
    assert rollouts.version == 7 and engine.version == 7
    sampling = SamplingParams(n=1, max_tokens=2, temperature=0.0)
    rollout = rollouts.generate([RolloutRequest(uid="q", prompt="hi", images=(), sampling=sampling)])[0]
    assert rollout.policy_version == 7
    broadcaster.close()
    learners.shutdown()
