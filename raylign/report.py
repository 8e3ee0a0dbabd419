"""``raylign report RUN_DIR [RUN_DIR...] --out DIR``: PNG plots plus ``summary.md`` / ``summary.json``.

Reads only the run directory contract (``config.yaml``, ``metrics.jsonl``, ``samples.jsonl``), so it
works on a finished run, a run still in progress, or a copy pulled from a cluster. Several runs are
overlaid in each plot (legend = run name). The plots themselves are in ``raylign.report_plots``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from raylign.driver.metrics import read_metrics
from raylign.report_plots import FAMILIES, TIME_KEYS, Run, expand, is_num, render_all
from raylign.rewards.errors import load_reward_errors

log = logging.getLogger(__name__)

# Best step: the first key a run has, and whether higher is better.
BEST_BY = [("eval/accuracy", True), ("accuracy", True), ("reward/mean", True), ("loss", False)]
MAX_SAMPLES = 8  # rows of the samples table per run (the most recent ones)
THUMB_PX = 64


@dataclass
class RunReport:
    """One run as the report sees it."""

    run: Run
    dir: Path
    method: str
    samples: list[dict[str, Any]]
    unreadable_samples: int = 0
    unreadable_images: int = 0
    sample_views: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run.name


def main(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Render plots and summaries of ``run_dirs`` into ``out`` and return it.

    ``out`` defaults to ``RUN_DIR/report`` for one run and ``./report`` for several.
    """
    if not run_dirs:
        raise ValueError("raylign report: give at least one run directory")
    runs = [load_run(d) for d in run_dirs]  # first, so a wrong path leaves no empty report behind
    out_dir = Path(out) if out else (Path(run_dirs[0]) / "report" if len(run_dirs) == 1 else Path("report"))
    out_dir.mkdir(parents=True, exist_ok=True)
    _dedupe_names(runs)
    plots = render_all([r.run for r in runs], out_dir)
    for r in runs:
        r.sample_views = [sample_view(r, i, s, out_dir) for i, s in enumerate(r.samples[-MAX_SAMPLES:])]
    (out_dir / "summary.md").write_text(summary_markdown(runs, plots))
    (out_dir / "summary.json").write_text(json.dumps(summary_dict(runs, plots), indent=2))
    return out_dir


