"""TransformersEngine: n completions per prompt whose logprobs match a teacher-forced forward pass,
finish reasons, stop strings, seeds, and weight loading, on both tiny VLM families."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from raylign.data.chat import encode_for_generation
from raylign.protocol import RolloutRequest, SamplingParams
from raylign.rollout.engine import validate_requests
from raylign.rollout.hf import TransformersEngine

RED = Image.new("RGB", (48, 40), (200, 30, 30))
BLUE = Image.new("RGB", (30, 56), (20, 40, 220))


def teacher_forced_distributions(model, processor, request, token_ids, temperature):
    """log_softmax(logits / T) [T, V] before each completion token, from one unpadded forward pass."""
    enc = encode_for_generation(processor, [request.prompt], [request.images])
    prompt_len = enc["input_ids"].shape[1]
    completion = torch.tensor([token_ids])
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:  # Qwen marks image tokens; completion tokens are text
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(completion)], 1)
    ids = torch.cat([enc["input_ids"], completion], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0]
    logits = logits[prompt_len - 1 : -1].float() / (temperature if temperature > 0 else 1.0)
    return torch.log_softmax(logits, -1)


def teacher_forced_logprobs(model, processor, request, token_ids, temperature):
    """The reference logprob of each completion token (raylign's definition, as the learner computes it)."""
    dists = teacher_forced_distributions(model, processor, request, token_ids, temperature)
    return dists.gather(-1, torch.tensor(token_ids)[:, None])[:, 0]


def requests(sampling: SamplingParams) -> list[RolloutRequest]:
    return [
        RolloutRequest(uid="one-image", prompt="how many red circles?", images=(RED,), sampling=sampling),
        RolloutRequest(uid="text", prompt=[{"role": "user", "content": "say a number"}], sampling=sampling),
        RolloutRequest(uid="two-images", prompt="which is bigger?", images=(RED, BLUE), sampling=sampling),
    ]


@pytest.fixture(scope="module")
def engine(tiny_qwen_dir):
    return TransformersEngine(str(tiny_qwen_dir), batch_size=2, seed=3)


def test_n_completions_with_teacher_forced_logprobs(tiny_model_dir):
    engine = TransformersEngine(str(tiny_model_dir), batch_size=2, seed=3)
    # top-k/top-p truncate sampling, yet logprobs are of the full tempered distribution
    sampling = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=40, max_tokens=10)
    batch = requests(sampling)
    rollouts = engine.generate(batch)  # batch_size=2: two generate calls, left padding, images mixed
    assert [r.request.uid for r in rollouts] == [r.uid for r in batch]
    worst = 0.0
    for rollout in rollouts:
        assert len(rollout.completions) == 3 and rollout.policy_version == 0 and rollout.generate_s > 0
        for c in rollout.completions:
            assert len(c.token_ids) == len(c.logprobs) >= 1
            assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            ref = teacher_forced_logprobs(engine.model, engine.processor, rollout.request, c.token_ids, 0.7)
            worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    assert worst < 1e-4


def test_greedy_is_deterministic_with_untempered_logprobs(engine):
    sampling = SamplingParams(n=2, temperature=0.0, max_tokens=8)
    first, second = engine.generate(requests(sampling)), engine.generate(requests(sampling))
    for a, b in zip(first, second):
        assert a.completions[0].token_ids == a.completions[1].token_ids == b.completions[0].token_ids
        assert a.completions[0].logprobs == pytest.approx(b.completions[0].logprobs, abs=1e-5)
        c = a.completions[0]
        dists = teacher_forced_distributions(engine.model, engine.processor, a.request, c.token_ids, 0.0)
        assert dists.argmax(-1).tolist() == list(c.token_ids)
        ref = dists.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert torch.allclose(ref, torch.tensor(c.logprobs), atol=1e-4)


def test_seeded_request_ignores_its_batch_and_global_rng(engine):
    seeded = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=11)
    alone = engine.generate([requests(seeded)[0]])[0]
    state = torch.get_rng_state()
    mixed = engine.generate(requests(SamplingParams(n=2, max_tokens=8))[1:] + [requests(seeded)[0]])[-1]
    assert torch.equal(state, torch.get_rng_state())  # the engine never touches the global RNG
    assert alone.completions == mixed.completions
    assert len({c.token_ids for c in alone.completions}) > 1  # samples of one prompt differ
    other = engine.generate([requests(SamplingParams(n=4, max_tokens=8, seed=12))[0]])[0]
    assert other.completions != alone.completions


def test_engine_seed_makes_unseeded_runs_reproducible(tiny_qwen_dir):
    sampling = SamplingParams(n=2, max_tokens=6)
    a = TransformersEngine(str(tiny_qwen_dir), seed=5).generate(requests(sampling))
    b = TransformersEngine(str(tiny_qwen_dir), seed=5).generate(requests(sampling))
    assert [r.completions for r in a] == [r.completions for r in b]


