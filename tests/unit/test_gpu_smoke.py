"""jobs/gpu_smoke.py without a GPU: it imports, parses its arguments, lists its checks, and on a machine
without CUDA reports every check as skipped (one line each) and exits 0."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SMOKE = Path(__file__).resolve().parents[2] / "jobs" / "gpu_smoke.py"


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SMOKE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_smoke"]


def test_arguments_and_check_selection(smoke):
    assert smoke.selected("") == list(smoke.CHECKS)
    assert smoke.selected("zero") == ["zero2", "zero3"]
    assert smoke.selected("engine,nccl") == ["engine", "nccl"]
    args = smoke.parse_args(["--only", "vision", "--hidden", "128"])
    assert args.only == "vision" and args.hidden == 128
    with pytest.raises(SystemExit):
        smoke.parse_args(["--only", "nope"])


def test_one_line_per_check_and_failures_set_the_exit_code(smoke, capsys):
    report = smoke.Report()
    report.run("fine", lambda: "done")
    report.run("skip", lambda: (_ for _ in ()).throw(smoke.Skip("no GPU")))
    assert not report.failed
    report.run("bad", lambda: 1 / 0)
    assert report.failed
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["fine", "ok"], ["skip", "skipped"], ["bad", "FAIL"]]
    assert lines[2].endswith("ZeroDivisionError: division by zero")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the smoke test really runs (tests/gpu)")
def test_without_a_gpu_every_check_is_skipped(smoke, capsys):
    assert smoke.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(smoke.CHECKS)
    assert all(line.split()[1] == "skipped" and line.endswith("no CUDA GPU") for line in lines)
