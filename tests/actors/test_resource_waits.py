"""A request the cluster cannot grant fails within resource_timeout_s, in one line naming the key (real local Ray).

Ray itself would wait forever (its autoscaler only logs "No available node types can fulfill
resource request"). Each group reserves its actors' resources first, with a bound.
"""

from __future__ import annotations

import time

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from raylign.config import LearnerConfig, ModelConfig, TrainConfig
from raylign.learner.group import LearnerGroup
from raylign.placement import ResourceRequest, ResourcesUnavailable, unavailable_message
from raylign.rewards.group import RewardGroup
from raylign.rollout.engine import EngineSpec
from raylign.rollout.group import RolloutGroup
from raylign.rollout.worker import WorkerResources

TIMEOUT_S = 1.0


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _fails_within_bound(make) -> str:
    start = time.monotonic()
    with pytest.raises(ResourcesUnavailable) as err:
        make()
    assert time.monotonic() - start < TIMEOUT_S + 5.0
    message = str(err.value)
    assert "\n" not in message and "the cluster offers {CPU: 4, memory: " in message, message
    return message


def _learners(**learner_kw) -> LearnerGroup:
    # The model is never loaded: the reservation fails first.
    return LearnerGroup(
        ModelConfig(name_or_path="never-loaded"), TrainConfig(), LearnerConfig(**learner_kw), 1,
        resource_timeout_s=TIMEOUT_S,
    )


def test_a_gpu_learner_on_a_cpu_cluster():
    message = _fails_within_bound(lambda: _learners(num_learners=1, num_gpus_per_learner=1))
    assert message.startswith(
        "1 learner(s) could not get {CPU: 1, GPU: 1} within resource_timeout_s=1: no node has enough GPU "
        "(asked by learner.num_gpus_per_learner (GPU: 1 per actor)); the cluster offers {CPU: 4, memory: "
    ), message
    assert message.endswith("lower those keys, fix a mistyped resource name, or add nodes that have them")


def test_a_mistyped_custom_resource():
    message = _fails_within_bound(lambda: _learners(num_learners=2, resources={"lerner": 1}))
    assert "2 learner(s) could not get 2 x {CPU: 1, lerner: 1}" in message
    assert "asked by learner.resources.lerner (lerner: 1 per actor)" in message


def test_a_rollout_worker_with_a_resource_no_node_has(tiny_qwen_dir):
    spec = EngineSpec("transformers", str(tiny_qwen_dir), {"batch_size": 1})
    message = _fails_within_bound(
        lambda: RolloutGroup(1, spec, WorkerResources(resources={"rollout": 1}), resource_timeout_s=TIMEOUT_S)
    )
    assert message.startswith("rollout worker rollout-0 could not get {CPU: 1, rollout: 1}"), message
    assert "asked by rollout.resources.rollout (rollout: 1 per actor)" in message


def test_resources_that_exist_but_are_taken():
    """All 4 CPUs held by someone else: the reward worker's CPU is named as in use, not missing."""
    hog = placement_group([{"CPU": 4}])
    ray.get(hog.ready(), timeout=30)
    try:
        message = _fails_within_bound(
            lambda: RewardGroup(["format"], num_workers=1, resource_timeout_s=TIMEOUT_S)
        )
    finally:
        remove_placement_group(hog)
    assert message.startswith(
        "reward worker reward-1 could not get {CPU: 1} within resource_timeout_s=1: the resources exist but "
        "are in use or spread over nodes (asked by reward.num_workers)"
    ), message
    assert "free now {" in message and "CPU" not in message.split("free now")[1].split("}")[0]


def test_a_grantable_request_is_reserved_and_given_back():
    group = RewardGroup(["format"], num_workers=1, num_cpus_per_worker=2, resource_timeout_s=30)
    try:
        assert ray.available_resources().get("CPU", 0) <= 2
    finally:
        group.close()
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # placement-group removal is asynchronous
    assert ray.available_resources().get("CPU", 0) == 4


def test_message_for_a_multi_node_cluster():
    keys = {"CPU": "learner.num_cpus_per_learner", "GPU": "learner.num_gpus_per_learner"}
    request = ResourceRequest("2 learner(s)", ({"CPU": 1.0, "GPU": 1.0},) * 2, keys, "learner.resources")
    nodes = [{"CPU": 8.0, "GPU": 1.0, "node:10.0.0.1": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    message = unavailable_message(request, 900, nodes, {"CPU": 16.0})
    assert message == (
        "2 learner(s) could not get 2 x {CPU: 1, GPU: 1} within resource_timeout_s=900: the resources exist but "
        "are in use or spread over nodes (asked by learner.num_cpus_per_learner, learner.num_gpus_per_learner); "
        "the cluster offers "
        "{CPU: 16, GPU: 2} (2 node(s)), free now {CPU: 16}; free them (other jobs?), lower the request, or add nodes"
    )
