"""Weight sync into real vLLM inside Ray: a RolloutWorker actor holds a VLLMEngine in vLLM's default
multiprocess mode (engine core and model in subprocesses), the learner is in this process.

Defect 3: before the redesign every sync failed there (tensors as ``collective_rpc`` arguments).
Now the learner broadcasts into vLLM's worker process over gloo (collective transport) or the
actor feeds it (object-store transport), and the engine's generations equal a fresh engine's.
"""

from __future__ import annotations

import gc
import shutil

import pytest
import ray
import torch

from raylign.config import LearnerConfig, ModelConfig, SyncConfig, TrainConfig
from raylign.learner.group import LearnerGroup
from raylign.models.loading import load_model, load_processor
from raylign.rollout.engine import EngineSpec
from raylign.rollout.group import RolloutGroup
from raylign.rollout.vllm import VLLMEngine
from raylign.sync.broadcaster import WeightBroadcaster
from vllm_reference import CPU_ENGINE_KWARGS, max_logprob_error, perturb, requests

MULTIPROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": MULTIPROCESS})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def parts(ray_session, vllm_model_dir):
    # In-process vLLM engines of earlier tests tear torch.distributed down when collected; the
    # learner in this process needs its own default group, so they go first.
    gc.collect()
    learners = LearnerGroup(
        ModelConfig(name_or_path=str(vllm_model_dir)), TrainConfig(), LearnerConfig(num_learners=0), 1
    )
    rollouts = RolloutGroup(1, EngineSpec("vllm", str(vllm_model_dir), CPU_ENGINE_KWARGS))
    yield learners, rollouts
    rollouts.shutdown()


def _tokens(rollouts):
    return [c.token_ids for r in rollouts for c in r.completions]


def test_sync_into_a_vllm_actor_equals_a_fresh_engine(parts, vllm_model_dir, tmp_path):
    learners, rollouts = parts
    greedy = requests(n=1, temperature=0.0)
    before = rollouts.generate(greedy)
    policy = learners.local_learner.policy
    original = {n: p.detach().clone() for n, p in policy.named_parameters()}
    perturb(policy, scale=0.05, seed=3)

    collective = WeightBroadcaster(learners, rollouts, SyncConfig(transport="collective", bucket_mb=1))
    metrics = collective.broadcast(1)
    assert metrics["sync/buckets"] > 1 and metrics["sync/engines"] == 1
    after = rollouts.generate(greedy)
    assert {r.policy_version for r in after} == {1} and _tokens(after) != _tokens(before)

    fresh_dir = tmp_path / "fresh"  # the learner's weights as a checkpoint, for a fresh engine below
    policy.save_pretrained(fresh_dir)
    load_processor(vllm_model_dir).save_pretrained(fresh_dir)
    shutil.copy(vllm_model_dir / "generation_config.json", fresh_dir)
    sampled = rollouts.generate(requests(temperature=1.0, seed=4))
    collective.close()

    # Back to the original weights through the object store: the actor feeds its vLLM worker.
    with torch.no_grad():
        for n, p in policy.named_parameters():
            p.copy_(original[n])
    store = WeightBroadcaster(learners, rollouts, SyncConfig(transport="object_store", bucket_mb=1))
    store.broadcast(2)
    back = rollouts.generate(greedy)
    assert {r.policy_version for r in back} == {2} and _tokens(back) == _tokens(before)
    store.close()
    learners.shutdown()  # before an in-process vLLM engine shares (and tears down) torch.distributed

    # A fresh engine (in this process) from the synced weights samples what the actor sampled.
    fresh = VLLMEngine(str(fresh_dir), **CPU_ENGINE_KWARGS)
    assert _tokens(fresh.generate(greedy)) == _tokens(after)
    synced = load_model(fresh_dir, dtype="float32")
    assert max_logprob_error(synced, load_processor(fresh_dir), sampled, 1.0, fresh.suppressed_ids) < 1e-4
