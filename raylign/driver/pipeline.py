"""Asynchronous group sampling with bounded staleness.

Prompts for step ``s`` are submitted only once the rollout engines serve the weights of step
``s - max_staleness`` or newer, so no sample trained on is more than ``max_staleness`` steps old;
with ``max_staleness = 0`` a step's prompts wait for the previous update: the synchronous
algorithm exactly. Everything already submitted keeps generating while the learner trains.

A step's batch is its own prompt groups in submission order (never whichever finished first), so
a run is reproducible. With dynamic sampling, groups whose rewards are all equal are dropped
(reported as *filtered* to the sampler) and replaced by fresh prompts, for at most
``max_dynamic_sampling_rounds`` rounds; after that the step trains on what it has, zero-advantage
groups included, so it never stalls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from raylign.config import GRPOConfig
from raylign.data.datasets import VLMDataset
from raylign.driver.batching import is_informative, make_request, sampling_params
from raylign.driver.sampler import PromptSampler
from raylign.protocol import ScoredGroup, TrainerState


@dataclass
class StepBatch:
    """One step's scored groups plus how long the driver spent getting them."""

    groups: list[ScoredGroup]
    wait_s: float  # blocked on rollouts
    reward_s: float  # blocked on reward scoring
    filtered: int  # groups dropped by dynamic sampling
    generate_s: float = 0.0  # engine seconds spent on these groups (summed over groups)
    extra: dict = field(default_factory=dict)


class RolloutPipeline:
    """Feeds the rollout group ahead of the learner (see the module docstring).

    Args:
        rollouts: a ``RolloutGroup`` (``submit`` / ``wait`` / ``poll`` / ``version``).
        rewards: a ``RewardGroup`` (``score``).
        dataset: prompt dataset rows (``prompt``, ``images``, extra columns).
        sampler: the exactly-once prompt order.
        g: the grpo section; ``prompts_per_step``, ``num_generations``, ``max_staleness``, dynamic sampling.
        total_steps: no prompt is submitted for steps past the end of the run.
        seed: seeds every prompt's sampling (``None``: engine-chosen seeds).
        sync_workers: called with the ids of replaced rollout workers that still need weights.
    """

    def __init__(self, rollouts, rewards, dataset: VLMDataset, sampler: PromptSampler, g: GRPOConfig,
                 total_steps: int, seed: int | None, num_iterations: int = 1,
                 sync_workers: Callable[[list[str]], object] | None = None):
        self.rollouts, self.rewards, self.dataset, self.sampler, self.g = rollouts, rewards, dataset, sampler, g
        self.sync_workers = sync_workers  # brings replacement workers to the current weights
        self.total_steps = total_steps
        self.seed = seed
        self.num_iterations = num_iterations
        self.sampling = sampling_params(g)
        self.submitted_steps: int | None = None  # steps whose prompts are all submitted
        self._step_of: dict[str, int] = {}  # uid -> step it feeds
        self._ready: dict[str, object] = {}  # uid -> finished Rollout, not yet consumed

    def _submit(self, step: int, count: int) -> None:
        taken = [self.sampler.take() for _ in range(count)]
        rows = self.dataset.rows([row for _, row in taken])
        # What the reward functions see as trainer_state: the step these prompts feed (TRL's global_step).
        state = TrainerState(step, self.total_steps, step * self.g.prompts_per_step / max(1, len(self.dataset)))
        requests = [replace(make_request(uid, row, self.sampling, self.seed), trainer_state=state)
                    for (uid, _), row in zip(taken, rows)]
        for r in requests:
            self._step_of[r.uid] = step
        self.rollouts.submit(requests)

    def fill(self, step: int) -> None:
        """Submit every step the staleness bound allows, given the engines' current version."""
        if self.submitted_steps is None:
            self.submitted_steps = step
        engine_step = self.rollouts.version // self.num_iterations
        limit = min(self.total_steps, engine_step + self.g.max_staleness + 1)
        while self.submitted_steps < limit:
            self._submit(self.submitted_steps, self.g.prompts_per_step)
            self.submitted_steps += 1

    def _collect(self, needed: set[str]) -> None:
        while not needed.issubset(self._ready):
            stale = self.rollouts.workers_needing_sync()
            if stale and self.sync_workers is not None:  # a replaced worker gets no work until synced
                self.sync_workers(stale)
            for rollout in self.rollouts.wait(timeout=1.0, num=1):
                self._ready[rollout.request.uid] = rollout

    def next_batch(self, step: int) -> StepBatch:
        """Block until ``step``'s batch is sampled and scored; returns it in submission order."""
        self.fill(step)
        kept: list[ScoredGroup] = []
        dropped: list[ScoredGroup] = []
        wait_s = reward_s = 0.0
        for round_ in range(self.g.max_dynamic_sampling_rounds + 1 if self.g.dynamic_sampling else 1):
            uids = [u for u, s in self._step_of.items() if s == step]
            t0 = time.perf_counter()
            self._collect(set(uids))
            t1 = time.perf_counter()
            scored = self.rewards.score([self._ready.pop(u) for u in uids])
            t2 = time.perf_counter()
            wait_s, reward_s = wait_s + t1 - t0, reward_s + t2 - t1
            for u in uids:
                del self._step_of[u]
            last = round_ == self.g.max_dynamic_sampling_rounds
            for grp in scored:
                (kept if not self.g.dynamic_sampling or is_informative(grp) else dropped).append(grp)
            missing = self.g.prompts_per_step - len(kept)
            if missing <= 0 or last or not self.g.dynamic_sampling:
                break
            self._submit(step, missing)
        if len(kept) < self.g.prompts_per_step:  # rounds exhausted: fill with zero-advantage groups
            fill = self.g.prompts_per_step - len(kept)
            kept, dropped = kept + dropped[:fill], dropped[fill:]
        for grp in dropped:
            self.sampler.done(grp.rollout.request.uid, trained=False)
        generate_s = sum(grp.rollout.generate_s for grp in kept)
        return StepBatch(kept, wait_s, reward_s, len(dropped), generate_s)

    def pending_uids(self) -> list[str]:
        """Prompts handed out but not yet trained (they are re-queued first on resume)."""
        return list(self.sampler.pending)
