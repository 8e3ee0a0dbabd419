"""Objectives on a plain model (no DeepSpeed): global normalisers make micro-batching invisible."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from rows import preference_rows, sft_rows, user_turn

from raylign.algos.grpo import PolicyLossConfig
from raylign.config import DPOConfig, SFTConfig, config_from_dict
from raylign.data.synthetic import generate_example
from raylign.learner.logprobs import target_logprobs
from raylign.learner.model import backbone_and_head
from raylign.learner.objectives import (
    REF_CHOSEN,
    REF_REJECTED,
    PolicyObjective,
    PreferenceObjective,
    SFTObjective,
    make_objective,
    policy_loss_config,
)
from raylign.models.loading import load_model, load_processor
from raylign.protocol import TrainSample


@pytest.fixture(scope="module")
def setup(tiny_qwen_dir):
    torch.manual_seed(0)
    model = load_model(tiny_qwen_dir).eval()
    processor = load_processor(tiny_qwen_dir)
    backbone, head = backbone_and_head(model)

    def policy(batch, temperature=1.0, with_entropy=False):
        return target_logprobs(backbone, head, batch, torch.device("cpu"), temperature, 16, with_entropy)

    return model, processor, policy


def _totals(objective, mbs):
    keys = objective.counts(mbs[0]).keys()
    return {k: sum(objective.counts(mb)[k] for mb in mbs) for k in keys}


def _loss_and_grads(model, processor, policy, objective, items, split: int, reference=None):
    """Sum of micro-batch losses with global totals, and the gradient of that sum."""
    model.zero_grad()
    mbs = [objective.collate(processor, items[i : i + split]) for i in range(0, len(items), split)]
    totals = _totals(objective, mbs)
    total = 0.0
    for mb in mbs:
        loss, _ = objective.loss(mb, policy, reference, totals)
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads


def _assert_same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_sft_split_invariance(setup, aggregation):
    model, processor, policy = setup
    objective = SFTObjective(SFTConfig(aggregation=aggregation))
    rows = sft_rows(4)
    whole = _loss_and_grads(model, processor, policy, objective, rows, 4)
    _assert_same(whole, _loss_and_grads(model, processor, policy, objective, rows, 1))
    assert whole[0] > 3.0  # an untrained tiny model: NLL near log(vocab) ~ 6


def test_sft_all_tokens_excludes_images_and_position_zero(setup):
    _, processor, _ = setup
    rows = sft_rows(2)
    completion = SFTObjective(SFTConfig()).collate(processor, rows).inputs
    everything = SFTObjective(SFTConfig(completion_only_loss=False)).collate(processor, rows).inputs
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    mask = everything["completion_mask"].bool()
    assert not mask[:, 0].any() and not mask[everything["input_ids"] == image_id].any()
    assert (mask | ~completion["completion_mask"].bool()).all()  # a superset of the completion
    assert int(mask.sum()) > int(completion["completion_mask"].sum())


def test_preference_split_invariance_and_precomputed_reference(setup):
    model, processor, policy = setup
    rows = preference_rows(4, lambda i, ex: "no idea " * (i + 1))
    cfg = DPOConfig(loss_type=["sigmoid", "ipo", "bco_pair", "sft"], loss_weights=[0.5, 0.1, 0.2, 1.0])
    objective = PreferenceObjective(cfg, bco_running_mean=True, bco_mean=0.3, bco_count=10.0)
    # the reference is the model before a small perturbation, so log-ratios are not all zero
    with torch.no_grad():
        ref_model = load_model(model.name_or_path).eval()
    ref_backbone, ref_head = backbone_and_head(ref_model)

    def reference(batch, temperature=1.0, with_entropy=False):
        return target_logprobs(ref_backbone, ref_head, batch, torch.device("cpu"), temperature)

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    whole = _loss_and_grads(model, processor, policy, objective, rows, 4, reference)
    _assert_same(whole, _loss_and_grads(model, processor, policy, objective, rows, 1, reference))
    # precomputed reference columns give the same loss without a reference function
    mb = objective.collate(processor, rows)
    with torch.no_grad():
        sums = reference(mb.inputs).logprobs.sum(-1)
    with_refs = [
        dict(r, **{REF_CHOSEN: float(sums[i]), REF_REJECTED: float(sums[4 + i])}) for i, r in enumerate(rows)
    ]
    pre = _loss_and_grads(model, processor, policy, objective, with_refs, 2, reference=None)
    _assert_same(whole, pre)


def test_preference_against_itself_is_log2(setup):
    _, processor, policy = setup
    objective = PreferenceObjective(DPOConfig())  # sigmoid, reference == policy: every margin is 0
    mb = objective.collate(processor, preference_rows(3, lambda i, ex: "no idea " * (i + 1)))
    loss, metrics = objective.loss(mb, policy, policy, objective.counts(mb))
    assert float(loss) == pytest.approx(math.log(2), rel=1e-6)
    assert float(metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)


def test_bco_running_mean_state():
    objective = PreferenceObjective(DPOConfig(loss_type=["bco_pair"]))
    objective.after_step({"bco/reward_mean": 1.0, "num_pairs": 2.0}, skipped=False)
    objective.after_step({"bco/reward_mean": 4.0, "num_pairs": 1.0}, skipped=False)
    assert objective.bco_mean == pytest.approx((1.0 * 4 + 4.0 * 2) / 6)  # a mean over 6 rewards
    objective.after_step({"bco/reward_mean": 100.0, "num_pairs": 5.0}, skipped=True)  # skipped: no change
    state = objective.state_dict()
    fresh = PreferenceObjective(DPOConfig(loss_type=["bco_pair"]))
    assert fresh == objective  # equality compares config, not state (actors keep their own copy)
    fresh.load_state_dict(state)
    assert (fresh.bco_mean, fresh.bco_count) == (pytest.approx(2.0), 6.0)


def _samples(processor, policy, n: int) -> list[TrainSample]:
    """Samples whose old logprobs are the policy's own, with some truncated."""
    gen = torch.Generator().manual_seed(1)
    samples = []
    for i in range(n):
        ex = generate_example("digit", i)
        ids = tuple(int(t) for t in torch.randint(10, 200, (3 + 2 * i,), generator=gen))
        sample = TrainSample(f"p{i // 2}", [user_turn(ex.question)], (ex.image,), ids, (0.0,) * len(ids), 0.0, 0)
        samples.append(sample)
    objective = PolicyObjective(PolicyLossConfig())
    with torch.no_grad():
        out = policy(objective.collate(processor, samples).inputs)
    advantages = [1.0, -0.5, 0.3, -1.2]
    return [
        TrainSample(
            s.uid,
            s.prompt,
            s.images,
            s.completion_ids,
            tuple(out.logprobs[i, : len(s.completion_ids)].tolist()),
            advantages[i],
            0,
            truncated=(i == 3),
        )
        for i, s in enumerate(samples)
    ]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_policy_split_invariance(setup, loss_type):
    model, processor, policy = setup
    samples = _samples(processor, policy, 4)
    cfg = PolicyLossConfig(loss_type=loss_type, beta=0.04, max_completion_length=16)
    objective = PolicyObjective(cfg, temperature=0.9, mask_truncated_completions=True)
    whole = _loss_and_grads(model, processor, policy, objective, samples, 4, reference=policy)
    _assert_same(whole, _loss_and_grads(model, processor, policy, objective, samples, 1, reference=policy))


