"""Per-step metrics to JSONL (always), TensorBoard (default), Weights & Biases and MLflow (when asked).

Each backend is used through its own library. A backend that was asked for but is not installed
is an error at start-up (never a run that silently logs nothing).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

BACKENDS = ("tensorboard", "wandb", "mlflow", "none")


def _finite(value: Any) -> float | None:
    """JSON has no NaN/inf: non-finite values are written as null (and counted by readers)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class MetricsLogger:
    """Writes ``metrics.jsonl`` (one flat JSON object per step) and mirrors it to the chosen backends."""

    def __init__(
        self,
        run_dir: str | Path,
        report_to: Sequence[str] = ("tensorboard",),
        config: Mapping[str, Any] | None = None,
        project: str = "raylign",
        run_name: str | None = None,
        resume: bool = False,
        resume_step: int | None = None,
    ):
        """``resume`` appends to the run's files. With ``resume_step`` the rows of later steps, which the
        interrupted run wrote after that checkpoint and the resumed run writes again, are dropped
        first (TensorBoard purges them too), so every step keeps one row."""
        unknown = sorted(set(report_to) - set(BACKENDS))
        if unknown:
            raise ValueError(f"logging.report_to: unknown backend(s) {unknown}; choose from {list(BACKENDS)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        mode = "a" if resume else "w"
        purge = resume_step is not None and resume
        if purge:
            for name in ("metrics.jsonl", "samples.jsonl"):
                drop_rows_after(self.run_dir / name, resume_step)
        self._jsonl = open(self.run_dir / "metrics.jsonl", mode, buffering=1)
        self._samples = open(self.run_dir / "samples.jsonl", mode, buffering=1)
        self._start = time.time()
        self._tb = self._wandb = self._mlflow = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                     purge_step=resume_step + 1 if purge else None)
        if "wandb" in report_to:
            self._wandb = _require("wandb").init(
                project=project, name=run_name or self.run_dir.name, config=dict(config or {}), dir=str(self.run_dir)
            )
        if "mlflow" in report_to:
            mlflow = _require("mlflow")
            mlflow.set_experiment(project)
            mlflow.start_run(run_name=run_name or self.run_dir.name)
            mlflow.log_params(_flatten(config or {}))
            self._mlflow = mlflow

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Record one step; returns the row written (with ``step`` and ``time/elapsed``)."""
        row: dict[str, Any] = {"step": int(step), "time/elapsed": round(time.time() - self._start, 3)}
        row.update({k: _finite(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if v is not None and k != "step"}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", ".") : v for k, v in scalars.items()}, step=step)
        return row

    def log_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
        """Record a few completions with their rewards (one JSON object per sample)."""
        for sample in samples:
            self._samples.write(json.dumps({"step": int(step), **sample}, default=str) + "\n")
        if self._tb is not None and samples:
            table = "\n\n".join(f"**{s.get('reward', '')}** {s.get('completion', '')}" for s in samples)
            self._tb.add_text("samples", table, step)

    def close(self) -> None:
        self._jsonl.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drop_rows_after(path: Path, step: int) -> int:
    """Rewrite a JSONL file of ``{"step": ...}`` rows without those after ``step``; returns rows dropped.

    A half-written last line (the run was killed mid-write) goes too; other unreadable lines stay.
    """
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):  # kept unless it is the cut-off tail
            row_step = None if i < len(lines) - 1 else math.inf
        if row_step is None or row_step <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)  # atomic: a crash now leaves the old file or the new one, never half of each
    return len(lines) - len(kept)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Load ``metrics.jsonl`` of a run (the last row wins when a resumed run repeated a step).

    A run that is still writing may have a half-written last line: it is skipped, not fatal.
    """
    rows: dict[int, dict[str, Any]] = {}
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # being written right now
                continue
            raise ValueError(f"{run_dir}/metrics.jsonl line {i + 1} is not JSON: {line[:80]!r}") from None
        rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def _require(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(
            f"logging.report_to includes {name!r} but {name} is not installed: pip install 'raylign[{name}]'"
        ) from e


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
