"""GRPO on a real multi-node Ray cluster laid out like cluster/raycluster.yaml: placement and lost nodes.

One cluster for the module, of real raylets on this machine (``ray.cluster_utils.Cluster``), built
from the manifest's node types (``cluster_shape``): a head with no work resources (the driver, this
process, attaches to it), one ``learner`` node, three ``rollout`` nodes, each with the manifest's
custom resources and a few logical CPUs instead of GPUs. Jobs run the GRPO recipe unchanged with
``--preset=tiny`` and the cluster overrides the manifest names, 2-4 steps each.

Node failures are real: ``crash`` SIGKILLs the node's raylet and its worker processes, and the
cluster's health checks (``FAST_HEALTH_CHECKS``) declare the node dead within seconds.
"""

from __future__ import annotations

import shlex
from collections import Counter

import pytest
import ray
from cluster_shape import RAYCLUSTER, cluster_shapes
from multinode import (CLUSTER_OVERRIDES, assert_each_prompt_trained_once, audit, custom, job_config,
                       learner_nodes, node_types, worker_nodes)
from ray_nodes import FAST_HEALTH_CHECKS, NodeCluster, alive_nodes

from raylign import cli
from raylign.config import load_config
from raylign.driver.common import LearnerFailed
from raylign.driver.metrics import read_metrics
from raylign.driver.online import OnlineRun

LEARNER_CPUS = 2  # logical CPUs of a learner node here: a learner rank, and room for a resumed run's rank
ROLLOUT_CPUS = 1  # one rollout worker (rollout.num_cpus_per_worker=1), as `rollout: 1` allows

@pytest.fixture(scope="module")
def cluster():
    head, groups = cluster_shapes()
    c = NodeCluster(head, FAST_HEALTH_CHECKS)
    try:
        c.add_node("learner-0", groups["learner"].scaled(LEARNER_CPUS))
        for i in range(3):
            c.add_node(f"rollout-{i}", groups["rollout"].scaled(ROLLOUT_CPUS))
        c.connect()
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One output dir for the module: the tiny model and data of --preset=tiny are built once, here."""
    return tmp_path_factory.mktemp("multinode")


def test_the_test_cluster_has_the_manifests_node_types(cluster):
    head, groups = cluster_shapes()
    assert set(groups) == {"rollout", "learner"} and head.num_cpus == 0 and head.num_gpus == 0
    assert not head.resources, "the head offers no work resources: actors go to the worker groups"
    text = RAYCLUSTER.read_text()
    assert " ".join(CLUSTER_OVERRIDES) in text, "cluster/raycluster.yaml names other job overrides"
    for flag in CLUSTER_OVERRIDES:  # --rollout.resources.rollout=1: a resource only its own group has
        section, _, resource = flag[2:].partition("=")[0].split(".")
        assert [g for g, s in groups.items() if resource in s.resources] == [section]
    alive = alive_nodes()
    seen = Counter(next((g for g in groups if g in n["Resources"]), "head") for n in alive)
    assert seen == {"head": 1, "learner": 1, "rollout": 3}
    for n in alive:
        kind = next((g for g in groups if g in n["Resources"]), "head")
        shape = head if kind == "head" else groups[kind]
        assert custom(n["Resources"]) == shape.resources, (kind, n["Resources"])
        cpus = {"head": 0, "learner": LEARNER_CPUS, "rollout": ROLLOUT_CPUS}[kind]
        assert n["Resources"].get("GPU", 0) == 0 and n["Resources"].get("CPU", 0) == cpus, (kind, n["Resources"])


def test_placement_by_node_type_and_a_lost_rollout_node(cluster, out):
    """Learners only on the learner node, rollout workers only on rollout nodes; a rollout node dies
    with requests in flight, its worker is replaced on a surviving or new rollout node, and every
    prompt is trained exactly once."""
    steps = 4
    cfg = job_config(out, "placement", "--rollout.num_workers=2", f"--train.max_steps={steps}")
    assert cfg.grpo.max_staleness >= 1  # the recipe's: the next step's requests are in flight between steps
    job = OnlineRun(cfg)
    try:
        types = node_types()
        assert [types[n] for n in learner_nodes(job)] == ["learner"]
        placed = worker_nodes(job)
        assert [types[n] for n in placed.values()] == ["rollout", "rollout"]
        assert len(set(placed.values())) == 2, "`rollout: 1` per node: one worker per rollout node"
        job.step(0)
        lost_worker, lost_node = next(iter(placed.items()))
        name = next(k for k in cluster.nodes if cluster.node_id(k) == lost_node)
        cluster.crash(name)
        # KubeRay recreates a lost pod: a new rollout node joins while the run goes on.
        cluster.add_node("rollout-new", cluster_shapes()[1]["rollout"].scaled(ROLLOUT_CPUS))
        for step in range(1, steps):
            job.step(step)
        after = worker_nodes(job)
        restarts = job.rollouts.restarts
        learner_after = learner_nodes(job)
    finally:
        job.close()
    types = node_types()
    assert restarts >= 1 and lost_worker not in after and len(after) == 2
    assert lost_node not in after.values() and all(types.get(n) == "rollout" for n in after.values()), after
    assert [types[n] for n in learner_after] == ["learner"]
    assert_each_prompt_trained_once(cfg.run_dir, steps, cfg.grpo.prompts_per_step)
    sampled = {w for r in audit(cfg.run_dir).values() for w in r["workers"]}
    assert sampled - set(placed), "the replacement worker sampled prompts of later steps"


def test_a_lost_learner_node_ends_with_the_resume_command_that_finishes_on_a_new_node(cluster, out):
    steps = 3
    cfg = job_config(out, "learner-lost", "--rollout.num_workers=1", f"--train.max_steps={steps}")
    job = OnlineRun(cfg)
    try:
        job.step(0)
        saved = job._save(1)
        (lost,) = learner_nodes(job)
        name = next(k for k in cluster.nodes if cluster.node_id(k) == lost)
        cluster.crash(name)
        with pytest.raises(LearnerFailed) as err:
            job.step(1)
    finally:
        job.close()  # the dead learner is logged; its placement group is removed all the same
    message = str(err.value)
    assert f"last checkpoint: {saved}" in message and "Resume with: " in message, message
    assert not [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]

    cluster.add_node("learner-new", cluster_shapes()[1]["learner"].scaled(LEARNER_CPUS))
    argv = shlex.split(message.split("Resume with: ", 1)[1])
    assert argv[:2] == ["raylign", "grpo"] and f"--train.resume_from_checkpoint={saved}" in argv
    assert cli.main(argv[1:]) == 0  # the command as printed, in this driver process (joined to the cluster)

    learners = [n for n, t in node_types().items() if t == "learner"]
    assert learners == [cluster.node_id("learner-new")], "the only learner node is the new one"
    resumed = load_config(cfg.run_dir / "config.yaml")
    assert resumed.learner.resources == {"learner": 1.0} and resumed.rollout.resources == {"rollout": 1.0}
    assert_each_prompt_trained_once(cfg.run_dir, steps, cfg.grpo.prompts_per_step)
    assert (cfg.run_dir / "checkpoints" / f"step_{steps}" / "COMPLETE").exists()
    assert [r["step"] for r in read_metrics(cfg.run_dir)] == list(range(2, steps + 1))  # the resumed steps
