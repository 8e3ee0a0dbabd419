"""metrics.jsonl is flat JSON per step (non-finite -> null), TensorBoard gets the same scalars."""

from __future__ import annotations

import json
import math

import pytest

from raylign.driver.metrics import MetricsLogger, read_metrics


def test_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, report_to=["tensorboard"]) as log:
        log.log(1, {"loss": 0.5, "reward/mean": 1.0})
        log.log(2, {"loss": math.nan, "reward/mean": 2.0})
        log.log_samples(2, [{"prompt": "p", "completion": "c", "reward": 1.0}])
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["loss"] is None and rows[1]["reward/mean"] == 2.0
    assert json.loads((tmp_path / "samples.jsonl").read_text())["completion"] == "c"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("reward/mean")] == [1.0, 2.0]


def test_resume_appends_and_last_row_wins(tmp_path):
    with MetricsLogger(tmp_path, report_to=["none"]) as log:
        log.log(1, {"loss": 1.0})
        log.log(2, {"loss": 2.0})
    with MetricsLogger(tmp_path, report_to=["none"], resume=True) as log:
        log.log(2, {"loss": 3.0})
    assert [r["loss"] for r in read_metrics(tmp_path)] == [1.0, 3.0]


def test_unknown_or_missing_backend_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown backend"):
        MetricsLogger(tmp_path, report_to=["tensorbored"])


def test_resume_drops_the_rows_the_resumed_run_writes_again(tmp_path):
    """Killed after step 3 with a checkpoint at step 2: the file then holds 1..3 once each, not 1, 2, 3, 3."""
    with MetricsLogger(tmp_path, report_to=["tensorboard"]) as log:
        for step in (1, 2, 3):
            log.log(step, {"loss": float(step)})
            log.log_samples(step, [{"completion": f"c{step}"}])
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # the kill cut the last write short
    with MetricsLogger(tmp_path, report_to=["tensorboard"], resume=True, resume_step=2) as log:
        log.log(3, {"loss": 30.0})
        log.log_samples(3, [{"completion": "again"}])
    raw = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in raw] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["completion"] for s in samples] == ["c1", "c2", "again"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
