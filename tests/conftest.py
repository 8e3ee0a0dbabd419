"""Markers follow the directory a test lives in, so a test cannot be filed under the wrong tier."""

from __future__ import annotations

import pytest

_TIERS = ("unit", "actors", "e2e", "cluster", "gpu", "vllm_cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: multi-node Ray clusters on one machine (tests/cluster, `make test-cluster`)")
    config.addinivalue_line("markers", "vllm_cpu: real vLLM code on CPU, in .venv-vllm (tests/vllm_cpu, `make test-vllm`)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = item.path.parts
        tier = next((t for t in _TIERS if t in parts), None)
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: tests live under tests/{{{','.join(_TIERS)}}}/")
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL saved as an HF directory (built once per test session)."""
    from raylign.models.tiny import make_tiny_model

    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("tiny_qwen"))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny random LLaVA (SigLIP + Qwen2) saved as an HF directory."""
    from raylign.models.tiny import make_tiny_model

    return make_tiny_model("llava", tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session", params=["qwen2_5_vl", "llava"])
def tiny_model_dir(request, tiny_qwen_dir, tiny_llava_dir):
    """Both tiny families, for tests that must hold on each."""
    return tiny_qwen_dir if request.param == "qwen2_5_vl" else tiny_llava_dir
