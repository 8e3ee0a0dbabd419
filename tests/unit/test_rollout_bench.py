"""jobs/bench_generation.py runs end to end on a tiny model and reports both throughputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "jobs" / "bench_generation.py"


def test_bench_generation_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_generation", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "generation.json"
    result = bench.main(["--family", "llava", "--batch", "2", "--n", "2", "--max-tokens", "4", "--repeats", "1",
                         "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == result
    assert result["engine_tokens"] > 0 and result["plain_tokens"] > 0 and result["engine_over_plain"] > 0
