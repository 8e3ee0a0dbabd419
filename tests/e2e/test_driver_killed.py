"""A `raylign grpo` driver SIGKILLed mid-run (OOM killer, `kill -9`): the next run is not hurt by what is left.

The embedded Ray instance's GCS and raylet die with the driver; its DashboardAgent and
RuntimeEnvAgent linger for about a minute (see docs/errors.md). The next command, here the resume,
starts a fresh instance beside them and finishes the run with every prompt trained once. Processes
this test started are found by a marker in their environment and ended by pid at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import yaml

from raylign.data.synthetic import make_dataset

MARK = "RAYLIGN_TEST_MARK"


def _marked(mark: str) -> dict[int, str]:
    """pid -> name of every live process whose environment carries ``MARK=mark``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            name = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if f"{MARK}={mark}".encode() in environ:
            found[int(entry.name)] = name
    return found


def _wait_for(path: Path, proc: subprocess.Popen, deadline_s: float) -> None:
    """Until ``path`` exists; fails when the process ends first or the deadline passes."""
    end = time.monotonic() + deadline_s
    while not path.exists():
        assert time.monotonic() < end, f"{path} did not appear within {deadline_s} s"
        try:
            proc.wait(timeout=0.2)  # returns at once if the driver exited
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"the driver exited ({proc.returncode}) before {path} appeared")


def test_next_run_after_a_sigkilled_driver_finishes(tiny_llava_dir, tmp_path):
    data = make_dataset("color", 32, tmp_path / "data", kind="prompt")
    run_dir = tmp_path / "runs" / "killed"
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump({
        "method": "grpo", "model": {"name_or_path": str(tiny_llava_dir)}, "seed": 0,
        "data": {"train": str(data / "prompt.parquet")}, "output_dir": str(run_dir.parent), "run_name": "killed",
        "train": {"max_steps": 2, "save_steps": 1},
        "grpo": {"prompts_per_step": 2, "num_generations": 2, "max_completion_length": 8},
        "learner": {"num_learners": 0}, "rollout": {"num_workers": 1}, "reward": {"num_workers": 0},
        "logging": {"report_to": ["none"], "progress_bar": False},
    }))
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "raylign", "grpo", "--config", str(config)]
    try:
        log = (tmp_path / "killed.log").open("w")  # a file, not a pipe: a full pipe would stall the driver
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        _wait_for(run_dir / "checkpoints" / "step_1" / "COMPLETE", driver, deadline_s=240)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        log.close()
        left = _marked(mark)
        print(f"left behind by the killed driver: {sorted(left.values())}")

        resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    finally:
        for pid in _marked(mark):  # only what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue

    steps = {}
    for line in (run_dir / "prompts.jsonl").read_text().splitlines():
        row = json.loads(line)
        steps[row["step"]] = row["uids"]
    uids = [u for step_uids in steps.values() for u in step_uids]
    assert sorted(steps) == [1, 2] and len(uids) == 2 * 2 and max(Counter(uids).values()) == 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
