"""Tiny, randomly initialised VLMs built offline, saved as ordinary Hugging Face directories.

Two families, so every code path is exercised on more than one architecture:
- ``qwen2_5_vl``: Qwen2.5-VL (windowed ViT, 3-D mRoPE, dynamic resolution), ~0.3M parameters;
- ``llava``: LLaVA with a SigLIP vision tower and a Qwen2 text model (fixed resolution).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from raylign.models.tokenizer import train_tokenizer

Family = Literal["qwen2_5_vl", "llava"]
FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "llava")

# Small images keep CPU tests fast: at most 56x56 pixels -> 16 patches -> 4 image tokens for Qwen.
QWEN_MIN_PIXELS = 28 * 28
QWEN_MAX_PIXELS = 56 * 56
LLAVA_IMAGE_SIZE = 32
LLAVA_PATCH = 8


def _text_dims(vocab_size: int, hidden: int = 64) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


def _qwen(tokenizer, hidden: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from raylign.models.loading import Qwen2_5_VLImageOnlyProcessor

    ids = tokenizer.convert_tokens_to_ids
    half = hidden // 4 // 2  # mrope_section (t, h, w) must sum to head_dim / 2
    hw = half * 3 // 8
    config = Qwen2_5_VLConfig(
        text_config=dict(
            **_text_dims(len(tokenizer), hidden),
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e4,
                "mrope_section": [half - 2 * hw, hw, hw],
            },
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=QWEN_MIN_PIXELS,
        max_pixels=QWEN_MAX_PIXELS,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    processor = Qwen2_5_VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def _llava(tokenizer, hidden: int):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessorPil

    config = LlavaConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=LLAVA_IMAGE_SIZE,
            patch_size=LLAVA_PATCH,
        ),
        text_config=dict(model_type="qwen2", **_text_dims(len(tokenizer), hidden)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(config)
    image_processor = SiglipImageProcessorPil(size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_PATCH,
        vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template,
        image_token="<image>",
    )
    return model, processor


def build_tiny_model(family: Family, seed: int = 0, hidden: int = 64):
    """Return ``(model, processor)`` of a tiny random VLM of ``family`` (fp32, eval mode)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    tokenizer = train_tokenizer(family)
    torch.manual_seed(seed)
    model, processor = (_qwen if family == "qwen2_5_vl" else _llava)(tokenizer, hidden)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    return model.eval(), processor


def make_tiny_model(family: Family, out: str | Path, seed: int = 0, hidden: int = 64) -> Path:
    """Build a tiny VLM of ``family`` and save model, tokenizer and processor to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_model(family, seed=seed, hidden=hidden)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
