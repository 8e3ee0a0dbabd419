"""The vLLM weight path's plain parts, without vLLM: the layout that crosses ``collective_rpc``, the
engine process feeding its workers over a real gloo group, the engine options (defects 2, 7), the
level-2 sleep rule (defect 6). Real vLLM runs the same code in tests/vllm_cpu."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from raylign.config import load_config
from raylign.driver.online import engine_kwargs
from raylign.rollout.engine import EngineSpec
from raylign.rollout.vllm import LOGPROBS_MODE, vllm_options
from raylign.rollout.vllm_feed import LocalFeed
from raylign.rollout.vllm_worker import EXTENSION, WeightReceiverExtension, tied_heads
from raylign.sync.broadcaster import WeightBroadcaster, sleep_discards_weights
from raylign.sync.buckets import WeightLayout, layout_from_plain, layout_to_plain, spec_of


def test_layout_crosses_rpc_as_plain_lists():
    bucket = [("a.weight", torch.zeros(3, 5)), ("b", torch.zeros(7, dtype=torch.bfloat16))]
    layout = WeightLayout((spec_of(bucket), spec_of(bucket[1:])), "cuda")
    plain = layout_to_plain(layout)

    def plain_only(x):
        return all(plain_only(v) for v in x) if isinstance(x, list) else isinstance(x, (str, int))

    assert plain_only(plain) and layout_from_plain(plain) == layout


class _Model(torch.nn.Module):
    """Stands in for vLLM's model: ``load_weights`` takes (hf_name, tensor) pairs, as vLLM's does."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4, 3), requires_grad=False)
        self.b = torch.nn.Parameter(torch.zeros(5), requires_grad=False)
        self.kept: list[torch.Tensor] = []

    def load_weights(self, weights):
        for name, t in weights:
            if name not in ("w", "b"):
                raise KeyError(f"no parameter {name}")
            getattr(self, name).data.copy_(t)
            self.kept.append(t)  # vLLM's layerwise reload keeps them until a layer is complete


class _Worker(WeightReceiverExtension):
    """vLLM's worker with the extension mixed in; vLLM's layerwise reload is what tests/vllm_cpu checks."""

    def __init__(self):
        self.model_runner = SimpleNamespace(model=_Model())
        self.rank = 0
        self.reloads = []

    def _raylign_begin_update(self):
        if not getattr(self, "_raylign_reloading", False):
            self.reloads.append("begin")
            self._raylign_reloading = True

    def raylign_finish_update(self):
        if getattr(self, "_raylign_reloading", False):
            self.reloads.append("finish")
            self._raylign_reloading = False


def _rpc(worker):
    """``llm.collective_rpc`` with one worker in this process (vLLM's in-process mode)."""
    return lambda method, args=(): [getattr(worker, method)(*args)]


def test_engine_feeds_its_workers_over_a_gloo_group():
    worker = _Worker()
    feed = LocalFeed(_rpc(worker), ranks=1, timeout_s=20)
    w, b = torch.randn(4, 3), torch.randn(5)
    assert feed.send([("w", w)]) == 1 and feed.send([("b", b)]) == 1
    feed.finish()
    model = worker.model_runner.model
    assert torch.equal(model.w, w) and torch.equal(model.b, b)
    assert worker.reloads == ["begin", "finish"]  # one reload across the buckets of one update
    # The worker got tensors of its own, not views into the reused receive buffers.
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in model.kept)
    feed.close()


def test_a_bucket_the_model_refuses_is_an_error_and_the_next_update_works():
    worker = _Worker()
    feed = LocalFeed(_rpc(worker), ranks=1, timeout_s=20)
    with pytest.raises(RuntimeError, match="no parameter nope"):
        feed.send([("nope", torch.ones(2))])
    assert worker.reloads == ["begin", "finish"]  # the reload was closed on the failure
    w = torch.randn(4, 3)
    assert feed.send([("w", w)]) == 1  # over a new group
    feed.finish()
    assert torch.equal(worker.model_runner.model.w, w)
    feed.close()


def test_tied_heads_are_the_heads_sharing_an_embedding_weight():
    class VocabParallelEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(3, 2))

    class ParallelLMHead(VocabParallelEmbedding):
        quant_method = None

    emb, tied, untied = VocabParallelEmbedding(), ParallelLMHead(), ParallelLMHead()
    tied.weight = emb.weight
    model = torch.nn.ModuleList([emb, tied, untied])
    assert tied_heads(model) == [tied]


ACCEPTED = {"model", "dtype", "tensor_parallel_size", "max_model_len", "logprobs_mode", "worker_extension_cls",
            "enforce_eager", "gpu_memory_utilization", "enable_sleep_mode", "seed"}  # fmt: skip


def test_vllm_options_refuse_keys_vllm_does_not_take():
    options = vllm_options("m", torch.bfloat16, {"seed": 1}, {"enforce_eager": True}, ACCEPTED)
    assert options == {"model": "m", "dtype": "bfloat16", "seed": 1, "enforce_eager": True,
                       "logprobs_mode": LOGPROBS_MODE, "worker_extension_cls": EXTENSION}  # fmt: skip
    with pytest.raises(ValueError, match=r"rollout.engine_kwargs: vLLM's EngineArgs has no batch_size"):
        vllm_options("m", torch.bfloat16, {}, {"batch_size": 8}, ACCEPTED)
    with pytest.raises(ValueError, match="did you mean enforce_eager"):
        vllm_options("m", torch.bfloat16, {}, {"enforce_eagre": True}, ACCEPTED)


def _online(*overrides):
    return load_config(None, ["--model.name_or_path=m", "--data.train=d", *overrides], method="grpo")


def test_engine_kwargs_for_vllm_have_no_batch_size_and_a_bounded_context():
    cfg = _online("--rollout.engine=vllm", "--data.max_prompt_length=300", "--grpo.max_completion_length=50")
    kwargs = engine_kwargs(cfg, "cuda")
    assert "batch_size" not in kwargs and "device" not in kwargs
    assert kwargs["max_model_len"] == 350  # not None: vLLM would size its KV cache for the model's context
    assert engine_kwargs(_online("--rollout.engine=vllm", "--rollout.max_model_len=4096"), "cuda")[
        "max_model_len"
    ] == 4096
    hf = engine_kwargs(_online("--rollout.batch_size=3"), "cpu")
    assert hf == {"batch_size": 3, "device": "cpu"}


def test_level_2_sleep_makes_every_sync_carry_every_weight():
    level2 = {"enable_sleep_mode": True, "sleep_level": 2}
    assert sleep_discards_weights("vllm", level2)
    assert not sleep_discards_weights("vllm", {"enable_sleep_mode": True})  # level 1 keeps the weights
    assert not sleep_discards_weights("vllm", {"sleep_level": 2})  # never sleeps
    assert not sleep_discards_weights("transformers", level2)
    learners = SimpleNamespace(local_learner=object(), local_worker=None, actors=[])
    for kwargs, expect in ((level2, False), ({"enable_sleep_mode": True}, True)):
        rollouts = SimpleNamespace(local=object(), colocated=False, version=0, spec=EngineSpec("vllm", "m", kwargs))
        broadcaster = WeightBroadcaster(learners, rollouts, _online().sync, trainable_only=True)
        assert broadcaster.trainable_only is expect and broadcaster.transport.trainable_only is expect
