"""The `raylign` command line.

Training commands (`sft dpo mpo grpo gspo`) take `--config FILE`, `--resume [PATH|latest]` and any
dotted override (`--train.learning_rate=2e-5` or `--rollout.num_workers 4`). Every command's
implementation is imported inside its handler, so `raylign --help` stays fast and a missing
optional part only affects the command that needs it. A ConfigError becomes one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from raylign.config import ONLINE_METHODS, ConfigError, RaylignConfig, config_reference_markdown, load_config

TRAIN_METHODS = ("sft", "dpo", "mpo", "grpo", "gspo")
_METHOD_HELP = {
    "sft": "supervised fine-tuning on chat data with images (offline)",
    "dpo": "direct preference optimization on chosen/rejected pairs (offline)",
    "mpo": "mixed preference optimization: DPO + BCO + SFT losses (offline)",
    "grpo": "group relative policy optimization with reward functions (online)",
    "gspo": "group sequence policy optimization: GRPO with sequence-level ratios (online)",
}
_OVERRIDES_EPILOG = (
    "Any config key can be set on the command line: --train.learning_rate=2e-5 or "
    "--rollout.num_workers 4. Later values win over earlier ones and over the file. "
    "`raylign config-docs` lists every key."
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per tool."""
    parser = argparse.ArgumentParser(
        prog="raylign", description="Post-train vision-language models on Ray.", allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for method in TRAIN_METHODS:
        p = sub.add_parser(method, help=_METHOD_HELP[method], description=_METHOD_HELP[method],
                           epilog=_OVERRIDES_EPILOG, allow_abbrev=False)
        p.add_argument("--config", type=Path, metavar="FILE", help="YAML config file")
        p.add_argument("--resume", nargs="?", const="latest", metavar="PATH|latest",
                       help="resume from a checkpoint dir, or (no value) the newest one of run_name")
        p.set_defaults(handler=_train)
    p = sub.add_parser("make-tiny-model", help="build a random tiny VLM as an HF directory (offline)",
                       allow_abbrev=False)
    p.add_argument("--family", choices=("qwen2_5_vl", "llava"), default="qwen2_5_vl")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.set_defaults(handler=_make_tiny_model)
    p = sub.add_parser("make-dataset", help="write a synthetic visual task dataset", allow_abbrev=False)
    p.add_argument("--task", required=True, metavar="NAME")
    p.add_argument("--n", type=int, default=256, metavar="N", help="rows (default 256)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--kind", choices=("prompt", "sft", "preference", "all"), default="all")
    p.set_defaults(handler=_make_dataset)
    p = sub.add_parser("report", help="plots and a summary table from run directories", allow_abbrev=False)
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", type=Path, metavar="DIR", help="default: RUN_DIR/report, or ./report")
    p.set_defaults(handler=_report)
    p = sub.add_parser("bench", help="throughput benchmarks", allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="a short run for CI")
    p.add_argument("--out", type=Path, default=Path("bench_out"), metavar="DIR")
    p.set_defaults(handler=_bench)
    p = sub.add_parser("config-docs", help="print the configuration reference (Markdown)", allow_abbrev=False)
    p.set_defaults(handler=_config_docs)
    return parser


def config_from_args(args: argparse.Namespace) -> RaylignConfig:
    """The resolved config of a training command: file, then overrides, then --resume."""
    overrides = list(args.overrides)
    if args.resume is not None:  # JSON-quoted so a path like `123` stays a string
        overrides.append(f"--train.resume_from_checkpoint={json.dumps(args.resume)}")
    return load_config(args.config, overrides, method=args.command)


def _train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.method in ONLINE_METHODS:
        from raylign.driver.online import run
    else:
        from raylign.driver.offline import run
    run_dir = run(cfg)
    print(f"raylign: run directory: {run_dir}")
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from raylign.models.tiny import make_tiny_model

    print(make_tiny_model(args.family, args.out))
    return 0


def _make_dataset(args: argparse.Namespace) -> int:
    from raylign.data.synthetic import make_dataset

    result = make_dataset(task=args.task, n=args.n, out=args.out, seed=args.seed, kind=args.kind)
    print(result if result is not None else args.out)
    return 0


def _report(args: argparse.Namespace) -> int:
    from raylign.report import main as report_main

    print(report_main(args.run_dirs, args.out))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from raylign.bench import main as bench_main

    bench_main(quick=args.quick, out=args.out)
    return 0


def _config_docs(args: argparse.Namespace) -> int:
    print(config_reference_markdown())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]) and run the chosen command; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in TRAIN_METHODS:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args.handler(args)
    except ConfigError as e:  # a user mistake: one line, no traceback
        print(f"raylign: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `raylign config-docs | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
