"""DeepSpeed JIT ops: a CPU learner builds none (so a stale build lock cannot hang it); stale locks are named."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from raylign.learner.extensions import SHM_COMM_OP, StaleBuildLock, check_build_locks, find_build_locks

REPO = Path(__file__).resolve().parents[2]


def _stale_lock(root: Path, op: str = SHM_COMM_OP, age_s: float = 600.0) -> Path:
    """What a killed ``cpp_extension.load`` leaves: ``<root>/<op>/lock``, no process holding it."""
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_stale_lock_is_named_with_what_to_delete(tmp_path):
    lock = _stale_lock(tmp_path, "fused_adam")
    with pytest.raises(StaleBuildLock, match=r"rm .*fused_adam/lock") as err:
        check_build_locks(tmp_path)
    assert "\n" not in str(err.value) and "600 s old" in str(err.value)
    (found,) = find_build_locks(tmp_path)
    assert found.path == lock and found.holders == () and found.age_s >= 599


def test_a_lock_held_by_a_live_builder_is_not_stale(tmp_path):
    lock = tmp_path / "fused_adam" / "lock"
    lock.parent.mkdir()
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # exactly how torch's FileBaton takes the lock
    try:
        (found,) = find_build_locks(tmp_path)
        assert found.holders == (os.getpid(),)
        check_build_locks(tmp_path)  # a build in progress: logged, not an error
    finally:
        os.close(fd)
    with pytest.raises(StaleBuildLock):  # the builder went away without deleting it
        check_build_locks(tmp_path)


_START_LEARNER = textwrap.dedent(
    """
    import sys, time
    t0 = time.perf_counter()
    from raylign.config import LearnerConfig, ModelConfig, TrainConfig
    from raylign.learner.learner import Learner
    learner = Learner(ModelConfig(name_or_path=sys.argv[1]), TrainConfig(), LearnerConfig(zero_stage=2), 2)
    learner.close()
    print("STARTED", time.perf_counter() - t0)
    """
)


def test_cpu_learner_starts_past_a_stale_shm_lock_without_building(tmp_path, tiny_qwen_dir):
    """The lock a killed shm-op build leaves used to hang every later start in ``FileBaton.wait``."""
    root = tmp_path / "torch_extensions"
    lock = _stale_lock(root)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _START_LEARNER, str(tiny_qwen_dir)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "STARTED" in proc.stdout and "built successfully" not in proc.stdout + proc.stderr
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == [Path(SHM_COMM_OP), lock.relative_to(root)]


def test_extensions_root_is_where_torch_builds(tmp_path, monkeypatch):
    """Checked against torch's own (private) build-directory function, in a private cache."""
    from torch.utils.cpp_extension import _get_build_directory

    from raylign.learner.extensions import extensions_root

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert Path(_get_build_directory("probe", False)).parent == extensions_root()
    assert extensions_root().is_relative_to(tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "explicit"))
    assert Path(_get_build_directory("probe", False)).parent == extensions_root() == tmp_path / "explicit"
