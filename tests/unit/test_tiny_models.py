"""The tiny offline VLMs round-trip through save/load with identical logits, on both families."""

from __future__ import annotations

import torch
from PIL import Image

from raylign.models.loading import load_model, load_processor, vision_module_prefixes
from raylign.models.tiny import build_tiny_model, make_tiny_model


def _inputs(processor):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many red circles?"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    return processor(text=[text], images=[[image]], return_tensors="pt")


def test_round_trip_gives_identical_logits(tiny_model_dir):
    model = load_model(tiny_model_dir)
    processor = load_processor(tiny_model_dir)
    family = "qwen2_5_vl" if "qwen" in type(model).__name__.lower() else "llava"
    fresh, _ = build_tiny_model(family)
    batch = _inputs(processor)
    with torch.no_grad():
        loaded = model(**batch).logits
        built = fresh(**batch).logits
    assert loaded.shape[-1] == len(processor.tokenizer)
    assert torch.equal(loaded, built)


def test_chat_template_and_special_tokens(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    tok = processor.tokenizer
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "<think>a</think><answer>1</answer>"},
    ]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "<think>a</think><answer>1</answer><|im_end|>"
    assert tok.convert_tokens_to_ids("<answer>") != tok.unk_token_id
    assert tok.decode(tok.encode("<think>x</think>"), skip_special_tokens=True) == "<think>x</think>"


def test_make_tiny_model_is_deterministic(tmp_path):
    a = load_model(make_tiny_model("llava", tmp_path / "a"))
    b = load_model(make_tiny_model("llava", tmp_path / "b"))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert vision_module_prefixes(a)
