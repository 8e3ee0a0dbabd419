"""Methods mixed into vLLM's GPU workers (``worker_extension_cls``), called through ``llm.collective_rpc``.

vLLM runs the model in its own worker process(es), one per tensor-parallel rank; an extension class
is how code reaches the model there. Every rank receives the full HF-named tensors and vLLM's own
``model.load_weights`` maps HF names to its fused/sharded parameters (qkv, gate_up, TP shards).

This module imports nothing from vLLM, so it can be imported (and named in a config) anywhere.
"""

from __future__ import annotations

import torch


class WeightLoaderExtension:
    """Weight-sync entry points of a vLLM worker; ``self`` is vLLM's worker (has ``model_runner``)."""

    def raylign_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Load one bucket of ``(hf_name, tensor)`` pairs into this rank's model; returns the count."""
        model = self.model_runner.model
        device = next(model.parameters()).device
        model.load_weights(weights=((name, t.to(device, non_blocking=True)) for name, t in named_tensors))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the host copies must be done before the caller frees them
        return len(named_tensors)

    def raylign_fingerprint(self) -> float:
        """Float64 sum of |w| over this rank's (fused, possibly sharded) parameters."""
        model = self.model_runner.model
        return float(sum(p.detach().double().abs().sum().item() for p in model.parameters()))
