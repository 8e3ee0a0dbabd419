"""RolloutGroup on a local Ray instance: two tiny-VLM workers, teacher-forced logprobs, weight loading,
a worker killed mid-generation, and workers added/removed while requests are in flight.

The tests share one group (actor start-up is the slow part) and run in file order.
"""

from __future__ import annotations

import time

import pytest
import ray
import torch
from PIL import Image
from ray.exceptions import RayActorError

from raylign.data.chat import encode_for_generation
from raylign.models.loading import load_model, load_processor
from raylign.protocol import RolloutRequest, SamplingParams
from raylign.rollout.engine import EngineSpec, weights_fingerprint
from raylign.rollout.group import RolloutGroup

IMG = Image.new("RGB", (48, 40), (200, 30, 30))


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def group(ray_session, tiny_qwen_dir):
    spec = EngineSpec("transformers", str(tiny_qwen_dir), {"batch_size": 4})
    g = RolloutGroup(2, spec, chunk_size=2, max_inflight_per_worker=2)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def local(tiny_qwen_dir):
    """The same checkpoint in this process, for reference forward passes."""
    return load_model(tiny_qwen_dir), load_processor(tiny_qwen_dir)


def _requests(k: int, prefix: str, **sampling) -> list[RolloutRequest]:
    s = SamplingParams(**{"n": 2, "max_tokens": 6, **sampling})
    return [
        RolloutRequest(
            uid=f"{prefix}{i}", prompt=f"how many circles? {i}", images=(IMG,) if i % 2 else (), sampling=s
        )
        for i in range(k)
    ]


def _teacher_forced(model, processor, request, token_ids, temperature):
    enc = encode_for_generation(processor, [request.prompt], [request.images])
    completion = torch.tensor([token_ids])
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(completion)], 1)
    ids = torch.cat([enc["input_ids"], completion], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0]
    logits = logits[enc["input_ids"].shape[1] - 1 : -1].float() / (temperature or 1.0)
    return torch.log_softmax(logits, -1).gather(-1, completion[0, :, None])[:, 0]


def _max_logprob_error(rollouts, model, processor, temperature) -> float:
    return max(
        (_teacher_forced(model, processor, r.request, c.token_ids, temperature) - torch.tensor(c.logprobs))
        .abs()
        .max()
        .item()
        for r in rollouts
        for c in r.completions
    )


def test_two_workers_return_n_completions_with_teacher_forced_logprobs(group, local):
    requests = _requests(6, "a", n=3, temperature=0.8)
    rollouts = group.generate(requests)
    assert [r.request.uid for r in rollouts] == [r.uid for r in requests]
    assert all(len(r.completions) == 3 and r.policy_version == 0 for r in rollouts)
    assert {r.worker for r in rollouts} == {"rollout-0", "rollout-1"}  # the work was spread
    assert _max_logprob_error(rollouts, *local, temperature=0.8) < 1e-4
    # async: submit now, collect later, in submission order
    tickets = group.submit(_requests(3, "b"))
    assert len(tickets) == 3 and group.outstanding == 3
    assert [r.request.uid for r in group.wait(timeout=60)] == ["b0", "b1", "b2"] and group.outstanding == 0


def test_loaded_weights_change_outputs_and_bump_the_version(group, local):
    model, processor = local
    greedy = _requests(4, "g", temperature=0.0)
    before = group.generate(greedy)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    group.load_weights(list(model.named_parameters()), version=1)
    after = group.generate(greedy)
    assert group.version == 1 and all(r.policy_version == 1 for r in after)
    assert [r.completions[0].logprobs for r in before] != [r.completions[0].logprobs for r in after]
    assert _max_logprob_error(after, model, processor, temperature=0.0) < 1e-4
    prints = ray.get([h.model_fingerprint.remote() for _, h in group.workers])
    assert prints == pytest.approx([weights_fingerprint(model.parameters())] * 2, rel=1e-9)


def _busy_worker(group, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in group._workers:
            if w.inflight:
                return w
        time.sleep(0.05)
    raise AssertionError("no worker had a call in flight")


def test_killed_worker_is_replaced_and_every_request_comes_back_once(group, local):
    requests = _requests(12, "k", max_tokens=16)
    group.submit(requests)
    victim = _busy_worker(group)  # a call is in flight: killing it now loses that call either way
    ray.kill(victim.handle, no_restart=True)
    rollouts = group.wait(timeout=120)
    assert sorted(r.request.uid for r in rollouts) == sorted(r.uid for r in requests)  # each exactly once
    assert group.restarts == 1 and group.requeued >= 1 and group.outstanding == 0
    assert victim.id not in dict(group.workers)  # (calls it finished before dying were kept)
    # The replacement holds the checkpoint's weights (version 0): no work until it is synced.
    (fresh,) = group.workers_needing_sync()
    assert fresh == "rollout-2" and group.num_workers == 2
    group.load_weights(list(local[0].named_parameters()), version=1)  # loads only the stale worker
    assert group.workers_needing_sync() == []
    rollouts = group.generate(_requests(6, "s"))
    assert "rollout-2" in {r.worker for r in rollouts} and all(r.policy_version == 1 for r in rollouts)


def test_add_and_remove_workers_while_requests_are_in_flight(group, local):
    requests = _requests(12, "e", max_tokens=12)
    requeued = group.requeued
    group.submit(requests)
    (added,) = group.add_workers(1)
    assert group.workers_needing_sync() == [added]
    removed = group.remove_workers(1)
    assert removed == [added]  # an unsynced worker goes first
    (added,) = group.add_workers(1)
    handle = dict(group.workers)[added]
    ray.get(handle.load_weights.remote(list(local[0].named_parameters()), 1))
    group.mark_synced([added], 1)
    busy = _busy_worker(group)
    handles = dict(group.workers)
    assert group.remove_workers(worker_ids=[busy.id]) == [busy.id]  # drains, then it is killed
    rollouts = group.wait(timeout=120)
    assert sorted(r.request.uid for r in rollouts) == sorted(r.uid for r in requests)  # none lost
    assert group.num_workers == 2 and busy.id not in dict(group.workers) and group.requeued == requeued
    assert busy.id in {r.worker for r in rollouts}  # its in-flight calls finished and were kept
    with pytest.raises(RayActorError):
        ray.get(handles[busy.id].ping.remote(), timeout=30)
    # A death noticed elsewhere (e.g. by the weight broadcaster): replaced, and stale until synced.
    restarts, victim = group.restarts, group.workers[0][0]
    new = group.replace_worker(victim)
    assert group.restarts == restarts + 1 and group.workers_needing_sync() == [new]
    group.sleep(), group.wake()  # no-ops for CPU engines, but they reach every worker
