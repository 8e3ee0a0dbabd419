"""raylign.algos imports and runs with ray, deepspeed, vllm and transformers unavailable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = ("ray", "deepspeed", "vllm", "transformers", "trl", "accelerate")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked by test_layering: {name}")
            return None

    sys.meta_path.insert(0, Block())
    import torch
    import raylign.algos as algos

    logps = torch.randn(2, 3, requires_grad=True)
    loss, metrics = algos.policy_loss(
        logps, logps.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 3), algos.PolicyLossConfig(),
        sampler_logprobs=logps.detach(),
    )
    loss.backward()
    algos.sft_loss(logps, torch.ones(2, 3))
    algos.dpo_loss(*torch.randn(4, 2), algos.DPOLossConfig())
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("OK", float(loss))
    """
)


def test_algos_import_without_heavy_dependencies():
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK")


def test_blocker_really_blocks():
    """Guard: the finder must make a blocked import fail, or the test above proves nothing."""
    script = (
        _SCRIPT.split("sys.meta_path.insert(0, Block())")[0]
        + "sys.meta_path.insert(0, Block())\nimport ray\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode != 0 and "blocked by test_layering: ray" in proc.stderr
