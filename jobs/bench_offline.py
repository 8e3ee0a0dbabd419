"""Offline training throughput: raylign's learner vs TRL's SFTTrainer / DPOTrainer, in one run.

Both sides train the same tiny VLM (built here, or ``--model``) on the same synthetic colour-task rows
(SFT: ``messages`` + image; DPO: ``prompt``/``chosen``/``rejected`` + image), ``--batch`` rows per
optimizer step, ``--steps`` timed steps after one warm-up step, fp32, AdamW at a constant learning
rate, gradient clipping 1.0, no gradient checkpointing (TRL turns it on by default: turned off), no
evaluation, logging or saving. DPO keeps a frozen reference model on both sides. raylign runs one
in-process ``Learner`` (DeepSpeed ZeRO-2, the offline driver's ``num_learners: 0``).

Tokens are the non-padding tokens each side's own collator feeds the model (the counts are printed:
they match when both render the chat the same way). Time is wall-clock from the end of the warm-up
step to the end of the last step, so it includes reading rows, collation and the step. The sides
alternate ``--repeats`` times and the median of each is reported, with the median of the per-repeat ratios;
per-CPU-second ratios are in the notes, since on a shared machine wall time also measures the
neighbours (which is also why one thread is the default).

    python jobs/bench_offline.py --quick --json bench_out/offline.json
    python jobs/bench_offline.py                 # tiny Qwen2.5-VL, text hidden 128, 20 steps x 5
    python jobs/bench_offline.py --hidden 256 --batch 16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from raylign.config import DPOConfig, LearnerConfig, ModelConfig, SFTConfig, TrainConfig
from raylign.data.datasets import load_dataset
from raylign.data.synthetic import make_dataset
from raylign.learner.learner import Learner
from raylign.learner.objectives import PreferenceObjective, SFTObjective
from raylign.models.loading import load_model, load_processor

LEARNING_RATE = 1e-4
KINDS = {"sft": "sft", "dpo": "preference"}


def _tokens(batch: dict[str, Any]) -> int:
    return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))


class _Clock:
    """Wall and CPU time from the end of the warm-up step to the end of the last one."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_raylign(method: str, model: str, data: Path, batch: int, steps: int, threads: int) -> dict[str, float]:
    """``steps`` timed updates (after one warm-up) of an in-process learner."""
    torch.set_num_threads(threads)
    train = TrainConfig(learning_rate=LEARNING_RATE, per_device_train_batch_size=batch,
                        lr_scheduler_type="constant", max_grad_norm=1.0)
    learner = Learner(ModelConfig(name_or_path=model), train, LearnerConfig(zero_stage=2, precision="fp32"),
                      steps + 1, reference=method == "dpo")
    objective = SFTObjective(SFTConfig()) if method == "sft" else PreferenceObjective(DPOConfig())
    dataset = load_dataset(data, kind=KINDS[method])
    tokens = sum(  # counted outside the clock, with the learner's own collation
        _tokens(objective.collate(learner.processor, dataset.rows(range(s * batch, (s + 1) * batch))).inputs)
        for s in range(1, steps + 1)
    )
    clock = _Clock()
    for s in range(steps + 1):
        if s == 1:
            clock.start()
        learner.update(dataset.rows(range(s * batch, (s + 1) * batch)), objective)
    wall, cpu = clock.stop()
    learner.close()
    return {"tokens": tokens, "wall_s": wall, "cpu_s": cpu}


