"""A small pool of reward processes with a hard per-call timeout.

Why hand-rolled: ``concurrent.futures.ProcessPoolExecutor`` cannot kill one stuck task, and
``multiprocessing`` re-imports the parent's ``__main__`` in every child (a user's training script
without a main guard would run again). Each pool process here is a fresh interpreter
(``python -c``) talking over a socket pair; it loads the reward functions itself from their spec
strings, so functions from ``path/to/file.py:fn`` need not pickle. A call that outruns its timeout,
or a process that dies, costs that call only: the process is SIGKILLed and replaced in the
background while the caller gets its answer at once.

What a call prints is capped (``output_lines`` per stream, the rest counted: ``raylign.rewards.output``)
and ``max_memory_mb`` caps each process's address space (a call past it gets a ``MemoryError``).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

import raylign
from raylign.rewards.output import capped_output

logger = logging.getLogger(__name__)

_RAYLIGN_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(raylign.__file__)))
_CHILD_CMD = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from raylign.rewards.pool import child_main; child_main(int(sys.argv[1]))"
)


@dataclass(frozen=True)
class CallResult:
    """The outcome of one reward-function call on one group."""

    status: Literal["ok", "timeout", "error"]
    values: tuple[float | None, ...] | None  # [n] when status == "ok"
    message: str = ""  # why, when not ok (the function's traceback tail, or how its process died)
    elapsed_s: float = 0.0  # from sending the call to its answer (or to giving up on it)
    metrics: dict[str, list[float]] = field(default_factory=dict)  # what the call passed to log_metric
    extra: dict[str, list[Any]] = field(default_factory=dict)  # what the call passed to log_extra


class _Process:
    """One pool process and its end of the socket pair."""

    def __init__(self, specs: Sequence[str], options: dict[str, Any]):
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-c", _CHILD_CMD.format(root=_RAYLIGN_ROOT), str(theirs.fileno())]
        self.popen = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),))
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send(("init", list(sys.path), list(specs), options))  # the child may still be importing
        self.ready = False

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the process has loaded its functions; raise if it could not."""
        if self.ready:
            return
        if not self.conn.poll(timeout_s):
            raise RuntimeError(f"a reward process did not start within {timeout_s:.0f} s")
        try:
            kind, detail = self.conn.recv()
        except (EOFError, OSError):
            kind, detail = "died", f"exit code {self.popen.wait()}"
        if kind != "ready":
            raise RuntimeError(f"a reward process could not load the reward functions: {detail}")
        self.ready = True

    def kill(self) -> int | None:
        """SIGKILL the process (a stuck one ignores anything softer) and reap it; its exit code."""
        self.conn.close()
        if self.popen.poll() is None:
            self.popen.kill()
        try:
            return self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:  # unkillable (uninterruptible I/O): leave it to the OS
            logger.warning("reward process %d did not exit after SIGKILL", self.popen.pid)
            return None


