"""Defect 8: a tiny Qwen2.5-VL (and a raylign checkpoint's processor) is saved as the stock files, so
``AutoProcessor`` and vLLM read it unchanged; the torchvision-free processor is only a load-time
substitute inside raylign. (vLLM reading it: every engine in tests/vllm_cpu is built on such a directory.)"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from transformers import AutoProcessor, Qwen2_5_VLProcessor

from raylign.models.loading import Qwen2_5_VLImageOnlyProcessor, load_processor
from raylign.models.tiny import make_tiny_model

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def _config(path) -> dict:
    return json.loads((path / "processor_config.json").read_text())


def test_saved_processor_files_are_the_stock_ones(tiny_qwen_dir):
    config = _config(tiny_qwen_dir)
    assert config["processor_class"] == "Qwen2_5_VLProcessor"
    assert config["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"
    video, image = config["video_processor"], config["image_processor"]
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    for key in ("patch_size", "temporal_patch_size", "merge_size", "size", "image_mean", "image_std"):
        assert video[key] == image[key], key


def test_auto_processor_reads_the_stock_class(tiny_qwen_dir):
    """Before: AutoProcessor returned a bare tokenizer (the saved class was raylign's own)."""
    if HAS_TORCHVISION:
        assert type(AutoProcessor.from_pretrained(str(tiny_qwen_dir))) is Qwen2_5_VLProcessor
        return
    with pytest.raises(ImportError, match="[Tt]orchvision"):  # the stock video processor's own requirement
        AutoProcessor.from_pretrained(str(tiny_qwen_dir))


def test_checkpoint_processor_round_trips_as_stock_files(tiny_qwen_dir, tmp_path):
    processor = load_processor(tiny_qwen_dir)
    if not HAS_TORCHVISION:
        assert isinstance(processor, Qwen2_5_VLImageOnlyProcessor)
        with pytest.raises(ValueError, match="videos need torchvision"):
            processor.video_processor([])
    processor.save_pretrained(tmp_path)  # what a learner checkpoint writes
    assert _config(tmp_path) == _config(tiny_qwen_dir)
    shutil.copy(tiny_qwen_dir / "config.json", tmp_path)
    again = load_processor(tmp_path)
    assert again.image_processor.to_dict() == processor.image_processor.to_dict()


def test_directories_saved_with_raylign_s_old_class_name_still_load(tmp_path):
    path = make_tiny_model("qwen2_5_vl", tmp_path)
    config = _config(path)
    config["processor_class"] = "Qwen2_5_VLImageOnlyProcessor"
    del config["video_processor"]
    (path / "processor_config.json").write_text(json.dumps(config))
    assert isinstance(load_processor(path), Qwen2_5_VLImageOnlyProcessor)
