"""`ray job submit` of the GRPO recipe to a real Ray head, the way README.md says to run it on a cluster.

A head is started with the `ray` CLI (node IP and dashboard on 127.0.0.1); the tiny GRPO job is
submitted with the real `ray job submit --working-dir <repo>` running jobs/grpo_qwen2_5_vl_3b.yaml
unchanged, with the overrides of its `# tiny:` line (paths pointed at this test's model and data).
The job's driver joins the head through RAY_ADDRESS (``common.init_ray``) and must finish
SUCCEEDED, leaving the run directory of the contract.

The head is kept apart from any other Ray on the machine (another test module's ``ray.init`` in
this very process, another engineer's run):
- own ports and own ``--temp-dir``: the address file ``ray start`` writes lives there, so a bare
  ``ray.init()`` elsewhere never joins this head;
- it runs as ``ray start --head --block`` in a session of its own, and SIGTERM to that one process
  drains the node and stops every process it started. ``ray stop`` is never used: Ray 2.60 finds
  what it stops by process name (gcs_server, raylet, ...) machine-wide, so it would kill every
  Ray instance this user runs;
- token authentication with a token of its own. Ray 2.60 turns token auth on for a head whenever
  ~/.ray/auth_token exists, and the CLI and ``JobSubmissionClient`` then only send the token
  when RAY_AUTH_MODE=token is set: passing both explicitly makes the test independent of ~/.ray.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from raylign.config import load_config
from raylign.data.synthetic import make_dataset
from raylign.driver.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
RECIPE = "jobs/grpo_qwen2_5_vl_3b.yaml"
BIN = Path(sys.executable).parent  # the venv's `ray` and `raylign`
JOB_ID = "raylign-tiny-grpo"
STEPS = 2
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 600  # generous: a hang fails the test instead of blocking CI
STOP_TIMEOUT_S = 60


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on loopback now (all held open together so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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


# Runs `ray start` (argv[1:]) with PR_SET_PDEATHSIG = SIGTERM, kept across exec: if pytest is killed,
# the head still gets its SIGTERM and stops all it started. A launcher, not preexec_fn: this process
# may hold Ray's threads (another module's ray.init), and code between fork and exec is unsafe then.
_LAUNCH = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0); "
           "os.execv(sys.argv[1], sys.argv[1:])")


class RayHead:
    """A `ray start --head --block` on loopback with its own ports, temp dir and auth token."""

    def __init__(self, log_path: Path):
        gcs, dash, agent, client = free_ports(4)
        self.gcs_port = gcs
        self.address = f"http://127.0.0.1:{dash}"
        # Short: Unix socket paths under it (session_*/sockets/plasma_store) must stay < 108 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
        self.token = secrets.token_hex(32)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        # The venv first on PATH: the job's entrypoint `raylign` is resolved by a shell on the node.
        self.env = {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
                    # On SIGTERM the head drains first, up to 30 s by default while a job still runs.
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.log_path = log_path
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
               f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
               "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={self.temp_dir}"]
        if sys.platform.startswith("linux"):
            cmd = [sys.executable, "-c", _LAUNCH, *cmd]
        with open(log_path, "w") as log:  # its own session: signals meant for pytest's group skip it
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:]

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until the job API answers an authenticated request; fails at once if the head exits."""
        request = urllib.request.Request(f"{self.address}/api/version",
                                         headers={"Authorization": f"Bearer {self.token}"})
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"ray start exited ({self.proc.returncode}):\n{self.log_tail()}"
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet (or 401 while the dashboard's modules load): poll again
            assert time.monotonic() < deadline, \
                f"no dashboard at {self.address} after {timeout_s}s:\n{self.log_tail()}"
            time.sleep(0.5)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The `ray` CLI against this head (an explicit --address: RAY_ADDRESS is not consulted)."""
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def stop(self) -> list[str]:
        """SIGTERM the `ray start --block` process (it stops all it started); returns what outlived it.

        Anything still alive afterwards was started by this head (a descendant, or a process naming
        its temp dir); it is killed by pid and reported, never matched by name.
        """
        try:
            mine = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            mine = []
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        _, alive = psutil.wait_procs(mine, timeout=STOP_TIMEOUT_S / 2)
        alive += [p for p in psutil.process_iter(["cmdline"]) if p not in alive
                  and str(self.temp_dir) in " ".join(p.info["cmdline"] or ())]
        left = []
        for p in alive:
            try:
                left.append(f"{p.pid} {p.name()}")
                p.kill()
            except psutil.NoSuchProcess:
                continue  # it exited between the check and the kill: not left behind
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp_dir)
        return left


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
