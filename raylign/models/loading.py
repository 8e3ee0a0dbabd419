"""Load VLMs and their processors from Hugging Face directories (or hub names when a hub is reachable).

One place decides how a checkpoint becomes ``(model, processor)``, so the learner, the rollout
engines and the tests all see the same objects.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin, Qwen2_5_VLProcessor
from transformers.processing_utils import VideosKwargs

from raylign.models.source import check_model_source

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NoVideoProcessor:
    """Stands in for Qwen2-VL's torchvision-backed video processor: raylign feeds images only.

    vLLM reads ``video_processor.valid_kwargs`` of every processor whose model supports video; a
    video itself is refused with what to install.
    """

    valid_kwargs = VideosKwargs

    def __call__(self, *args, **kwargs):
        raise ValueError("videos need torchvision (Qwen2VLVideoProcessor); raylign's image-only processor takes images")


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without the video half: a load-time substitute where torchvision is missing.

    In transformers 5.x the stock processor requires a torchvision-backed video processor, and
    torchvision cannot be installed next to a CPU torch (see ENVIRONMENT.md). It saves the stock
    files (``processor_class: Qwen2_5_VLProcessor`` and a video processor config derived from the
    image settings), so a directory it writes loads unchanged in ``AutoProcessor`` and vLLM wherever
    torchvision exists.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)  # a saved video config; this processor has no video half
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.video_processor = NoVideoProcessor()

    def to_dict(self) -> dict:
        """What the stock ``Qwen2_5_VLProcessor`` saves for the same image settings."""
        out = super().to_dict()
        out["processor_class"] = STOCK_QWEN_PROCESSOR
        out["video_processor"] = video_config_of(out["image_processor"])
        return out


STOCK_QWEN_PROCESSOR = "Qwen2_5_VLProcessor"
_VIDEO_KEYS = (
    "do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std", "merge_size",
    "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size",
)  # fmt: skip


def video_config_of(image_config: dict) -> dict:
    """A ``Qwen2VLVideoProcessor`` config with the image processor's resize and normalisation settings."""
    video = {k: image_config[k] for k in _VIDEO_KEYS if k in image_config}
    return {**video, "video_processor_type": "Qwen2VLVideoProcessor"}


def resolve_dtype(dtype: str, device: str | torch.device = "cpu") -> torch.dtype:
    """``auto`` means bf16 on a GPU and fp32 on a CPU (CPU bf16 matmuls are slow and imprecise)."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _processor_class_name(path: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = path / name
        if f.is_file():
            cls = json.loads(f.read_text()).get("processor_class")
            if cls:
                return cls
    return None


def load_processor(name_or_path: str | Path, **kwargs) -> ProcessorMixin:
    """Load the processor (tokenizer + image processor + chat template) of a VLM.

    Qwen2.5-VL directories load as :class:`Qwen2_5_VLImageOnlyProcessor` when torchvision is
    missing, so the same checkpoint works on CPU-only machines and GPU clusters.
    """
    path = Path(name_or_path)
    check_model_source(name_or_path)  # a missing dir / offline hub: one line, not a hub client traceback
    cls_name = _processor_class_name(path) if path.is_dir() else None
    if cls_name == Qwen2_5_VLImageOnlyProcessor.__name__ or (
        cls_name in ("Qwen2_5_VLProcessor", "Qwen2VLProcessor") and not _has_torchvision()
    ):
        return Qwen2_5_VLImageOnlyProcessor.from_pretrained(str(name_or_path), **kwargs)
    return AutoProcessor.from_pretrained(str(name_or_path), **kwargs)


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def load_model(
    name_or_path: str | Path,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
) -> torch.nn.Module:
    """Load an image-text-to-text model with ``AutoModelForImageTextToText`` (what vLLM and users load too)."""
    check_model_source(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(
        str(name_or_path),
        dtype=resolve_dtype(dtype, device),
        attn_implementation=attn_implementation,
    )
    return model.to(device)


def is_qwen_vl(model_or_config) -> bool:
    """Qwen-VL models take ``image_grid_thw`` and compute 3-D mRoPE positions."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", "").startswith("qwen2")


def vision_module_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the vision tower (and projector), for freezing it."""
    names = [n for n, _ in model.named_parameters()]
    keys = ("visual.", "vision_tower.", "multi_modal_projector.")
    return tuple(sorted({n[: n.index(k) + len(k)] for n in names for k in keys if k in n}))
