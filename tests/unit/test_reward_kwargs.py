"""TRL 1.16's reward keyword arguments (images, trainer_state, log_metric, log_extra), and failing reward
functions made visible (issue 15, items 3 and 6). One in-process RewardWorker (a real process pool)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from PIL import Image

from raylign.driver.batching import batch_metrics, sample_rows
from raylign.protocol import Completion, Rollout, RolloutRequest, TrainerState
from raylign.rewards.errors import RewardErrorLog, load_reward_errors
from raylign.rewards.worker import RewardWorker

FUNCS = '''
import re

def probe(prompts, completions, images, image, trainer_state, log_metric, log_extra, solution, **kwargs):
    """Checks what TRL passes; logs one metric and one extra column."""
    n = len(completions)
    assert len(images) == len(image) == len(solution) == n
    assert all(len(imgs) == 2 and imgs[0].size == (8, 4) for imgs in images) and image[0] is images[0][0]
    log_metric("probe/step", float(trainer_state.global_step))
    log_extra("judge", [f"{trainer_state.global_step}/{trainer_state.max_steps}@{trainer_state.epoch}"] * n)
    return [float(len(c[0]["content"])) for c in completions]

def format_reward(completions, **kwargs):
    """The seed blog's reward: expects strings, gets conversational completions."""
    pattern = r"^<think>.*?</think>"
    return [1.0 if re.match(pattern, c) else 0.0 for c in completions]
'''


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "funcs.py"
    path.write_text(FUNCS)
    with RewardWorker([f"{path}:probe", f"{path}:format_reward"], timeout_s=30, num_processes=1) as w:
        yield w


def rollout(uid: str, step: int) -> Rollout:
    images = (Image.new("RGB", (8, 4), "red"), Image.new("RGB", (8, 4), "blue"))
    request = RolloutRequest(uid, [{"role": "user", "content": "colour?"}], images, {"solution": "red"},
                             trainer_state=TrainerState(step, 10, step / 5))
    texts = ("red", "blue!")
    return Rollout(request, tuple(Completion((1, 2), (0.0, 0.0), t, "stop") for t in texts), policy_version=step)


def test_images_trainer_state_and_logged_values_arrive(worker):
    g = worker.score(rollout("a", 3))
    assert g.per_function["probe"] == (3.0, 5.0) and g.errors["probe"] == 0
    assert g.logged_metrics == {"probe/step": (3.0,)}
    assert g.logged_extra == {"judge": ("3/10@0.6", "3/10@0.6")}
    metrics = batch_metrics([g, worker.score(rollout("b", 5))], version=5)
    assert metrics["probe/step"] == pytest.approx(4.0)  # averaged over the step, under TRL's name
    assert sample_rows([g], 1)[0]["extra"] == {"judge": "3/10@0.6"}  # lands in samples.jsonl


def test_a_reward_failing_on_every_call_is_counted_and_named(worker, tmp_path):
    log = RewardErrorLog()
    groups = [worker.score(rollout(f"g{i}", 1)) for i in range(3)]
    assert all(g.per_function["format_reward"] == (None, None) for g in groups)  # the run goes on
    assert all(g.rewards == g.per_function["probe"] for g in groups)  # the other function still counts
    lines = log.update(1, groups)
    assert len(lines) == 1 and lines[0].startswith("reward 'format_reward' failed 3 of 3 calls (from step 1): error: TypeError")
    assert "expected string or bytes-like object" in lines[0]
    assert log.update(2, groups[:1]) == []  # said once
    assert log.postfix().startswith("format_reward x4 (TypeError:")
    assert batch_metrics(groups, version=1)["reward/format_reward/errors"] == 3.0
    log.save(tmp_path)
    saved = load_reward_errors(tmp_path)["format_reward"]
    assert (saved["errors"], saved["calls"], saved["first_step"]) == (4, 4, 1) and "probe" not in load_reward_errors(tmp_path)


def test_progress_bar_and_report_name_the_function(worker, tmp_path):
    from raylign.driver.online import OnlineRun
    from raylign.report import main as report

    printed: list[str] = []
    run = SimpleNamespace(reward_errors=RewardErrorLog(), run_dir=tmp_path)
    run._new_reward_errors = run.reward_errors.update(1, [worker.score(rollout("x", 1))])
    postfix: dict[str, str] = {"reward": "3"}
    OnlineRun._show_reward_errors(run, SimpleNamespace(write=printed.append), postfix)
    assert printed == [f"raylign: {run._new_reward_errors[0]}"] and postfix["reward_errors"].startswith("format_reward x1")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 3.0}) + "\n")
    out = report([tmp_path], tmp_path / "report")
    summary = (out / "summary.md").read_text()
    assert "## Reward functions that failed" in summary and "| `format_reward` | 1 of 1 | 1 | error: TypeError" in summary
    assert json.loads((out / "summary.json").read_text())["runs"][0]["reward_errors"]["format_reward"]["errors"] == 1


def test_trl_reward_functions_run_unchanged_with_the_new_kwargs():
    pytest.importorskip("trl")
    with RewardWorker(["trl.rewards:think_format_reward", "trl.rewards:accuracy_reward"], timeout_s=60,
                      num_processes=1) as w:
        request = RolloutRequest("t", [{"role": "user", "content": "2+2?"}], (Image.new("RGB", (8, 8)),),
                                 {"solution": "$4$"}, trainer_state=TrainerState(1, 2, 0.5))
        texts = ("<think>\nadd\n</think>\n$4$", "five")
        g = w.score(Rollout(request, tuple(Completion((1,), (0.0,), t, "stop") for t in texts), policy_version=0))
    assert g.errors == {"think_format_reward": 0, "accuracy_reward": 0}, g.error_messages
    assert g.per_function["think_format_reward"] == (1.0, 0.0)
    assert all(v in (0.0, 1.0, None) for v in g.per_function["accuracy_reward"])
