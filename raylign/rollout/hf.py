"""``TransformersEngine``: rollouts with Hugging Face ``generate`` (the embedded default; CPU or GPU).

Requests with the same sampling settings are batched, ``batch_size`` prompts per ``generate`` call,
each prompt repeated ``n`` times in the batch (done here rather than with ``num_return_sequences``
so that every VLM family's image tensors expand the same way). Logprobs follow
:mod:`raylign.rollout.engine`: computed from the raw logits (``output_logits=True``), so top-p/top-k
truncation never enters them. A completion ends at the first EOS token (kept, with its logprob), at
the token that completes a stop string (kept), or at ``max_tokens`` (finish reason "length").

Randomness: a request with ``sampling.seed`` is generated alone under that seed, so it gives the
same completions whatever else is in the call; unseeded requests draw a per-call seed from the
engine's own generator (``seed``), so a run is reproducible and the global torch RNG is untouched.
The KV cache is HF's default dynamic cache. Note the memory cost of ``output_logits``: one
[rows, vocab] tensor per generated token is kept until the call returns.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from raylign.data.chat import encode_for_generation
from raylign.models.loading import load_model, load_processor
from raylign.protocol import Completion, Rollout, RolloutRequest, SamplingParams
from raylign.rollout.engine import (
    NamedTensors,
    placeholder_token_ids,
    sampled_token_logprobs,
    validate_requests,
    weights_fingerprint,
)


class _StopStrings(StoppingCriteria):
    """Stops a row at the first token after which its decoded completion contains a stop string.

    Records that length per row in ``cut`` so the caller trims exactly there.
    """

    def __init__(self, tokenizer, stops: Sequence[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, tuple(stops), prompt_len
        # A stop string of k characters spans at most 4k byte-level tokens; decode only that tail.
        self.window = 4 * max(len(s) for s in stops) + 4
        self.cut: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len :]
        length = generated.shape[1]
        tails = self.tokenizer.batch_decode(
            generated[:, max(0, length - self.window) :], skip_special_tokens=True
        )
        done = []
        for row, text in enumerate(tails):
            if row not in self.cut and any(s in text for s in self.stops):
                self.cut[row] = length
            done.append(row in self.cut)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    """EOS ids from the model's generation config (int or list) and the tokenizer."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(
            "the model has no EOS token (generation_config.eos_token_id and tokenizer.eos_token)"
        )
    return tuple(dict.fromkeys(int(i) for i in ids))