def load_run(run_dir: str | Path) -> RunReport:
    """Read a run directory; a missing ``metrics.jsonl`` is an error that says what is expected."""
    path = Path(run_dir)
    if not (path / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{path} has no metrics.jsonl: give a run directory (output_dir/run_name)")
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    config = config or {}
    samples, bad = _read_jsonl(path / "samples.jsonl")
    name = str(config.get("run_name") or path.resolve().name)
    method = str(config.get("method", "unknown"))
    report = RunReport(Run(name, read_metrics(path)), path, method, samples, unreadable_samples=bad)
    if bad:
        log.warning("%s: %d unreadable line(s) in samples.jsonl were skipped", path, bad)
    return report


def best_step(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """``{step, metric, value}`` by eval accuracy, else reward mean, else lowest loss; None if none logged."""
    for key, higher in BEST_BY:
        points = [(r[key], r["step"]) for r in rows if is_num(r.get(key))]
        if points:  # ties go to the earliest step
            value, step = min(points, key=lambda p: (-p[0] if higher else p[0], p[1]))
            return {"step": step, "metric": key, "value": value}
    return None


def wall_time(rows: Sequence[dict[str, Any]]) -> float | None:
    """Seconds of training: ``time/elapsed`` restarts at 0 on resume, so segments are summed."""
    elapsed = [r["time/elapsed"] for r in rows if is_num(r.get("time/elapsed"))]
    if not elapsed:
        return None
    total, prev = 0.0, 0.0
    for e in elapsed:
        if e < prev:
            total += prev
        prev = e
    return total + prev


def final_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The last finite value of every key."""
    return {k: v for r in rows for k, v in r.items() if k != "step" and is_num(v)}


def null_counts(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many rows logged each key as null (a NaN or inf at logging time)."""
    counts: dict[str, int] = {}
    for r in rows:
        for k, v in r.items():
            if v is None:
                counts[k] = counts.get(k, 0) + 1
    return counts


# --- summary ---------------------------------------------------------------------------------------


def summary_markdown(runs: Sequence[RunReport], plots: Sequence[Path]) -> str:
    """The human summary: runs table, final metrics, plots, samples."""
    lines = ["# raylign report", "",
             "| run | method | steps | last step | wall time | best step | best by | value |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        best = best_step(r.run.rows) or {"step": "-", "metric": "-", "value": None}
        last = r.run.rows[-1]["step"] if r.run.rows else "-"
        lines.append(f"| {_cell(r.name)} | {r.method} | {len(r.run.rows)} | {last} | "
                     f"{_duration(wall_time(r.run.rows))} | {best['step']} | {best['metric']} "
                     f"| {_fmt(best['value'])} |")
    nulls = [f"{r.name}: " + ", ".join(f"`{k}` x{n}" for k, n in c.items())
             for r in runs if (c := null_counts(r.run.rows))]
    if nulls:
        lines += ["", "Non-finite values (logged as null, not plotted): " + "; ".join(nulls)]
    failing = [(r.name, name, fn) for r in runs for name, fn in load_reward_errors(r.dir).items()]
    if failing:  # a reward function that fails is counted and the run goes on: say so up front
        lines += ["", "## Reward functions that failed", "", "| run | function | failed calls | first step | first error |",
                  "|---|---|---|---|---|"]
        lines += [f"| {_cell(run)} | `{name}` | {fn['errors'] + fn['timeouts']} of {fn['calls']} | {fn['first_step']} "
                  f"| {_cell(fn['first_message'], 200)} |" for run, name, fn in failing]
    lines += ["", "## Final metrics", "", *_final_table(runs), "", "## Plots", ""]
    lines += [f"![{p.stem}]({p.name})\n" for p in plots] or ["(no plottable metrics)"]
    for r in runs:
        if r.sample_views:
            lines += ["", f"## Samples: {r.name}", "", "| step | image | prompt | completion | reward |",
                      "|---|---|---|---|---|"]
            lines += [_sample_row(v) for v in r.sample_views]
    return "\n".join(lines) + "\n"


def _final_table(runs: Sequence[RunReport]) -> list[str]:
    """Rows = the plotted metrics present in some run, columns = runs."""
    finals = [final_metrics(r.run.rows) for r in runs]
    patterns = [k for specs in FAMILIES.values() for _, keys in specs for k in keys] + TIME_KEYS
    keys = expand(patterns, set().union(*finals))
    if not keys:
        return ["(none logged)"]
    head = ["| metric | " + " | ".join(_cell(r.name) for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    return head + [f"| `{k}` | " + " | ".join(_fmt(f.get(k)) for f in finals) + " |" for k in keys]


def summary_dict(runs: Sequence[RunReport], plots: Sequence[Path]) -> dict[str, Any]:
    """The machine-readable summary (same facts as the markdown, all final values)."""
    return {
        "plots": [p.name for p in plots],
        "runs": [
            {
                "name": r.name, "dir": str(r.dir), "method": r.method, "steps": len(r.run.rows),
                "last_step": r.run.rows[-1]["step"] if r.run.rows else None,
                "wall_time_s": wall_time(r.run.rows), "best": best_step(r.run.rows),
                "final": final_metrics(r.run.rows), "null_counts": null_counts(r.run.rows),
                "num_samples": len(r.samples), "unreadable_samples": r.unreadable_samples,
                "unreadable_images": r.unreadable_images, "samples_shown": r.sample_views,
                "reward_errors": load_reward_errors(r.dir),
            }
            for r in runs
        ],
    }


# --- samples ---------------------------------------------------------------------------------------


def sample_view(run: RunReport, index: int, sample: dict[str, Any], out: Path) -> dict[str, Any]:
    """One sample as plain fields (text, rewards, thumbnail path relative to ``out``); writes the thumb."""
    image = sample.get("image") or next(iter(sample.get("images") or []), None)
    thumb = None
    if isinstance(image, str):
        rel = (Path("thumbs") / f"{_slug(run.name)}_{index}.png").as_posix()
        if make_thumbnail(image, run.dir, out / rel):
            thumb = rel
        else:
            run.unreadable_images += 1
            thumb = "unreadable"
    return {
        "step": sample.get("step"),
        "thumb": thumb,
        "prompt": _text(sample.get("prompt")),
        "completion": _text(sample.get("completion")),
        "reward": sample.get("reward"),
        "rewards": _per_function(sample),
    }


def _sample_row(view: dict[str, Any]) -> str:
    """A samples-table markdown row."""
    thumb = view["thumb"]
    image = "" if thumb is None else "(unreadable image)" if thumb == "unreadable" else f"![]({thumb})"
    total = f"**{_fmt(view['reward'])}**" if view["reward"] is not None else ""
    detail = ", ".join(f"{_cell(k)} {_fmt(v)}" for k, v in view["rewards"].items())
    reward = f"{total} ({detail})" if total and detail else total or detail
    return (f"| {view['step']} | {image} | {_cell(view['prompt'], 200)} | {_cell(view['completion'], 400)} "
            f"| {reward} |")


def make_thumbnail(image: str, run_dir: Path, dest: Path) -> bool:
    """Write a <= 64 px PNG of ``image`` (a path relative to the run dir, or base64 PNG/JPEG, optionally
    a ``data:`` URI) to ``dest``. Returns False (and logs why) when it cannot be read."""
    from PIL import Image

    try:
        if image.startswith("data:"):
            data = base64.b64decode(image.split(",", 1)[1], validate=True)
        elif len(image) < 1024 and (run_dir / image).is_file():
            data = (run_dir / image).read_bytes()
        else:
            data = base64.b64decode(image, validate=True)
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            dest.parent.mkdir(parents=True, exist_ok=True)
            im.save(dest)
        return True
    except (OSError, ValueError) as e:  # bad base64, missing file, not an image: counted by the caller
        log.warning("%s: sample image not readable (%s: %s)", run_dir, type(e).__name__, e)
        return False


def _per_function(sample: dict[str, Any]) -> dict[str, Any]:
    """Per-function rewards from ``rewards`` (dict or list) or ``reward/<fn>`` keys."""
    per = sample.get("rewards")
    if isinstance(per, dict):
        return {str(k): v for k, v in per.items()}
    if isinstance(per, list):
        return {str(i): v for i, v in enumerate(per)}
    return {k.split("/", 1)[1]: v for k, v in sample.items() if k.startswith("reward/")}


def _text(value: Any) -> str:
    """Plain text of a string, a chat message list, or content parts (images shown as ``[image]``)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(t for v in value if (t := _text(v)))
    if isinstance(value, dict):
        if "content" in value:
            return _text(value["content"])
        kind = value.get("type")
        return value.get("text", "") if kind == "text" else "[image]" if kind == "image" else ""
    return str(value)


# --- small helpers ---------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of an optional JSONL file and the count of unreadable lines (e.g. one cut off mid-write)."""
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return rows, bad


def _dedupe_names(runs: Sequence[RunReport]) -> None:
    """Two runs with one name would share a legend entry: suffix the later ones."""
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.run.name = f"{r.name}-{seen[r.name]}"


def _cell(text: str, limit: int | None = None) -> str:
    """Safe inside a markdown table cell: HTML-escaped (keeps ``<think>`` visible), pipes and newlines."""
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _fmt(v: Any) -> str:
    if not is_num(v):
        return "-"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return f"{v:.2e}"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes}m {s:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="raylign report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report, or ./report)")
    args = parser.parse_args()
    print(main(args.run_dirs, args.out) / "summary.md")
