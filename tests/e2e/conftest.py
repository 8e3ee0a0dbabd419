"""Module-scoped fixtures of the online e2e files: each module gets its own Ray instance and warm start."""

from __future__ import annotations

import pytest
import ray

from online_task import WARMUP_STEPS
from raylign.config import config_from_dict
from raylign.data.synthetic import make_dataset
from raylign.driver import offline


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def task(tmp_path_factory, tiny_llava_dir):
    """(warm-started model dir, prompt parquet): SFT on the colour task, stopped early on purpose."""
    root = tmp_path_factory.mktemp("online")
    demos = make_dataset("color", 600, root / "sft", seed=0, kind="sft")
    prompts = make_dataset("color", 600, root / "prompts", seed=1, kind="prompt")  # images SFT never saw
    cfg = config_from_dict({
        "method": "sft", "model": {"name_or_path": str(tiny_llava_dir)},
        "data": {"train": str(demos / "sft.parquet")}, "output_dir": str(root), "run_name": "warm",
        "train": {"learning_rate": 3e-3, "per_device_train_batch_size": 16, "max_steps": WARMUP_STEPS},
        "learner": {"num_learners": 0}, "logging": {"report_to": ["none"], "progress_bar": False},
    })
    warm = offline.run(cfg) / "checkpoints" / f"step_{WARMUP_STEPS}"
    return warm, prompts / "prompt.parquet"
