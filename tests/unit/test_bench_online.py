"""jobs/bench_online.py's pure helpers: samples/s, overlap efficiency and the result rows (no runs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "jobs" / "bench_online.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_online", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_online"] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_online", None)


def test_importing_the_script_starts_nothing_heavy(bench):
    assert bench.Job("m", Path("p"), 6).samples_per_step == 64
    for heavy in ("ray", "trl"):  # imported lazily inside the runs, so helpers and --help stay cheap
        assert heavy not in vars(bench)


def test_samples_per_s_skips_start_up_steps(bench):
    rows = [{"time/elapsed": t} for t in (10.0, 11.0, 12.5, 14.0)]  # step 1 includes 10 s of start-up
    assert bench.samples_per_s(rows, 64, skip=1) == pytest.approx(64 * 3 / 4.0)
    assert bench.samples_per_s(rows, 64, skip=2) == pytest.approx(64 * 2 / 3.0)
    assert bench.samples_per_s(rows, 64, skip=0) == pytest.approx(64 * 4 / 14.0)


def test_samples_per_s_refuses_too_few_rows(bench):
    with pytest.raises(ValueError, match="skip=2"):
        bench.samples_per_s([{"time/elapsed": 1.0}, {"time/elapsed": 2.0}], 64, skip=2)
    with pytest.raises(ValueError, match="does not increase"):
        bench.samples_per_s([{"time/elapsed": 1.0}, {"time/elapsed": 1.0}], 64, skip=1)


def _row(step: float, generate: float, train: float) -> dict[str, float]:
    return {"time/step": step, "time/generate": generate, "time/train": train}


def test_overlap_efficiency_is_slower_half_over_step(bench):
    rows = [_row(9.0, 5.0, 5.0), _row(1.0, 0.6, 0.8), _row(1.0, 1.0, 0.6)]
    got = bench.overlap(rows, skip=1)
    assert got["step"] == pytest.approx(1.0)
    assert got["generate"] == pytest.approx(0.8) and got["train"] == pytest.approx(0.7)
    assert got["efficiency"] == pytest.approx(0.8)
    sync = bench.overlap([_row(1.0, 0.4, 0.5)], skip=0)  # halves one after the other
    assert sync["efficiency"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bench.overlap(rows, skip=3)


def test_elapsed_rows_measure_trl_like_raylign(bench):
    rows = bench.elapsed_rows([101.0, 102.0, 104.0], start=100.0)
    assert [r["time/elapsed"] for r in rows] == [1.0, 2.0, 4.0]
    assert bench.samples_per_s(rows, 10, skip=1) == pytest.approx(20 / 3.0)


def test_result_rows_take_medians_and_ratios(bench):
    sync = [
        {"samples_per_s": s, "length": 16.0, "step": 1.0, "generate": 0.4, "train": 0.5, "efficiency": 0.5}
        for s in (100.0, 80.0, 90.0)
    ]
    asyn = [
        {"samples_per_s": s, "length": 16.0, "step": 0.5, "generate": 0.4, "train": 0.45, "efficiency": 0.9}
        for s in (150.0, 160.0, 170.0)
    ]
    trl = [{"samples_per_s": s, "length": 15.5, "threads": 1} for s in (50.0, 40.0, 45.0)]
    rows = bench.result_rows(sync, asyn, trl, staleness=1, setup="tiny", trl_name="trl GRPOTrainer")
    speedup, efficiency, vs_trl = rows
    assert speedup["raylign"] == 160.0 and speedup["baseline"] == 90.0
    assert speedup["ratio"] == pytest.approx(170 / 90)  # median of 1.5, 2.0, 1.89
    assert efficiency["ratio"] == pytest.approx(0.9)
    assert efficiency["raylign"] == pytest.approx(2.0) and efficiency["baseline"] == pytest.approx(1 / 0.45)
    assert efficiency["baseline_name"] == "max(generate, train)"
    assert vs_trl["raylign"] == 90.0 and vs_trl["baseline"] == 45.0 and vs_trl["ratio"] == pytest.approx(2.0)
    assert all(
        set(r) >= {"benchmark", "metric", "raylign", "baseline", "baseline_name", "ratio", "notes"}
        for r in rows
    )
    table = bench.format_table(rows)
    assert "max(generate, train)" in table and "trl GRPOTrainer" in table
