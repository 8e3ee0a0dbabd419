"""A TRL user's MPO recipe, written as TRL's DPOConfig keys, runs unchanged with `raylign mpo --config` (issue 15)."""

from __future__ import annotations

import subprocess
import sys

import yaml

from raylign.config import load_config
from raylign.data.synthetic import make_dataset
from raylign.driver.metrics import read_metrics


def test_flat_trl_mpo_recipe_trains(tiny_qwen_dir, tmp_path):
    data = make_dataset("color", 8, tmp_path / "data", kind="preference")
    recipe = tmp_path / "mpo.yaml"
    recipe.write_text(yaml.safe_dump({  # TRL's names throughout; one raylign section for what TRL has no name for
        "model_name_or_path": str(tiny_qwen_dir), "dataset_name": str(data / "preference.parquet"),
        "output_dir": str(tmp_path / "runs"), "run_name": "trl-mpo",
        "loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "beta": 0.1,
        "learning_rate": 1e-4, "per_device_train_batch_size": 2, "max_steps": 2, "logging_steps": 1,
        "remove_unused_columns": False, "report_to": "none", "disable_tqdm": True,
        "learner": {"num_learners": 0},
    }))
    proc = subprocess.run([sys.executable, "-m", "raylign", "mpo", "--config", str(recipe)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "remove_unused_columns=False has no meaning in raylign" in proc.stderr  # the one logged line
    run_dir = tmp_path / "runs" / "trl-mpo"
    cfg = load_config(run_dir / "config.yaml")  # the resolved config is a raylign one
    assert cfg.dpo.loss_weights == [0.8, 0.2, 1.0] and cfg.model.gradient_checkpointing  # TRL's default
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
