"""`raylign sft --config FILE` in a subprocess writes the run directory of the contract, and `--resume` continues it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForImageTextToText

from raylign.config import load_config
from raylign.data.synthetic import make_dataset
from raylign.driver.metrics import read_metrics
from raylign.models.loading import load_processor


def raylign(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "raylign", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_sft_cli_writes_the_run_directory_and_resumes(tiny_qwen_dir, tmp_path):
    data = make_dataset("color", 12, tmp_path / "data", kind="sft")
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_qwen_dir)},
        "data": {"train": str(data / "sft.parquet"), "eval_split_size": 4},
        "output_dir": str(tmp_path / "runs"), "run_name": "cli",
        "train": {"learning_rate": 1e-3, "per_device_train_batch_size": 2, "max_steps": 3, "eval_steps": 3},
        "learner": {"num_learners": 0},
        "logging": {"progress_bar": False},
    }))
    out = raylign("sft", "--config", str(config))
    run_dir = tmp_path / "runs" / "cli"
    assert f"run directory: {run_dir}" in out.stdout

    assert load_config(run_dir / "config.yaml").method == "sft"  # the resolved config loads again
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert {"loss", "grad_norm", "learning_rate", "throughput/tokens_per_s", "epoch"} <= set(rows[1])
    assert {"eval/loss", "eval/accuracy"} <= set(rows[-1])
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    checkpoint = run_dir / "checkpoints" / "step_3"
    assert (checkpoint / "COMPLETE").exists()
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    processor = load_processor(checkpoint)  # AutoProcessor wants torchvision for Qwen's video part
    ids = processor.tokenizer("What colour?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()

    raylign("sft", "--config", str(config), "--resume", "--train.max_steps=5")  # `latest` of run_name
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert (run_dir / "checkpoints" / "step_5" / "COMPLETE").exists()
    assert Path(load_config(run_dir / "config.yaml").train.resume_from_checkpoint or "") == Path("latest")
