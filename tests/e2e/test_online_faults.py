"""The online driver end to end on CPU, part 2: staleness, scaling, colocation, failures and exact resume.

Same warm-started tiny LLaVA and colour task as test_online.py (its own module Ray instance, so the
two files run on two pytest workers side by side).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
import yaml

from online_task import final_weights, grpo_config, trained_uids
from raylign import cli
from raylign.config import config_from_dict
from raylign.driver.metrics import read_metrics
from raylign.driver.online import OnlineRun, run
from raylign.learner.group import LearnerGroup
from raylign.sync.group import CollectiveTransport, _RemoteTransport

def test_staleness_bound_holds_and_overlap_happens(ray_local, task, tmp_path):
    cfg = config_from_dict(grpo_config(task, tmp_path, "stale2", train={"max_steps": 6},
                                       grpo={"max_staleness": 2}))
    rows = read_metrics(run(cfg))
    stale = [r["staleness/max"] for r in rows]
    assert max(stale) <= 2
    assert max(stale) >= 1  # samples for later steps really were generated ahead of the learner


def test_rollout_workers_scale_up_and_down_during_the_run(ray_local, task, tmp_path):
    cfg = config_from_dict(grpo_config(task, tmp_path, "scale", train={"max_steps": 4}, grpo={"max_staleness": 1}))
    job = OnlineRun(cfg)
    try:
        job.step(0)
        job.scale_rollouts(3)
        assert job.rollouts.num_workers == 3 and not job.rollouts.workers_needing_sync()
        job.step(1)
        (cfg.run_dir / "rollout_workers").write_text("1\n")  # what a user does to a running job
        job.scale_rollouts(job._requested_rollout_workers())
        job.step(2)
        job.step(3)
        assert job.rollouts.num_workers == 1
    finally:
        job.close()
    uids = [u for step_uids in trained_uids(cfg.run_dir).values() for u in step_uids]
    assert len(uids) == 4 * 8 and max(Counter(uids).values()) == 1


def test_colocated_run_syncs_inside_the_learner_actors(ray_local, task, tmp_path):
    """rollout.colocate: each learner actor holds an engine; weights never cross a process (no gloo group)."""
    cfg = config_from_dict(grpo_config(task, tmp_path, "colocate", train={"max_steps": 3},
                                       learner={"num_learners": 2}, rollout={"colocate": True},
                                       grpo={"max_staleness": 1}))
    job = OnlineRun(cfg)
    try:
        assert job.broadcaster.transport.name == "inprocess"
        assert [h for _, h in job.rollouts.workers] == job.learners.actors
        job.train()
        pings = ray.get([a.ping.remote() for a in job.learners.actors])
    finally:
        job.close()
    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["sync/version"] == r["step"] for r in rows)
    assert all(r["sync/bytes"] > 0 and r["sync/engines"] == 2 for r in rows)  # loaded in-process, both ranks
    assert max(r["staleness/max"] for r in rows) <= 1
    assert [p["version"] for p in pings] == [3, 3] and not any(p["weight_group"] for p in pings)
    assert {p["worker_id"] for p in pings} == {"rollout-0", "rollout-1"}


def test_staleness_zero_equals_a_synchronous_loop(ray_local, task, tmp_path):
    """max_staleness 0 through actors == the plain synchronous algorithm written out by hand."""
    from raylign.driver.batching import make_request, request_seed, sampling_params, train_samples
    from raylign.driver.sampler import PromptSampler
    from raylign.learner.group import LearnerGroup
    from raylign.learner.objectives import make_objective
    from raylign.protocol import TrainBatch
    from raylign.rewards.worker import RewardWorker
    from raylign.rollout.hf import TransformersEngine

    cfg = config_from_dict(grpo_config(task, tmp_path, "sync0", train={"max_steps": 3}))
    job = OnlineRun(cfg)
    try:
        job.train()
        driver_rows = read_metrics(cfg.run_dir)
        train_ds = job.train_ds
    finally:
        job.close()

    engine = TransformersEngine(cfg.model.name_or_path, batch_size=8)
    rewards = RewardWorker(cfg.reward.funcs, timeout_s=cfg.reward.timeout_s)
    learners = LearnerGroup(cfg.model, cfg.train, cfg.learner, 3, seed=cfg.seed)
    objective = make_objective(cfg)
    sampler = PromptSampler(len(train_ds), seed=cfg.seed)
    try:
        for step in range(3):
            taken = [sampler.take() for _ in range(cfg.grpo.prompts_per_step)]
            rows = train_ds.rows([r for _, r in taken])
            params = sampling_params(cfg.grpo)
            requests = [make_request(uid, row, params, cfg.seed) for (uid, _), row in zip(taken, rows)]
            assert requests[0].sampling.seed == request_seed(cfg.seed, taken[0][0])
            groups = [rewards.score(r) for r in engine.generate(requests)]
            result = learners.update(TrainBatch(tuple(train_samples(groups, cfg.grpo)), step), objective)
            flat = [kv for bucket in learners.weight_buckets() for kv in bucket]
            engine.load_weights(flat, version=learners.step)
            reward_mean = sum(r for g in groups for r in g.rewards) / (8 * 8)
            assert driver_rows[step]["reward/mean"] == pytest.approx(reward_mean, abs=1e-9)
            assert driver_rows[step]["loss"] == pytest.approx(result.metrics["loss"], rel=1e-5, abs=1e-7)
    finally:
        rewards.close()
        learners.shutdown()


def test_killed_rollout_worker_is_replaced_and_every_prompt_trains_once(ray_local, task, tmp_path):
    cfg = config_from_dict(grpo_config(task, tmp_path, "kill", train={"max_steps": 5}, grpo={"max_staleness": 1}))
    job = OnlineRun(cfg)
    try:
        for step in range(5):
            if step == 2:  # requests of steps 2 and 3 are in flight now
                ray.kill(job.rollouts.workers[0][1], no_restart=True)
            job.step(step)
        restarts = job.rollouts.restarts
    finally:
        job.close()
    uids = [u for step_uids in trained_uids(cfg.run_dir).values() for u in step_uids]
    assert restarts >= 1
    assert len(uids) == 5 * 8 and max(Counter(uids).values()) == 1


@pytest.mark.parametrize("staleness", [0, 2])
def test_interrupt_and_resume_continues_exactly(ray_local, task, tmp_path, staleness):
    grpo = {"max_staleness": staleness}
    full = config_from_dict(grpo_config(task, tmp_path, "full", train={"max_steps": 4}, grpo=grpo))
    run(full)

    crashed = grpo_config(task, tmp_path, "crash", train={"max_steps": 4, "save_steps": 2}, grpo=grpo)
    job = OnlineRun(config_from_dict(crashed))
    try:
        for step in range(3):  # dies after step 3; the last checkpoint is step 2
            job.step(step)
            if step + 1 == 2:
                job._save(2)
    finally:
        job.close()
    resumed = config_from_dict({**crashed, "train": {**crashed["train"], "resume_from_checkpoint": "latest"}})
    run(resumed)

    assert trained_uids(resumed.run_dir) == trained_uids(full.run_dir)  # same prompts, each step, none twice
    if staleness == 0:  # on-policy sampling is fully determined: the weights match bit for bit
        a, b = final_weights(full.run_dir, 4), final_weights(resumed.run_dir, 4)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _sigkill_learner(learners) -> float:
    """SIGKILL learner rank 0's process, as the OOM killer or a lost node would; returns when it was sent."""
    pid = ray.get(learners.actors[0].__ray_call__.remote(lambda worker: os.getpid()), timeout=60)
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


