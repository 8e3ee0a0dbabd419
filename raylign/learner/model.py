"""Build the policy the learner trains: load, freeze the vision tower, add LoRA, and find its parts.

The learner computes logprobs from the final hidden states with the LM head applied in chunks, so
it needs the *backbone* (``model.model``: vision tower + language model, returning hidden states)
and the *LM head* (``model.lm_head``) of the Hugging Face model separately. Both exist on every
``*ForConditionalGeneration`` VLM in transformers 5 (Qwen2/2.5-VL, LLaVA, ...), with or without
PEFT adapters injected into their layers.
"""

from __future__ import annotations

import torch
from torch import nn

from raylign.config import LoraConfig, ModelConfig
from raylign.models.loading import load_model, vision_module_prefixes

PEFT_PREFIX = "base_model.model."  # what peft puts before every parameter name of the wrapped model
ALL_LINEAR = "all-linear"


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside ``model`` (unwraps a PEFT model; its LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(backbone, lm_head)``: the module giving ``last_hidden_state`` and the vocabulary projection."""
    hf = hf_model(model)
    backbone, head = getattr(hf, "model", None), hf.get_output_embeddings()
    if backbone is None or head is None:
        raise TypeError(
            f"{type(hf).__name__} has no .model backbone and LM head; raylign trains *ForConditionalGeneration "
            "VLMs loaded with AutoModelForImageTextToText"
        )
    return backbone, head


def language_linear_names(model: nn.Module) -> list[str]:
    """Full names of the language model's linear layers (LoRA's "all-linear"): no vision tower, no LM head."""
    skip = vision_module_prefixes(model)
    head = model.get_output_embeddings()
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and not name.startswith(skip)
    ]


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` in PEFT LoRA adapters; ``all-linear`` means the language model's linear layers only."""
    import peft

    targets = list(cfg.target_modules)
    if targets == [ALL_LINEAR]:
        targets = language_linear_names(model)
    lora = peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets
    )
    return peft.get_peft_model(model, lora)


def build_policy(cfg: ModelConfig, dtype: torch.dtype) -> nn.Module:
    """The trainable policy on CPU in ``dtype``: loaded, vision tower frozen on request, LoRA when ``lora.r > 0``.

    Gradient checkpointing uses the non-reentrant variant, which needs no input gradients (LoRA
    with a frozen embedding works) and lets ZeRO-3 fetch parameters again during the recomputation.
    """
    model = load_model(
        cfg.name_or_path, dtype=_dtype_name(dtype), attn_implementation=cfg.attn_implementation
    )
    if cfg.freeze_vision_tower:
        prefixes = vision_module_prefixes(model)
        if not prefixes:
            raise ValueError(
                f"model.freeze_vision_tower is set but {cfg.name_or_path} has no vision tower to freeze"
            )
        for name, p in model.named_parameters():
            if name.startswith(prefixes):
                p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.r > 0:
        model = add_lora(model, cfg.lora)
    return model


def build_reference(cfg: ModelConfig, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of the initial policy (eval mode, no gradients)."""
    model = load_model(
        cfg.name_or_path, dtype=_dtype_name(dtype), attn_implementation=cfg.attn_implementation
    )
    return model.eval().requires_grad_(False)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def export_name(name: str) -> str:
    """A (possibly PEFT-wrapped) parameter name as the plain HF model names it."""
    name = name.removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer.", ".")


def is_lora_param(name: str) -> bool:
    """True for adapter weights (``lora_A``/``lora_B``/...), which merge into their base layer on export."""
    return any(
        f".{part}." in name
        for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    )
