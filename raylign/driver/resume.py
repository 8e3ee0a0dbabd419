"""Checkpoint directories of a run: where they go, which one is complete, and how to resume from one.

Plain files only (no Ray, no torch), so the CLI checks ``train.resume_from_checkpoint`` before it
starts anything. Both drivers use these through ``driver.common``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from raylign.config import ConfigError, RaylignConfig

_STEP_DIR = re.compile(r"^step_(\d+)$")
_KEY = "train.resume_from_checkpoint"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step}"


def _complete(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint of ``run_dir``, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / "COMPLETE").exists()
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step (a checkpoint is complete once ``COMPLETE`` exists)."""
    done = _complete(run_dir)
    return done[-1][1] if done else None


def mark_complete(path: Path) -> None:
    """Written last, so a run killed mid-save never resumes from a half-written checkpoint."""
    (path / "COMPLETE").write_text("")


def resolve_resume(cfg: RaylignConfig) -> Path | None:
    """The checkpoint ``train.resume_from_checkpoint`` names (a path, or ``latest`` of this run).

    Raises a ConfigError that says what to do when there is none to resume from.
    """
    spec = cfg.train.resume_from_checkpoint
    if spec is None:
        return None
    if spec == "latest":
        path = latest_checkpoint(cfg.run_dir)
        if path is None:
            raise ConfigError(
                f"{_KEY}: 'latest' found no complete checkpoint under {cfg.run_dir / 'checkpoints'} "
                f"(run {cfg.run_name!r} has not saved one); start without --resume, "
                "or give a checkpoint directory"
            )
        return path
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"{_KEY}: {spec} does not exist; give a checkpoint directory "
                          "(output_dir/run_name/checkpoints/step_N) or 'latest'")
    if not (path / "COMPLETE").exists():
        done = _complete(path.parent.parent) if path.parent.name == "checkpoints" else []
        hint = f"; the newest complete one there is {done[-1][1]}" if done else ""
        raise ConfigError(f"{_KEY}: {spec} is not a complete raylign checkpoint (no COMPLETE file: the save "
                          f"was cut short, or this is no checkpoint){hint}")
    return path


def resume_command(cfg: RaylignConfig, checkpoint: Path | None) -> str:
    """The command that continues this run (from the start when nothing was saved yet)."""
    command = f"raylign {cfg.method} --config {cfg.run_dir / 'config.yaml'}"
    return f"{command} --{_KEY}={checkpoint}" if checkpoint else command


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints of ``run_dir``; returns the deleted ones."""
    done = [p for _, p in _complete(run_dir)]
    old = done[:-keep] if keep > 0 else done
    for path in old:
        shutil.rmtree(path)
    return old
