"""policy_loss (GRPO / GSPO / DAPO / Dr. GRPO / BNPO) against TRL 1.16, hand-computed cases and invariances.

TRL's loss lives in ``GRPOTrainer._compute_loss``; it is driven on a trainer made with
``object.__new__`` whose logprob forward is replaced by a function returning our leaf tensor.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from raylign.algos import PolicyLossConfig, policy_loss

GRPOTrainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer

F64 = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-12}


def _cfg(**kw) -> PolicyLossConfig:
    with warnings.catch_warnings():  # sequence level + token-sum aggregations warn on purpose
        warnings.simplefilter("ignore")
        return PolicyLossConfig(**kw)


def _batch(seed: int = 0, b: int = 6, t: int = 7, garbage: float = 3.0) -> dict[str, torch.Tensor]:
    """Random float64 rollout batch; padding holds moderate garbage (TRL's code cannot take huge values)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    logps = -2 * torch.rand(b, t, generator=g, dtype=F64)
    old = logps + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    ref = logps + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    sampler = old + 0.4 * torch.randn(b, t, generator=g, dtype=F64)
    pad = ~mask.bool()
    for x in (logps, old, ref, sampler):
        x[pad] = garbage * torch.randn(int(pad.sum()), generator=g, dtype=F64)
    return {
        "logps": logps,
        "old": old,
        "ref": ref,
        "sampler": sampler,
        "adv": torch.randn(b, generator=g, dtype=F64),
        "mask": mask,
        "entropy": torch.rand(b, t, generator=g, dtype=F64),
    }


def _trl_is_ratio(old, sampler, mask, cap):
    """TRL's token_truncate IS ratio (``_generate_and_score_completions``); parity is checked in
    test_algos_advantages.py::test_tis_weights_match_trl_rollout."""
    return torch.exp(torch.nan_to_num((old - sampler) * mask, nan=0.0)).clamp(max=cap)


def _trl_loss(cfg: PolicyLossConfig, data, logps_leaf, with_ref: bool):
    """Run TRL's ``GRPOTrainer._compute_loss`` on ``data`` with ``cfg``'s settings."""
    tr = object.__new__(GRPOTrainer)
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (logps_leaf, data["entropy"], None)
    tr.model = SimpleNamespace(training=True)
    tr.accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x)
    tr.args = SimpleNamespace(
        delta=cfg.delta, use_bias_correction_kl=cfg.use_bias_correction_kl, steps_per_generation=1
    )
    tr.top_entropy_quantile, tr.off_policy_mask_threshold = 1.0, None
    tr.importance_sampling_level, tr.loss_type, tr.beta = (
        cfg.importance_sampling_level,
        cfg.loss_type,
        cfg.beta,
    )
    tr.epsilon_low, tr.epsilon_high = cfg.epsilon, cfg.clip_high
    tr.use_vllm = tr.vllm_importance_sampling_correction = cfg.tis_cap is not None
    tr.current_gradient_accumulation_steps, tr.max_completion_length = 1, cfg.max_completion_length
    tr._entropy_bonus_enabled = tr.aux_loss_enabled = False
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    b, t = data["mask"].shape
    inputs = {
        "prompt_ids": torch.ones(b, 1, dtype=torch.long),
        "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.ones(b, t, dtype=torch.long),
        "completion_mask": data["mask"],
        "advantages": data["adv"],
        "old_per_token_logps": data["old"],
        "num_items_in_batch": data["mask"].sum(),
    }
    if with_ref:
        inputs["ref_per_token_logps"] = data["ref"]
    if cfg.tis_cap is not None:
        inputs["importance_sampling_ratio"] = _trl_is_ratio(
            data["old"], data["sampler"], data["mask"], cfg.tis_cap
        )
    loss = tr._compute_loss(None, inputs)
    return loss, {k: v[0] for k, v in tr._metrics["train"].items()}


