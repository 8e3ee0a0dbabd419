"""Rollout engines on a CUDA GPU: VLLMEngine (needs vLLM) and TransformersEngine(device="cuda").

vLLM: n completions with images, logprobs against an HF teacher-forced pass, weights loaded through
the worker extension (HF names -> vLLM's fused parameters), version bump, sleep/wake.
The tiny model uses a text hidden size of 256 (head_dim 64), which vLLM's attention kernels accept.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from raylign.data.chat import encode_for_generation
from raylign.models.loading import load_model, load_processor
from raylign.protocol import RolloutRequest, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

IMG = Image.new("RGB", (56, 56), (200, 30, 30))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from raylign.models.tiny import make_tiny_model

    path = make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("gpu_qwen"), hidden=256)
    # vLLM builds the stock Qwen2_5_VLProcessor, which wants a video processor config; hub
    # checkpoints have one, the image-only tiny processor does not: reuse the image settings.
    config_file = path / "processor_config.json"
    config = json.loads(config_file.read_text())
    video = {k: v for k, v in config["image_processor"].items() if k != "image_processor_type"}
    config["video_processor"] = {**video, "video_processor_type": "Qwen2VLVideoProcessor"}
    config_file.write_text(json.dumps(config, indent=2))
    return str(path)


def _requests(**sampling) -> list[RolloutRequest]:
    s = SamplingParams(**{"n": 4, "temperature": 1.0, "max_tokens": 12, **sampling})
    return [
        RolloutRequest(uid="img", prompt="how many red circles?", images=(IMG,), sampling=s),
        RolloutRequest(uid="two", prompt="which is bigger?", images=(IMG, IMG), sampling=s),
        RolloutRequest(uid="txt", prompt=[{"role": "user", "content": "count"}], sampling=s),
    ]


def _teacher_forced(model, processor, request, token_ids, temperature, masked=()):
    enc = encode_for_generation(processor, [request.prompt], [request.images]).to(model.device)
    completion = torch.tensor([token_ids], device=model.device)
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(completion)], 1)
    ids = torch.cat([enc["input_ids"], completion], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0]
    logits = logits[enc["input_ids"].shape[1] - 1 : -1].float() / (temperature or 1.0)
    logits[:, list(masked)] = float("-inf")  # vLLM's logprobs exclude the suppressed placeholders
    return torch.log_softmax(logits, -1).gather(-1, completion[0, :, None])[:, 0].cpu()


def _max_error(rollouts, model, processor, temperature, masked=()) -> float:
    return max(
        (
            _teacher_forced(model, processor, r.request, c.token_ids, temperature, masked)
            - torch.tensor(c.logprobs)
        )
        .abs()
        .max()
        .item()
        for r in rollouts
        for c in r.completions
    )


def test_transformers_engine_on_cuda(tiny_dir):
    from raylign.rollout.hf import TransformersEngine

    engine = TransformersEngine(tiny_dir, device="cuda", dtype="float32")
    rollouts = engine.generate(_requests(temperature=0.7))
    assert all(len(r.completions) == 4 for r in rollouts)
    assert _max_error(rollouts, engine.model, engine.processor, 0.7) < 1e-3
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


def test_vllm_generates_n_completions_with_matching_logprobs(vllm_engine, tiny_dir):
    model, processor = load_model(tiny_dir, dtype="float32", device="cuda"), load_processor(tiny_dir)
    rollouts = vllm_engine.generate(_requests(temperature=0.7))
    assert [r.request.uid for r in rollouts] == ["img", "two", "txt"]
    for r in rollouts:
        assert len(r.completions) == 4 and r.policy_version == 0
        for c in r.completions:
            assert len(c.token_ids) == len(c.logprobs) and c.finish_reason in ("stop", "length")
            assert not set(c.token_ids) & set(vllm_engine.suppressed_ids)
    assert _max_error(rollouts, model, processor, 0.7, vllm_engine.suppressed_ids) < 1e-3
    seeded = _requests(seed=3)[:1]
    assert vllm_engine.generate(seeded)[0].completions == vllm_engine.generate(seeded)[0].completions


def test_vllm_loads_hf_named_weights_in_buckets(vllm_engine, tiny_dir):
    model, processor = load_model(tiny_dir, dtype="float32", device="cuda"), load_processor(tiny_dir)
    greedy = _requests(n=1, temperature=0.0)
    before, fingerprint = vllm_engine.generate(greedy), vllm_engine.model_fingerprint()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    named = list(model.named_parameters())
    half = len(named) // 2
    vllm_engine.load_weights(named[:half])
    vllm_engine.load_weights(named[half:])
    vllm_engine.set_version(1)
    after = vllm_engine.generate(greedy)
    assert vllm_engine.version == 1 and all(r.policy_version == 1 for r in after)
    assert vllm_engine.model_fingerprint() != pytest.approx(fingerprint)
    assert [r.completions[0].token_ids for r in before] != [r.completions[0].token_ids for r in after]
    assert (
        _max_error(after, model, processor, 0.0, vllm_engine.suppressed_ids) < 1e-3
    )  # it holds the HF weights


def test_vllm_sleep_and_wake(vllm_engine):
    free_before = torch.cuda.mem_get_info()[0]
    vllm_engine.sleep()
    assert torch.cuda.mem_get_info()[0] > free_before
    with pytest.raises(RuntimeError, match="asleep"):
        vllm_engine.generate(_requests(n=1))
    vllm_engine.wake()
    assert len(vllm_engine.generate(_requests(n=1))[0].completions) == 1
