"""Checkpoints: exact resume after a restart, an HF directory that loads with from_pretrained, safe loading."""

from __future__ import annotations

import json

import pytest
import torch
from rows import preference_rows, sft_rows
from transformers import AutoModelForImageTextToText

from raylign.config import DPOConfig, LearnerConfig, ModelConfig, SFTConfig, TrainConfig
from raylign.learner import checkpoint
from raylign.learner.learner import Learner
from raylign.learner.objectives import PreferenceObjective, SFTObjective
from raylign.models.loading import load_processor


def make_learner(path, stage: int) -> Learner:
    train = TrainConfig(learning_rate=2e-3, per_device_train_batch_size=2, warmup_steps=1, weight_decay=0.01)
    return Learner(
        ModelConfig(name_or_path=str(path)), train, LearnerConfig(zero_stage=stage), 8, reference=True
    )


def weights(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: t for b in learner.iter_weight_buckets(4.0) for n, t in b}


def _steps(learner, objective_sft, objective_dpo, start: int, stop: int) -> list[float]:
    """Alternate SFT and MPO steps (so the bco running mean is part of the resumed state)."""
    sft, pref = sft_rows(4), preference_rows(4, lambda i, ex: ex.reasoning)
    losses = []
    for step in range(start, stop):
        if step % 2:
            losses.append(learner.update(pref[2 * (step % 2) :][:2], objective_dpo).metrics["loss"])
        else:
            losses.append(learner.update(sft[(step % 4) :][:2], objective_sft).metrics["loss"])
    return losses


def _objectives():
    mpo = DPOConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    return SFTObjective(SFTConfig()), PreferenceObjective(mpo)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_matches_an_uninterrupted_run(tiny_qwen_dir, tmp_path, stage):
    learner = make_learner(tiny_qwen_dir, stage)
    sft, dpo = _objectives()
    losses = _steps(learner, sft, dpo, 0, 4)
    checkpoint.save(learner, tmp_path / "ckpt", {"epoch": 0, "row": 8})
    losses += _steps(learner, sft, dpo, 4, 7)
    final = weights(learner)
    bco = dpo.state_dict()
    learner.close()

    resumed = make_learner(tiny_qwen_dir, stage)  # a fresh process would do the same
    sft2, dpo2 = _objectives()
    resumed.set_objective(dpo2)
    assert checkpoint.restore(resumed, tmp_path / "ckpt") == {"epoch": 0, "row": 8}
    assert resumed.step == 4 and dpo2.bco_count > 0
    assert _steps(resumed, sft2, dpo2, 4, 7) == losses[4:]  # exactly
    assert dpo2.state_dict() == bco
    again = weights(resumed)
    assert all(torch.equal(final[n], again[n]) for n in final)
    resumed.close()


def test_saved_model_loads_with_from_pretrained_and_gives_the_same_logits(tiny_qwen_dir, tmp_path):
    learner = make_learner(tiny_qwen_dir, 2)
    sft, dpo = _objectives()
    _steps(learner, sft, dpo, 0, 2)
    checkpoint.save(learner, tmp_path / "ckpt")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.dtype == torch.float32
    load_processor(tmp_path / "ckpt")  # the processor round-trips too
    batch = sft.collate(learner.processor, sft_rows(2)).inputs
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        learner.policy.eval()
        ours = learner.policy(**inputs).logits
        theirs = loaded(**inputs).logits
    assert torch.equal(ours, theirs)
    trained = weights(learner)
    assert all(torch.equal(trained[n], p) for n, p in loaded.named_parameters())
    learner.close()


@pytest.mark.parametrize("stage", [0, 3])
def test_restore_reads_only_weights_and_refuses_other_layouts(tiny_qwen_dir, tmp_path, monkeypatch, stage):
    learner = make_learner(tiny_qwen_dir, stage)
    sft, dpo = _objectives()
    _steps(learner, sft, dpo, 0, 1)
    checkpoint.save(learner, tmp_path / "ckpt", {"row": 2})
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert checkpoint.restore(learner, tmp_path / "ckpt") == {"row": 2}
    assert calls and all(w is True for w in calls), calls  # DeepSpeed's files and ours
    state_file = tmp_path / "ckpt" / "resume" / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(ValueError, match="saved by 2 learners"):
        checkpoint.restore(learner, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a raylign checkpoint"):
        checkpoint.restore(learner, tmp_path)
    learner.close()
