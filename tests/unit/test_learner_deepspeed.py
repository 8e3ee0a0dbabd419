"""The DeepSpeed learner in one process: logprobs, skipped non-finite steps, the schedule, weight export."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from rows import sft_rows

from raylign.config import LearnerConfig, ModelConfig, SFTConfig, TrainConfig
from raylign.learner.learner import Learner
from raylign.learner.objectives import SFTObjective
from raylign.models.loading import load_model


def make_learner(path, stage: int = 2, steps: int = 10, warmup: int = 0, **model_kw) -> Learner:
    train = TrainConfig(
        learning_rate=1e-3, per_device_train_batch_size=2, warmup_steps=warmup, lr_scheduler_type="cosine"
    )
    return Learner(
        ModelConfig(name_or_path=str(path), **model_kw), train, LearnerConfig(zero_stage=stage), steps
    )


def exported(learner: Learner) -> dict[str, torch.Tensor]:
    return {name: t for bucket in learner.iter_weight_buckets(1.0) for name, t in bucket}


@dataclass
class PoisonedSFT(SFTObjective):
    """SFT whose loss becomes NaN while ``poison`` is set (so every gradient is NaN)."""

    poison: bool = False

    def loss(self, mb, policy, reference, totals):
        loss, metrics = super().loss(mb, policy, reference, totals)
        return (loss * float("nan"), metrics) if self.poison else (loss, metrics)


def test_logprobs_match_a_plain_forward(tiny_llava_dir):
    learner = make_learner(tiny_llava_dir, stage=3)
    objective = SFTObjective(SFTConfig())
    batch = objective.collate(learner.processor, sft_rows(3)).inputs
    lp, mask = learner.logprobs(batch, temperature=0.8)
    model = load_model(tiny_llava_dir).eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
        logp = (model(**inputs).logits / 0.8).log_softmax(-1)
    for b in range(3):
        pos = torch.nonzero(batch["completion_mask"][b]).squeeze(-1)
        expected = logp[b, pos - 1].gather(-1, batch["input_ids"][b, pos, None]).squeeze(-1)
        assert int(mask[b].sum()) == len(pos)
        torch.testing.assert_close(lp[b, : len(pos)], expected, rtol=1e-5, atol=1e-5)
    learner.close()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_non_finite_step_is_skipped_and_counted(tiny_qwen_dir, stage):
    learner = make_learner(tiny_qwen_dir, stage=stage)
    objective = PoisonedSFT(SFTConfig())
    rows = sft_rows(4)
    first = learner.update(rows, objective)
    assert not first.skipped and math.isfinite(first.metrics["loss"])
    before = exported(learner)
    objective.poison = True
    bad = learner.update(rows, objective)
    assert bad.skipped and learner.skipped_steps == 1 and bad.metrics["skipped_steps"] == 1.0
    assert not math.isfinite(bad.metrics["grad_norm"])
    after_bad = exported(learner)
    assert all(torch.equal(before[n], after_bad[n]) for n in before)  # nothing moved
    objective.poison = False
    good = learner.update(rows, objective)
    assert (
        not good.skipped and math.isfinite(good.metrics["loss"]) and math.isfinite(good.metrics["grad_norm"])
    )
    assert good.metrics["loss"] < first.metrics["loss"]
    after = exported(learner)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert (bad.step, good.step) == (2, 3)
    learner.close()


def test_update_metrics_follow_the_schedule(tiny_qwen_dir):
    learner = make_learner(tiny_qwen_dir, warmup=2)
    rows = sft_rows(4)
    lrs, results = [], []
    for _ in range(3):
        lrs.append(learner.learning_rate())
        results.append(learner.update(rows, SFTObjective(SFTConfig())))
    assert [r.metrics["learning_rate"] for r in results] == lrs
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3])  # warmup 2: 0, half, peak
    m = results[-1].metrics
    assert m["num_tokens"] == float(
        sum(int(objective_mask.sum()) for objective_mask in _masks(learner, rows))
    )
    assert m["loss"] == pytest.approx(m["nll"], rel=1e-5)  # token-mean NLL, also as a weighted metric
    assert m["throughput/tokens_per_s"] > 0 and m["grad_norm"] > 0
    assert results[0].metrics["loss"] == pytest.approx(results[1].metrics["loss"])  # lr 0: no change
    assert results[2].metrics["loss"] < results[1].metrics["loss"]
    learner.close()


def _masks(learner, rows):
    return [
        SFTObjective(SFTConfig()).collate(learner.processor, rows[i : i + 2]).inputs["completion_mask"]
        for i in (0, 2)
    ]


@pytest.mark.parametrize("stage", [2, 3])
def test_weight_export_names_values_and_buckets(tiny_qwen_dir, stage):
    learner = make_learner(tiny_qwen_dir, stage=stage, freeze_vision_tower=True)
    fresh = dict(load_model(tiny_qwen_dir).named_parameters())
    bucket_mb = 0.05
    buckets = list(learner.iter_weight_buckets(bucket_mb))
    weights = {n: t for b in buckets for n, t in b}
    assert list(weights) == list(fresh)  # same names, same order
    assert all(torch.equal(weights[n], fresh[n].detach()) for n in fresh)
    limit = bucket_mb * 2**20
    for b in buckets:
        assert len(b) == 1 or sum(t.numel() * t.element_size() for _, t in b) <= limit
    assert len(buckets) > 3
    trainable = {n for b in learner.iter_weight_buckets(bucket_mb, trainable_only=True) for n, _ in b}
    assert trainable and not any(n.startswith("model.visual.") for n in trainable)
    assert trainable == {n for n in fresh if not n.startswith("model.visual.")}
    learner.close()


def test_gradient_checkpointing_changes_nothing_but_memory(tiny_qwen_dir):
    rows = sft_rows(4)
    losses = []
    for checkpointing in (False, True):
        learner = make_learner(tiny_qwen_dir, stage=3, gradient_checkpointing=checkpointing)
        assert learner.policy.is_gradient_checkpointing == checkpointing
        losses.append([learner.update(rows, SFTObjective(SFTConfig())).metrics["loss"] for _ in range(2)])
        learner.close()
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert losses[0][1] < losses[0][0]


def test_deepspeed_config_choices():
    from raylign.learner.engine import deepspeed_config

    train = TrainConfig(per_device_train_batch_size=3, max_grad_norm=0.5, learning_rate=2e-5, adam_beta2=0.95)
    gpu = deepspeed_config(
        train, LearnerConfig(zero_stage=3, offload_optimizer=True, offload_param=True), "bf16", "cuda", 4
    )
    assert gpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert gpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert gpu["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert gpu["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert gpu["optimizer"]["params"]["torch_adam"] is True and gpu["optimizer"]["params"]["betas"] == [
        0.9,
        0.95,
    ]
    assert (gpu["train_batch_size"], gpu["gradient_clipping"], gpu["managed_gradient_accumulation"]) == (
        12,
        0.5,
        False,
    )
    cpu = deepspeed_config(train, LearnerConfig(zero_stage=2, offload_optimizer=True), "fp32", "cpu", 1)
    assert "offload_optimizer" not in cpu["zero_optimization"]  # already in CPU memory
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["bf16"]["enabled"] is False
    stage0 = deepspeed_config(train, LearnerConfig(zero_stage=0), "fp32", "cpu", 1)
    assert "optimizer" not in stage0 and stage0["gradient_clipping"] == 0.0  # GuardedAdamW clips and skips


def _deepspeed_optimizer_choice(config: dict) -> tuple[type, dict]:
    """The optimizer class and extra kwargs DeepSpeed 0.19's own code picks for ``config`` (nothing built).

    ``get_optimizer_configuration`` reads three engine settings; they come from ``config`` here.
    """
    from types import SimpleNamespace

    from deepspeed.runtime.engine import DeepSpeedEngine

    engine = SimpleNamespace(
        zero_use_cpu_optimizer=lambda: "offload_optimizer" in config["zero_optimization"],
        zenflow=False,
        bf16_optimizer_states=lambda: False,
    )
    params = dict(config["optimizer"]["params"])
    cls, extra = DeepSpeedEngine.get_optimizer_configuration(engine, params, adam_w_mode=True)
    return cls, {**params, **extra}


@pytest.mark.parametrize("stage,offload", [(0, False), (2, False), (3, False), (2, True)])
def test_gpu_learner_builds_no_deepspeed_op(stage, offload):
    """On a GPU DeepSpeed must pick torch's AdamW: its FusedAdam / DeepSpeedCPUAdam are JIT-built and
    docker/Dockerfile.gpu has no nvcc (a CUDA runtime base image, DS_BUILD_OPS=0)."""
    from raylign.learner.engine import deepspeed_config

    learner = LearnerConfig(zero_stage=stage, offload_optimizer=offload)
    cfg = deepspeed_config(TrainConfig(), learner, "bf16", "cuda", 2)
    cls, kwargs = _deepspeed_optimizer_choice(cfg)
    assert cls is torch.optim.AdamW, f"DeepSpeed would build {cls.__module__}.{cls.__name__}"
    assert kwargs.get("fused", False) is (not offload)  # fused where the optimizer state is on the GPU
    # The exact arguments DeepSpeed passes are accepted by torch (fused AdamW also runs on CPU tensors).
    weight = torch.nn.Parameter(torch.ones(3))
    opt = cls([weight], **kwargs)
    weight.grad = torch.ones(3)
    opt.step()
    assert bool(opt.defaults["fused"]) is (not offload) and bool((weight < 1).all())


def test_gpu_optimizer_config_goes_through_deepspeed_initialize():
    """The GPU optimizer section through a real deepspeed.initialize (on CPU): torch's fused AdamW is built."""
    import deepspeed

    from raylign.learner.distributed import ensure_process_group
    from raylign.learner.engine import deepspeed_config

    ensure_process_group(0, 1, "gloo", None)
    gpu = deepspeed_config(TrainConfig(), LearnerConfig(zero_stage=2), "bf16", "cuda", 1)
    cpu_ready = {**gpu, "bf16": {"enabled": False}}  # everything else as on a GPU
    model = torch.nn.Linear(4, 4)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cpu_ready)
    assert type(engine.basic_optimizer) is torch.optim.AdamW and engine.basic_optimizer.defaults["fused"] is True
