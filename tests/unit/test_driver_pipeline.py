"""The staleness gate and dynamic sampling of the rollout pipeline, on in-memory stand-ins for the groups."""

from __future__ import annotations

from raylign.config import GRPOConfig
from raylign.data.datasets import VLMDataset
from raylign.driver.pipeline import RolloutPipeline
from raylign.driver.sampler import PromptSampler
from raylign.protocol import Completion, Rollout, ScoredGroup


class FakeRollouts:
    """Finishes every request at once, sampled by the current version."""

    def __init__(self):
        self.version, self.submitted, self._done = 0, [], []

    def submit(self, requests):
        self.submitted += requests
        self._done += [Rollout(r, (Completion((1,), (-0.1,), "x", "stop"),) * r.sampling.n, self.version) for r in requests]

    def wait(self, timeout=None, num=None):
        done, self._done = self._done, []
        return done

    def workers_needing_sync(self):
        return []


class FakeRewards:
    """Rows whose index is a multiple of 3 get equal rewards (uninformative groups)."""

    def score(self, rollouts):
        out = []
        for r in rollouts:
            row = int(r.request.uid.split("/r")[1])
            rewards = (1.0,) * len(r.completions) if row % 3 == 0 else (0.0, 1.0) * (len(r.completions) // 2)
            out.append(ScoredGroup(r, rewards, {"f": rewards}))
        return out


def _pipeline(staleness=0, dynamic=False, rounds=3, rows=60):
    ds = VLMDataset.from_list([{"prompt": f"q{i}", "solution": str(i)} for i in range(rows)])
    g = GRPOConfig(num_generations=2, prompts_per_step=4, max_staleness=staleness, dynamic_sampling=dynamic,
                   max_dynamic_sampling_rounds=rounds)
    rollouts, sampler = FakeRollouts(), PromptSampler(rows, seed=0, shuffle=False)
    return RolloutPipeline(rollouts, FakeRewards(), ds, sampler, g, total_steps=10, seed=0), rollouts, sampler


def test_staleness_gate_limits_prompts_in_flight():
    pipe, rollouts, _ = _pipeline(staleness=1)
    pipe.fill(0)
    assert len(rollouts.submitted) == 8  # steps 0 and 1: engines serve version 0, bound 1
    rollouts.version = 1
    pipe.fill(1)
    assert len(rollouts.submitted) == 12  # step 2 opens once version 1 is served
    pipe0, rollouts0, _ = _pipeline(staleness=0)
    pipe0.fill(0)
    assert len(rollouts0.submitted) == 4


def test_batch_is_in_submission_order_and_carries_columns():
    pipe, rollouts, _ = _pipeline()
    batch = pipe.next_batch(0)
    assert [g.rollout.request.uid for g in batch.groups] == ["e0/r0", "e0/r1", "e0/r2", "e0/r3"]
    assert batch.groups[1].rollout.request.columns["solution"] == "1"
    assert rollouts.submitted[0].sampling.seed is not None


def test_dynamic_sampling_replaces_uninformative_groups_and_counts_them():
    pipe, rollouts, sampler = _pipeline(dynamic=True)
    batch = pipe.next_batch(0)
    rows = [int(g.rollout.request.uid.split("/r")[1]) for g in batch.groups]
    assert len(rows) == 4 and all(r % 3 for r in rows)  # rows 0 and 3 were dropped, 4 and 5 drawn instead
    assert batch.filtered == 2 and sampler.filtered == 2
    assert len(sampler.pending) == 4  # kept groups stay pending until the driver reports them trained


def test_dynamic_sampling_is_bounded_and_never_stalls():
    pipe, _, sampler = _pipeline(dynamic=True, rounds=0)
    batch = pipe.next_batch(0)
    assert len(batch.groups) == 4  # no extra round: zero-advantage groups fill the batch
    assert batch.filtered == 0 and sampler.filtered == 0
