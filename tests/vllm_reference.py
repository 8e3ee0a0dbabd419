"""What a vLLM engine's outputs are checked against (tests/vllm_cpu on CPU, tests/gpu on a GPU).

The reference is the learner's teacher forcing: the learner's own batch of the sampled completions
(``raylign.data.collate.collate_completions``) through the HF model, ``log_softmax(logits / T)``
at each sampled token. vLLM never samples the vision placeholders (a -100 logit bias) and
normalises its logprobs without them, so they are masked here too (raylign.rollout.engine).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from raylign.data.collate import collate_completions
from raylign.learner.logprobs import model_inputs
from raylign.protocol import Rollout, RolloutRequest, SamplingParams

# vLLM on CPU (tests/vllm_cpu): fp32 to compare with an fp32 HF forward pass at a tight tolerance;
# eager (no torch.compile); images only (raylign feeds no videos).
CPU_ENGINE_KWARGS = {
    "dtype": "float32",
    "max_model_len": 1024,
    "enforce_eager": True,
    "limit_mm_per_prompt": {"image": 2, "video": 0},
}

RED = Image.new("RGB", (56, 56), (200, 30, 30))
BLUE = Image.new("RGB", (56, 28), (20, 40, 220))


def requests(**sampling) -> list[RolloutRequest]:
    """One prompt with one image, one with two, one text-only."""
    s = SamplingParams(**{"n": 2, "temperature": 1.0, "max_tokens": 8, **sampling})
    return [
        RolloutRequest(uid="img", prompt="how many red circles?", images=(RED,), sampling=s),
        RolloutRequest(uid="two", prompt="which is bigger?", images=(RED, BLUE), sampling=s),
        RolloutRequest(uid="txt", prompt=[{"role": "user", "content": "count"}], sampling=s),
    ]


def teacher_forced(model, processor, rollout: Rollout, temperature: float, masked: Sequence[int]) -> list[torch.Tensor]:
    """Per completion of ``rollout``: the model's logprob of each of its tokens."""
    r, comps = rollout.request, rollout.completions
    batch = collate_completions(
        processor, [r.prompt] * len(comps), [list(r.images)] * len(comps), [c.token_ids for c in comps]
    )
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    with torch.no_grad():
        logits = model(**inputs).logits.float() / (temperature or 1.0)
    logits[..., list(masked)] = float("-inf")
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
    mask = batch["completion_mask"][:, 1:].to(device).bool()
    return [logprobs[b][mask[b]].cpu() for b in range(len(comps))]


def max_logprob_error(model, processor, rollouts: Sequence[Rollout], temperature: float, masked) -> float:
    """Largest |engine logprob - teacher-forced logprob| over every sampled token."""
    worst = 0.0
    for r in rollouts:
        for c, ref in zip(r.completions, teacher_forced(model, processor, r, temperature, masked)):
            assert len(ref) == len(c.token_ids), (len(ref), len(c.token_ids))
            worst = max(worst, float((ref - torch.tensor(c.logprobs)).abs().max()))
    return worst


def perturb(model, prefix: str = "", scale: float = 0.05, seed: int = 1) -> list[tuple[str, torch.Tensor]]:
    """Add noise to the parameters whose name starts with ``prefix``; returns those (name, tensor) pairs."""
    gen = torch.Generator().manual_seed(seed)
    changed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefix):
                p.add_(scale * torch.randn(p.shape, generator=gen).to(p))
                changed.append((name, p.detach()))
    return changed