class RewardProcessPool:
    """``size`` processes, each holding every reward function of ``specs``; thread-safe ``call``.

    ``output_lines``: lines of each call's stdout and stderr shown (the rest counted);
    ``max_memory_mb``: address-space limit of each process (None = none).
    """

    def __init__(
        self,
        specs: Sequence[str],
        size: int = 2,
        start_timeout_s: float = 120.0,
        output_lines: int = 20,
        max_memory_mb: int | None = None,
    ):
        if size < 1:
            raise ValueError(f"a reward process pool needs at least one process, got size={size}")
        self.specs = tuple(specs)
        self.options = {"output_lines": int(output_lines), "max_memory_mb": max_memory_mb}
        self.start_timeout_s = start_timeout_s
        self.restarts = 0  # processes replaced after a timeout or a death
        self._lock = threading.Lock()
        self._closed = False
        self._idle: queue.Queue[_Process] = queue.Queue()
        self._live: set[_Process] = set()
        for _ in range(size):
            self._idle.put(self._start())

    def _start(self) -> _Process:
        proc = _Process(self.specs, self.options)
        with self._lock:
            self._live.add(proc)
        return proc

    def _replace(self, proc: _Process) -> _Process:
        code = proc.kill()
        with self._lock:
            self._live.discard(proc)
            self.restarts += 1
        logger.info("replaced reward process %d (exit code %s)", proc.popen.pid, code)
        return self._start()

    def _acquire(self) -> _Process:
        if self._closed:
            raise RuntimeError("the reward process pool is closed")
        proc = self._idle.get()
        try:
            if proc.popen.poll() is not None:  # died while idle (e.g. the OOM killer): not a call's fault
                proc = self._replace(proc)
            proc.wait_ready(self.start_timeout_s)
        except BaseException:
            self._idle.put(self._replace(proc))  # keep the pool's size; the next call retries
            raise
        return proc

    def _release(self, proc: _Process) -> None:
        if self._closed:
            proc.kill()
        else:
            self._idle.put(proc)

    def call(self, index: int, kwargs: dict[str, Any], n: int, timeout_s: float) -> CallResult:
        """Run reward function ``index`` on ``kwargs``; expects ``n`` values back within ``timeout_s``."""
        proc = self._acquire()
        start = time.monotonic()
        try:
            proc.conn.send((index, kwargs, n))
        except (OSError, EOFError):
            proc = self._replace(proc)
            return CallResult("error", None, "the reward process died before the call", 0.0)
        except Exception as err:  # the arguments do not pickle; the process is untouched
            self._release(proc)
            return CallResult("error", None, f"cannot send the call: {type(err).__name__}: {err}", 0.0)
        answered = proc.conn.poll(timeout_s)
        elapsed = time.monotonic() - start
        if not answered:
            self._release(self._replace(proc))
            return CallResult("timeout", None, f"no answer within {timeout_s:g} s", elapsed)
        try:
            status, payload = proc.conn.recv()
        except (EOFError, OSError):
            code = proc.popen.wait()
            self._release(self._replace(proc))
            return CallResult("error", None, f"the reward process died (exit code {code})", elapsed)
        self._release(proc)
        if status == "ok":
            values, metrics, extra = payload
            return CallResult("ok", tuple(values), "", elapsed, metrics, extra)
        return CallResult("error", None, payload, elapsed)

    def wait_ready(self) -> None:
        """Block until every idle process has started (e.g. before timing calls)."""
        procs = [self._acquire() for _ in range(self._idle.qsize())]
        for proc in procs:
            self._release(proc)

    def close(self) -> None:
        """Kill every process; calls still running get an error."""
        self._closed = True
        with self._lock:
            procs, self._live = list(self._live), set()
        for proc in procs:
            proc.kill()


# ---------------------------------------------------------------- child side


def _check(out: Any, n: int) -> tuple[str, Any]:
    """("ok", values) when ``out`` is n numbers / Nones (NaN reads as None), else ("error", why)."""
    try:
        values = list(out)
    except TypeError:
        return "error", f"returned a {type(out).__name__}, not a list of {n} floats"
    if len(values) != n:
        return "error", f"returned {len(values)} values for {n} completions"
    clean: list[float | None] = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, numbers.Real) and math.isnan(v)):
            clean.append(None)
        elif isinstance(v, numbers.Real) and math.isfinite(v):
            clean.append(float(v))
        else:
            return "error", f"value {i} is {v!r}; expected a finite float or None"
    return "ok", clean


class _Logs:
    """TRL's ``log_metric(name, value)`` / ``log_extra(column, values)`` for one call, sent back with its answer."""

    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = {}
        self.extras: dict[str, list[Any]] = {}

    def metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(str(name), []).append(float(value))

    def extra(self, column: str, values: Sequence[Any]) -> None:
        self.extras.setdefault(str(column), []).extend(_plain(v) for v in values)


def _plain(value: Any) -> Any:
    """A value that JSON (samples.jsonl) can hold: numbers, strings, None, else its str()."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _watch_parent(parent: int) -> None:
    """Exit when the parent is gone (e.g. its Ray actor was killed), so no pool process outlives it."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def child_main(fd: int) -> None:
    """Entry point of a pool process: load the functions, then answer calls until the socket closes."""
    # Ctrl-C reaches the whole process group; the parent decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_parent(os.getppid())
    conn = Connection(fd)
    _, parent_path, specs, options = conn.recv()
    sys.path.extend(p for p in parent_path if p not in sys.path)
    if options["max_memory_mb"]:
        limit = int(options["max_memory_mb"]) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from raylign.rewards.loader import load_reward_function  # after the path is the parent's

    try:
        fns = [load_reward_function(spec) for spec in specs]
    except Exception as err:
        conn.send(("load_error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            index, kwargs, n = conn.recv()
        except EOFError:
            return
        logs = _Logs()
        try:
            with capped_output(specs[index], options["output_lines"]):
                status, values = _check(fns[index](**kwargs, log_metric=logs.metric, log_extra=logs.extra), n)
            reply = (status, (values, logs.metrics, logs.extras) if status == "ok" else values)
        except BaseException as err:  # report anything (even sys.exit) as this call's error
            where = traceback.extract_tb(err.__traceback__)[-1]
            reply = (
                "error",
                f"{type(err).__name__}: {err} (at {where.filename}:{where.lineno} in {where.name})",
            )
        conn.send(reply)
