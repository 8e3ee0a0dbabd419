"""Weight-sync throughput: WeightBroadcaster (real learner and rollout actors) vs a plain in-memory copy.

A random Qwen2.5-VL of ~100M parameters (text hidden 1792, fp32, ~390 MB) is held by one
DeepSpeed learner actor (ZeRO-2) and loaded by two transformers rollout-engine actors on this machine.
Each transport (``collective`` over gloo, ``object_store``) first syncs once untimed (it pings the
engines and builds its group), then ``--repeats`` syncs are timed, each followed by the baseline:
a copy of the same tensors into two warm in-memory destinations (one for the in-process
transport), i.e. what a sync into that many engines in one process would cost at best. Medians are
reported; GB/s counts the weight bytes once. The in-process transport (learner and engine in this
process) is measured too.

vLLM (``--engine vllm``, and in a full run): the same syncs into a real vLLM engine (the CPU
build, ``.venv-vllm``; run there, or this script runs that part with ``.venv-vllm/bin/python``),
where the receiver lives in vLLM's worker process: learner -> vLLM worker over gloo (collective),
and the in-process engine feeding its worker. Text hidden 1024 (head_dim 256, which vLLM takes),
one engine actor in vLLM's default multiprocess mode. Quick runs leave it out (engine start-up
alone is ~45 s on 2 cores).

    python jobs/bench_weight_sync.py --quick --json bench_out/weight_sync.json
    python jobs/bench_weight_sync.py --hidden 1024 --repeats 5 --json out.json
    .venv-vllm/bin/python jobs/bench_weight_sync.py --engine vllm --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from raylign.config import LearnerConfig, ModelConfig, SyncConfig, TrainConfig
from raylign.learner.group import LearnerGroup
from raylign.models.tiny import build_tiny_model, make_tiny_model
from raylign.rollout.engine import EngineSpec
from raylign.rollout.group import RolloutGroup
from raylign.sync.broadcaster import WeightBroadcaster

ENGINES = 2
REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
VLLM_HIDDEN = 1024  # head_dim 256: vLLM's CPU attention takes it (448, at the default 1792, it does not)
VLLM_KWARGS = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True,
               "limit_mm_per_prompt": {"image": 1, "video": 0}}  # fmt: skip


class Memcpy:
    """The baseline: copy every weight of the same model into ``k`` warm in-memory destinations."""

    def __init__(self, hidden: int):
        model, _ = build_tiny_model("qwen2_5_vl", hidden=hidden)
        self.src = [p.detach() for p in model.parameters()]
        self.dsts = [[torch.empty_like(t) for t in self.src] for _ in range(ENGINES)]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.src)
        self.time(ENGINES)  # touch the destination pages once

    def time(self, k: int) -> float:
        start = time.perf_counter()
        for dst in self.dsts[:k]:
            for d, s in zip(dst, self.src):
                d.copy_(s)
        return time.perf_counter() - start


def timed_syncs(learners, rollouts, transport: str, args, memcpy: Memcpy, k: int) -> dict:
    """``args.repeats`` syncs over ``transport`` after one untimed, each followed by a baseline copy
    into ``k`` destinations (alternating, so load from other processes on the machine hits both alike).
    """
    broadcaster = WeightBroadcaster(
        learners, rollouts, SyncConfig(transport=transport, bucket_mb=args.bucket_mb)
    )
    broadcaster.broadcast(rollouts.version + 1)  # pings the engines and builds the group
    ours, base, metrics = [], [], {}
    for _ in range(args.repeats):
        metrics = broadcaster.broadcast(rollouts.version + 1)
        ours.append(metrics["sync/seconds"])
        base.append(memcpy.time(k))
    broadcaster.close()
    return {"seconds": statistics.median(ours), "baseline_s": statistics.median(base), "k": k, **metrics}


def inprocess(path: str, args, memcpy: Memcpy) -> dict:
    """Learner and one engine in this process (num_learners=0, num_workers=0)."""
    learners = LearnerGroup(ModelConfig(name_or_path=path), TrainConfig(), LearnerConfig(num_learners=0), 1)
    rollouts = RolloutGroup(0, EngineSpec("transformers", path, {"batch_size": 1}))
    try:
        return timed_syncs(learners, rollouts, "inprocess", args, memcpy, 1)
    finally:
        learners.shutdown()


def run_vllm(args) -> list[dict]:
    """The vLLM rows: one engine actor (multiprocess vLLM) over collective, and an in-process engine."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    memcpy = Memcpy(VLLM_HIDDEN)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(make_tiny_model("qwen2_5_vl", Path(tmp) / "model", hidden=VLLM_HIDDEN))
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        try:
            learners = LearnerGroup(ModelConfig(name_or_path=path), TrainConfig(), LearnerConfig(num_learners=0), 1)
            rollouts = RolloutGroup(1, EngineSpec("vllm", path, VLLM_KWARGS))
            ray.get([h.ping.remote() for _, h in rollouts.workers])  # started (~45 s), not timed
            results["vllm collective"] = timed_syncs(learners, rollouts, "collective", args, memcpy, 1)
            rollouts.shutdown()
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
            local = RolloutGroup(0, EngineSpec("vllm", path, VLLM_KWARGS))
            results["vllm inprocess"] = timed_syncs(learners, local, "inprocess", args, memcpy, 1)
            learners.shutdown()
        finally:
            ray.shutdown()
    return rows_of(results, memcpy, args)