def run_trl(method: str, model: str, data: Path, batch: int, steps: int, threads: int, out: Path) -> dict[str, float]:
    """``steps`` timed optimizer steps (after one warm-up) of TRL's trainer on the same rows."""
    import datasets
    from transformers import TrainerCallback

    clock, counted = _Clock(), []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            torch.set_num_threads(threads)  # accelerate resets them when the trainer is built

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                clock.start()
            if state.global_step == steps + 1:
                counted.append(clock.stop())

    rows = datasets.load_dataset("parquet", data_files=str(data), split="train").select(range((steps + 1) * batch))
    common = {
        "output_dir": str(out), "per_device_train_batch_size": batch, "max_steps": steps + 1,
        "learning_rate": LEARNING_RATE, "lr_scheduler_type": "constant", "max_grad_norm": 1.0,
        "gradient_checkpointing": False, "bf16": False, "fp16": False, "use_cpu": not torch.cuda.is_available(),
        "logging_strategy": "no", "save_strategy": "no", "eval_strategy": "no", "report_to": "none",
        "disable_tqdm": True, "dataloader_num_workers": 0, "max_length": None, "seed": 0,
    }
    policy, processor = load_model(model), load_processor(model)
    if method == "sft":
        from trl import SFTConfig as TRLSFTConfig
        from trl import SFTTrainer

        trainer = SFTTrainer(model=policy, args=TRLSFTConfig(**common), train_dataset=rows, processing_class=processor,
                             callbacks=[Timer()])
    else:
        from trl import DPOConfig as TRLDPOConfig
        from trl import DPOTrainer

        trainer = DPOTrainer(model=policy, ref_model=load_model(model), args=TRLDPOConfig(**common),
                             train_dataset=rows, processing_class=processor, callbacks=[Timer()])
    per_batch: list[int] = []
    collate = trainer.data_collator

    def counting(examples):
        out = collate(examples)
        per_batch.append(_tokens(out))
        return out

    trainer.data_collator = counting
    trainer.train()
    wall, cpu = counted[0]
    return {"tokens": sum(per_batch[1 : steps + 1]), "wall_s": wall, "cpu_s": cpu}


def compare(
    method: str, model: str, data: Path, batch: int, steps: int, repeats: int, threads: int, out: Path
) -> dict[str, Any]:
    """Alternate raylign and TRL ``repeats`` times; one result row.

    ``raylign``/``baseline`` are the median tokens/s of each side; ``ratio`` is the median of the
    per-repeat ratios (each pair ran back to back, so a neighbour's load burst hits both alike).
    """
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(run_raylign(method, model, data, batch, steps, threads))
        theirs.append(run_trl(method, model, data, batch, steps, threads, out))

    def rates(runs: list[dict[str, float]], key: str) -> list[float]:
        return [r["tokens"] / r[key] for r in runs]

    wall = [a / b for a, b in zip(rates(ours, "wall_s"), rates(theirs, "wall_s"))]
    cpu = [a / b for a, b in zip(rates(ours, "cpu_s"), rates(theirs, "cpu_s"))]
    trainer = "SFTTrainer" if method == "sft" else "DPOTrainer"
    return {
        "benchmark": "offline", "metric": f"{method} train tokens/s",
        "raylign": statistics.median(rates(ours, "wall_s")), "baseline": statistics.median(rates(theirs, "wall_s")),
        "baseline_name": f"trl {_trl_version()} {trainer}", "ratio": statistics.median(wall),
        "notes": (f"{batch} rows/step, {steps} timed steps x {repeats} alternating runs, fp32, "
                  f"{threads} thread(s); tokens/step raylign {ours[0]['tokens'] / steps:.0f}, "
                  f"trl {theirs[0]['tokens'] / steps:.0f}; per-run ratios {', '.join(f'{r:.2f}' for r in wall)}; "
                  f"per CPU-second ratio {statistics.median(cpu):.2f}"),
    }


def _trl_version() -> str:
    import trl

    return trl.__version__


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (< 2.5 minutes on 2 CPU cores)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the result rows here")
    parser.add_argument("--model", default=None, help="HF directory; default: build a tiny random VLM")
    parser.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "llava"])
    parser.add_argument("--hidden", type=int, default=None, help="text hidden size of the tiny model")
    parser.add_argument("--batch", type=int, default=None, help="rows per optimizer step")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each side (median reported)")
    parser.add_argument("--methods", default="sft,dpo", help="comma-separated: sft, dpo")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads, both sides (default 1: on a shared machine more threads mostly wait)")
    args = parser.parse_args(argv)
    hidden = args.hidden or (64 if args.quick else 128)
    batch, steps = args.batch or 8, args.steps or (10 if args.quick else 20)
    repeats = args.repeats or (3 if args.quick else 5)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from raylign.models.tiny import make_tiny_model

            model = str(make_tiny_model(args.family, tmp / "model", hidden=hidden))
        make_dataset("color", (steps + 1) * batch, tmp / "data", kind="all")
        for method in args.methods.split(","):
            data = tmp / "data" / f"{KINDS[method]}.parquet"
            rows.append(compare(method, model, data, batch, steps, repeats, args.threads, tmp / "trl"))
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        row["notes"] += f"; model {'tiny ' + args.family + ' hidden ' + str(hidden) if args.model is None else model}"
        print(f"{row['metric']}: raylign {row['raylign']:.0f}, {row['baseline_name']} {row['baseline']:.0f}, "
              f"ratio {row['ratio']:.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
