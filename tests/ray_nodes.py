"""Real Ray nodes on this machine as `ray start --block` processes, the way a KubeRay pod runs Ray.

    head = RayHead(log_dir / "head.log", num_cpus=0, dashboard=False)   # own ports, temp dir, token
    head.connect()                                                      # this process is the driver
    node = head.add_worker("rollout-0", shape)                          # ray start --address=... --resources=...
    node.crash()                                                        # SIGKILL its raylet: a lost pod
    head.stop()                                                         # every node, nothing left behind

Each head is kept apart from any other Ray on the machine (another test's ``ray.init``, another
engineer's run):
- own ports and own ``--temp-dir``: the address file ``ray start`` writes lives there, so a bare
  ``ray.init()`` elsewhere never joins this head;
- every node runs as ``ray start --block`` in a session of its own, and SIGTERM to that one process
  drains the node and stops every process it started. ``ray stop`` is never used: Ray 2.60 finds
  what it stops by process name (gcs_server, raylet, ...) machine-wide, so it would kill every
  Ray instance this user runs (``AutoscalingCluster.start`` runs ``ray stop --force`` for that reason
  it is not used here; ``autoscaling_config`` starts the same autoscaler over the same fake provider);
- with the dashboard (``ray job submit``), token authentication with a token of its own. Ray 2.60
  turns token auth on for a head whenever ~/.ray/auth_token exists, and the CLI and
  ``JobSubmissionClient`` then only send the token when RAY_AUTH_MODE=token is set: passing both
  explicitly makes the test independent of ~/.ray. A head this process joins as driver
  (``connect``) runs with RAY_AUTH_MODE=disabled instead: ``ray.init`` reads the auth mode once,
  when ``ray`` is imported, so a token set later is never sent.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from cluster_shape import NodeShape

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `raylign`
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60
# Node-death detection in ~5 s instead of Ray's ~30 s (a crashed raylet refuses every check at once),
# with enough slack that a loaded 2-core machine does not get a live node declared dead.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5,
                      "health_check_timeout_ms": 3000, "health_check_initial_delay_ms": 1000}


_GIVEN: set[int] = set()  # ports handed out by this process: nodes starting at once must not share one


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free now and never handed out before by this process."""
    socks = []
    try:
        ports: list[int] = []
        while len(ports) < n:
            s = socket.socket()
            socks.append(s)  # held open till the end, so no bind below gets it again
            s.bind(("", 0))
            if s.getsockname()[1] not in _GIVEN:
                ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    _GIVEN.update(ports)
    return ports


# Runs `ray start` (argv[1:]) with PR_SET_PDEATHSIG = SIGTERM, kept across exec: if pytest is killed,
# the node still gets its SIGTERM and stops all it started. A launcher, not preexec_fn: this process
# may hold Ray's threads (another module's ray.init), and code between fork and exec is unsafe then.
_LAUNCH = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0); "
           "os.execv(sys.argv[1], sys.argv[1:])")


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-c", _LAUNCH, *cmd]
    with open(log_path, "w") as log:  # its own session: signals meant for pytest's group skip it
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


class NodeCluster:
    """A multi-node cluster of real raylets in this process's care (``ray.cluster_utils.Cluster``).

    Kept apart like ``RayHead``: RAY_TMPDIR points Ray's default temp root (session dirs and the
    ``ray_current_cluster`` address file that ``Cluster`` writes and removes) at a directory of
    its own while the cluster lives, so no bare ``ray.init()`` elsewhere joins it and its shutdown
    removes no other instance's address file.
    """

    def __init__(self, head: NodeShape, system_config: dict | None = None):
        from ray.cluster_utils import Cluster

        self.root = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # short: socket paths < 108 bytes
        self._saved_tmpdir = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = str(self.root)
        self.nodes: dict[str, Any] = {}  # name -> ray._private.node.Node
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": int(head.num_cpus), "num_gpus": head.num_gpus, "resources": dict(head.resources),
            "include_dashboard": False, "_system_config": system_config or {}})

    def add_node(self, name: str, shape: NodeShape) -> str:
        """Start a worker node of ``shape`` (its own raylet); returns its Ray node id."""
        node = self.cluster.add_node(num_cpus=int(shape.num_cpus), num_gpus=shape.num_gpus,
                                     resources=dict(shape.resources))
        self.nodes[name] = node
        return node.node_id

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id

    def crash(self, name: str) -> None:
        """SIGKILL the node's raylet and every process of it, as when a pod or VM is lost."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)

    def connect(self) -> None:
        """Make this process the cluster's driver, attached to the head (which has no work resources)."""
        self.cluster.connect()

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        try:
            self.cluster.shutdown()
        finally:
            if self._saved_tmpdir is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = self._saved_tmpdir
            shutil.rmtree(self.root, ignore_errors=True)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:  # exited, or not ours to read: not a process to stop
        return []


