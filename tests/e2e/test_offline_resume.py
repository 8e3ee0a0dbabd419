"""Exact resume: a run resumed from its step-k checkpoint repeats steps k+1..N of the uninterrupted run.

Ten rows and four rows a step put an epoch boundary inside steps 3 and 5, so the saved data position
(epoch, cursor) and the reshuffle of the next epoch are exercised. DPO precomputes its reference
logprobs, which the checkpoint must carry (a resumed policy is no longer the reference).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from raylign.config import config_from_dict
from raylign.data.synthetic import make_dataset
from raylign.driver.metrics import read_metrics
from raylign.driver.offline import run

STEPS, SAVE_AT = 6, 3
COMPARED = ("loss", "grad_norm", "learning_rate", "epoch", "rewards/margins", "nll")


def config(method: str, model: Path, data: Path, out: Path, run_name: str, **train):
    return config_from_dict({
        "method": method,
        "model": {"name_or_path": str(model)},
        "data": {"train": str(data)},
        "output_dir": str(out), "run_name": run_name,
        "train": {"learning_rate": 2e-3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                  "max_steps": STEPS, "save_steps": SAVE_AT, "lr_scheduler_type": "cosine", "warmup_steps": 1,
                  **train},
        "learner": {"num_learners": 0},
        "dpo": {"precompute_ref_log_probs": True},
        "logging": {"report_to": ["none"], "progress_bar": False},
    })


def weights(run_dir: Path, step: int):
    return load_file(run_dir / "checkpoints" / f"step_{step}" / "model.safetensors")


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_resumed_run_repeats_the_uninterrupted_one(method, tiny_qwen_dir, tmp_path):
    data = make_dataset("color", 10, tmp_path / "data", kind=method if method == "sft" else "preference")
    data = data / ("sft.parquet" if method == "sft" else "preference.parquet")
    full = run(config(method, tiny_qwen_dir, data, tmp_path, "full"))
    checkpoint = full / "checkpoints" / f"step_{SAVE_AT}"
    assert (checkpoint / "COMPLETE").exists()
    assert (checkpoint / "ref_logps.safetensors").exists() == (method == "dpo")
    resumed = run(config(method, tiny_qwen_dir, data, tmp_path, "resumed", resume_from_checkpoint=str(checkpoint)))

    ours, theirs = read_metrics(resumed), read_metrics(full)
    assert [r["step"] for r in ours] == list(range(SAVE_AT + 1, STEPS + 1))
    assert [r["step"] for r in theirs] == list(range(1, STEPS + 1))
    for a, b in zip(ours, theirs[SAVE_AT:], strict=True):
        for key in COMPARED:
            if key in b:
                assert a[key] == b[key], (a["step"], key)  # exactly
    assert len({r["loss"] for r in theirs}) >= STEPS - 1  # the steps differ: the comparison means something
    final_a, final_b = weights(resumed, STEPS), weights(full, STEPS)
    assert final_a.keys() == final_b.keys()
    assert all((final_a[k] == final_b[k]).all() for k in final_b)