@pytest.mark.parametrize("during", ["update", "sync"])
def test_learner_sigkilled_mid_step_ends_with_the_command_that_finishes_the_run(
    ray_local, task, tmp_path, monkeypatch, capsys, during
):
    """The CLI run ends within the sync timeout naming the last checkpoint; the command it prints finishes
    the run, and every prompt is trained exactly once (one metrics row per step)."""
    timeout_s = 10.0
    cfg = grpo_config(task, tmp_path, f"sigkill-{during}", train={"max_steps": 3, "save_steps": 1},
                      learner={"num_learners": 1}, rollout={"num_workers": 1}, sync={"timeout_s": timeout_s},
                      grpo={"prompts_per_step": 4, "num_generations": 4})
    config = tmp_path / f"{during}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    killed: list[float] = []
    if during == "update":  # the second step's update: the learner dies while the driver waits on it
        real_update = LearnerGroup.update

        def update(self, batch, objective):
            if batch.policy_version != 1 or killed:
                return real_update(self, batch, objective)
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(real_update, self, batch, objective)
                killed.append(_sigkill_learner(self))
                return pending.result()

        monkeypatch.setattr(LearnerGroup, "update", update)
    else:  # the second step's broadcast: receivers wait on a sender that is gone
        real_send = CollectiveTransport.send

        def send(self, targets, version):
            if version == 2 and not killed:
                killed.append(_sigkill_learner(self.learners))
            return real_send(self, targets, version)

        monkeypatch.setattr(CollectiveTransport, "send", send)

    assert cli.main(["grpo", "--config", str(config)]) == 2
    ended_s = time.monotonic() - killed[0]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    step_1 = tmp_path / f"sigkill-{during}" / "checkpoints" / "step_1"
    assert last.startswith(f"raylign: error: a learner died (") and f"last checkpoint: {step_1}. " in last, last
    assert ended_s < timeout_s + 15, f"{ended_s:.1f} s after the kill"
    command = last.split("Resume with: ")[1]
    assert command == f"raylign grpo --config {step_1.parents[1] / 'config.yaml'} " \
                      f"--train.resume_from_checkpoint={step_1}"

    # The resumed run's engine is still starting at the restore's sync (a large vLLM engine always is):
    # it must get the restored weights once it is up, or it could take no work.
    real_ready = _RemoteTransport.ready
    monkeypatch.setattr(_RemoteTransport, "ready", lambda self, targets, wait_s: real_ready(self, targets, 0.0))
    assert cli.main(shlex.split(command)[1:]) == 0  # what the user runs next
    run_dir = step_1.parents[1]
    steps = trained_uids(run_dir)
    uids = [u for step_uids in steps.values() for u in step_uids]
    assert sorted(steps) == [1, 2, 3] and len(uids) == 3 * 4 and max(Counter(uids).values()) == 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # the interrupted run's step-2 row is not kept twice
