"""LoRA: adapters train, the reference is the base (adapters disabled), merged export = the merged model."""

from __future__ import annotations

import copy

import pytest
import torch
from rows import sft_rows
from transformers import AutoModelForImageTextToText

from raylign.config import LearnerConfig, LoraConfig, ModelConfig, SFTConfig, TrainConfig
from raylign.learner import checkpoint
from raylign.learner.learner import Learner
from raylign.learner.objectives import SFTObjective
from raylign.models.loading import load_model


@pytest.fixture(scope="module", params=[2, 3])
def trained(request, tiny_qwen_dir):
    """A LoRA learner after three SFT steps, and the batch it trained on."""
    model_cfg = ModelConfig(name_or_path=str(tiny_qwen_dir), lora=LoraConfig(r=4, lora_alpha=8))
    train = TrainConfig(learning_rate=1e-2, per_device_train_batch_size=4)
    learner = Learner(model_cfg, train, LearnerConfig(zero_stage=request.param), 10, reference=True)
    objective = SFTObjective(SFTConfig())
    rows = sft_rows(4)
    losses = [learner.update(rows, objective).metrics["loss"] for _ in range(3)]
    batch = objective.collate(learner.processor, rows).inputs
    yield learner, batch, losses
    learner.close()


def test_adapters_train_and_only_adapters(trained, tiny_qwen_dir):
    learner, _, losses = trained
    assert losses[2] < losses[0] - 0.05
    names = [n for n, p in learner.policy.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not any("visual" in n for n in names)  # all-linear means the language model's linear layers
    assert any(n.endswith("mlp.down_proj.lora_A.default.weight") for n in names)


def test_reference_is_the_base_model(trained, tiny_qwen_dir):
    learner, batch, _ = trained
    base = load_model(tiny_qwen_dir).eval()
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        logp = base(**inputs).logits.log_softmax(-1)
    ref, mask = learner.logprobs(batch, reference=True)
    policy, _ = learner.logprobs(batch)
    for b in range(batch["input_ids"].shape[0]):
        pos = torch.nonzero(batch["completion_mask"][b]).squeeze(-1)
        expected = logp[b, pos - 1].gather(-1, batch["input_ids"][b, pos, None]).squeeze(-1)
        torch.testing.assert_close(ref[b, : len(pos)], expected, rtol=1e-5, atol=1e-5)
    assert float((policy - ref)[mask].abs().max()) > 1e-3  # the adapters changed the policy


def test_merged_export_equals_the_merged_model(trained, tiny_qwen_dir, tmp_path):
    learner, batch, _ = trained
    exported = {n: t for b in learner.iter_weight_buckets(0.1) for n, t in b}
    fresh_names = [n for n, _ in load_model(tiny_qwen_dir).named_parameters()]
    assert list(exported) == fresh_names
    if learner.learner_cfg.zero_stage == 2:  # a plain PEFT model to merge independently
        merged = copy.deepcopy(learner.policy).merge_and_unload()
        for name, p in merged.named_parameters():
            torch.testing.assert_close(exported[name], p.detach(), rtol=0, atol=1e-6)
    trainable = {n for b in learner.iter_weight_buckets(0.1, trainable_only=True) for n, _ in b}
    assert trainable and all(n.endswith(".weight") and "language_model.layers." in n for n in trainable)
    checkpoint.save_model(learner, tmp_path / "model")
    assert (tmp_path / "model" / "adapter" / "adapter_config.json").is_file()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "model").eval()
    for name, p in loaded.named_parameters():
        assert torch.equal(exported[name], p.detach()), name
    policy_lp, _ = learner.logprobs(batch)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        logp = loaded(**inputs).logits.log_softmax(-1)
    pos = torch.nonzero(batch["completion_mask"][0]).squeeze(-1)
    expected = logp[0, pos - 1].gather(-1, batch["input_ids"][0, pos, None]).squeeze(-1)
    torch.testing.assert_close(policy_lp[0, : len(pos)], expected, rtol=1e-4, atol=1e-4)
