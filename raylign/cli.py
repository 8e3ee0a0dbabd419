"""The `raylign` command line.

Training commands (`sft dpo mpo grpo gspo`) take `--config FILE`, `--resume [PATH|latest]` and any
dotted override (`--train.learning_rate=2e-5` or `--rollout.num_workers 4`). Every command's
implementation is imported inside its handler, so `raylign --help` stays fast and a missing
optional part only affects the command that needs it. Before a training command imports its driver,
every model, data path, checkpoint and reward spec the config names is checked (driver/preflight.py).

Errors are one line on stderr, never a traceback unless `--debug` (or RAYLIGN_DEBUG=1) is given: a
RaylignError (bad config, data, model path, reward spec, a dead learner) says what to do and exits 2;
anything else is an internal error, exit 1, with a pointer to `--debug`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from raylign.config import ONLINE_METHODS, RaylignConfig, config_reference_markdown, load_config
from raylign.errors import RaylignError

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


_DEBUG_HELP = "show the full traceback of an error (also RAYLIGN_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per tool."""
    parser = argparse.ArgumentParser(
        prog="raylign", description="Post-train vision-language models on Ray.", allow_abbrev=False
    )
    parser.add_argument("--debug", dest="debug_all", action="store_true", help=_DEBUG_HELP)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], allow_abbrev=False, **kwargs)

    for method in TRAIN_METHODS:
        p = add(method, help=_METHOD_HELP[method], description=_METHOD_HELP[method], epilog=_OVERRIDES_EPILOG)
        p.add_argument("--config", type=Path, metavar="FILE", help="YAML config file")
        p.add_argument("--resume", nargs="?", const="latest", metavar="PATH|latest",
                       help="resume from a checkpoint dir, or (no value) the newest one of run_name")
        p.set_defaults(handler=_train)
    p = add("make-tiny-model", help="build a random tiny VLM as an HF directory (offline)")
    p.add_argument("--family", choices=("qwen2_5_vl", "llava"), default="qwen2_5_vl")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.set_defaults(handler=_make_tiny_model)
    p = add("make-dataset", help="write a synthetic visual task dataset")
    p.add_argument("--task", required=True, metavar="NAME")
    p.add_argument("--n", type=int, default=256, metavar="N", help="rows (default 256)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--kind", choices=("prompt", "sft", "preference", "all"), default="all")
    p.set_defaults(handler=_make_dataset)
    p = add("report", help="plots and a summary table from run directories")
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", type=Path, metavar="DIR", help="default: RUN_DIR/report, or ./report")
    p.set_defaults(handler=_report)
    p = add("bench", help="throughput benchmarks")
    p.add_argument("--quick", action="store_true", help="a short run for CI")
    p.add_argument("--out", type=Path, default=Path("bench_out"), metavar="DIR")
    p.set_defaults(handler=_bench)
    p = add("config-docs", help="print the configuration reference (Markdown)")
    p.set_defaults(handler=_config_docs)
    return parser


def config_from_args(args: argparse.Namespace) -> RaylignConfig:
    """The resolved config of a training command: file, then overrides, then --resume."""
    overrides = list(args.overrides)
    if args.resume is not None:  # JSON-quoted so a path like `123` stays a string
        overrides.append(f"--train.resume_from_checkpoint={json.dumps(args.resume)}")
    return load_config(args.config, overrides, method=args.command)


def _train(args: argparse.Namespace) -> int:
    from raylign.driver.preflight import check_inputs

    cfg = config_from_args(args)
    check_inputs(cfg)  # before Ray, models or data start: a bad path or spec costs seconds
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
    debug = args.debug or args.debug_all or os.environ.get("RAYLIGN_DEBUG", "").lower() in ("1", "true")
    try:
        return args.handler(args)
    except BrokenPipeError:  # `raylign config-docs | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("raylign: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every error ends as one line; --debug shows the traceback instead
        if debug:
            raise
        print(f"raylign: error: {error_line(err)}", file=sys.stderr)
        return 2 if isinstance(_cause(err), RaylignError) else 1


def _cause(err: BaseException) -> BaseException:
    """The error a Ray task raised, not the wrapper whose message holds the remote traceback."""
    while isinstance(getattr(err, "cause", None), BaseException):
        err = err.cause
    return err


def error_line(err: BaseException, limit: int = 600) -> str:
    """One line for ``err``: a RaylignError's own message, else its type and message and where to look."""
    cause = _cause(err)
    text = " ".join(str(cause).split())
    if isinstance(cause, RaylignError):
        return text
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return (f"{type(cause).__name__}: {text} (an internal error: rerun with --debug or RAYLIGN_DEBUG=1 for "
            "the traceback, and report it)")


if __name__ == "__main__":
    sys.exit(main())
