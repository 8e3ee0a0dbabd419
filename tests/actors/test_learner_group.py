"""LearnerGroup on a local Ray: 2 learners (ZeRO-2, ZeRO-3) follow 1 learner's trajectory; multi-rank resume."""

from __future__ import annotations

import time

import pytest
import ray
import torch
from rows import preference_rows, sft_rows, user_turn

from raylign.config import DPOConfig, LearnerConfig, ModelConfig, SFTConfig, TrainConfig
from raylign.data.synthetic import generate_example
from raylign.learner.group import LearnerGroup, shard
from raylign.learner.objectives import PreferenceObjective, SFTObjective

SFT_STEPS, DPO_STEPS, BATCH = 2, 2, 4


SFT_ROWS = sft_rows(SFT_STEPS * BATCH)
PREF_ROWS = preference_rows(DPO_STEPS * BATCH, lambda i, ex: "hmm " * (1 + i % 3))
MPO = DPOConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def make_group(path, num_learners: int, stage: int, micro_batch: int) -> LearnerGroup:
    train = TrainConfig(learning_rate=2e-3, per_device_train_batch_size=micro_batch, warmup_steps=1)
    learner = LearnerConfig(num_learners=num_learners, zero_stage=stage, num_cpus_per_learner=1)
    return LearnerGroup(ModelConfig(name_or_path=str(path)), train, learner, 10, reference=True)


def run(group: LearnerGroup, steps: range) -> list[dict[str, float]]:
    """SFT steps, then MPO steps (with the reference model), over the same global batches."""
    out = []
    for step in steps:
        if step < SFT_STEPS:
            out.append(
                dict(group.update(SFT_ROWS[step * BATCH :][:BATCH], SFTObjective(SFTConfig())).metrics)
            )
        else:
            k = step - SFT_STEPS
            out.append(dict(group.update(PREF_ROWS[k * BATCH :][:BATCH], PreferenceObjective(MPO)).metrics))
    return out


def weights(group: LearnerGroup) -> dict[str, torch.Tensor]:
    return {n: t for bucket in group.weight_buckets(1.0) for n, t in bucket}


@pytest.fixture(scope="module")
def baseline(tiny_qwen_dir):
    """One in-process learner, whole batches in one micro-batch."""
    group = make_group(tiny_qwen_dir, 0, 2, BATCH)
    metrics = run(group, range(SFT_STEPS + DPO_STEPS))
    refs = group.sequence_logps(PREF_ROWS[:3], PreferenceObjective(MPO), reference=True)
    final = weights(group)
    group.shutdown()
    return metrics, refs, final


def _assert_same_trajectory(ours, theirs):
    keys = ("loss", "grad_norm", "learning_rate", "rewards/margins", "loss/sft", "bco/reward_mean", "nll")
    for a, b in zip(ours, theirs, strict=True):
        for key in keys:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-6), key


@pytest.mark.parametrize("stage,micro_batch", [(2, 1), (3, 2)])
def test_two_learners_follow_one(tiny_qwen_dir, tmp_path, baseline, stage, micro_batch):
    base_metrics, base_refs, base_weights = baseline
    start = time.perf_counter()
    group = make_group(tiny_qwen_dir, 2, stage, micro_batch)
    half = SFT_STEPS + 1
    first = run(group, range(half))
    group.save(tmp_path / "ckpt", {"step": half})
    rest = run(group, range(half, SFT_STEPS + DPO_STEPS))
    _assert_same_trajectory(first + rest, base_metrics)
    no_answer = {"messages": [user_turn("what colour?")], "images": [generate_example("color", 0).image]}
    with pytest.raises(ray.exceptions.RayTaskError, match="no assistant turn|another learner failed"):
        group.update(SFT_ROWS[:1] + [no_answer], SFTObjective(SFTConfig()))  # rank 1 fails; neither hangs
    refs = group.sequence_logps(
        PREF_ROWS[:3], PreferenceObjective(MPO), reference=True
    )  # 3 rows: padded shards
    torch.testing.assert_close(refs, base_refs, rtol=1e-5, atol=1e-4)
    final = weights(group)
    for name, t in base_weights.items():
        torch.testing.assert_close(final[name], t, rtol=1e-4, atol=1e-5)
    group.shutdown()
    seconds = time.perf_counter() - start

    resumed = make_group(tiny_qwen_dir, 2, stage, micro_batch)  # a restarted job
    assert resumed.restore(tmp_path / "ckpt") == {"step": half}
    assert resumed.step == half
    again = run(resumed, range(half, SFT_STEPS + DPO_STEPS))
    assert [m["loss"] for m in again] == [m["loss"] for m in rest]  # exactly
    assert all(torch.equal(t, final[n]) for n, t in weights(resumed).items())
    resumed.shutdown()
    print(f"ZeRO-{stage}, 2 learners: {seconds:.1f}s for start + {SFT_STEPS + DPO_STEPS} steps + save")


def test_batches_must_split_evenly():
    assert shard(list(range(6)), 3) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="5 rows does not split evenly over 2 learners"):
        shard(list(range(5)), 2)
