"""`raylign bench`: run every benchmark side by side with its baseline and write one table.

Each benchmark is a script in ``jobs/`` run in its own process (so Ray, DeepSpeed and torch
threads of one cannot skew another) as ``python jobs/bench_X.py [--quick] --json PATH``; it
writes a JSON list of rows::

    {"benchmark": "generation", "metric": "tokens/s", "raylign": 2100.0, "baseline": 1900.0,
     "baseline_name": "model.generate", "ratio": 1.1, "notes": "..."}

``ratio`` is raylign over baseline, both measured in the same run, so it carries over between
machines better than the raw numbers do.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS: dict[str, str] = {
    "offline": "jobs/bench_offline.py",  # SFT/DPO tokens/s vs TRL's SFTTrainer/DPOTrainer
    "generation": "jobs/bench_generation.py",  # TransformersEngine vs plain model.generate
    "weight_sync": "jobs/bench_weight_sync.py",  # broadcaster GB/s vs in-memory copy
    "online": "jobs/bench_online.py",  # async overlap efficiency; GRPO samples/s vs TRL's GRPOTrainer
}
COLUMNS = ("benchmark", "metric", "raylign", "baseline", "baseline_name", "ratio", "notes")


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    import torch

    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()),
        "memory_gb": f"{mem_gb:.0f}",
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def run_one(name: str, script: Path, quick: bool, out: Path, timeout_s: float) -> list[dict]:
    """Run one benchmark script; a failure becomes a row that says so (the table is still written)."""
    json_path = out / f"{name}.json"
    cmd = [sys.executable, str(script), "--json", str(json_path)] + (["--quick"] if quick else [])
    started = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [_failed(name, f"timed out after {timeout_s:.0f}s")]
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not json_path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return [_failed(name, f"exit {proc.returncode}: {tail[0][:200]} (see {name}.log)")]
    rows = json.loads(json_path.read_text())
    for row in rows:
        row.setdefault("benchmark", name)
        row["seconds"] = round(time.time() - started, 1)
    return rows


def _failed(name: str, why: str) -> dict:
    return {"benchmark": name, "metric": "FAILED", "raylign": None, "baseline": None, "ratio": None, "notes": why}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def to_markdown(rows: list[dict], env: dict[str, str]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |\n" for r in rows)
    where = ", ".join(f"{k}: {v}" for k, v in env.items())
    return f"## raylign bench\n\nMachine: {where}\n\n{head}{body}"


def main(quick: bool = False, out: str | Path = "bench_out", only: list[str] | None = None) -> Path:
    """Run the benchmarks (all, or ``only``) and write ``bench.md`` and ``bench.json`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent.parent
    names = only or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    budget_s = 150.0 if quick else 1800.0
    rows: list[dict] = []
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        rows += run_one(name, root / BENCHMARKS[name], quick, out, budget_s)
        for row in rows[-1:]:
            print(f"[bench] {name}: {row.get('metric')} ratio={_cell(row.get('ratio'))}", flush=True)
    env = machine()
    (out / "bench.json").write_text(json.dumps({"machine": env, "rows": rows}, indent=2))
    (out / "bench.md").write_text(to_markdown(rows, env))
    print(to_markdown(rows, env))
    return out