def _batch_key(s: SamplingParams) -> tuple:
    """Requests batch together when everything but ``n`` and ``seed`` matches."""
    return (s.temperature, s.top_p, s.top_k, s.max_tokens, s.stop)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run under ``seed`` without disturbing the caller's global RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class TransformersEngine:
    """A :class:`~raylign.rollout.engine.RolloutEngine` on HF transformers ``generate``.

    Args:
        model_path: HF directory (or hub name) loadable by ``AutoModelForImageTextToText``.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu`` or ``cuda[:i]``.
        batch_size: prompts per ``generate`` call (each expanded to its ``n`` samples).
        seed: seed of the engine's generator for unseeded requests.
        version: policy version of the weights at ``model_path``.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        device: str = "cpu",
        batch_size: int = 8,
        seed: int = 0,
        version: int = 0,
        attn_implementation: str | None = "sdpa",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = load_model(
            model_path, dtype=dtype, device=self.device, attn_implementation=attn_implementation
        )
        self.model.eval().requires_grad_(False)
        self.processor = load_processor(model_path)
        self.tokenizer = self.processor.tokenizer
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.eos_ids[0] if pad is None else int(pad)
        self.suppressed_ids = placeholder_token_ids(self.model.config, self.processor)
        # A checkpoint's generation_config.json may carry sampling defaults (Qwen's has temperature
        # 0.1, top_k 1, repetition_penalty 1.05); the engine owns sampling, so keep only token ids.
        self.model.generation_config = GenerationConfig(
            eos_token_id=list(self.eos_ids), pad_token_id=self.pad_id
        )
        self.batch_size = batch_size
        self._rng = random.Random(seed)
        self._version = version
        self._asleep = False

    @property
    def version(self) -> int:
        return self._version

    # ---- generation -------------------------------------------------------------------------

    def generate(self, requests: Sequence[RolloutRequest]) -> list[Rollout]:
        """One Rollout per request, in order; see the module docstring for batching and seeds."""
        if self._asleep:
            raise RuntimeError("the rollout engine is asleep; call wake() before generate()")
        validate_requests(requests)
        completions: dict[int, tuple[Completion, ...]] = {}
        seconds: dict[int, float] = {}
        for indices, seed in self._plan(requests):
            batch = [requests[i] for i in indices]
            start = time.perf_counter()
            groups = self._generate_batch(batch, seed)
            elapsed = time.perf_counter() - start
            rows = sum(r.sampling.n for r in batch)
            for i, group in zip(indices, groups):
                completions[i] = group
                seconds[i] = elapsed * requests[i].sampling.n / rows  # this group's share of the call
        return [
            Rollout(
                request=r, completions=completions[i], policy_version=self._version, generate_s=seconds[i]
            )
            for i, r in enumerate(requests)
        ]

    def _plan(self, requests: Sequence[RolloutRequest]) -> list[tuple[list[int], int]]:
        """Batches of request indices with their seed: seeded requests alone, others by sampling key."""
        plan: list[tuple[list[int], int | None]] = []
        by_key: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            if r.sampling.seed is not None:
                plan.append(([i], r.sampling.seed))
            else:
                by_key.setdefault(_batch_key(r.sampling), []).append(i)
        for indices in by_key.values():
            for start in range(0, len(indices), self.batch_size):
                plan.append((indices[start : start + self.batch_size], None))
        plan.sort(key=lambda item: item[0][0])  # keep request order roughly stable across calls
        return [(idx, self._rng.getrandbits(63) if seed is None else seed) for idx, seed in plan]

    @torch.no_grad()
    def _generate_batch(self, batch: Sequence[RolloutRequest], seed: int) -> list[tuple[Completion, ...]]:
        """Generate every sample of ``batch`` (same sampling settings) in one ``generate`` call."""
        s = batch[0].sampling
        rows = [r for r in batch for _ in range(r.sampling.n)]
        inputs = encode_for_generation(self.processor, [r.prompt for r in rows], [r.images for r in rows])
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        prompt_len = inputs["input_ids"].shape[1]
        stops = _StopStrings(self.tokenizer, s.stop, prompt_len) if s.stop else None
        with _seeded(seed, self.device):
            out = self.model.generate(
                **inputs,
                generation_config=self._generation_config(s),
                stopping_criteria=StoppingCriteriaList([stops] if stops else []),
            )
        generated = out.sequences[:, prompt_len:]
        logprobs = torch.stack(
            [
                sampled_token_logprobs(step, generated[:, t], s.temperature)
                for t, step in enumerate(out.logits)
            ],
            dim=1,
        )
        done = [
            self._completion(generated[row], logprobs[row], stops.cut.get(row) if stops else None, s)
            for row in range(len(rows))
        ]
        groups, start = [], 0
        for r in batch:
            groups.append(tuple(done[start : start + r.sampling.n]))
            start += r.sampling.n
        return groups

    def _generation_config(self, s: SamplingParams) -> GenerationConfig:
        sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k}
        return GenerationConfig(
            **(sampling if s.temperature > 0 else {"do_sample": False}),
            max_new_tokens=s.max_tokens,
            suppress_tokens=list(self.suppressed_ids) or None,
            eos_token_id=list(self.eos_ids),
            pad_token_id=self.pad_id,
            output_logits=True,
            return_dict_in_generate=True,
            use_cache=True,
        )

    def _completion(
        self, ids: torch.Tensor, logprobs: torch.Tensor, stop_cut: int | None, s: SamplingParams
    ) -> Completion:
        """Trim one generated row after its first EOS / stop string; padding after that is dropped."""
        tokens = ids.tolist()
        cut = next((i + 1 for i, t in enumerate(tokens) if t in self.eos_ids), None)
        if stop_cut is not None:
            cut = stop_cut if cut is None else min(cut, stop_cut)
        finish = "stop" if cut is not None else "length"
        cut = len(tokens) if cut is None else cut
        if finish == "length" and cut < s.max_tokens:
            raise RuntimeError(f"generate returned {cut} < max_tokens={s.max_tokens} tokens without a stop")
        kept = tuple(tokens[:cut])
        return Completion(
            token_ids=kept,
            logprobs=tuple(logprobs[:cut].tolist()),
            text=self.tokenizer.decode(kept, skip_special_tokens=True),
            finish_reason=finish,
        )

    # ---- weights and memory -----------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, named_tensors: NamedTensors, version: int | None = None) -> int:
        """Copy HF-named tensors (as in ``model.named_parameters()``) into the model, in place."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        count = 0
        for name, tensor in named_tensors:
            if name not in params:
                known = ", ".join(list(params)[:3])
                raise KeyError(f"no parameter {name!r} in the rollout model (names look like: {known}, ...)")
            target = params[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"{name}: got shape {tuple(tensor.shape)}, the model has {tuple(target.shape)}"
                )
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            count += 1
        if version is not None:
            self.set_version(version)
        return count

    def set_version(self, version: int) -> None:
        self._version = int(version)

    def sleep(self) -> None:
        """On a GPU, move the weights to host memory and free the CUDA cache; a no-op on CPU."""
        if self.device.type == "cuda" and not self._asleep:
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._asleep = self.device.type == "cuda"

    def wake(self) -> None:
        if self._asleep:
            self.model.to(self.device)
        self._asleep = False

    def model_fingerprint(self) -> float:
        return weights_fingerprint(self.model.parameters())
