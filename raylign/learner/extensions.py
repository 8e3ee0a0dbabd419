"""DeepSpeed's JIT-built C++ ops: build none on a CPU, and never wait silently on a dead build's lock.

DeepSpeed compiles some ops on first use with ``torch.utils.cpp_extension.load``, which guards each
build directory with a ``lock`` file (``torch.utils.file_baton.FileBaton``). The builder holds the
lock file open and deletes it when done; every other process polls until the file is gone, with
no time limit. A build that was killed (Ctrl-C, pod eviction) leaves the file behind, and every
later start-up then waits forever. ``prepare_deepspeed`` runs before ``deepspeed.initialize``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# deepspeed/ops/op_builder/cpu/comm.py: ShareMemCommBuilder.NAME
SHM_COMM_OP = "deepspeed_shm_comm"


class StaleBuildLock(RuntimeError):
    """A torch extension build lock that no live process holds (a killed build left it)."""


@dataclass(frozen=True)
class BuildLock:
    path: Path
    age_s: float
    holders: tuple[int, ...] | None  # pids holding it open; None = cannot tell (no /proc)


def skip_shm_comm_op() -> None:
    """Mark DeepSpeed's shared-memory comm op unavailable, so its CPU backend never JIT-builds it.

    DeepSpeed 0.19's torch comm backend builds ``deepspeed_shm_comm`` (~40-80 s with a compiler, then
    cached) when it starts, if ``deepspeed.ops.__compatible_ops__`` says the op can be built. The op
    only speeds up ``inference_all_reduce`` (AutoTP inference); training collectives go through
    torch.distributed either way, and without the op that call falls back to it too. The dict is
    probed once per process and DeepSpeed keeps that one object, so setting the flag here holds for
    the comm backend made later by ``deepspeed.initialize``.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def extensions_root() -> Path:
    """Where torch builds extensions: ``TORCH_EXTENSIONS_DIR``, else its per-python/accelerator default."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    import sys

    import torch
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    if torch.version.hip:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def lock_holders(lock: Path, proc: Path = Path("/proc")) -> tuple[int, ...] | None:
    """Pids of processes that have ``lock`` open (the builder keeps its fd until it deletes the file).

    None where ``/proc`` is missing. Processes of other users or other containers are invisible, so
    an empty answer means "no holder on this host that we can see".
    """
    if not proc.is_dir():
        return None
    target = os.path.realpath(lock)
    holders = []
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:  # another user's process, or it just exited: not a holder we can see
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    holders.append(int(pid_dir.name))
                    break
            except OSError:  # the fd closed while we looked
                continue
    return tuple(holders)


def find_build_locks(root: Path) -> list[BuildLock]:
    """Every ``<root>/<op>/lock`` with its age and holders."""
    if not root.is_dir():
        return []
    now = time.time()
    locks = []
    for lock in sorted(root.glob("*/lock")):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # the build finished while we looked
            continue
        locks.append(BuildLock(lock, age, lock_holders(lock)))
    return locks


def check_build_locks(root: Path) -> None:
    """Raise ``StaleBuildLock`` naming the file to delete if a lock in ``root`` has no live holder.

    A lock held by a live process is a build in progress: it is logged (that build ends on its own).
    """
    for lock in find_build_locks(root):
        if lock.holders is None:
            logger.warning(
                "extension build lock %s exists (%.0f s old); if no build is running, delete it", lock.path, lock.age_s
            )
        elif lock.holders:
            logger.warning("waiting for the extension build of pid(s) %s (%s)", list(lock.holders), lock.path)
        elif lock.path.exists():  # not released meanwhile
            raise StaleBuildLock(
                f"the torch extension build lock {lock.path} ({lock.age_s:.0f} s old) is held by no process "
                "on this host: a killed build left it, and DeepSpeed would wait on it forever; delete it "
                f"(rm {lock.path}) and start again (if another host shares this cache and is building, let it "
                "finish first)"
            )


def prepare_deepspeed(device_type: str) -> None:
    """Before ``deepspeed.initialize``: on a CPU build no op at all; elsewhere fail fast on a stale lock.

    On a CPU the only op DeepSpeed would build is the shm comm op (the optimizer is torch's AdamW,
    see ``engine.deepspeed_config``), so nothing waits on a lock there.
    """
    if device_type == "cpu":
        skip_shm_comm_op()
        return
    check_build_locks(extensions_root())
