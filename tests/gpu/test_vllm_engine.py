"""Rollout engines on a CUDA GPU: VLLMEngine (needs vLLM) and TransformersEngine(device="cuda").

vLLM: n completions with images, logprobs against the learner's teacher forcing, weights through
the receiver in vLLM's worker (layerwise reload), the encoder cache reset, sleep/wake. The same
checks run on CPU with real vLLM in tests/vllm_cpu; jobs/gpu_smoke.py is the one-line-per-check version.
The tiny model has text hidden 256 (head_dim 64), which vLLM's attention kernels accept, and is
used as raylign saves it (stock processor files).
"""

from __future__ import annotations

import pytest
import torch

from raylign.models.loading import load_model, load_processor
from vllm_reference import max_logprob_error, perturb, requests

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from raylign.models.tiny import make_tiny_model

    return str(make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("gpu_qwen"), hidden=256))


def test_transformers_engine_on_cuda(tiny_dir):
    from raylign.rollout.hf import TransformersEngine

    engine = TransformersEngine(tiny_dir, device="cuda", dtype="float32")
    rollouts = engine.generate(requests(n=4, temperature=0.7))
    assert all(len(r.completions) == 4 for r in rollouts)
    assert max_logprob_error(engine.model, engine.processor, rollouts, 0.7, engine.suppressed_ids) < 1e-2
    engine.sleep()
    assert next(engine.model.parameters()).device.type == "cpu"
    engine.wake()
    assert next(engine.model.parameters()).device.type == "cuda"


@pytest.fixture(scope="module")
def vllm_engine(tiny_dir):
    pytest.importorskip("vllm")
    from raylign.rollout.vllm import VLLMEngine

    return VLLMEngine(
        tiny_dir,
        dtype="float32",  # compare with an fp32 HF forward pass at a tight tolerance
        gpu_memory_utilization=0.2,
        max_model_len=1024,
        enable_sleep_mode=True,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 2, "video": 0},
    )


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return load_model(tiny_dir, dtype="float32", device="cuda"), load_processor(tiny_dir)


def test_vllm_generates_n_completions_with_matching_logprobs(vllm_engine, hf):
    rollouts = vllm_engine.generate(requests(n=4, temperature=0.7))
    assert [r.request.uid for r in rollouts] == ["img", "two", "txt"]
    for r in rollouts:
        assert len(r.completions) == 4 and r.policy_version == 0
        assert all(not set(c.token_ids) & set(vllm_engine.suppressed_ids) for c in r.completions)
    assert max_logprob_error(*hf, rollouts, 0.7, vllm_engine.suppressed_ids) < 1e-3


def test_vllm_vision_update_reaches_a_repeated_image(vllm_engine, hf):
    model, processor = hf
    greedy = requests(n=1, temperature=0.0)
    vllm_engine.generate(greedy)  # the images' encoder outputs are cached now
    changed = perturb(model, "model.visual.", scale=0.5)
    vllm_engine.load_weights(changed, version=1)
    assert max_logprob_error(model, processor, vllm_engine.generate(greedy), 0.0, vllm_engine.suppressed_ids) < 1e-3


def test_vllm_loads_hf_named_weights_in_buckets(vllm_engine, hf):
    model, processor = hf
    fingerprint = vllm_engine.model_fingerprint()
    named = perturb(model, scale=0.05, seed=2)
    half = len(named) // 2
    vllm_engine.load_weights(named[:half])
    vllm_engine.load_weights(named[half:])
    vllm_engine.set_version(2)
    after = vllm_engine.generate(requests(n=2, temperature=1.0, seed=1))
    assert vllm_engine.version == 2 and all(r.policy_version == 2 for r in after)
    assert vllm_engine.model_fingerprint() != pytest.approx(fingerprint)
    assert max_logprob_error(model, processor, after, 1.0, vllm_engine.suppressed_ids) < 1e-3


def test_vllm_sleep_and_wake(vllm_engine, hf):
    free_before = torch.cuda.mem_get_info()[0]
    vllm_engine.sleep()
    assert torch.cuda.mem_get_info()[0] > free_before
    with pytest.raises(RuntimeError, match="asleep"):
        vllm_engine.generate(requests(n=1))
    vllm_engine.wake()
    vllm_engine.load_weights(list(hf[0].named_parameters()), version=3)
    assert len(vllm_engine.generate(requests(n=1))[0].completions) == 1


def test_gpu_smoke_script_passes():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "jobs" / "gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("gpu_smoke", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = module
    spec.loader.exec_module(module)
    assert module.main(["--only", "optimizer,engine,generate,load_tensor,vision_cache"]) == 0
