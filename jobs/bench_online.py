"""Online (GRPO) throughput: async vs synchronous raylign, and raylign vs TRL's GRPOTrainer, in one run.

Three runs of the same GRPO job, one after the other in this process (each raylign run in its own
Ray session, shut down before the next starts):

1. raylign with ``grpo.max_staleness=0`` (synchronous: a step's prompts wait for the previous update);
2. raylign with ``grpo.max_staleness=--staleness`` (asynchronous: the next step generates while the
   learner trains);
3. TRL's ``GRPOTrainer`` (transformers generation, ``use_vllm=False``, one process).

The job: a tiny random LLaVA (SigLIP + Qwen2, built here), the synthetic colour task, ``--prompts``
prompts x ``--generations`` completions per optimizer step, ``--max-tokens`` completion tokens,
temperature 0.7, AdamW at a constant learning rate 5e-4, gradient clipping 1.0, fp32 on CPU, DAPO
token normalisation, beta 0 (no reference model), micro-batches of ``--micro-batch`` completions,
rewards [format, accuracy] (raylign's builtins, which have TRL's signature). raylign runs one learner
actor (DeepSpeed ZeRO-2), two rollout worker actors and scores rewards in the driver's process pool.

Samples/s is ``prompts x generations`` per step over the wall time from the end of step ``--skip`` to
the end of the last step (the first steps include actor start-up and warm-up). The async run's
overlap efficiency is ``max(mean generate, mean train) / mean step`` from its metrics.jsonl
(``time/generate`` is one rollout worker's engine seconds for the step's groups, ``time/train`` the
update): 1.0 means the step takes no longer than its slower half. The random model seldom emits EOS,
so nearly every completion runs to ``--max-tokens`` on both sides (completion lengths are in the notes).

Threads: Ray gives each raylign actor one torch thread (``num_cpus=1``); TRL runs at one thread too
by default (``--trl-threads``). Measured on the shared 2-core machine, TRL at 2 threads ran 4-13x
slower than at 1 (6.6-24 vs 84 samples/s, alternating): its OpenMP threads wait on each other when
neighbours load the cores. Wall times also measure the neighbours (the 1-minute load average is in
the notes); the full run alternates the three runs ``--repeats`` times and reports medians.

    python jobs/bench_online.py --quick --json bench_out/online.json
    python jobs/bench_online.py                      # 16 steps, 24 tokens, 2 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEARNING_RATE = 5e-4
TEMPERATURE = 0.7
SEED = 1


@dataclass(frozen=True)
class Job:
    """The GRPO job both frameworks run."""

    model: str
    prompts: Path  # parquet written by make_dataset(kind="prompt")
    steps: int
    num_prompts: int = 8
    num_generations: int = 8
    max_tokens: int = 16
    micro_batch: int = 16

    @property
    def samples_per_step(self) -> int:
        return self.num_prompts * self.num_generations


# ---------------------------------------------------------------------------------------- pure helpers


def samples_per_s(rows: Sequence[Mapping[str, Any]], samples_per_step: int, skip: int) -> float:
    """Samples/s over steps ``skip+1 .. len(rows)`` from each row's ``time/elapsed`` (seconds at step end).

    With ``skip == 0`` the window starts at 0, i.e. it includes start-up.
    """
    if skip < 0 or len(rows) <= skip:
        raise ValueError(f"need more than skip={skip} step rows to measure, got {len(rows)}")
    start = rows[skip - 1]["time/elapsed"] if skip else 0.0
    wall = rows[-1]["time/elapsed"] - start
    if wall <= 0:
        raise ValueError(
            f"time/elapsed does not increase over the measured steps ({start} -> {rows[-1]['time/elapsed']})"
        )
    return samples_per_step * (len(rows) - skip) / wall


def overlap(rows: Sequence[Mapping[str, Any]], skip: int) -> dict[str, float]:
    """Mean ``time/step``, ``time/generate``, ``time/train`` over the steady rows, and the overlap efficiency.

    ``efficiency = max(generate, train) / step``: 1.0 means the step is no longer than its slower half
    (perfect overlap); a synchronous step, ``generate + train + ...``, is well below 1.
    """
    steady = rows[skip:]
    if not steady:
        raise ValueError(f"need more than skip={skip} step rows to measure, got {len(rows)}")
    out = {k: statistics.fmean(r[f"time/{k}"] for r in steady) for k in ("step", "generate", "train")}
    out["efficiency"] = max(out["generate"], out["train"]) / out["step"]
    return out


def mean_length(rows: Sequence[Mapping[str, Any]], skip: int) -> float:
    """Mean completion length over the steady rows."""
    return statistics.fmean(r["completion_length/mean"] for r in rows[skip:])


def elapsed_rows(stamps: Sequence[float], start: float) -> list[dict[str, float]]:
    """Step-end timestamps as metric rows (``time/elapsed`` since ``start``), to measure TRL like raylign."""
    return [{"time/elapsed": t - start} for t in stamps]


def _ratios(ours: Sequence[dict], theirs: Sequence[dict]) -> str:
    """Per-repeat samples/s ratios, for the notes."""
    return ", ".join(f"{a['samples_per_s'] / b['samples_per_s']:.2f}" for a, b in zip(ours, theirs))


def result_rows(
    sync: Sequence[dict], asyn: Sequence[dict], trl: Sequence[dict], staleness: int, setup: str, trl_name: str
) -> list[dict[str, Any]]:
    """The benchmark rows from per-repeat summaries of each run (medians over repeats).

    Each summary has ``samples_per_s`` and ``length``; async ones also ``step``, ``generate``,
    ``train``, ``efficiency``; TRL ones ``threads``.
    """

    def med(runs: Sequence[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    sync_sps, async_sps, trl_sps = (
        med(sync, "samples_per_s"),
        med(asyn, "samples_per_s"),
        med(trl, "samples_per_s"),
    )
    step, gen, train = med(asyn, "step"), med(asyn, "generate"), med(asyn, "train")
    return [
        {
            "benchmark": "online",
            "metric": f"GRPO samples/s, async (max_staleness={staleness}) vs sync",
            "raylign": async_sps,
            "baseline": sync_sps,
            "baseline_name": "raylign max_staleness=0",
            "ratio": statistics.median(a["samples_per_s"] / s["samples_per_s"] for a, s in zip(asyn, sync)),
            "notes": f"{setup}; per-repeat ratios {_ratios(asyn, sync)}",
        },
        {
            "benchmark": "online",
            "metric": f"async steps/s vs perfect overlap (max_staleness={staleness})",
            "raylign": 1.0 / step,
            "baseline": 1.0 / max(gen, train),
            "baseline_name": "max(generate, train)",
            "ratio": med(asyn, "efficiency"),
            "notes": (
                f"ratio = overlap efficiency max(generate, train) / step (1.0 = perfect); mean step "
                f"{step:.3f}s, generate {gen:.3f}s (per rollout worker), train {train:.3f}s; sync run: "
                f"step {med(sync, 'step'):.3f}s, generate {med(sync, 'generate'):.3f}s, train "
                f"{med(sync, 'train'):.3f}s, efficiency {med(sync, 'efficiency'):.2f} (halves slower when "
                f"overlapped = they share the cores)"
            ),
        },
        {
            "benchmark": "online",
            "metric": "GRPO samples/s vs TRL (max_staleness=0)",
            "raylign": sync_sps,
            "baseline": trl_sps,
            "baseline_name": trl_name,
            "ratio": statistics.median(s["samples_per_s"] / t["samples_per_s"] for s, t in zip(sync, trl)),
            "notes": (
                f"{setup}; async raylign / TRL {async_sps / trl_sps:.2f}; per-repeat ratios "
                f"{_ratios(sync, trl)}; "
                f"mean completion tokens raylign {med(sync, 'length'):.1f}, TRL {med(trl, 'length'):.1f}; "
                f"raylign: 1 learner actor (DeepSpeed ZeRO-2) + 2 rollout actors (1 torch thread each) + "
                f"rewards in a driver process pool, logprobs computed by the engine; TRL: one process, "
                f"{trl[0]['threads']} torch thread(s), generation and training take turns, rewards inline"
            ),
        },
    ]


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width table of the result rows (notes on their own lines)."""
    lines = [f"{'metric':<52} {'raylign':>10} {'baseline':>10} {'ratio':>7}  baseline_name"]
    for r in rows:
        lines.append(
            f"{r['metric']:<52} {r['raylign']:>10.3f} {r['baseline']:>10.3f} {r['ratio']:>7.2f}  "
            f"{r['baseline_name']}"
        )
    lines += [f"  - {r['metric']}: {r['notes']}" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- the runs


def run_raylign(job: Job, staleness: int, out: Path, skip: int) -> dict[str, float]:
    """One raylign GRPO run in a fresh Ray session; its steady-state numbers."""
    import ray

    from raylign.config import config_from_dict
    from raylign.driver.metrics import read_metrics
    from raylign.driver.online import run

    # fmt: off
    cfg = config_from_dict({
        "method": "grpo", "model": {"name_or_path": job.model}, "seed": SEED,
        "data": {"train": str(job.prompts)}, "output_dir": str(out), "run_name": f"staleness{staleness}",
        "train": {"learning_rate": LEARNING_RATE, "max_steps": job.steps, "lr_scheduler_type": "constant",
                  "max_grad_norm": 1.0, "per_device_train_batch_size": job.micro_batch},
        "grpo": {"num_generations": job.num_generations, "prompts_per_step": job.num_prompts,
                 "max_completion_length": job.max_tokens, "temperature": TEMPERATURE,
                 "max_staleness": staleness, "loss_type": "dapo", "beta": 0.0, "log_completions_steps": 0},
        "learner": {"num_learners": 1, "precision": "fp32", "zero_stage": 2},
        "rollout": {"num_workers": 2, "batch_size": job.num_prompts},
        "reward": {"num_workers": 0, "funcs": ["format", "accuracy"]},
        "logging": {"report_to": ["none"], "progress_bar": False},
    })
    # fmt: on
    try:
        rows = read_metrics(run(cfg))
    finally:
        ray.shutdown()
    if len(rows) != job.steps:
        raise RuntimeError(f"raylign run wrote {len(rows)} metric rows for {job.steps} steps ({cfg.run_dir})")
    return {
        "samples_per_s": samples_per_s(rows, job.samples_per_step, skip),
        "length": mean_length(rows, skip),
        **overlap(rows, skip),
    }


def _counting(fn: Callable[..., list], lengths: list[int]) -> Callable[..., list]:
    """``fn`` that also records each completion's token count (TRL passes ``completion_ids``)."""

    def wrapped(prompts, completions, completion_ids=None, **kwargs):
        lengths.extend(len(ids) for ids in completion_ids or ())
        return fn(prompts=prompts, completions=completions, **kwargs)

    wrapped.__name__ = fn.__name__
    return wrapped


def run_trl(job: Job, out: Path, skip: int, threads: int | None) -> dict[str, float]:
    """TRL's GRPOTrainer on the same job; its steady-state numbers."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from raylign.models.loading import load_model, load_processor
    from raylign.rewards.builtin import accuracy_reward, format_reward

    stamps: list[float] = []
    lengths: list[int] = []
    seen_threads: list[int] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if threads:
                torch.set_num_threads(threads)
            seen_threads.append(torch.get_num_threads())
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    accumulation = job.samples_per_step // job.micro_batch  # one generation batch = one optimizer step
    args = GRPOConfig(
        output_dir=str(out),
        seed=SEED,
        per_device_train_batch_size=job.micro_batch,
        gradient_accumulation_steps=accumulation,
        num_generations=job.num_generations,
        max_completion_length=job.max_tokens,
        temperature=TEMPERATURE,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=job.steps,
        beta=0.0,
        loss_type="dapo",
        use_vllm=False,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    if args.generation_batch_size != job.samples_per_step:
        raise RuntimeError(
            f"TRL generation batch {args.generation_batch_size} != {job.samples_per_step} samples/step"
        )
    dataset = datasets.load_dataset("parquet", data_files=str(job.prompts), split="train")
    trainer = GRPOTrainer(
        model=load_model(job.model),
        args=args,
        train_dataset=dataset,
        processing_class=load_processor(job.model),
        reward_funcs=[_counting(format_reward, lengths), accuracy_reward],
        callbacks=[Clock()],
    )
    before = torch.get_num_threads()
    try:
        trainer.train()
    finally:
        torch.set_num_threads(before)  # the next runs in this process start as they would alone
    rows = elapsed_rows(stamps[1:], stamps[0])
    if len(rows) != job.steps:
        raise RuntimeError(f"TRL ran {len(rows)} optimizer steps, expected {job.steps}")
    per_step = job.samples_per_step
    steady = lengths[skip * per_step :]
    return {
        "samples_per_s": samples_per_s(rows, per_step, skip),
        "threads": seen_threads[0],
        "length": statistics.fmean(steady) if steady else float("nan"),
    }


def _trl_name() -> str:
    import trl

    return f"trl {trl.__version__} GRPOTrainer"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (< 2.5 minutes on 2 CPU cores)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the result rows here")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default 6, full 16)"
    )
    parser.add_argument("--skip", type=int, default=2, help="first steps left out of the measurement")
    parser.add_argument(
        "--repeats", type=int, default=None, help="alternating rounds of the 3 runs (1 quick, 2 full)"
    )
    parser.add_argument("--staleness", type=int, default=1, help="max_staleness of the async run")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="max completion tokens (16 quick, 24 full)"
    )
    parser.add_argument(
        "--micro-batch", type=int, default=16, help="completions per forward/backward, both sides"
    )
    parser.add_argument(
        "--trl-threads",
        type=int,
        default=1,
        help="torch threads for TRL (default 1, as each raylign actor; 0 = torch's default)",
    )
    args = parser.parse_args(argv)
    steps = args.steps or (6 if args.quick else 16)
    repeats = args.repeats or (1 if args.quick else 2)
    max_tokens = args.max_tokens or (16 if args.quick else 24)
    if steps <= args.skip:
        parser.error(f"--steps ({steps}) must be more than --skip ({args.skip})")
    if (args.prompts * args.generations) % args.micro_batch:
        parser.error("--micro-batch must divide prompts x generations")

    from raylign.data.synthetic import make_dataset
    from raylign.models.tiny import make_tiny_model

    sync, asyn, trl = [], [], []
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = str(make_tiny_model("llava", tmp / "model"))
        # Enough prompts for every step plus the async run's look-ahead.
        data = make_dataset("color", (steps + args.staleness + 1) * args.prompts, tmp / "data", kind="prompt")
        job = Job(
            model,
            data / "prompt.parquet",
            steps,
            args.prompts,
            args.generations,
            max_tokens,
            args.micro_batch,
        )
        for r in range(repeats):
            loads.append(os.getloadavg()[0])
            sync.append(run_raylign(job, 0, tmp / f"runs{r}", args.skip))
            asyn.append(run_raylign(job, args.staleness, tmp / f"runs{r}", args.skip))
            trl.append(run_trl(job, tmp / f"trl{r}", args.skip, args.trl_threads))
            print(json.dumps({"repeat": r, "sync": sync[-1], "async": asyn[-1], "trl": trl[-1]}), flush=True)
    setup = (
        f"tiny llava, colour task, {args.prompts} prompts x {args.generations} generations, "
        f"{max_tokens} max tokens, micro-batch {args.micro_batch}, {steps} steps ({args.skip} skipped) x "
        f"{repeats} repeat(s), fp32 CPU, {os.cpu_count()} cores, load avg {statistics.fmean(loads):.1f}"
    )
    rows = result_rows(sync, asyn, trl, args.staleness, setup, _trl_name())
    print(format_table(rows), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
