"""``RewardWorker``: score rollout groups with reward functions, each call under a hard timeout.

A plain class (no Ray here; ``group.py`` wraps it in an actor). It owns a ``RewardProcessPool``;
every (group, function) pair is one call into the pool, so a function that hangs, raises, or kills
its process costs ``None`` for that group's samples and a count in ``ScoredGroup.timeouts`` /
``errors``, never the worker. Thread-safe: a threaded actor may call ``score`` concurrently.

Weighted sum: ``reward[i] = sum(w_f * r_f[i] for f whose r_f[i] is not None)``. ``None`` is "no
opinion" and is left out (its weight is not applied, nothing is renormalised); a sample on which
every function has no opinion gets 0.0, as in TRL (a nansum of an all-NaN row).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from raylign.protocol import Rollout, ScoredGroup, TrainerState
from raylign.rewards.loader import as_spec, load_reward_functions
from raylign.rewards.pool import CallResult, RewardProcessPool

logger = logging.getLogger(__name__)

# Keyword arguments the worker (and, for the log_* callables, the pool process) fills in itself; a
# dataset column may not reuse them.
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids", "completion_lengths", "images", "image",
                    "trainer_state", "log_metric", "log_extra")


def reward_inputs(rollout: Rollout) -> dict[str, Any]:
    """TRL 1.16's keyword arguments for one group: prompts, completions and columns, each a list of n.

    Completions are conversational when the prompt is a list of messages. ``completion_ids`` (TRL's
    name) and ``completion_lengths`` (token counts) come from the sampled tokens; ``images`` is each
    sample's list of PIL images and ``image`` its first (None without one), the two forms TRL passes
    for an ``images`` / ``image`` column; ``trainer_state`` is the progress of the step the prompt
    feeds (a ``TrainerState``; zeros outside training). The pool process adds ``log_metric`` and
    ``log_extra``.
    """
    n = len(rollout.completions)
    prompt = rollout.request.prompt
    conversational = isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt)
    if conversational:
        completions: list[Any] = [[{"role": "assistant", "content": c.text}] for c in rollout.completions]
    else:
        completions = [c.text for c in rollout.completions]
    inputs: dict[str, Any] = {
        "prompts": [prompt] * n,
        "completions": completions,
        "completion_ids": [list(c.token_ids) for c in rollout.completions],
        "completion_lengths": [len(c.token_ids) for c in rollout.completions],
        "images": [list(rollout.request.images)] * n,
        "image": [rollout.request.images[0] if rollout.request.images else None] * n,
        "trainer_state": rollout.request.trainer_state or TrainerState(),
    }
    for key, value in rollout.request.columns.items():
        if key in RESERVED_COLUMNS:
            raise ValueError(
                f"rollout {rollout.request.uid!r}: dataset column {key!r} clashes with an argument the "
                f"reward worker passes itself ({', '.join(RESERVED_COLUMNS)}); rename the column"
            )
        inputs[key] = [value] * n
    return inputs


def weighted_sum(
    per_function: dict[str, tuple[float | None, ...]], weights: dict[str, float], n: int
) -> tuple[float, ...]:
    """Per-sample weighted sum, leaving out ``None`` (0.0 when every function abstains)."""
    totals = [0.0] * n
    for name, values in per_function.items():
        for i, v in enumerate(values):
            if v is not None:
                totals[i] += weights[name] * v
    return tuple(totals)


class RewardWorker:
    """Scores groups with reward functions given as spec strings (see ``loader``) or importable functions.

    Args:
        reward_funcs: specs such as ``"accuracy"``, ``"pkg.mod:fn"``, ``"rewards.py:fn"``.
        reward_weights: one weight per function (TRL's ``reward_weights``); 1.0 each by default.
        timeout_s: hard limit on one function's call on one group.
        num_processes: pool processes, i.e. calls that run at once.
        output_lines: lines of each call's stdout/stderr shown; the rest is counted (one summary line).
        max_memory_mb: address-space limit of each pool process (None = none).
        name: an id for logs.
    """

    def __init__(
        self,
        reward_funcs: Sequence[str | Callable[..., Any]],
        reward_weights: Sequence[float] | None = None,
        *,
        timeout_s: float = 10.0,
        num_processes: int = 2,
        output_lines: int = 20,
        max_memory_mb: int | None = None,
        name: str = "reward",
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        specs = [as_spec(f) for f in ([reward_funcs] if isinstance(reward_funcs, str) else reward_funcs)]
        # Load here too: a bad spec fails now with a clear message, not inside a pool process.
        loaded = load_reward_functions(specs, reward_weights)
        self.names = tuple(r.name for r in loaded)
        self.weights = {r.name: r.weight for r in loaded}
        self.timeout_s = float(timeout_s)
        self.name = name
        self._pool = RewardProcessPool(
            [r.spec for r in loaded], size=num_processes, output_lines=output_lines, max_memory_mb=max_memory_mb
        )
        self._threads = ThreadPoolExecutor(max_workers=num_processes, thread_name_prefix=f"{name}-call")
        self._lock = threading.Lock()
        self._stats = {"groups": 0, "calls": 0, "timeouts": 0, "errors": 0}

    def score(self, rollout: Rollout) -> ScoredGroup:
        """Score the n completions of one group."""
        return self.score_many([rollout])[0]

    def score_many(self, rollouts: Sequence[Rollout]) -> list[ScoredGroup]:
        """Score many groups at once: all their calls share the pool, so they overlap. Keeps order."""
        start = time.monotonic()
        inputs = [reward_inputs(r) for r in rollouts]
        futures = [
            [
                self._threads.submit(self._pool.call, i, kw, len(r.completions), self.timeout_s)
                for i in range(len(self.names))
            ]
            for r, kw in zip(rollouts, inputs, strict=True)
        ]
        scored = [
            self._assemble(r, [f.result() for f in fs], start)
            for r, fs in zip(rollouts, futures, strict=True)
        ]
        return scored

    def _assemble(self, rollout: Rollout, results: list[CallResult], start: float) -> ScoredGroup:
        n = len(rollout.completions)
        per_function: dict[str, tuple[float | None, ...]] = {}
        timeouts = {name: 0 for name in self.names}
        errors = {name: 0 for name in self.names}
        messages: dict[str, str] = {}
        metrics: dict[str, list[float]] = {}
        extra: dict[str, list[Any]] = {}
        for name, res in zip(self.names, results, strict=True):
            per_function[name] = res.values if res.status == "ok" else (None,) * n
            for key, values in res.metrics.items():
                metrics.setdefault(key, []).extend(values)
            for key, values in res.extra.items():
                extra.setdefault(key, []).extend(values)
            if res.status == "timeout":
                timeouts[name] += 1
            elif res.status == "error":
                errors[name] += 1
            if res.status != "ok":
                messages[name] = f"{res.status}: {' '.join(res.message.split())}"
                logger.warning(
                    "reward %r on group %r: %s: %s", name, rollout.request.uid, res.status, res.message
                )
        with self._lock:
            self._stats["groups"] += 1
            self._stats["calls"] += len(results)
            self._stats["timeouts"] += sum(timeouts.values())
            self._stats["errors"] += sum(errors.values())
        return ScoredGroup(
            rollout=rollout,
            rewards=weighted_sum(per_function, self.weights, n),
            per_function=per_function,
            timeouts=timeouts,
            errors=errors,
            score_s=time.monotonic() - start,
            error_messages=messages,
            logged_metrics={k: tuple(v) for k, v in metrics.items()},
            logged_extra={k: tuple(v) for k, v in extra.items()},
        )

    def wait_ready(self) -> None:
        """Block until the pool processes have loaded the reward functions (they start in the background)."""
        self._pool.wait_ready()

    def stats(self) -> dict[str, int]:
        """Totals since start: groups, calls, timeouts, errors, process_restarts, pid."""
        with self._lock:
            return {**self._stats, "process_restarts": self._pool.restarts, "pid": os.getpid()}

    def close(self) -> None:
        """Stop the pool processes; the worker cannot score afterwards."""
        self._pool.close()
        self._threads.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RewardWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
