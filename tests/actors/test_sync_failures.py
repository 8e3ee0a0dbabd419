"""Weight sync when a receiver dies or stalls: a SyncError naming it, within the timeout, and recovery.

ZeRO-3 learners on purpose: every learner rank takes part in each bucket's gather, so a sender that
stopped iterating after a failed broadcast would leave the other rank waiting forever; the update
and the syncs after each failure show nobody was left behind.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import ray
import torch
from PIL import Image

from raylign.config import LearnerConfig, ModelConfig, SFTConfig, SyncConfig, TrainConfig
from raylign.data.chat import encode_for_generation
from raylign.learner.group import LearnerGroup
from raylign.learner.objectives import SFTObjective
from raylign.models.loading import load_processor
from raylign.rollout.engine import EngineSpec
from raylign.rollout.group import RolloutGroup
from raylign.sync.broadcaster import WeightBroadcaster
from raylign.sync.transports import SyncError

IMG = Image.new("RGB", (48, 40), (200, 30, 30))

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the functions run inside actors


def sft_rows(n: int) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it?"}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "<answer>red</answer>"}]}
    return [{"messages": [user, answer], "images": [IMG]} for _ in range(n)]


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    torch.set_num_threads(1)  # only ever called inside actors
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def busy(seconds: float):
    """Occupy an actor (its calls run one at a time), so the sync's call to it waits behind this one."""
    return lambda worker: time.sleep(seconds)


@pytest.fixture(scope="module")
def parts(tiny_qwen_dir):
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    learners = LearnerGroup(
        ModelConfig(name_or_path=str(tiny_qwen_dir)),
        TrainConfig(learning_rate=2e-2, per_device_train_batch_size=1),
        LearnerConfig(num_learners=2, zero_stage=3, num_cpus_per_learner=1),
        10,
    )
    learners.update(sft_rows(2), SFTObjective(SFTConfig()))
    rollouts = RolloutGroup(2, EngineSpec("transformers", str(tiny_qwen_dir), {"batch_size": 2}))
    inputs = dict(encode_for_generation(load_processor(tiny_qwen_dir), ["what colour?"], [[IMG]]))
    yield learners, rollouts, inputs
    rollouts.shutdown()
    learners.shutdown()
    ray.shutdown()


def assert_engines_match(learners: LearnerGroup, rollouts: RolloutGroup, inputs: dict, version: int) -> None:
    want = ray.get(
        [a.__ray_call__.remote(lambda w, x: logits(w.learner.policy, x), inputs) for a in learners.actors]
    )[0]
    for worker_id, handle in rollouts.workers:
        got = ray.get(handle.__ray_call__.remote(lambda w, x: logits(w.engine.model, x), inputs))
        assert torch.equal(got, want), worker_id
        assert ray.get(handle.version.remote()) == version
    assert rollouts.workers_needing_sync() == []


def test_a_receiver_killed_mid_sync_gives_a_sync_error_then_its_replacement_is_synced(parts):
    learners, rollouts, inputs = parts
    timeout_s = 20.0
    broadcaster = WeightBroadcaster(
        learners, rollouts, SyncConfig("collective", bucket_mb=0.05, timeout_s=timeout_s)
    )
    broadcaster.broadcast(1)  # builds the group
    (healthy, _), (victim, handle) = rollouts.workers
    handle.__ray_call__.remote(busy(30.0))
    outcome: dict[str, object] = {}

    def sync() -> None:
        start = time.perf_counter()
        try:
            broadcaster.broadcast(2)
        except SyncError as err:
            outcome["error"] = err
        outcome["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=sync)
    thread.start()
    time.sleep(2.0)  # the sender and the other engine are now inside the first bucket's broadcast
    assert thread.is_alive()
    ray.kill(handle, no_restart=True)
    thread.join(timeout_s + 10)
    err = outcome.get("error")
    assert isinstance(err, SyncError), outcome
    assert err.worker_ids == [victim] and f"rollout worker {victim}: died" in str(err)
    assert set(err.unsynced) == {healthy, victim}  # the healthy one lost its sender: not synced either
    assert outcome["seconds"] < 2.0 + 5.0  # failed fast, well inside the timeout
    replacement = err.replaced[victim]
    assert replacement and replacement in dict(rollouts.workers)
    assert set(rollouts.workers_needing_sync()) == {w for w, _ in rollouts.workers}  # nobody got version 2

    learners.update(sft_rows(2), SFTObjective(SFTConfig()))  # no learner rank was left inside a gather
    metrics = broadcaster.broadcast(3)  # a new group with the replacement
    assert metrics["sync/control_calls"] == 2 + 2 + 1 + 4  # + a ping of the new worker, store, 3 joins
    assert_engines_match(learners, rollouts, inputs, 3)
    broadcaster.close()


def test_a_stalled_receiver_is_named_within_the_timeout_and_replaced(parts):
    learners, rollouts, inputs = parts
    timeout_s = 6.0  # a healthy receiver's collateral timeout must reach the driver in time on a busy machine
    broadcaster = WeightBroadcaster(
        learners, rollouts, SyncConfig("collective", bucket_mb=0.05, timeout_s=timeout_s)
    )
    broadcaster.broadcast(4)
    victim, handle = rollouts.workers[0]
    handle.__ray_call__.remote(busy(60.0))
    start = time.perf_counter()
    with pytest.raises(SyncError, match=f"rollout worker {victim}: stalled") as info:
        broadcaster.broadcast(5)
    assert time.perf_counter() - start < timeout_s + 2.0
    assert info.value.worker_ids == [victim] and info.value.replaced[victim]
    new = info.value.replaced[victim]
    assert set(rollouts.workers_needing_sync()) == {w for w, _ in rollouts.workers}
    ray.get(dict(rollouts.workers)[new].ping.remote())  # started (a starting engine is skipped, not blamed)
    broadcaster.sync_workers(rollouts.workers_needing_sync(), version=5)  # what a driver may do at once
    assert_engines_match(learners, rollouts, inputs, 5)
    broadcaster.close()


def test_object_store_names_a_dead_receiver_and_recovers(parts):
    learners, rollouts, inputs = parts
    broadcaster = WeightBroadcaster(
        learners, rollouts, SyncConfig("object_store", bucket_mb=0.05, timeout_s=20)
    )
    victim, handle = rollouts.workers[1]
    ray.kill(handle, no_restart=True)
    with pytest.raises(SyncError, match=f"rollout worker {victim}: died") as info:
        broadcaster.broadcast(6)
    assert info.value.replaced[victim]
    broadcaster.broadcast(7)  # waits for the replacement to start
    assert_engines_match(learners, rollouts, inputs, 7)
    broadcaster.close()