def _embedding_name(engine) -> str:
    emb = engine.model.get_input_embeddings().weight
    return next(n for n, p in engine.model.named_parameters() if p is emb)


def test_finish_reasons_eos_trimming_and_no_placeholders(tiny_qwen_dir):
    engine = TransformersEngine(str(tiny_qwen_dir))
    eos, image_pad = engine.eos_ids[0], engine.processor.image_token_id
    assert image_pad in engine.suppressed_ids
    length_only = engine.generate([requests(SamplingParams(n=4, max_tokens=5, seed=0))[0]])[0]
    # Make <|im_end|> likely (tied embeddings: its logit is h . e_eos) so rows of one batch end apart,
    # and <|image_pad|> likelier still: it must never be sampled.
    weights = engine.model.get_input_embeddings().weight.detach().clone()
    weights[eos] *= 30
    weights[image_pad] *= 60
    engine.load_weights([(_embedding_name(engine), weights)])
    sampling = SamplingParams(n=16, temperature=1.0, max_tokens=12, seed=1)
    rollout = engine.generate([requests(sampling)[0]])[0]
    reasons = [c.finish_reason for c in rollout.completions]
    assert "stop" in reasons and "length" in reasons
    assert all(c.finish_reason == "length" and len(c.token_ids) == 5 for c in length_only.completions)
    for c in rollout.completions:
        assert not set(c.token_ids) & set(engine.suppressed_ids)
        assert eos not in c.token_ids[:-1]  # nothing after the first EOS survives
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == eos and len(c.token_ids) <= 12 and "<|im_end|>" not in c.text
        else:
            assert len(c.token_ids) == 12 and eos not in c.token_ids
        ref = teacher_forced_logprobs(engine.model, engine.processor, rollout.request, c.token_ids, 1.0)
        assert torch.allclose(ref, torch.tensor(c.logprobs), atol=1e-4)  # the EOS logprob included


def test_stop_strings_cut_at_the_completing_token(engine):
    sampling = SamplingParams(n=8, temperature=1.0, max_tokens=12, stop=(" ", "0"), seed=2)
    rollout = engine.generate([requests(sampling)[0]])[0]
    decode = lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True)
    stopped = [
        c for c in rollout.completions if c.finish_reason == "stop" and c.token_ids[-1] not in engine.eos_ids
    ]
    assert stopped, "no completion hit a stop string"
    for c in rollout.completions:
        hit = lambda text: any(s in text for s in sampling.stop)
        if c in stopped:
            assert hit(c.text) and not hit(decode(c.token_ids[:-1]))
        elif c.finish_reason == "length":
            assert not hit(c.text) and len(c.token_ids) == 12


def test_bucketed_load_weights_changes_outputs_and_bumps_version(tiny_qwen_dir):
    engine = TransformersEngine(str(tiny_qwen_dir))
    greedy = requests(SamplingParams(n=1, temperature=0.0, max_tokens=8))
    before, fingerprint = engine.generate(greedy), engine.model_fingerprint()
    gen = torch.Generator().manual_seed(0)
    perturbed = [
        (n, p + 0.05 * torch.randn(p.shape, generator=gen)) for n, p in engine.model.named_parameters()
    ]
    half = len(perturbed) // 2
    assert engine.load_weights(perturbed[:half]) == half and engine.version == 0  # bucket 1
    assert engine.load_weights(perturbed[half:]) == len(perturbed) - half
    engine.set_version(3)  # the sync is final
    after = engine.generate(greedy)
    assert engine.version == 3 and all(r.policy_version == 3 for r in after)
    assert engine.model_fingerprint() != pytest.approx(fingerprint, rel=1e-6)
    assert [r.completions[0].logprobs for r in before] != [r.completions[0].logprobs for r in after]
    c = after[0].completions[0]
    ref = teacher_forced_logprobs(engine.model, engine.processor, after[0].request, c.token_ids, 0.0)
    assert torch.allclose(ref, torch.tensor(c.logprobs), atol=1e-4)
    engine.load_weights(perturbed[:1], version=4)
    assert engine.version == 4
    with pytest.raises(KeyError, match="no parameter"):
        engine.load_weights([("not.a.param", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([(perturbed[0][0], torch.zeros(1))])


def test_sleep_is_a_noop_on_cpu_and_bad_sampling_is_refused(engine):
    engine.sleep()
    engine.wake()
    assert len(engine.generate([requests(SamplingParams(max_tokens=2))[1]])[0].completions) == 1
    for bad in (SamplingParams(n=0), SamplingParams(top_p=0.0), SamplingParams(temperature=-1.0)):
        with pytest.raises(ValueError, match="request 'text'"):
            validate_requests([requests(bad)[1]])