VARIANTS = {
    "plain": {"epsilon": 0.1},
    "clip_higher": {"epsilon": 0.1, "epsilon_high": 0.28},
    "delta": {"epsilon": 0.1, "epsilon_high": 0.15, "delta": 1.2},
    "delta_below_clip": {"epsilon": 0.1, "epsilon_high": 0.28, "delta": 1.1},  # TRL counts clips after delta
    "kl_bias_corrected": {"epsilon": 0.1, "beta": 0.05},
    "kl_plain": {"epsilon": 0.1, "beta": 0.05, "use_bias_correction_kl": False},
    "tis": {"epsilon": 0.1, "tis_cap": 1.5},
    "all": {"epsilon": 0.1, "epsilon_high": 0.2, "delta": 1.3, "beta": 0.04, "tis_cap": 2.0},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_matches_trl_loss_grad_and_metrics(loss_type, level, variant):
    cfg = _cfg(
        loss_type=loss_type, importance_sampling_level=level, max_completion_length=9, **VARIANTS[variant]
    )
    data = _batch(seed=zlib.crc32(f"{loss_type}/{level}/{variant}".encode()))
    with_ref = cfg.beta > 0
    ours_leaf = data["logps"].clone().requires_grad_(True)
    trl_leaf = data["logps"].clone().requires_grad_(True)
    loss, metrics = policy_loss(
        ours_leaf,
        data["old"],
        data["adv"],
        data["mask"],
        cfg,
        ref_logprobs=data["ref"] if with_ref else None,
        sampler_logprobs=data["sampler"],
        entropy=data["entropy"],
    )
    trl_loss, trl_metrics = _trl_loss(cfg, data, trl_leaf, with_ref)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    loss.backward()
    trl_loss.backward()
    torch.testing.assert_close(ours_leaf.grad, trl_leaf.grad, **TOL)
    assert torch.all(ours_leaf.grad[~data["mask"].bool()] == 0)
    keys = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy"]
    keys += ["kl"] if with_ref else []
    for key in keys:
        assert metrics[key].item() == pytest.approx(trl_metrics[key], rel=1e-6, abs=1e-12), key
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def test_parity_cases_exercise_clipping():
    """Guard for the parity grid: its inputs must actually clip, or clipping would go untested."""
    data = _batch(seed=1)
    for level in ("token", "sequence"):
        _, metrics = policy_loss(
            data["logps"],
            data["old"],
            data["adv"],
            data["mask"],
            _cfg(epsilon=0.05, importance_sampling_level=level, loss_type="grpo"),
        )
        assert metrics["clip_ratio/region_mean"] > 0


def test_hand_computed_token_clipping():
    old = torch.zeros(2, 2, dtype=F64)
    logps = torch.tensor([[math.log(1.5), math.log(0.5)]] * 2, dtype=F64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    mask = torch.ones(2, 2)
    loss, m = policy_loss(logps, old, adv, mask, _cfg(epsilon=0.2, loss_type="dapo"))
    # A=+1: tokens give -min(1.5, 1.2) = -1.2 and -min(0.5, 0.8) = -0.5.
    # A=-1: tokens give -min(-1.5, -1.2) = 1.5 and -min(-0.5, -0.8) = 0.8.  Mean of 4 tokens:
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4, rel=1e-12)
    loss.backward()
    # Only unclipped branches carry gradient: d(-A * r)/d logp = -A * r, over 4 tokens.
    expected = torch.tensor([[0.0, -0.5 / 4], [1.5 / 4, 0.0]], dtype=F64)
    torch.testing.assert_close(logps.grad, expected, rtol=1e-12, atol=1e-15)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(0.25)
    assert m["clip_ratio/low_mean"].item() == pytest.approx(0.25)
    assert m["clip_ratio/region_mean"].item() == pytest.approx(0.5)
    assert m["ratio/mean"].item() == pytest.approx(1.0)


def test_token_level_metrics_ignore_padding_even_with_one_column():
    logps = torch.tensor([[math.log(1.5)], [math.log(1.5)]], dtype=F64)
    _, m = policy_loss(
        logps, torch.zeros(2, 1, dtype=F64), torch.ones(2, dtype=F64), torch.tensor([[1], [0]]), _cfg()
    )
    assert m["clip_ratio/high_mean"].item() == 1.0 and m["ratio/mean"].item() == pytest.approx(1.5)


def test_hand_computed_sequence_level_and_aggregations():
    old = torch.zeros(2, 3, dtype=F64)
    logps = torch.tensor([[0.2, -0.1, 9.0], [0.3, 0.0, 0.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, 1.0], dtype=F64)
    r0, r1 = math.exp(0.05), math.exp(0.1)  # exp of each sequence's mean token log-ratio
    cfg = _cfg(importance_sampling_level="sequence", epsilon=0.5, loss_type="grpo")
    loss, m = policy_loss(logps, old, adv, mask, cfg)
    assert loss.item() == pytest.approx(-(2 * r0 + 1 * r1) / 2, rel=1e-12)
    loss.backward()
    # d/d logp_t of -A * exp(mean) = -A * r / L, then / B
    expected = torch.tensor([[-2 * r0 / 2 / 2] * 2 + [0.0], [-r1 / 3 / 2] * 3], dtype=F64)
    torch.testing.assert_close(logps.grad, expected, rtol=1e-12, atol=1e-15)
    assert m["ratio/mean"].item() == pytest.approx((r0 + r1) / 2)
    per_token_sum = -(2 * r0 * 2 + r1 * 3)  # the sequence value repeats on each of its tokens
    hand = {"dapo": per_token_sum / 5, "bnpo": per_token_sum / 5, "dr_grpo": per_token_sum / (2 * 4)}
    for loss_type, value in hand.items():
        got, _ = policy_loss(
            logps,
            old,
            adv,
            mask,
            _cfg(
                importance_sampling_level="sequence",
                epsilon=0.5,
                loss_type=loss_type,
                max_completion_length=4,
            ),
        )
        assert got.item() == pytest.approx(value, rel=1e-12), loss_type


@pytest.mark.parametrize(
    ("loss_type", "norm"),
    [("dapo", "num_tokens"), ("dr_grpo", "num_sequences"), ("grpo", "num_sequences")],
)
def test_microbatch_split_gives_full_batch_gradient(loss_type, norm):
    data = _batch(seed=3, b=7, t=6)
    cfg = _cfg(loss_type=loss_type, max_completion_length=6, beta=0.02, epsilon=0.1)
    full = data["logps"].clone().requires_grad_(True)
    loss, _ = policy_loss(full, data["old"], data["adv"], data["mask"], cfg, ref_logprobs=data["ref"])
    loss.backward()
    split = data["logps"].clone().requires_grad_(True)
    globals_ = {"num_tokens": data["mask"].sum(), "num_sequences": 7}
    total = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 7)):  # uneven micro-batches, uneven token counts
        part, _ = policy_loss(
            split[rows],
            data["old"][rows],
            data["adv"][rows],
            data["mask"][rows],
            cfg,
            ref_logprobs=data["ref"][rows],
            **{norm: globals_[norm]},
        )
        total = total + part
    total.backward()
    torch.testing.assert_close(total, loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(split.grad, full.grad, rtol=1e-12, atol=1e-14)


def test_gspo_identical_policies_ratio_one_no_clipping():
    data = _batch(seed=4)
    logps = data["logps"].clone().requires_grad_(True)
    loss, m = policy_loss(logps, data["logps"], data["adv"], data["mask"], PolicyLossConfig.gspo())
    assert m["ratio/mean"].item() == pytest.approx(1.0, abs=1e-15)
    assert m["clip_ratio/region_mean"].item() == 0.0
    assert loss.item() == pytest.approx(-data["adv"].mean().item(), rel=1e-12)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_padding_never_changes_loss_or_gradient(loss_type, level):
    clean = _batch(seed=5, garbage=0.0)
    dirty = {k: v.clone() for k, v in clean.items()}
    pad = ~clean["mask"].bool()
    for key, value in (("logps", 1e30), ("old", -1e30), ("ref", 1e4), ("sampler", -1e4), ("entropy", 1e30)):
        dirty[key][pad] = value
    cfg = _cfg(
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=7,
        beta=0.1,
        tis_cap=2.0,
        delta=1.5,
    )
    results = []
    for d in (clean, dirty):
        leaf = d["logps"].clone().requires_grad_(True)
        loss, m = policy_loss(
            leaf,
            d["old"],
            d["adv"],
            d["mask"],
            cfg,
            ref_logprobs=d["ref"],
            sampler_logprobs=d["sampler"],
            entropy=d["entropy"],
        )
        loss.backward()
        results.append((loss, leaf.grad, m))
    (l0, g0, m0), (l1, g1, m1) = results
    assert torch.isfinite(g1).all()
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    assert torch.all(g1[pad] == 0)
    assert all(torch.equal(m0[k], m1[k]) for k in m0)


def test_kl_metric_with_ref_and_zero_beta_leaves_loss_unchanged():
    data = _batch(seed=6)
    cfg = _cfg(beta=0.0)
    base, m0 = policy_loss(data["logps"], data["old"], data["adv"], data["mask"], cfg)
    with_ref, m1 = policy_loss(
        data["logps"], data["old"], data["adv"], data["mask"], cfg, ref_logprobs=data["ref"]
    )
    assert "kl" not in m0 and m1["kl"] > 0
    torch.testing.assert_close(base, with_ref, rtol=0, atol=0)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_term_is_beta_times_masked_estimator(estimator):
    """Decomposition: loss(beta) - loss(0) = beta * sum(kl * ratio) / tokens (dapo), per estimator."""
    data = _batch(seed=7)
    m = data["mask"].bool()
    kw = {"ref_logprobs": data["ref"]}
    base, _ = policy_loss(
        data["logps"], data["old"], data["adv"], data["mask"], _cfg(kl_estimator=estimator), **kw
    )
    cfg = _cfg(kl_estimator=estimator, beta=0.3)
    loss, metrics = policy_loss(data["logps"], data["old"], data["adv"], data["mask"], cfg, **kw)
    d = (data["ref"] - data["logps"])[m]
    k = {"k1": -d, "k2": 0.5 * d**2, "k3": torch.exp(d) - d - 1}[estimator]
    kl = k * torch.exp(data["logps"] - data["old"])[m]  # TRL's bias correction (default)
    assert (loss - base).item() == pytest.approx(0.3 * kl.sum().item() / m.sum().item(), rel=1e-10)
    assert metrics["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon_high": -0.1}, "epsilon_high"),
        ({"delta": 0.9}, "delta"),
        ({"importance_sampling_level": "seq"}, "importance_sampling_level"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"beta": -1.0}, "beta"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"loss_type": "dr_grpo"}, "max_completion_length"),
        ({"tis_cap": 0.0}, "tis_cap"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kwargs)


def test_gspo_defaults_and_warning():
    cfg = PolicyLossConfig.gspo()
    assert (cfg.importance_sampling_level, cfg.epsilon, cfg.clip_high, cfg.beta, cfg.loss_type) == (
        "sequence",
        3e-4,
        4e-4,
        0.0,
        "grpo",
    )
    assert PolicyLossConfig.gspo(beta=0.01).beta == 0.01
    with pytest.warns(UserWarning, match="GSPO"):
        PolicyLossConfig(importance_sampling_level="sequence", loss_type="dapo")


def test_missing_inputs_raise():
    data = _batch(seed=8)
    args = (data["logps"], data["old"], data["adv"], data["mask"])
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(*args, _cfg(beta=0.1))
    with pytest.raises(ValueError, match="sampler_logprobs"):
        policy_loss(*args, _cfg(tis_cap=2.0))
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(data["logps"], data["old"], data["adv"][:3], data["mask"], _cfg())