def vllm_rows(args) -> list[dict]:
    """The vLLM rows, here when vLLM is importable, else from .venv-vllm's interpreter; [] without either."""
    if importlib.util.find_spec("vllm") is not None:
        return run_vllm(args)
    if not VLLM_PYTHON.exists():
        print("vLLM rows skipped: no vLLM here and no .venv-vllm (make .venv-vllm/.raylign-installed)")
        return []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vllm.json"
        cmd = [str(VLLM_PYTHON), __file__, "--engine", "vllm", "--repeats", str(args.repeats),
               "--bucket-mb", str(args.bucket_mb), "--json", str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=REPO)
        return json.loads(out.read_text())


def run(args) -> list[dict]:
    if args.engine == "vllm":
        return run_vllm(args)
    memcpy = Memcpy(args.hidden)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(make_tiny_model("qwen2_5_vl", Path(tmp) / "model", hidden=args.hidden))
        ray.init(num_cpus=2 + ENGINES, include_dashboard=False, log_to_driver=False)
        try:
            learners = LearnerGroup(
                ModelConfig(name_or_path=path),
                TrainConfig(),
                LearnerConfig(num_learners=1, zero_stage=2, num_cpus_per_learner=1),
                1,
            )
            rollouts = RolloutGroup(ENGINES, EngineSpec("transformers", path, {"batch_size": 1}))
            for transport in ("collective", "object_store"):
                results[transport] = timed_syncs(learners, rollouts, transport, args, memcpy, ENGINES)
            rollouts.shutdown()
            learners.shutdown()
        finally:
            ray.shutdown()
        results["inprocess"] = inprocess(path, args, memcpy)
    rows = rows_of(results, memcpy, args)
    if args.quick:
        print("vLLM rows left out of a quick run (--engine vllm, or a full run, measures them)")
        return rows
    return rows + vllm_rows(args)


def rows_of(results: dict, memcpy: Memcpy, args) -> list[dict]:
    rows, nbytes, tensors = [], memcpy.nbytes, len(memcpy.src)
    for transport, r in results.items():
        assert r["sync/bytes"] == nbytes, (r["sync/bytes"], nbytes)
        engines = ENGINES if r["k"] > 1 else 1
        where = (
            f"{engines} engine actor{'s' if engines > 1 else ''}"
            if "inprocess" not in transport
            else "1 engine in the learner's process"
        )
        if transport.startswith("vllm"):
            where += ", received inside vLLM's worker process (layerwise reload)"
        notes = (
            f"{nbytes / 1e6:.0f} MB fp32 ({tensors} tensors) to {where}, {r['sync/buckets']:.0f} buckets of "
            f"{args.bucket_mb:g} MiB, median of {args.repeats}"
        )
        label = {"collective": "collective (gloo)", "vllm collective": "vllm collective (gloo)"}.get(
            transport, transport
        )
        base_name = f"in-memory copy into {r['k']} buffer{'s' if r['k'] > 1 else ''}"
        gbps, base_gbps = nbytes / r["seconds"] / 1e9, nbytes / r["baseline_s"] / 1e9
        rows.append(_row(f"{label} GB/s", gbps, base_gbps, base_name, notes + "; higher is better"))
        rows.append(
            _row(f"{label} s/sync", r["seconds"], r["baseline_s"], base_name, notes + "; lower is better")
        )
        if "inprocess" not in transport:
            calls = r["sync/control_calls"]
            note = "1 learner rank + 1 per engine; lower is better"
            rows.append(
                _row(
                    f"{label} control calls/sync",
                    calls,
                    float(tensors * engines),
                    "one call per tensor per engine",
                    note,
                )
            )
    return rows


def _row(metric: str, ours: float, base: float, base_name: str, notes: str) -> dict:
    return {
        "benchmark": "weight_sync",
        "metric": metric,
        "raylign": ours,
        "baseline": base,
        "baseline_name": base_name,
        "ratio": ours / base if base else None,
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (well under 2.5 minutes)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--hidden", type=int, default=1792, help="text hidden size (1792: ~98M parameters)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed syncs per transport (default 2 quick, 5)"
    )
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--engine", choices=("all", "vllm"), default="all",
                        help="vllm: only the rows of a real vLLM engine (needs vLLM: .venv-vllm)")  # fmt: skip
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 7)
    start = time.perf_counter()
    rows = run(args)
    for row in rows:
        print(
            f"{row['metric']:<40} raylign {row['raylign']:.4g}  baseline {row['baseline']:.4g}  ratio {row['ratio']:.3g}"
        )
    print(f"total {time.perf_counter() - start:.0f}s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
