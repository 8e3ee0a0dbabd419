"""The rollout engine interface, the logprob definition every engine follows, and a small factory.

An engine turns :class:`RolloutRequest` s into :class:`Rollout` s: ``sampling.n`` completions per
prompt, each with its token ids, the sampling-time logprob of every token, the decoded text and a
finish reason, tagged with the engine's policy version. It also takes new weights.

Logprob definition (shared with the learner, as in TRL): the logprob of a sampled token is
``log_softmax(logits / temperature)[token]`` computed in float32 from the model's *raw* logits,
*without* top-p/top-k truncation (a temperature of 0, greedy decoding, counts as 1). Engines sample
from the truncated distribution when ``top_p < 1`` or ``top_k > 0`` but report this untruncated
logprob, so ``exp(learner_logprob - rollout_logprob)`` is exactly 1 for an unchanged policy.
(vLLM can only report the truncated one; see ``raylign.rollout.vllm``.)

Vision placeholder tokens (image/video pads, vision start/end) are never sampled: a completion that
contains one breaks the learner's forward pass ("image features and image tokens do not match"),
and a tiny random model emits them. They are suppressed when sampling. The transformers engine
still reports the logprob with the full normaliser; vLLM's renormalises without them, i.e. higher by
-log(1 - p_placeholders): nil for a trained model, about 0.008 on the random tiny models.

Weight loading is bucketed: a sync calls ``load_weights(bucket)`` once per bucket of
``(hf_name, tensor)`` pairs, named as in the learner's ``model.named_parameters()``, then
``set_version(v)`` once. ``load_weights(bucket, version=v)`` does both for a single bucket.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from raylign.protocol import Rollout, RolloutRequest

EngineKind = Literal["transformers", "vllm"]
ENGINE_KINDS: tuple[str, ...] = ("transformers", "vllm")
NamedTensors = Iterable[tuple[str, torch.Tensor]]


@runtime_checkable
class RolloutEngine(Protocol):
    """What a rollout worker needs from a generation backend."""

    @property
    def version(self) -> int:
        """Policy version of the weights currently loaded (bumped by ``set_version``)."""
        ...

    def generate(self, requests: Sequence[RolloutRequest]) -> list[Rollout]:
        """Sample ``request.sampling.n`` completions per request; one Rollout per request, in order."""
        ...

    def load_weights(self, named_tensors: NamedTensors, version: int | None = None) -> int:
        """Copy one bucket of HF-named tensors into the model; returns how many were loaded.

        With ``version`` set, the update is final and ``set_version(version)`` follows.
        """
        ...

    def set_version(self, version: int) -> None:
        """Finalise a weight update (all buckets loaded): outputs from now on carry ``version``."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory (weights and caches) where the engine can; ``wake`` undoes it."""
        ...

    def wake(self) -> None:
        """Reacquire what ``sleep`` released; generation and weight loading work again."""
        ...

    def model_fingerprint(self) -> float:
        """A cheap checksum of the weights (float64 sum of |w|), to check that a sync arrived."""
        ...


@dataclass(frozen=True)
class EngineSpec:
    """How to build an engine: small and picklable, so a Ray actor can build its own copy."""

    kind: EngineKind = "transformers"
    model_path: str = ""
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # constructor options of the engine class

    def __post_init__(self) -> None:
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"rollout.engine={self.kind!r} is not one of {', '.join(ENGINE_KINDS)}")
        if not self.model_path:
            raise ValueError("an EngineSpec needs model_path (an HF directory or hub name)")


def make_engine(spec: EngineSpec) -> RolloutEngine:
    """Build the engine a spec names (vLLM is imported only when asked for)."""
    if spec.kind == "vllm":
        from raylign.rollout.vllm import VLLMEngine

        return VLLMEngine(spec.model_path, **dict(spec.kwargs))
    from raylign.rollout.hf import TransformersEngine

    return TransformersEngine(spec.model_path, **dict(spec.kwargs))


def sampled_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` gathered at ``tokens``: [B, V], [B] -> [B] float32 (T <= 0 -> 1)."""
    scale = temperature if temperature > 0 else 1.0
    scaled = logits.float() / scale
    picked = scaled.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


_PLACEHOLDER_KEYS = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)


def placeholder_token_ids(config, processor) -> tuple[int, ...]:
    """Ids of the vision placeholder tokens of a VLM (from its config and processor), sorted."""
    ids = {getattr(config, k, None) for k in _PLACEHOLDER_KEYS}
    ids |= {getattr(processor, k, None) for k in ("image_token_id", "video_token_id")}
    return tuple(sorted(int(i) for i in ids if isinstance(i, int) and i >= 0))


def validate_requests(requests: Sequence[RolloutRequest]) -> None:
    """Fail early, naming the request, on sampling settings no engine can honour."""
    for r in requests:
        s = r.sampling
        if s.n < 1 or s.max_tokens < 1:
            raise ValueError(f"request {r.uid!r}: sampling.n and sampling.max_tokens must be >= 1, got {s}")
        if s.temperature < 0 or not 0 < s.top_p <= 1 or s.top_k < 0:
            raise ValueError(
                f"request {r.uid!r}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0 (0 = off), got {s}"
            )


def weights_fingerprint(params: Iterable[torch.Tensor]) -> float:
    """Float64 sum of absolute values over tensors; changes when any weight changes noticeably."""
    return float(sum(p.detach().double().abs().sum().item() for p in params))
