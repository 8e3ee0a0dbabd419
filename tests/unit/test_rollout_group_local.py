"""RolloutGroup with num_workers=0: one engine in this process, no Ray, same submit/wait/generate API."""

from __future__ import annotations

import pytest
import ray
import torch

from raylign.protocol import RolloutRequest, SamplingParams
from raylign.rollout.engine import EngineSpec
from raylign.rollout.group import RolloutGroup


def _requests(k: int, **sampling) -> list[RolloutRequest]:
    s = SamplingParams(n=2, max_tokens=4, **sampling)
    return [RolloutRequest(uid=f"r{i}", prompt=f"count to {i}", sampling=s) for i in range(k)]


def test_local_group_submit_wait_generate_and_load_weights(tiny_qwen_dir):
    group = RolloutGroup(0, EngineSpec("transformers", str(tiny_qwen_dir), {"batch_size": 2}), chunk_size=2)
    assert not ray.is_initialized() and group.workers == [] and group.workers_needing_sync() == []
    tickets = group.submit(_requests(3))
    assert tickets == [0, 1, 2] and group.outstanding == 3
    group.poll()  # never blocks, and in-process nothing runs until wait/generate
    assert group.outstanding == 3
    first = group.wait(num=1)
    rest = group.wait()
    assert [r.request.uid for r in first + rest] == ["r0", "r1", "r2"] and group.outstanding == 0
    assert all(
        len(r.completions) == 2 and r.worker == "local" and r.policy_version == 0 for r in first + rest
    )

    greedy = _requests(2, temperature=0.0)
    before = group.generate(greedy)
    model = group.local.engine.model
    noisy = [(n, p + 0.1 * torch.randn_like(p)) for n, p in model.named_parameters()]
    group.load_weights(noisy, version=2)
    after = group.generate(greedy)
    assert group.version == 2 and [r.policy_version for r in after] == [2, 2]
    assert [r.completions[0].logprobs for r in before] != [r.completions[0].logprobs for r in after]
    with pytest.raises(ValueError, match="cannot add workers"):
        group.add_workers(1)
