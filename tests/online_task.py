"""The online e2e tests' shared task: a warm-started tiny LLaVA on the colour task and a GRPO config for it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

WARMUP_STEPS = 45


def grpo_config(task, tmp_path: Path, name: str, **sections) -> dict:
    model, prompts = task
    cfg = {
        "method": "grpo", "model": {"name_or_path": str(model)}, "seed": 1,
        "data": {"train": str(prompts), "eval_split_size": 64}, "output_dir": str(tmp_path), "run_name": name,
        "train": {"learning_rate": 5e-4, "max_steps": 4, "lr_scheduler_type": "constant"},
        "grpo": {"num_generations": 8, "prompts_per_step": 8, "max_completion_length": 16, "max_staleness": 0,
                 "temperature": 0.7,
                 "eval_num_prompts": 64, "log_completions_steps": 0},
        "learner": {"num_learners": 0}, "rollout": {"num_workers": 2, "batch_size": 8},
        "reward": {"num_workers": 0, "funcs": ["format", "accuracy"]},
        "logging": {"report_to": ["none"], "progress_bar": False},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


def trained_uids(run_dir: Path) -> dict[int, list[str]]:
    """step -> prompt uids trained on (the last record of a step wins, as after a resume)."""
    steps = {}
    for line in (run_dir / "prompts.jsonl").read_text().splitlines():
        row = json.loads(line)
        steps[row["step"]] = row["uids"]
    return steps


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step}" / "model.safetensors"))
