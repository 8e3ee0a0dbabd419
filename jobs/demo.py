"""`make demo`: the whole pipeline on a laptop CPU in a few minutes, from nothing.

1. build a tiny random VLM, LLaVA-style (SigLIP vision + Qwen2 text; tokenizer trained in code;
   nothing is downloaded). ``--family qwen2_5_vl`` runs the same on a tiny Qwen2.5-VL (it learns the
   colours more slowly: give it ``--sft-steps 120`` and more GRPO steps);
2. generate a synthetic visual task with verifiable answers (the colour of the big shape, answered
   with its number so math-verify can check it);
3. a short SFT warm-up: the ``<think>...</think><answer>...</answer>`` format is learnt, the colours
   only half (greedy held-out accuracy about 0.5);
4. GRPO from the SFT checkpoint with the format and math-verify accuracy rewards, on local Ray
   actors (a learner, two rollout workers, a reward worker), asynchronous with staleness 1;
5. print the reward curve and held-out accuracy, write a report, and fail if nothing was learned.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from raylign.config import load_config
from raylign.data.synthetic import make_dataset
from raylign.driver.metrics import read_metrics
from raylign.models.tiny import make_tiny_model

SFT = [
    "--train.learning_rate=3e-3", "--train.per_device_train_batch_size=16",
    "--train.lr_scheduler_type=constant", "--learner.num_learners=0", "--logging.report_to=[tensorboard]",
]
GRPO = [
    "--train.learning_rate=5e-4", "--train.lr_scheduler_type=constant",
    "--grpo.num_generations=8", "--grpo.prompts_per_step=8", "--grpo.max_completion_length=24",
    "--grpo.temperature=0.7", "--grpo.max_staleness=1", "--grpo.beta=0.0", "--grpo.loss_type=dapo",
    "--grpo.eval_num_prompts=64", "--train.eval_steps=10", "--grpo.log_completions_steps=5",
    "--data.eval_split_size=64", "--learner.num_learners=1", "--learner.zero_stage=2",
    "--rollout.num_workers=2", "--rollout.batch_size=8", "--reward.num_workers=1",
    "--reward.funcs=[format, accuracy]", "--train.save_steps=20",
]


def curve(rows: list[dict], key: str, width: int = 40) -> str:
    """A text sparkline of ``key`` over steps (what the terminal can show without a plot)."""
    values = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if not values:
        return f"{key}: (none)"
    bars = " ▁▂▃▄▅▆▇█"
    lo, hi = min(v for _, v in values), max(v for _, v in values)
    step = max(1, len(values) // width)
    line = "".join(bars[int((v - lo) / (hi - lo + 1e-9) * 8)] for _, v in values[::step])
    return f"{key:>16}: {line}  {values[0][1]:.2f} -> {values[-1][1]:.2f} (min {lo:.2f}, max {hi:.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--family", default="llava", choices=["llava", "qwen2_5_vl"])
    parser.add_argument("--sft-steps", type=int, default=45)
    parser.add_argument("--grpo-steps", type=int, default=40)
    args = parser.parse_args()
    out = Path(args.out)
    started = time.time()

    model = make_tiny_model(args.family, out / f"tiny-{args.family}")
    demos = make_dataset("color", 600, out / "data-sft", seed=0, kind="sft")
    prompts = make_dataset("color", 600, out / "data-rl", seed=1, kind="prompt")  # images SFT never saw
    print(f"[demo] tiny model: {model}\n[demo] data: {demos}, {prompts}", flush=True)

    from raylign.driver import offline, online

    sft_cfg = load_config(None, [f"--model.name_or_path={model}", f"--data.train={demos / 'sft.parquet'}",
                                 f"--output_dir={out}", "--run_name=sft", f"--train.max_steps={args.sft_steps}",
                                 *SFT], method="sft")
    sft_dir = offline.run(sft_cfg)
    warm = max((sft_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    print(f"[demo] SFT warm-up done: {warm}", flush=True)

    steps = [f"--train.max_steps={args.grpo_steps}"]
    grpo_cfg = load_config(None, [f"--model.name_or_path={warm}", f"--data.train={prompts / 'prompt.parquet'}",
                                  f"--output_dir={out}", "--run_name=grpo", *GRPO, *steps], method="grpo")
    grpo_dir = online.run(grpo_cfg)

    rows = read_metrics(grpo_dir)
    print(f"\n[demo] GRPO on the colour task (tiny {args.family}, CPU):")
    for key in ("reward/mean", "reward/format/mean", "reward/accuracy/mean", "eval/accuracy"):
        print(curve(rows, key))
    evals = [r["eval/accuracy"] for r in rows if r.get("eval/accuracy") is not None]
    from raylign.report import main as report

    report_dir = report([str(grpo_dir)], None)
    summary = {"eval_accuracy_first": evals[0], "eval_accuracy_last": evals[-1], "minutes": (time.time() - started) / 60,
               "run_dir": str(grpo_dir), "report": str(report_dir)}
    print(json.dumps(summary, indent=2))
    if evals[-1] <= evals[0]:
        print("[demo] FAILED: held-out accuracy did not improve", file=sys.stderr)
        return 1
    print(f"[demo] held-out accuracy {evals[0]:.2f} -> {evals[-1]:.2f}; report: {report_dir}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
