"""Cap what one reward call prints: keep its first lines per stream, count the rest, print one summary line.

Runs inside a pool process. For the call's duration file descriptors 1 and 2 point at pipes drained
by one thread each, so output written by C code or subprocesses is capped too, not only
``print``. A reader keeps at most ``max_lines`` lines (and ``_MAX_KEPT_BYTES``: a 10 MB line without
a newline is not kept whole) and only counts the rest, so memory stays bounded whatever the
function writes. After the call the descriptors are restored and the kept head is written to
them, followed by ``[reward <fn>: N more line(s), X MiB of stdout not shown ...]``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

_MAX_KEPT_BYTES = 16 * 1024  # per stream and call
_CHUNK = 64 * 1024
_DRAIN_WAIT_S = 1.0  # a subprocess the call left running may hold the pipe open: stop waiting then


class _Drain:
    """Reads one pipe to EOF in a thread: the first lines kept, everything after counted."""

    def __init__(self, fd: int, max_lines: int):
        self.fd, self.max_lines = fd, max_lines
        self.head = bytearray()
        self.lines_kept = 0
        self.dropped_bytes = 0
        self.dropped_lines = 0
        self.dropped_partial = False
        self.thread = threading.Thread(target=self._run, name="reward-output", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with os.fdopen(self.fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(_CHUNK):
                self._take(chunk)

    def _take(self, chunk: bytes) -> None:
        if self.dropped_bytes == 0:
            keep = self._keepable(chunk)
            self.head += chunk[:keep]
            self.lines_kept += chunk[:keep].count(b"\n")
            chunk = chunk[keep:]
        if chunk:
            self.dropped_bytes += len(chunk)
            self.dropped_lines += chunk.count(b"\n")
            self.dropped_partial = not chunk.endswith(b"\n")  # a last line without its newline

    def _keepable(self, chunk: bytes) -> int:
        """How much of ``chunk`` fits in the head (whole lines up to max_lines, at most _MAX_KEPT_BYTES)."""
        room = max(0, _MAX_KEPT_BYTES - len(self.head))
        end, lines = 0, self.lines_kept
        while lines < self.max_lines and end < min(len(chunk), room):
            nl = chunk.find(b"\n", end, room)
            if nl < 0:
                return min(len(chunk), room)
            end, lines = nl + 1, lines + 1
        return min(end, room)

    def summary(self, name: str, stream: str, max_lines: int) -> bytes:
        """The kept head, then one line saying what was left out (nothing when nothing was)."""
        out = bytes(self.head)
        if self.dropped_bytes:
            if out and not out.endswith(b"\n"):
                out += b"\n"
            more = self.dropped_lines + int(self.dropped_partial)
            mib = self.dropped_bytes / 2**20
            out += (
                f"[reward {name}: {more} more line(s), {mib:.1f} MiB of {stream} not shown "
                f"(reward.output_lines={max_lines})]\n"
            ).encode()
        return out


@contextlib.contextmanager
def capped_output(name: str, max_lines: int) -> Iterator[None]:
    """Within the block, stdout and stderr (fds 1 and 2) are capped as the module docstring says."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved, drains = {}, {}
    for fd in (1, 2):
        read_end, write_end = os.pipe()
        saved[fd] = os.dup(fd)
        os.dup2(write_end, fd)
        os.close(write_end)
        drains[fd] = _Drain(read_end, max_lines)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd in (1, 2):
            os.dup2(saved[fd], fd)  # closes the pipe's last write end: its reader sees EOF
            os.close(saved[fd])
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            drains[fd].thread.join(_DRAIN_WAIT_S)
            text = drains[fd].summary(name, stream, max_lines)
            if text:
                os.write(fd, text)
