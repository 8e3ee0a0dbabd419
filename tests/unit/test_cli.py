"""The `raylign` command line: help, argument routing into the config, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from raylign.cli import build_parser, config_from_args, main

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("sft", "dpo", "mpo", "grpo", "gspo", "make-tiny-model", "make-dataset", "report", "bench",
            "config-docs")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raylign", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def parse(*argv: str):
    args, extra = build_parser().parse_known_args(list(argv))
    args.overrides = extra
    return args


def test_help_lists_every_subcommand():
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("    ")}
    assert set(COMMANDS) <= listed


def test_bad_key_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name_or_path: m}\ndata: {train: d}\n")
    done = run_cli("sft", "--config", str(cfg), "--train.learnng_rate=1e-4")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "raylign: error: train.learnng_rate: unknown key (did you mean train.learning_rate?); "
        "`raylign config-docs` lists every key"
    ]


def test_training_args_become_the_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_name: r1\nmodel: {name_or_path: m}\ndata: {train: d}\n")  # no method: the command's
    args = parse("grpo", "--config", str(path), "--rollout.num_workers", "4", "--train.max_steps", "-1",
                 "--grpo.temperature=0.7", "--resume")
    cfg = config_from_args(args)
    assert cfg.method == "grpo" and cfg.run_name == "r1" and cfg.rollout.num_workers == 4
    assert cfg.train.max_steps == -1 and cfg.grpo.temperature == 0.7
    assert cfg.train.resume_from_checkpoint == "latest"
    cfg = config_from_args(parse("dpo", "--config", str(path), "--resume", "123"))
    assert cfg.train.resume_from_checkpoint == "123"  # a path is a string even when it looks like a number
    assert config_from_args(parse("sft", "--config", str(path))).train.resume_from_checkpoint is None


def test_tool_arguments():
    args = parse("make-dataset", "--task", "shapes", "--n", "32", "--out", "d", "--kind", "sft")
    assert (args.task, args.n, args.out, args.seed, args.kind) == ("shapes", 32, Path("d"), 0, "sft")
    args = parse("report", "runs/a", "runs/b", "--out", "rep")
    assert args.run_dirs == [Path("runs/a"), Path("runs/b")] and args.out == Path("rep")
    assert parse("report", "runs/a").out is None  # report picks RUN_DIR/report itself
    args = parse("make-tiny-model", "--family", "llava", "--out", "m")
    assert (args.family, args.out) == ("llava", Path("m"))
    assert parse("bench", "--quick").quick is True


def test_config_error_in_process(capsys):
    assert main(["gspo", "--model.name_or_path=m", "--data.train=d", "--grpo.num_generations=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("raylign: error: grpo.num_generations: gspo compares")


def test_stray_arguments_of_tools_are_rejected(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--train.max_steps=3"])
    assert info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_config_docs_prints_markdown(capsys):
    assert main(["config-docs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Configuration reference") and "`grpo.num_generations`" in out
