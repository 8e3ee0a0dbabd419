"""PNG plots of one or more runs' ``metrics.jsonl``, drawn on matplotlib's Agg canvas (no pyplot, no display).

Each figure is a *family* (rewards, lengths, policy, time, pipeline, training) made of panels; a panel is a
``(title, keys)`` spec. Keys may be shell patterns (``reward/*/mean``). A panel is drawn only when one of
its keys has a value in some run, and a figure only when one of its panels is drawn, so missing keys
never crash. Runs are overlaid in one colour each; a panel's keys are told apart by line style.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

Spec = tuple[str, list[str]]

FAMILIES: dict[str, list[Spec]] = {
    "rewards": [
        ("Reward (mean)", ["reward/mean"]),
        ("Reward per function", ["reward/*/mean"]),
        ("Accuracy", ["eval/accuracy", "accuracy"]),
    ],
    "lengths": [
        ("Completion length (tokens)", ["completion_length/mean", "completion_length/max"]),
        ("Truncated fraction", ["*truncated*"]),
    ],
    "policy": [
        ("KL to reference", ["kl"]),
        ("Clip fraction",
         ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/*"]),
    ],
    "pipeline": [
        ("Staleness (policy versions)", ["staleness/mean", "staleness/max"]),
        ("Behaviour weight pi_prox / pi_sampler",
         ["sampling/importance_sampling_ratio/mean", "sampling/importance_sampling_ratio/max",
          "sampling/importance_sampling_ratio/min"]),
        ("Sampler/learner mismatch", ["sampling/mismatch_kl", "sampling/sampling_logp_difference/mean"]),
        ("Masked by the off-policy correction (fraction)",
         ["sampling/is_masked_frac", "sampling/off_policy_masked_frac"]),
        ("Proximal logprob recompute (s, part of time/train)", ["time/proximal"]),
        ("Throughput (tokens/s)", ["throughput/generate_tokens_per_s", "throughput/train_tokens_per_s"]),
    ],
    "training": [
        ("Loss", ["loss"]),
        ("Loss components", ["loss/*"]),
        ("Preference accuracy", ["rewards/accuracies"]),
        ("Reward margin (chosen - rejected)", ["rewards/margins"]),
        ("Implicit rewards", ["rewards/chosen", "rewards/rejected"]),
        ("Gradient norm", ["grad_norm"]),
        ("Learning rate", ["learning_rate"]),
    ],
}
# Stacked per run (a sum cannot be overlaid across runs), so drawn by its own function.
TIME_KEYS = ["time/generate", "time/reward", "time/train", "time/sync", "time/wait"]

DPI = 120
PANEL_SIZE = (7.0, 4.2)  # inches: one panel is 840x504 px
STYLES = ["-", "--", ":", "-."]
UNSMOOTHED = {"learning_rate"}  # a schedule, not a noisy measurement: smoothing would only add lag
SPARSE = 20  # series with at most this many points (e.g. evals) get point markers


@dataclass
class Run:
    """What the plots need of a run: its legend name and its rows (flat dicts, None for non-finite)."""

    name: str
    rows: list[dict[str, Any]]

    def keys(self) -> set[str]:
        return {k for row in self.rows for k, v in row.items() if v is not None}

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) where ``key`` has a finite value; null rows are skipped, not drawn as zero."""
        pts = [(float(r["step"]), float(r[key])) for r in self.rows if is_num(r.get(key))]
        return [p[0] for p in pts], [p[1] for p in pts]


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def expand(patterns: Sequence[str], available: set[str]) -> list[str]:
    """Keys matching the patterns, in pattern order (sorted within a pattern), each once."""
    out: list[str] = []
    for pattern in patterns:
        for key in sorted(fnmatch.filter(available, pattern)):
            if key not in out and key != "step":
                out.append(key)
    return out


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (the first points are not pulled to 0)."""
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**i) if weight > 0 else v)
    return out


def smoothing_weight(n: int) -> float:
    """Light smoothing that grows with the run: none for <= 15 points, 0.5 at 30, at most 0.85 (from 100)."""
    return min(0.85, max(0.0, 1.0 - 15.0 / n)) if n else 0.0


ORDER = ["rewards", "lengths", "policy", "time", "pipeline", "training"]


def render_all(runs: Sequence[Run], out: Path) -> list[Path]:
    """Draw every family that has data, in ``ORDER``; returns the PNG paths written."""
    drawn = (plot_time(runs, out) if name == "time" else plot_family(runs, name, FAMILIES[name], out)
             for name in ORDER)
    return [p for p in drawn if p is not None]


def plot_family(runs: Sequence[Run], name: str, specs: Sequence[Spec], out: Path) -> Path | None:
    """One PNG ``out/<name>.png`` with a panel per spec that has data; None when no panel has."""
    available = set().union(*(r.keys() for r in runs))
    panels = [(title, keys) for title, patterns in specs if (keys := expand(patterns, available))]
    if not panels:
        return None
    fig, axes = _grid(len(panels))
    for ax, (title, keys) in zip(axes, panels):
        _draw_lines(ax, runs, keys)
        _style(ax, title)
    return _save(fig, out / f"{name}.png")


def plot_time(runs: Sequence[Run], out: Path) -> Path | None:
    """``out/time.png``: seconds per step split into phases, stacked, one panel per run (shared y)."""
    timed = [(r, keys) for r in runs if (keys := [k for k in TIME_KEYS if k in r.keys()])]
    if not timed:
        return None
    fig, axes = _grid(len(timed), sharey=True)
    colors = _colors(len(TIME_KEYS))
    for ax, (run, keys) in zip(axes, timed):
        steps = [float(r["step"]) for r in run.rows]
        stacks = [[float(r[k]) if is_num(r.get(k)) else 0.0 for r in run.rows] for k in keys]
        ax.stackplot(steps, stacks, labels=[k.split("/", 1)[1] for k in keys],
                     colors=[colors[TIME_KEYS.index(k)] for k in keys], alpha=0.85, step="mid")
        _style(ax, f"Time per step (s) - {run.name}" if len(runs) > 1 else "Time per step (s)")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.15)  # headroom so the legend does not hide the tallest steps
        ax.legend(loc="upper left", fontsize=8, ncol=len(keys), frameon=False)
    return _save(fig, out / "time.png")


def _draw_lines(ax, runs: Sequence[Run], keys: Sequence[str]) -> None:
    """Each (run, key) as a faint raw line plus its EMA; colour = run, line style = key."""
    colors = _colors(len(runs))
    for color, run in zip(colors, runs):
        for i, key in enumerate(keys):
            x, y = run.series(key)
            if not x:
                continue
            label = _label(run.name, key, len(runs), len(keys))
            style = STYLES[i % len(STYLES)]
            weight = 0.0 if key in UNSMOOTHED else smoothing_weight(len(y))
            if weight > 0:
                ax.plot(x, y, color=color, linestyle=style, linewidth=1, alpha=0.3)
            ax.plot(x, ema(y, weight), color=color, linestyle=style, linewidth=2, label=label,
                    marker="o" if len(x) <= SPARSE else None, markersize=3)
    ax.legend(fontsize=8, frameon=False)


def _label(run: str, key: str, n_runs: int, n_keys: int) -> str:
    if n_runs == 1:
        return key
    return run if n_keys == 1 else f"{run}: {key}"


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _grid(n: int, sharey: bool = False):
    """A figure of n panels, two per row, and its axes as a flat list (unused cells removed)."""
    from matplotlib.figure import Figure

    ncols = 1 if n == 1 else 2
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).flat)
    for ax in axes[n:]:
        ax.remove()
    return fig, axes[:n]


def _style(ax, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=11, loc="left")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path
