"""Ray's autoscaler grows the rollout pool of a running GRPO job, not its learners, and lets idle nodes go.

A real head (``ray start --head --autoscaling-config``) runs Ray's autoscaler (the monitor process)
over its fake multi-node provider, which starts and stops real raylets on this machine: the setup
``ray.cluster_utils.AutoscalingCluster`` makes, without its ``ray stop --force`` (see ray_nodes.py).
Node types come from cluster/raycluster.yaml (``cluster_shape``): ``rollout`` (min 1, max 3 here)
and ``learner`` (min 1, max 1), with the manifest's custom resources. The job asks for more rollout
workers the way a user does (RUN_DIR/rollout_workers); the new actors wait for resources, the
autoscaler adds rollout nodes, the new workers get the current weights before any prompt, and the
learner stays where it was. Asking for fewer leaves nodes idle, and the autoscaler removes them.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import ray
from cluster_shape import cluster_shapes
from ray_nodes import FAST_HEALTH_CHECKS, RayHead, alive_nodes, fake_autoscaling_config
from multinode import assert_each_prompt_trained_once, audit, job_config, learner_nodes, node_types, worker_nodes

from raylign.driver.online import OnlineRun

ROLLOUT_MAX = 3
IDLE_TIMEOUT_S = 3.0  # the manifest keeps idle GPU pods 300 s; here idle nodes go after 3 s
NODE_DEADLINE_S = 180.0  # nodes start in ~10 s on an idle machine; a loaded one gets much longer


def wait_for(what: str, predicate, deadline_s: float = NODE_DEADLINE_S):
    """Poll ``predicate()`` until it returns something truthy (returned), or fail naming ``what``."""
    end = time.monotonic() + deadline_s
    while not (value := predicate()):
        assert time.monotonic() < end, f"{what}: not after {deadline_s:.0f}s; nodes: {node_types()}"
        time.sleep(0.5)
    return value


def nodes_of(kind: str) -> set[str]:
    return {n for n, t in node_types().items() if t == kind}


@pytest.fixture(scope="module")
def autoscaling_head(tmp_path_factory):
    head, groups = cluster_shapes()
    types = {"rollout": dataclasses.replace(groups["rollout"].scaled(1), min_replicas=1, max_replicas=ROLLOUT_MAX),
             "learner": dataclasses.replace(groups["learner"].scaled(2), min_replicas=1, max_replicas=1)}
    config = fake_autoscaling_config(head, types, IDLE_TIMEOUT_S)
    h = RayHead(tmp_path_factory.mktemp("autoscaling") / "head.log", num_cpus=int(head.num_cpus), dashboard=False,
                autoscaling_config=config, system_config=FAST_HEALTH_CHECKS)
    try:
        h.connect()
        wait_for("the autoscaler starts min_workers: 1 rollout + 1 learner node",
                 lambda: len(nodes_of("rollout")) == 1 and len(nodes_of("learner")) == 1)
        yield h
    finally:
        left = h.stop()
    assert left == [], f"processes outlived the autoscaling head and its nodes: {left}"


def test_autoscaler_adds_rollout_nodes_for_more_workers_and_removes_idle_ones(autoscaling_head, tmp_path):
    steps = 4
    cfg = job_config(tmp_path, "autoscale", "--rollout.num_workers=1", f"--train.max_steps={steps}")
    job = OnlineRun(cfg)
    try:
        (learner_node,) = learner_nodes(job)
        learner_actor = job.learners.actors[0]
        first_rollout_nodes = nodes_of("rollout")
        assert set(worker_nodes(job).values()) == first_rollout_nodes and ray.cluster_resources()["rollout"] == 1
        job.step(0)

        (cfg.run_dir / "rollout_workers").write_text(f"{ROLLOUT_MAX}\n")  # what a user does to a running job
        wanted = job._requested_rollout_workers()
        t0 = time.monotonic()
        job.scale_rollouts(wanted)  # 2 actors that no node can take yet: the autoscaler has to add nodes
        wait_for("the autoscaler adds 2 rollout nodes and the new workers start there",
                 lambda: len(set(worker_nodes(job).values())) == ROLLOUT_MAX)
        grow_s = time.monotonic() - t0
        grown = worker_nodes(job)
        new_workers = set(grown) - {"rollout-0"}
        assert len(new_workers) == 2 and all(grown[w] not in first_rollout_nodes for w in new_workers), \
            "the new workers run on nodes that did not exist when they were asked for"
        assert nodes_of("learner") == {learner_node}, "the learner pool is untouched"
        for step in (1, 2):
            job.step(step)
        versions = {p["worker_id"]: p["version"] for p in ray.get([h.ping.remote() for _, h in job.rollouts.workers])}
        assert set(versions.values()) == {job.learners.step}, versions

        job.scale_rollouts(1)
        job.step(3)
        t0 = time.monotonic()
        wait_for("the autoscaler removes the idle rollout nodes", lambda: len(nodes_of("rollout")) == 1)
        shrink_s = time.monotonic() - t0
        assert learner_nodes(job) == [learner_node] and job.learners.actors[0] is learner_actor
        assert job.learners.step == steps
    finally:
        job.close()
    records = audit(cfg.run_dir)
    # Steps 1-3 were submitted before the scale-up (staleness 1: step 0's update opened steps 2 and 3);
    # step 4's prompts, submitted after step 2's update, went to all three workers.
    assert cfg.grpo.max_staleness == 1 and set(records[4]["workers"]) & new_workers, records[4]["workers"]
    assert_each_prompt_trained_once(cfg.run_dir, steps, cfg.grpo.prompts_per_step)
    print(f"autoscaling: 1 -> {ROLLOUT_MAX} rollout nodes in {grow_s:.1f}s, back to 1 in {shrink_s:.1f}s")
    assert len(alive_nodes()) == 3  # head, learner, 1 rollout: min_workers
