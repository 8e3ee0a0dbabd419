"""RewardWorker without Ray: inputs, weighted sum with None, hard timeouts, crashes, errors."""

from __future__ import annotations

import time

import pytest

from raylign.protocol import Completion, Rollout, RolloutRequest, ScoredGroup
from raylign.rewards.worker import RewardWorker, reward_inputs, weighted_sum

HELPERS = """
import os, time

def hang(completions, **kwargs):
    while True:
        time.sleep(1)

def spin(completions, **kwargs):  # busy in Python, holding the GIL: only a kill stops it
    while True:
        pass

def die(completions, **kwargs):
    os._exit(1)

def boom(completions, **kwargs):
    raise RuntimeError("boom")

def wrong_length(completions, **kwargs):
    return [1.0]

def half_none(completions, **kwargs):
    return [None if i % 2 else 2.0 for i in range(len(completions))]

def echo(prompts, completions, completion_lengths, completion_ids, solution, **kwargs):
    # Check the inputs here; any mismatch shows as an error count.
    assert len(prompts) == len(completions) == len(solution) == len(completion_lengths)
    assert all(len(ids) == n for ids, n in zip(completion_ids, completion_lengths))
    return [float(n) + float(s) for n, s in zip(completion_lengths, solution)]
"""


@pytest.fixture(scope="module")
def helpers(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("rewards") / "helpers.py"
    path.write_text(HELPERS)
    return str(path)


def make_rollout(
    texts: list[str], solution: str = "1", conversational: bool = True, uid: str = "g0"
) -> Rollout:
    prompt = [{"role": "user", "content": "What is it?"}] if conversational else "What is it?"
    completions = tuple(
        Completion(
            token_ids=tuple(range(len(t) % 7 + 1)),
            logprobs=(0.0,) * (len(t) % 7 + 1),
            text=t,
            finish_reason="stop",
        )
        for t in texts
    )
    return Rollout(
        RolloutRequest(uid=uid, prompt=prompt, columns={"solution": solution}), completions, policy_version=3
    )


def test_reward_inputs_conversational_and_plain() -> None:
    inputs = reward_inputs(make_rollout(["a", "bb"], solution="7"))
    assert inputs["completions"] == [
        [{"role": "assistant", "content": "a"}],
        [{"role": "assistant", "content": "bb"}],
    ]
    assert inputs["solution"] == ["7", "7"] and inputs["completion_lengths"] == [2, 3]
    assert inputs["prompts"][0] == [{"role": "user", "content": "What is it?"}]
    assert reward_inputs(make_rollout(["a"], conversational=False))["completions"] == ["a"]
    clash = Rollout(RolloutRequest("u", "p", columns={"completions": 1}), make_rollout(["a"]).completions, 0)
    with pytest.raises(ValueError, match="dataset column 'completions' clashes"):
        reward_inputs(clash)


def test_weighted_sum_leaves_none_out() -> None:
    per_fn = {"a": (1.0, None, None), "b": (0.5, 2.0, None)}
    assert weighted_sum(per_fn, {"a": 2.0, "b": -1.0}, 3) == (1.5, -2.0, 0.0)


def test_scores_builtins_and_user_functions(helpers: str) -> None:
    specs = ["format", "accuracy", f"{helpers}:half_none", f"{helpers}:echo"]
    with RewardWorker(specs, [1.0, 2.0, 0.5, 0.0], timeout_s=20.0, num_processes=2) as worker:
        rollout = make_rollout(["<think>t</think><answer>1</answer>", "<answer>2</answer>", "\\boxed{1}"])
        group = worker.score(rollout)
        assert isinstance(group, ScoredGroup) and group.rollout is rollout
        assert group.per_function["format"] == (1.0, 0.0, 0.0)
        assert group.per_function["accuracy"] == (1.0, 0.0, 1.0)
        assert group.per_function["half_none"] == (2.0, None, 2.0)
        assert group.per_function["echo"] == tuple(len(c.token_ids) + 1.0 for c in rollout.completions)
        assert group.rewards == pytest.approx((1.0 + 2.0 + 1.0, 0.0, 2.0 + 1.0))
        assert group.timeouts == {n: 0 for n in worker.names} and group.errors == {n: 0 for n in worker.names}
        # score_many keeps order, and a warm pool scores a group of 8 fast.
        rollouts = [
            make_rollout([f"<answer>{i}</answer>"] * 8, solution=str(i % 3), uid=f"g{i}") for i in range(16)
        ]
        start = time.perf_counter()
        many = worker.score_many(rollouts)
        per_group = (time.perf_counter() - start) / len(rollouts)
        assert [g.rollout.request.uid for g in many] == [f"g{i}" for i in range(16)]
        assert [g.per_function["accuracy"][0] for g in many] == [1.0 if i < 3 else 0.0 for i in range(16)]
        assert per_group < 0.2, f"{per_group * 1000:.1f} ms per group of 8"


@pytest.mark.parametrize("fn", ["hang", "spin"])
def test_a_hanging_function_times_out_promptly(helpers: str, fn: str) -> None:
    timeout_s, slack = 0.5, 0.4  # slack: kill + restart of the process, on a busy 2-core CI box
    with RewardWorker([f"{helpers}:{fn}", "format"], timeout_s=timeout_s, num_processes=2) as worker:
        worker.score(make_rollout(["x"]))  # a first timeout: its process is replaced
        worker.wait_ready()  # measure the call, not a process start
        start = time.perf_counter()
        group = worker.score(make_rollout(["<think>a</think><answer>1</answer>", "y"]))
        elapsed = time.perf_counter() - start
        assert group.per_function[fn] == (None, None)
        assert group.timeouts[fn] == 1 and group.errors[fn] == 0
        assert group.per_function["format"] == (1.0, 0.0) and group.rewards == (1.0, 0.0)
        assert timeout_s <= elapsed < timeout_s + slack, f"returned after {elapsed:.3f} s"
        stats = worker.stats()
        assert stats["timeouts"] == 2 and stats["process_restarts"] == 2


def test_a_function_that_kills_its_process_does_not_kill_the_worker(helpers: str) -> None:
    with RewardWorker([f"{helpers}:die", "format"], timeout_s=10.0, num_processes=1) as worker:
        for _ in range(3):  # later calls still work, on replacement processes
            group = worker.score(make_rollout(["<think>a</think><answer>1</answer>"]))
            assert group.per_function == {"die": (None,), "format": (1.0,)}
            assert group.errors == {"die": 1, "format": 0} and group.timeouts == {"die": 0, "format": 0}
        assert worker.stats()["process_restarts"] == 3


def test_raising_and_malformed_functions_count_as_errors(helpers: str) -> None:
    with RewardWorker([f"{helpers}:boom", f"{helpers}:wrong_length", "format"], timeout_s=10.0) as worker:
        group = worker.score(make_rollout(["a", "b"]))
        assert group.errors == {"boom": 1, "wrong_length": 1, "format": 0}
        assert group.per_function["boom"] == (None, None) and group.per_function["wrong_length"] == (
            None,
            None,
        )
        assert group.rewards == (0.0, 0.0)
        assert worker.stats()["process_restarts"] == 0  # an exception does not cost the process


def test_closed_worker_refuses_to_score() -> None:
    worker = RewardWorker(["format"], num_processes=1)
    worker.close()
    with pytest.raises(RuntimeError):
        worker.score(make_rollout(["a"]))
