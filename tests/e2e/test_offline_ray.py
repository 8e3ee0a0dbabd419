"""The offline driver with 2 Ray learners (ZeRO-2): the in-process run's trajectory, and a dead learner's error.

Both runs take the same global batches (2 learners x 2 rows, or 1 learner x 2 micro-batches of 2 rows),
so DPO losses, reward margins, gradient norms and the held-out metrics (3 eval pairs: the learners pad
the odd row) agree to float tolerance.
"""

from __future__ import annotations

import pytest
import ray

from raylign.config import config_from_dict
from raylign.data.synthetic import make_dataset
from raylign.driver.metrics import read_metrics
from raylign.driver.offline import LearnerFailed, OfflineRun, run

STEPS = 3
COMPARED = ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "learning_rate",
            "eval/loss", "eval/rewards/margins", "eval/accuracy")


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset("color", 15, tmp_path_factory.mktemp("color"), kind="all")


def config(model, data, out, run_name: str, num_learners: int, method: str = "dpo"):
    kind = "sft" if method == "sft" else "preference"
    return config_from_dict({
        "method": method,
        "model": {"name_or_path": str(model)},
        "data": {"train": str(data / f"{kind}.parquet"), "eval_split_size": 3},
        "output_dir": str(out), "run_name": run_name,
        "train": {"learning_rate": 2e-3, "per_device_train_batch_size": 2, "warmup_steps": 1,
                  "gradient_accumulation_steps": 1 if num_learners else 2, "max_steps": STEPS, "eval_steps": STEPS},
        "learner": {"num_learners": num_learners, "zero_stage": 2, "num_cpus_per_learner": 1},
        "logging": {"report_to": ["none"], "progress_bar": False},
    })


def test_two_ray_learners_follow_the_in_process_run(tiny_qwen_dir, data, tmp_path):
    alone = read_metrics(run(config(tiny_qwen_dir, data, tmp_path, "alone", 0)))
    pair = read_metrics(run(config(tiny_qwen_dir, data, tmp_path, "pair", 2)))
    assert [r["step"] for r in pair] == [0, 1, 2, 3]
    for a, b in zip(pair, alone, strict=True):
        for key in COMPARED:
            if b.get(key) is not None:
                assert a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-6), (a["step"], key)
    assert (tmp_path / "pair" / "checkpoints" / f"step_{STEPS}" / "COMPLETE").exists()


def test_a_dead_learner_names_the_checkpoint_and_the_resume_command(tiny_qwen_dir, data, tmp_path):
    job = OfflineRun(config(tiny_qwen_dir, data, tmp_path, "dies", 2, method="sft"))
    try:
        job.step()
        checkpoint = job._save(1)
        ray.kill(job.learners.actors[1])
        with pytest.raises(LearnerFailed, match="a learner died during the update") as failed:
            job.step()
        assert f"last checkpoint: {checkpoint}" in str(failed.value)
        assert f"--train.resume_from_checkpoint={checkpoint}" in str(failed.value)
    finally:
        job.close()
