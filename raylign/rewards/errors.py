"""Reward functions that fail, made visible: counts, the first message and the step it came at.

A reward call that raises or times out is handled on purpose (scored ``None``, counted in
``ScoredGroup.errors``/``timeouts``) and the run goes on; this log is where a person sees it: the
driver's progress bar (``postfix``, plus one printed line the first time a function fails), and
``RUN_DIR/reward_errors.json``, which ``raylign report`` puts in its summary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from raylign.protocol import ScoredGroup

FILE = "reward_errors.json"


@dataclass
class FunctionErrors:
    """Failed calls of one reward function so far."""

    errors: int = 0  # calls that raised (or whose process died)
    timeouts: int = 0  # calls past reward.timeout_s
    calls: int = 0  # all calls (one per group)
    first_step: int = 0  # the step of the first failure
    first_message: str = ""  # its one-line message


class RewardErrorLog:
    """Accumulates failures per reward function across steps (pure bookkeeping, no I/O but ``save``)."""

    def __init__(self) -> None:
        self.functions: dict[str, FunctionErrors] = {}

    def update(self, step: int, groups: Sequence[ScoredGroup]) -> list[str]:
        """Count one step's groups; returns a line for each function failing for the first time."""
        new: list[str] = []
        for grp in groups:
            for name in grp.per_function:
                fn = self.functions.setdefault(name, FunctionErrors())
                fn.calls += 1
                failed = grp.errors.get(name, 0) + grp.timeouts.get(name, 0)
                fn.errors += grp.errors.get(name, 0)
                fn.timeouts += grp.timeouts.get(name, 0)
                if failed and not fn.first_message:
                    fn.first_step, fn.first_message = step, grp.error_messages.get(name, "no message")
                    new.append(name)
        return [self.line(name) for name in new]

    def line(self, name: str) -> str:
        """``reward 'format' failed 8 of 8 calls (from step 1): error: TypeError: ...``."""
        fn = self.functions[name]
        return (f"reward {name!r} failed {fn.errors + fn.timeouts} of {fn.calls} calls (from step {fn.first_step}): "
                f"{fn.first_message}")

    def failing(self) -> list[str]:
        return [n for n, fn in self.functions.items() if fn.errors or fn.timeouts]

    def postfix(self, limit: int = 60) -> str | None:
        """Short text for the progress bar: ``format x8 (TypeError: ...)``; None when nothing failed."""
        parts = []
        for name in self.failing():
            fn = self.functions[name]
            why = fn.first_message.removeprefix("error: ").removeprefix("timeout: ")
            parts.append(f"{name} x{fn.errors + fn.timeouts} ({why[:limit]})")
        return "; ".join(parts) or None

    def as_dict(self) -> dict[str, dict]:
        return {name: asdict(self.functions[name]) for name in self.failing()}

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / FILE
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return path


def load_reward_errors(run_dir: str | Path) -> dict[str, dict]:
    """``RUN_DIR/reward_errors.json`` (empty when the run had no failing reward function or predates it)."""
    path = Path(run_dir) / FILE
    return json.loads(path.read_text()) if path.is_file() else {}
