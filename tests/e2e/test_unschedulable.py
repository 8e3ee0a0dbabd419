"""The issue's commands, as a user types them: an unschedulable request stops the run in one line, in seconds.

`--learner.num_gpus_per_learner=1` on a CPU machine used to wait forever (killed at 152 s) with only
Ray's autoscaler line as output. The run starts its own local Ray (the CLI's embedded default)
with a 3 s `resource_timeout_s`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raylign.data.synthetic import make_dataset


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_llava_dir) -> Path:
    root = tmp_path_factory.mktemp("unschedulable")
    data = make_dataset("color", 8, root / "data")
    path = root / "grpo.yaml"
    path.write_text(yaml.safe_dump({
        "method": "grpo", "model": {"name_or_path": str(tiny_llava_dir)},
        "data": {"train": str(data / "prompt.parquet")}, "output_dir": str(root / "runs"),
        "train": {"max_steps": 1}, "resource_timeout_s": 3,
        "learner": {"num_learners": 1}, "rollout": {"num_workers": 1}, "reward": {"num_workers": 0},
        "logging": {"report_to": ["none"]},
    }))
    return path


def _run(config: Path, *overrides: str) -> tuple[int, str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYLIGN_DEBUG")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "raylign", "grpo", "--config", str(config), *overrides],
                          capture_output=True, text=True, timeout=170, env=env, check=False)
    return proc.returncode, proc.stderr, time.monotonic() - start


def test_a_gpu_learner_on_a_cpu_machine_fails_in_one_line(config):
    """The mistyped-resource and rollout cases take the same path (tests/actors/test_resource_waits.py)."""
    code, stderr, seconds = _run(config, "--learner.num_gpus_per_learner=1")
    names = "no node has enough GPU (asked by learner.num_gpus_per_learner (GPU: 1 per actor))"
    last = stderr.strip().splitlines()[-1]
    assert code == 2, stderr[-3000:]
    assert names in last and "within resource_timeout_s=3" in last and "the cluster offers {CPU: " in last, last
    assert "Traceback" not in stderr
    assert seconds < 120, f"took {seconds:.0f} s"  # start-up on 2 busy cores; the wait itself is 3 s
