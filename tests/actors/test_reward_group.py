"""RewardGroup on a local Ray: threaded actors, order, dead-worker replacement, scaling."""

from __future__ import annotations

import os
import threading
import time

import pytest
import ray

from raylign.protocol import Completion, Rollout, RolloutRequest
from raylign.rewards.builtin import accuracy_reward
from raylign.rewards.group import RewardGroup

HELPERS = """
import os, tempfile, time

def slow_len(completions, delay=None, **kwargs):
    # A marker per call that has started, so tests act on an event rather than after a guessed sleep.
    tempfile.mkstemp(dir=os.path.join(os.path.dirname(__file__), "started"))
    time.sleep(delay[0] if delay else 0.0)
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]
"""


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def group(ray_local, tmp_path_factory: pytest.TempPathFactory):
    """Two threaded worker actors shared by the tests below (an actor start costs seconds on 2 cores)."""
    path = tmp_path_factory.mktemp("rewards") / "actor_helpers.py"
    path.write_text(HELPERS)
    (path.parent / "started").mkdir()
    specs = ["accuracy", "format", f"{path}:slow_len"]
    group = RewardGroup(specs, [1.0, 10.0, 1.0], num_workers=2, max_concurrency=4, num_cpus_per_worker=0.5)
    group.started_dir = path.parent / "started"  # the test's own attribute: where slow_len marks its calls
    yield group
    group.close()


def started_calls(group: RewardGroup) -> int:
    """How many slow_len calls have started so far (one marker file each)."""
    return len(os.listdir(group.started_dir))


