"""The vLLM engine's pure parts, checked without vLLM: prompt dicts with unexpanded image placeholders,
SamplingParams keyword arguments, and the message when vLLM is missing (the receiver: test_vllm_receiver)."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from raylign.models.loading import load_processor
from raylign.protocol import RolloutRequest, SamplingParams
from raylign.rollout.vllm import VLLM_MISSING, VLLMEngine, vllm_prompt, vllm_sampling_kwargs

IMG = Image.new("RGB", (48, 40), (200, 30, 30))


def test_prompt_keeps_one_unexpanded_placeholder_per_image(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    placeholder = processor.image_token
    request = RolloutRequest(uid="u", prompt="which is bigger?", images=(IMG, IMG))
    prompt = vllm_prompt(processor, request)
    assert set(prompt) == {"prompt", "multi_modal_data"}
    assert prompt["prompt"].count(placeholder) == 2  # vLLM expands each itself (TRL #6294 otherwise)
    assert all(a is b for a, b in zip(prompt["multi_modal_data"]["image"], request.images))
    assert prompt["prompt"].endswith("<|im_start|>assistant\n") and "which is bigger?" in prompt["prompt"]
    # The HF processor, given the images, expands the same text into many more image tokens.
    expanded = processor(text=[prompt["prompt"]], images=[list(request.images)], return_tensors="pt")
    assert (expanded["input_ids"] == processor.image_token_id).sum() > 2
    chat = [{"role": "user", "content": "hi"}]
    assert vllm_prompt(processor, RolloutRequest(uid="t", prompt=chat)) == {
        "prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    }


def test_sampling_kwargs_map_every_setting():
    s = SamplingParams(n=4, temperature=0.9, top_p=0.95, top_k=0, max_tokens=17, stop=("</answer>",), seed=7)
    kwargs = vllm_sampling_kwargs(s, suppressed_ids=(6, 7))
    assert kwargs == {
        "n": 4, "temperature": 0.9, "top_p": 0.95, "top_k": -1, "max_tokens": 17, "stop": ["</answer>"],
        "include_stop_str_in_output": True, "seed": 7, "logprobs": 0, "skip_special_tokens": True,
        "logit_bias": {6: -100.0, 7: -100.0},
    }  # fmt: skip
    assert vllm_sampling_kwargs(SamplingParams(top_k=20))["top_k"] == 20
    assert vllm_sampling_kwargs(SamplingParams())["logit_bias"] is None


def test_sampling_kwargs_are_accepted_by_real_vllm():
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm runs with it)")
    params = vllm.SamplingParams(**vllm_sampling_kwargs(SamplingParams(n=2, top_k=5), (3,)))
    assert params.n == 2 and params.logprobs == 0 and params.top_k == 5


def test_missing_vllm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError) as err:
        VLLMEngine("any/model")
    assert str(err.value) == VLLM_MISSING and "rollout.engine=transformers" in VLLM_MISSING
