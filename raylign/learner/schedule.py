"""Learning-rate schedules as pure functions of the step (transformers' semantics).

The learner sets the optimizer's learning rate from ``lr_at(step)`` before every step instead of
keeping a scheduler object, so the schedule needs no state of its own to checkpoint: the step is
enough to resume it exactly.
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["constant", "linear", "cosine"]


def num_warmup_steps(num_training_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Warmup length: ``warmup_steps`` when > 0, else ``ceil(warmup_ratio * num_training_steps)`` (as transformers)."""
    if warmup_steps > 0:
        return warmup_steps
    return math.ceil(warmup_ratio * num_training_steps)


def lr_multiplier(step: int, num_training_steps: int, warmup: int, kind: ScheduleKind) -> float:
    """Factor in [0, 1] applied to the peak learning rate for optimizer step ``step`` (0-based).

    Linear warmup from 0 over ``warmup`` steps, then ``kind``: ``"constant"`` stays at 1,
    ``"linear"`` decays to 0 at ``num_training_steps``, ``"cosine"`` follows half a cosine to 0.
    The same numbers as transformers' ``get_{constant,linear,cosine}_schedule_with_warmup``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, (num_training_steps - step) / max(1, num_training_steps - warmup))
    if kind == "cosine":
        progress = (step - warmup) / max(1, num_training_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}; use 'constant', 'linear' or 'cosine'")


def lr_at(
    step: int,
    base_lr: float,
    num_training_steps: int,
    kind: ScheduleKind = "linear",
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``base_lr * lr_multiplier(...)``."""
    warmup = num_warmup_steps(num_training_steps, warmup_steps, warmup_ratio)
    return base_lr * lr_multiplier(step, num_training_steps, warmup, kind)