def wait_for_calls(group: RewardGroup, more_than: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while started_calls(group) <= more_than:
        assert time.monotonic() < deadline, "no reward call started"
        time.sleep(0.01)


def make_rollout(texts: list[str], solution: str, uid: str, delay: float | None = None) -> Rollout:
    completions = tuple(Completion((1, 2), (0.0, 0.0), t, "stop") for t in texts)
    columns = {"solution": solution} if delay is None else {"solution": solution, "delay": delay}
    request = RolloutRequest(uid=uid, prompt=[{"role": "user", "content": "?"}], columns=columns)
    return Rollout(request, completions, policy_version=0)


def slow_rollouts(delay: float = 0.3) -> list[Rollout]:
    """Eight groups whose slow_len call takes ``delay`` s; 'x' * i scores i (+10 for format, accuracy 0)."""
    return [
        make_rollout(["x" * i, "<think></think><answer></answer>"], "7", f"r{i}", delay) for i in range(8)
    ]


def expected_slow_rewards() -> list[tuple[float, ...]]:
    return [(float(i), 32.0 + 10.0) for i in range(8)]


def accuracy_cases(n: int = 240) -> list[tuple[str, str]]:
    """(solution, completion) pairs: integers, fractions vs decimals, negatives, boxed; every 4th is wrong."""
    cases = []
    for i in range(n):
        num, den = (i % 37) - 18 or 1, (2, 4, 5, 8)[i % 4] if i % 3 else 1
        gold = [f"{num}", f"\\frac{{{num}}}{{{den}}}", f"{num / den:g}"][i % 3]
        got = num if i % 4 else num + den  # off by one whole
        answer = [f"{got}", f"{got / den:g}", f"\\frac{{{got}}}{{{den}}}"][i % 3]
        cases.append(
            (gold, f"<think>...</think><answer>{answer}</answer>" if i % 2 else f"so \\boxed{{{answer}}}")
        )
    return cases


@ray.remote(max_concurrency=4, num_cpus=0.5)
class DirectScorer:
    """Calls the reward in the actor's own (non-main) threads, where signal.alarm raises."""

    def accuracy(self, completions, solution):
        return accuracy_reward(completions=completions, solution=solution)

    def signal_timeout_breaks_here(self) -> str:
        from math_verify import parse

        try:
            parse("1", parsing_timeout=5, raise_on_error=True)
        except ValueError as err:
            return str(err)
        return "no error"


def test_accuracy_in_a_threaded_actor_matches_in_process(group: RewardGroup) -> None:
    cases = accuracy_cases()
    reference = accuracy_reward(completions=[c for _, c in cases], solution=[s for s, _ in cases])
    assert reference.count(1.0) == 180 and reference.count(0.0) == 60

    actor = DirectScorer.remote()
    assert "threaded environment" in ray.get(actor.signal_timeout_breaks_here.remote())
    chunks = [cases[j : j + 8] for j in range(0, len(cases), 8)]
    refs = [actor.accuracy.remote([c for _, c in ch], [s for s, _ in ch]) for ch in chunks]
    assert [v for out in ray.get(refs) for v in out] == reference
    ray.kill(actor)

    rollouts = [make_rollout([c], s, f"r{i}") for i, (s, c) in enumerate(cases)]
    refs = [group.score_async(r) for r in rollouts]  # overlapping requests on threaded actors
    assert [g.per_function["accuracy"][0] for g in group.get(refs)] == reference


def test_two_workers_score_in_order(group: RewardGroup) -> None:
    assert group.num_workers == 2
    before = group.stats()
    start = time.perf_counter()
    scored = group.score(slow_rollouts())
    elapsed = time.perf_counter() - start
    assert [g.rollout.request.uid for g in scored] == [f"r{i}" for i in range(8)]
    assert [g.rewards for g in scored] == expected_slow_rewards()
    # 8 calls of 0.3 s on 2 workers x 2 processes: about 0.6 s, not 2.4 s.
    assert elapsed < 1.8, f"{elapsed:.2f} s"
    stats = group.stats()
    assert stats["groups"] - before["groups"] == 8 and stats["calls"] - before["calls"] == 24
    assert stats["restarts"] == 0 and stats["timeouts"] == 0 and stats["errors"] == 0


def test_killed_worker_is_replaced_and_scoring_completes(group: RewardGroup) -> None:
    rollouts = slow_rollouts()
    # Async path: kill a worker while its calls are running, then collect.
    seen = started_calls(group)
    refs = [group.score_async(r) for r in rollouts]
    wait_for_calls(group, seen)
    victim = group.actors[0]
    ray.kill(victim)
    assert [g.rewards for g in group.get(refs)] == expected_slow_rewards()
    assert group.restarts == 1 and group.num_workers == 2 and victim not in group.actors
    # Sync path: kill during score(); the killed worker's share is scored again on its replacement.
    seen, victim = started_calls(group), group.actors[1]
    killer = threading.Thread(target=lambda: (wait_for_calls(group, seen), ray.kill(victim)))
    killer.start()
    scored = group.score(rollouts)
    killer.join()
    assert [g.rewards for g in scored] == expected_slow_rewards()
    assert group.restarts == 2 and group.num_workers == 2


def test_scale_and_in_process_mode() -> None:
    rollouts = [make_rollout(["<think></think><answer>2</answer>"], "2", f"r{i}") for i in range(5)]
    group = RewardGroup(["format", "accuracy"], num_workers=0, num_cpus_per_worker=0.5)
    assert group.num_workers == 0
    assert [g.rewards for g in group.score(rollouts)] == [(2.0,)] * 5
    assert group.get([group.score_async(rollouts[0])])[0].rewards == (2.0,)
    group.scale(2)
    assert group.num_workers == 2 and len(group.actors) == 2
    refs = [group.score_async(r) for r in rollouts]
    group.scale(1)  # the removed worker finishes what it holds
    assert [g.rewards for g in group.get(refs)] == [(2.0,)] * 5
    assert group.num_workers == 1
    assert [g.rewards for g in group.score(rollouts)] == [(2.0,)] * 5
    group.scale(0)
    assert group.num_workers == 0 and [g.rewards for g in group.score(rollouts)] == [(2.0,)] * 5
    group.close()
