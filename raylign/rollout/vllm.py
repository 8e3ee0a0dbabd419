"""``VLLMEngine``: rollouts with vLLM's offline ``LLM`` (GPU machines; ``pip install 'raylign[vllm]'``).

Importing this module never needs vLLM; constructing the engine does, and says how to get it.

Prompts go to vLLM as ``{"prompt": chat text with *unexpanded* image placeholders,
"multi_modal_data": {"image": [PIL, ...]}}``: vLLM's multimodal processor expands each placeholder
to the right number of image tokens itself (expanding them beforehand duplicates them, TRL #6294).

Logprobs: the engine is built with ``logprobs_mode="processed_logprobs"``, which in vLLM's V1
sampler is ``log_softmax`` of the logits *after* temperature and *after* top-k/top-p masking (read
from ``vllm/v1/sample/sampler.py`` and ``ops/topk_topp_sampler.py``). With ``top_p == 1`` and
``top_k == 0`` (GRPO's defaults) that is exactly raylign's definition, ``log_softmax(logits / T)``;
``raw_logprobs`` would ignore the temperature. With truncation on, vLLM reports the logprob under
the truncated, renormalised distribution (>= the untruncated one) and cannot report the untruncated
one, so a warning is logged once. Greedy requests (T = 0) get ``log_softmax(logits)``, as in HF;
vLLM refuses greedy ``n > 1``, so a greedy request is sampled once and copied ``n`` times. Vision
placeholder tokens get a -100 logit bias (see :mod:`raylign.rollout.engine`), which the processed
logprobs include: they are normalised over the other tokens.

Checked against vLLM 0.32's CPU build on the tiny Qwen2.5-VL (text hidden 256): with one and two
images, logprobs equal an HF fp32 teacher-forced ``log_softmax(logits / T)`` over non-placeholder
tokens to 2e-6, greedy and stop strings included; every HF parameter name of the model maps onto
a vLLM parameter. Loading weights there fails inside vLLM's CPU backend (it repacks linear layers),
so weight sync is checked on GPUs only (tests/gpu).

Weights: ``load_weights`` sends one bucket per ``collective_rpc`` to
:class:`raylign.rollout.vllm_ext.WeightLoaderExtension`, which calls vLLM's ``model.load_weights``
(HF names in, vLLM names handled by vLLM). ``set_version`` resets the prefix cache, whose KV
entries were computed with the old weights. Tensors travel through host memory in this path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from transformers import AutoConfig

from raylign.data.chat import render_prompt
from raylign.models.loading import load_processor, resolve_dtype
from raylign.protocol import Completion, Rollout, RolloutRequest, SamplingParams
from raylign.rollout.engine import NamedTensors, placeholder_token_ids, validate_requests

logger = logging.getLogger(__name__)

VLLM_MISSING = (
    "vLLM is not installed: pip install 'raylign[vllm]' on a GPU machine, or set rollout.engine=transformers"
)
EXTENSION = "raylign.rollout.vllm_ext.WeightLoaderExtension"
LOGPROBS_MODE = "processed_logprobs"


def vllm_prompt(processor, request: RolloutRequest) -> dict[str, Any]:
    """The prompt dict ``LLM.generate`` takes for one request (placeholders left unexpanded)."""
    prompt: dict[str, Any] = {"prompt": render_prompt(processor, request.prompt, len(request.images))}
    if request.images:
        prompt["multi_modal_data"] = {"image": list(request.images)}
    return prompt


def vllm_sampling_kwargs(s: SamplingParams, suppressed_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for raylign's sampling settings.

    ``logprobs=0`` returns just the sampled token's logprob; stop strings stay in the output so the
    text is the decoded token ids, as in the transformers engine. ``suppressed_ids`` (vision
    placeholders) get vLLM's lowest logit bias, -100, which rules them out in practice.
    """
    return {
        "n": 1 if s.temperature == 0 else s.n,  # vLLM refuses greedy n > 1; the engine copies the one
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k if s.top_k > 0 else -1,  # -1 = off in every vLLM version (0 only in newer ones)
        "max_tokens": s.max_tokens,
        "stop": list(s.stop),
        "include_stop_str_in_output": True,
        "seed": s.seed,
        "logprobs": 0,
        "skip_special_tokens": True,
        "logit_bias": {int(i): -100.0 for i in suppressed_ids} or None,
    }


def _copies(request: RolloutRequest) -> int:
    """Greedy decoding is asked for once and copied ``n`` times."""
    return request.sampling.n if request.sampling.temperature == 0 else 1


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(VLLM_MISSING) from err
    return vllm