def test_policy_masks_truncated_and_counts(setup):
    _, processor, policy = setup
    samples = _samples(processor, policy, 4)
    objective = PolicyObjective(PolicyLossConfig(), mask_truncated_completions=True)
    mb = objective.collate(processor, samples)
    counts = objective.counts(mb)
    lengths = [len(s.completion_ids) for s in samples]
    assert float(counts["tokens"]) == sum(lengths[:3]) and float(counts["sequences"]) == 4
    # on-policy (old == current at temperature 1): ratio 1, loss = -sum(adv * tokens) / tokens over kept samples
    loss, metrics = objective.loss(mb, policy, None, counts)
    expected = -sum(a * n for a, n in zip([1.0, -0.5, 0.3], lengths[:3])) / sum(lengths[:3])
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(metrics["clip_ratio/region_mean"]) == 0.0


def test_policy_ratio_reads_proximal_logprobs_and_weight_reads_the_sampler(setup):
    """Decoupled PPO through the objective: the clip acts on pi / pi_prox, the sampler only weighs tokens."""
    _, processor, policy = setup
    samples = _samples(processor, policy, 4)  # the sampler's logprobs are the current policy's
    cfg = PolicyLossConfig(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=3.0)
    objective = PolicyObjective(cfg)
    shifted = [dataclasses.replace(s, proximal_logprobs=tuple(x + 0.5 for x in s.old_logprobs)) for s in samples]
    mb = objective.collate(processor, shifted)
    loss, metrics = objective.loss(mb, policy, None, objective.counts(mb))
    r, w = math.exp(-0.5), math.exp(0.5)  # pi / pi_prox on every token, and pi_prox / pi_sampler
    lengths = [len(s.completion_ids) for s in samples]
    per_sample = [-min(r * s.advantage, max(r, 0.8) * s.advantage) * w * n for s, n in zip(samples, lengths)]
    assert float(loss) == pytest.approx(sum(per_sample) / sum(lengths), rel=1e-4)
    assert float(metrics["ratio/mean"]) == pytest.approx(r, rel=1e-4)
    assert float(metrics["sampling/importance_sampling_ratio/mean"]) == pytest.approx(w, rel=1e-4)
    assert float(metrics["clip_ratio/low_mean"]) > 0
    with pytest.raises(ValueError, match="proximal_logprobs"):
        objective.collate(processor, [shifted[0], samples[1]])


def test_policy_loss_config_carries_every_loss_setting():
    g = config_from_dict({"method": "grpo", "model": {"name_or_path": "m"}, "data": {"train": "d"},
                          "grpo": {"loss_type": "cispo", "epsilon_high": 5.0, "vllm_importance_sampling_mode":
                                   "token_mask", "off_policy_mask_threshold": 0.5, "vespo_k_neg": 1.5}}).grpo
    cfg = policy_loss_config(g)
    assert {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)} == {
        f.name: getattr(g, f.name) for f in dataclasses.fields(cfg)
    }
    assert (cfg.loss_type, cfg.clip_high, cfg.vllm_importance_sampling_mode) == ("cispo", 5.0, "token_mask")


def test_make_objective_maps_every_method():
    base = {"model": {"name_or_path": "m"}, "data": {"train": "d"}}
    kinds = {
        m: type(make_objective(config_from_dict({**base, "method": m})))
        for m in ("sft", "dpo", "mpo", "grpo", "gspo")
    }
    assert kinds == {
        "sft": SFTObjective,
        "dpo": PreferenceObjective,
        "mpo": PreferenceObjective,
        "grpo": PolicyObjective,
        "gspo": PolicyObjective,
    }
    mpo = make_objective(config_from_dict({**base, "method": "mpo"}))
    assert mpo.loss_cfg.loss_type == ("sigmoid", "bco_pair", "sft") and mpo.loss_cfg.weights == (
        0.8,
        0.2,
        1.0,
    )
    gspo = make_objective(config_from_dict({**base, "method": "gspo"}))
    assert gspo.cfg.importance_sampling_level == "sequence"
