"""rollout.colocate with real vLLM: the engine lives inside a learner actor, beside its DeepSpeed learner.

The actor's default torch.distributed group is the learners' own, and vLLM's model runs in the
actor's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by ``ColocatedWorker``). After an update
and an in-process sync the engine samples with the learner's weights: its logprobs equal the
learner's teacher forcing, and no weight-sync group to the learner exists.
"""

from __future__ import annotations

import sys

import pytest
import ray
from PIL import Image

from raylign.config import LearnerConfig, ModelConfig, SFTConfig, SyncConfig, TrainConfig
from raylign.learner.group import LearnerGroup
from raylign.learner.objectives import SFTObjective
from raylign.models.loading import load_model, load_processor
from raylign.rollout.engine import EngineSpec
from raylign.rollout.group import RolloutGroup
from raylign.sync.broadcaster import WeightBroadcaster
from vllm_reference import CPU_ENGINE_KWARGS, max_logprob_error, requests

TOL = 1e-4  # fp32 on both sides
IMG = Image.new("RGB", (56, 56), (200, 30, 30))

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the functions run inside the actor


def sft_rows(n: int) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many red circles?"}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "<answer>1</answer>"}]}
    return [{"messages": [user, answer], "images": [IMG]} for _ in range(n)]


def suppressed_ids(worker) -> tuple[int, ...]:
    return tuple(worker.rollout.engine.suppressed_ids)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}})
    yield
    ray.shutdown()


def test_vllm_engine_inside_a_learner_actor_samples_with_the_learners_weights(ray_session, vllm_model_dir):
    learners = LearnerGroup(
        ModelConfig(name_or_path=str(vllm_model_dir)),
        TrainConfig(learning_rate=5e-2, per_device_train_batch_size=1),
        LearnerConfig(num_learners=1, zero_stage=2, num_cpus_per_learner=1),
        10,
        colocated=True,
    )
    spec = EngineSpec("vllm", str(vllm_model_dir), CPU_ENGINE_KWARGS)
    rollouts = RolloutGroup(1, spec, actors=learners.actors)
    broadcaster = WeightBroadcaster(learners, rollouts, SyncConfig(bucket_mb=1, timeout_s=120))
    try:
        assert broadcaster.transport.name == "inprocess"
        greedy = requests(n=1, temperature=0.0)
        before = rollouts.generate(greedy)
        learners.update(sft_rows(2), SFTObjective(SFTConfig()))
        metrics = broadcaster.broadcast(1)
        assert metrics["sync/version"] == 1 and metrics["sync/bytes"] > 0
        after = rollouts.generate(greedy)
        assert {r.policy_version for r in before} == {0} and {r.policy_version for r in after} == {1}

        # A fresh HF copy given the learner's weights, as its rank 0 exports them.
        trained = load_model(vllm_model_dir, dtype="float32")
        exported = dict(kv for bucket in learners.weight_buckets(8.0) for kv in bucket)
        for name, p in trained.named_parameters():
            p.data.copy_(exported[name])
        masked = ray.get(learners.actors[0].__ray_call__.remote(suppressed_ids))
        assert max_logprob_error(trained, load_processor(vllm_model_dir), after, 0.0, masked) < TOL
        tokens = [[c.token_ids for r in batch for c in r.completions] for batch in (before, after)]
        assert tokens[0] != tokens[1]  # the update changed what the engine samples
        ping = ray.get(learners.actors[0].ping.remote())
        assert ping["version"] == 1 and ping["weight_group"] is False
    finally:
        broadcaster.close()
        rollouts.shutdown()
        learners.shutdown()