class VLLMEngine:
    """A :class:`~raylign.rollout.engine.RolloutEngine` on ``vllm.LLM``.

    Args:
        model_path: HF directory or hub name.
        dtype: ``auto`` means bfloat16 (vLLM's own ``auto`` would turn an fp32 checkpoint into fp16).
        tensor_parallel_size, gpu_memory_utilization, max_model_len, seed: passed to ``vllm.LLM``.
        enable_sleep_mode: allow ``sleep``/``wake`` to free GPU memory while the learner trains.
        sleep_level: 1 offloads weights to host memory and drops the KV cache; 2 drops both (the
            next weight sync must then load every parameter before generating).
        version: policy version of the weights at ``model_path``.
        **engine_kwargs: any other ``vllm.LLM`` / ``EngineArgs`` option (``model_impl="transformers"``,
            ``enforce_eager``, ``limit_mm_per_prompt``, ...).
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        seed: int = 0,
        version: int = 0,
        **engine_kwargs: Any,
    ):
        vllm = _import_vllm()
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        self._vllm = vllm
        self.processor = load_processor(model_path)
        self.tokenizer = self.processor.tokenizer
        self.suppressed_ids = placeholder_token_ids(
            AutoConfig.from_pretrained(str(model_path)), self.processor
        )
        torch_dtype = resolve_dtype(dtype, "cuda")
        options = {
            "model": str(model_path),
            "dtype": str(torch_dtype).removeprefix("torch."),
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "enable_sleep_mode": enable_sleep_mode,
            "seed": seed,
            "logprobs_mode": LOGPROBS_MODE,
            "worker_extension_cls": EXTENSION,
        }
        options.update(engine_kwargs)
        self.llm = vllm.LLM(**options)
        self.sleep_mode, self.sleep_level = enable_sleep_mode, sleep_level
        self._version = version
        self._asleep = False
        self._weights_discarded = False  # after a level-2 sleep until the next completed sync
        self._warned_truncation = False

    @property
    def version(self) -> int:
        return self._version

    def generate(self, requests: Sequence[RolloutRequest]) -> list[Rollout]:
        """One Rollout per request, in order (vLLM schedules all of them at once)."""
        if self._asleep or self._weights_discarded:
            raise RuntimeError(
                "the vLLM engine is asleep or its weights were discarded: wake() and sync first"
            )
        validate_requests(requests)
        self._warn_truncation(requests)
        prompts = [vllm_prompt(self.processor, r) for r in requests]
        params = [
            self._vllm.SamplingParams(**vllm_sampling_kwargs(r.sampling, self.suppressed_ids))
            for r in requests
        ]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        rows = sum(r.sampling.n for r in requests)
        return [
            Rollout(
                request=r,
                completions=tuple(self._completion(c) for c in out.outputs for _ in range(_copies(r))),
                policy_version=self._version,
                generate_s=elapsed * r.sampling.n / rows,
            )
            for r, out in zip(requests, outputs)
        ]

    def _completion(self, c) -> Completion:
        ids = tuple(int(t) for t in c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(ids):
            raise RuntimeError(f"vLLM returned {len(c.logprobs or ())} logprob rows for {len(ids)} tokens")
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a completion with reason {c.finish_reason!r} (aborted?)")
        return Completion(
            token_ids=ids,
            logprobs=tuple(float(row[t].logprob) for t, row in zip(ids, c.logprobs)),
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            finish_reason=c.finish_reason,
        )

    def _warn_truncation(self, requests: Sequence[RolloutRequest]) -> None:
        if not self._warned_truncation and any(
            r.sampling.top_p < 1 or r.sampling.top_k > 0 for r in requests
        ):
            self._warned_truncation = True
            logger.warning(
                "vLLM reports logprobs under the top-p/top-k truncated distribution (%s); the learner's "
                "log_softmax(logits / T) differs, so importance ratios start above/below 1. Use top_p=1, "
                "top_k=0 for exact agreement.",
                LOGPROBS_MODE,
            )

    def load_weights(self, named_tensors: NamedTensors, version: int | None = None) -> int:
        """Send one bucket to every vLLM worker in a single ``collective_rpc``."""
        if self._asleep:
            raise RuntimeError("wake() the vLLM engine before loading weights")
        bucket = [(name, t.detach().to("cpu")) for name, t in named_tensors]
        counts = self.llm.collective_rpc("raylign_load_weights", args=(bucket,))
        if version is not None:
            self.set_version(version)
        return int(counts[0]) if counts else 0

    def set_version(self, version: int) -> None:
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the previous weights
        self._version = int(version)
        self._weights_discarded = False

    def sleep(self) -> None:
        """Free GPU memory (``llm.sleep``); a no-op unless built with ``enable_sleep_mode=True``."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True
            self._weights_discarded = self.sleep_level == 2

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def model_fingerprint(self) -> float:
        """Sum over tensor-parallel ranks of each rank's checksum (comparable between equal TP only)."""
        return float(sum(self.llm.collective_rpc("raylign_fingerprint")))