def _terminate(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGTERM a `ray start --block` process and wait; returns its descendants that outlived it."""
    mine = _descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    _, alive = psutil.wait_procs(mine, timeout=STOP_TIMEOUT_S / 2)
    return alive


class RayHead:
    """A `ray start --head --block` with its own ports, temp dir and auth token, and its worker nodes.

    Args:
        num_cpus: the head's logical CPUs (0: it runs only the driver, as on KubeRay).
        dashboard: start the dashboard and job server (`ray job submit` needs them).
        autoscaling_config: a cluster config for Ray's autoscaler over the fake multi-node provider
            (``fake_autoscaling_config``): the autoscaler starts and stops worker nodes by itself.
        system_config: Ray system settings for the whole cluster (e.g. ``FAST_HEALTH_CHECKS``).
    """

    def __init__(self, log_path: Path, *, num_cpus: int = 4, dashboard: bool = True,
                 autoscaling_config: dict | None = None, system_config: dict | None = None):
        gcs, dash, agent, client = free_ports(4)
        self.gcs_port = gcs
        self.ip = _node_ip()
        self.gcs_address = f"{self.ip}:{gcs}"
        self.address = f"http://127.0.0.1:{dash}"
        # Short: Unix socket paths under it (session_*/sockets/plasma_store) must stay < 108 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
        self.token = secrets.token_hex(32)  # sent only with the dashboard
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        # The venv first on PATH: the job's entrypoint `raylign` is resolved by a shell on the node.
        self.env = {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
                    # On SIGTERM the head drains first, up to 30 s by default while a job still runs.
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
                    # A node gives its raylet 30 s to register by default: too short on a loaded 2-core machine.
                    "RAY_raylet_start_wait_time_s": str(START_TIMEOUT_S),
                    **({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token} if dashboard
                       else {"RAY_AUTH_MODE": "disabled"})}
        self.log_path = log_path
        cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
               f"--ray-client-server-port={client}", f"--num-cpus={num_cpus}", "--num-gpus=0",
               "--disable-usage-stats", f"--temp-dir={self.temp_dir}"]
        if dashboard:
            cmd += ["--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    f"--dashboard-agent-listen-port={agent}"]
            self.gcs_address = f"127.0.0.1:{gcs}"
        else:
            cmd += ["--include-dashboard=false"]
        if system_config:
            cmd.append(f"--system-config={json.dumps(system_config, separators=(',', ':'))}")
        if autoscaling_config is not None:
            config = {**autoscaling_config, "provider": {**autoscaling_config["provider"],
                                                         "gcs_address": self.gcs_address}}
            path = self.temp_dir / "autoscaling.json"
            path.write_text(json.dumps(config))
            cmd.append(f"--autoscaling-config={path}")
            # What AutoscalingCluster sets: the fake provider's switch, and a 1 s autoscaler loop.
            self.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        self.proc = _spawn(cmd, self.env, log_path)

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

    def connect(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Make this process the cluster's driver (``ray.init``), once the head's GCS listens."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"ray start exited ({self.proc.returncode}):\n{self.log_tail()}"
            try:
                socket.create_connection((self.gcs_address.rsplit(":", 1)[0], self.gcs_port), timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"no GCS at {self.gcs_address} after {timeout_s}s"
                time.sleep(0.2)
        assert self.env["RAY_AUTH_MODE"] == "disabled", "a driver cannot join a token-auth head (see the module doc)"
        ray.init(address=self.gcs_address, log_to_driver=False)

    def _stop_fake_nodes(self) -> list[psutil.Process]:
        """SIGTERM the nodes the fake provider started, as `ray down` ends a cluster's VMs; returns survivors.

        They are the autoscaler's (the monitor process's) children, not the head's own processes, so
        stopping the head alone would leave them running.
        """
        monitors = [p for p in _descendants(self.proc.pid) if "monitor.py" in " ".join(_cmdline(p))]
        nodes = [c for m in monitors for c in _descendants(m.pid)]
        for p in nodes:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                continue  # already gone
        _, alive = psutil.wait_procs(nodes, timeout=STOP_TIMEOUT_S / 4)
        return alive

    def stop(self) -> list[str]:
        """Disconnect, SIGTERM the head (it stops all it started); returns what outlived it.

        Anything still alive afterwards was started by this head (a descendant, or a process naming
        its temp dir); it is killed by pid and reported, never matched by name.
        """
        import ray

        if ray.is_initialized():
            ray.shutdown()
        alive = self._stop_fake_nodes()
        alive += _terminate(self.proc)
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
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # a dying raylet may still remove files in it
        return left


def _node_ip() -> str:
    """The address Ray gives this machine's nodes by default (the fake provider's nodes use it too)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def alive_nodes() -> list[dict]:
    """``ray.nodes()`` entries of the nodes alive now."""
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def fake_autoscaling_config(head: NodeShape, node_types: dict[str, NodeShape], idle_timeout_s: float) -> dict:
    """A cluster config for Ray's autoscaler over its fake multi-node provider (``ray.cluster_utils.
    AutoscalingCluster``'s, whose template file the Ray 2.60 wheel lacks): node types with their
    resources and min/max counts; idle nodes above the minimum go after ``idle_timeout_s``."""
    types = {"ray.head.default": {"resources": {"CPU": head.num_cpus, **head.resources}, "node_config": {},
                                  "max_workers": 0}}
    for name, shape in node_types.items():
        types[name] = {"resources": {"CPU": shape.num_cpus, "GPU": shape.num_gpus, **shape.resources},
                       "node_config": {}, "min_workers": shape.min_replicas, "max_workers": shape.max_replicas}
    return {
        "cluster_name": "fake_multinode", "max_workers": sum(s.max_replicas for s in node_types.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
        "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_s / 60, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }
