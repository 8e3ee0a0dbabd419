"""`ray job submit` of the GRPO recipe to a real Ray head, the way README.md says to run it on a cluster.

A head is started with the `ray` CLI (node IP and dashboard on 127.0.0.1); the tiny GRPO job is
submitted with the real `ray job submit --working-dir <repo>` running jobs/grpo_qwen2_5_vl_3b.yaml
unchanged, with the overrides of its `# tiny:` line (paths pointed at this test's model and data).
The job's driver joins the head through RAY_ADDRESS (``common.init_ray``) and must finish
SUCCEEDED, leaving the run directory of the contract.

The head (tests/ray_nodes.py ``RayHead``) is kept apart from any other Ray on the machine: own
ports, temp dir and auth token, stopped by SIGTERM to its `ray start --block` (never `ray stop`).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ray_nodes import RayHead

from raylign.config import load_config
from raylign.data.synthetic import make_dataset
from raylign.driver.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
RECIPE = "jobs/grpo_qwen2_5_vl_3b.yaml"
JOB_ID = "raylign-tiny-grpo"
STEPS = 2
JOB_TIMEOUT_S = 600  # generous: a hang fails the test instead of blocking CI


def tiny_overrides(model: Path, data: Path) -> list[str]:
    """The recipe's `# tiny:` overrides with runs/tiny-* pointed at `model` and `data`, max_steps dropped."""
    lines = [ln for ln in (REPO / RECIPE).read_text().splitlines() if ln.startswith("# tiny:")]
    assert len(lines) == 1, f"{RECIPE}: expected one '# tiny:' line"
    tokens = shlex.split(lines[0][len("# tiny:"):])
    assert tokens[:4] == ["raylign", "grpo", "--config", RECIPE]
    swaps = {"runs/tiny-qwen": str(model), "runs/tiny-data": str(data)}
    out, swapped = [], set()
    for token in tokens[4:]:
        key, sep, value = token.partition("=")
        assert key.startswith("--") and sep, f"{RECIPE}: tiny override {token!r} is not --key=value"
        if key == "--train.max_steps":
            continue
        for old, new in swaps.items():
            if value == old or value.startswith(old + "/"):
                value, _ = new + value[len(old):], swapped.add(old)
        out.append(f"{key}={value}")
    assert swapped == set(swaps), f"{RECIPE}: the tiny line no longer names {set(swaps) - swapped}"
    return out


def uploaded_package(temp_dir: Path) -> Path:
    """The working dir as the head unpacked it for the job (one package per distinct upload)."""
    unpacked = temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    pkgs = [p for p in unpacked.glob("_ray_pkg_*") if p.is_dir()]
    assert len(pkgs) == 1, f"expected one unpacked working_dir package, found {pkgs}"
    return pkgs[0]


def test_ray_job_submit_runs_the_grpo_recipe_on_a_real_head(tiny_qwen_dir, tmp_path):
    data = make_dataset("color", 64, tmp_path / "tiny-data", seed=0, kind="prompt")
    run_dir = tmp_path / "runs" / "submitted"
    overrides = [*tiny_overrides(tiny_qwen_dir, data), f"--output_dir={tmp_path / 'runs'}",
                 "--run_name=submitted", f"--train.max_steps={STEPS}", "--logging.progress_bar=false"]
    recipe_bytes = (REPO / RECIPE).read_bytes()

    times = {}
    t0 = time.perf_counter()
    head = RayHead(tmp_path / "ray_head.log")
    try:
        head.wait_ready()
        times["head up"] = time.perf_counter() - t0

        t = time.perf_counter()
        job = head.ray("job", "submit", "--address", head.address, "--submission-id", JOB_ID,
                       "--working-dir", str(REPO), "--", "raylign", "grpo", "--config", RECIPE, *overrides,
                       timeout=JOB_TIMEOUT_S)
        times["job submit (blocks until the end)"] = time.perf_counter() - t
        logs = job.stdout + job.stderr
        (tmp_path / "job.log").write_text(logs)
        assert job.returncode == 0, f"ray job submit exited {job.returncode}:\n{logs[-6000:]}"
        assert f"Job '{JOB_ID}' succeeded" in logs
        # The driver joined this head (RAY_ADDRESS set by the job), no local Ray of its own. The host is
        # the machine's own IP: the job supervisor resolves 127.0.0.1 to it (resolve_ip_for_localhost).
        joined = re.findall(r"Connecting to existing Ray cluster at address: [\w.:-]+:(\d+)\.\.\.", logs)
        assert joined == [str(head.gcs_port)], f"the driver joined {joined}, not GCS port {head.gcs_port}"
        assert f"raylign: run directory: {run_dir}" in logs

        status = head.ray("job", "status", "--address", head.address, JOB_ID)
        assert status.returncode == 0 and f"Job '{JOB_ID}' succeeded" in status.stdout, \
            status.stdout + status.stderr
        # The SDK jobs/submit.py uses, in a process of its own (this process's Ray config stays as it is).
        query = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
                 "print(C(sys.argv[1]).get_job_status(sys.argv[2]))")
        sdk = subprocess.run([sys.executable, "-c", query, head.address, JOB_ID], env=head.env,
                             capture_output=True, text=True, timeout=120, check=False)
        assert sdk.stdout.strip().splitlines()[-1:] == ["SUCCEEDED"], sdk.stderr[-2000:]

        # What was uploaded: the repo's code and recipes, without .venv, .git or outputs (Ray's
        # default excludes and .gitignore), and the recipe byte for byte.
        pkg = uploaded_package(head.temp_dir)
        files = [p for p in pkg.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        assert (pkg / RECIPE).read_bytes() == recipe_bytes and (pkg / "raylign/driver/online.py").is_file()
        assert not any((pkg / d).exists() for d in (".venv", ".git", "runs"))
        assert size < 20 * 2**20, f"working_dir upload is {size / 2**20:.1f} MiB"
        times["upload (files, MiB)"] = (len(files), size / 2**20)
    finally:
        t = time.perf_counter()
        left = head.stop()
        times["head stop"] = time.perf_counter() - t
    times["total (model fixture excluded)"] = time.perf_counter() - t0
    print("ray job submit test:", {k: tuple(round(x, 2) for x in v) if isinstance(v, tuple)
                                   else round(v, 1) for k, v in times.items()})
    assert left == [], f"processes outlived the head: {left}"
    assert (REPO / RECIPE).read_bytes() == recipe_bytes

    # The run directory of the contract.
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.method == "grpo" and cfg.model.name_or_path == str(tiny_qwen_dir)
    assert cfg.grpo.loss_type == "dapo" and cfg.grpo.max_completion_length == 32  # recipe + tiny line
    rows = read_metrics(run_dir)
    trained = [r["step"] for r in rows if "loss" in r]
    assert trained == list(range(1, STEPS + 1)), [r["step"] for r in rows]
    checkpoint = run_dir / "checkpoints" / f"step_{STEPS}"
    assert (checkpoint / "COMPLETE").exists() and (checkpoint / "model.safetensors").stat().st_size > 0
