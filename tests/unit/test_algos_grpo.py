"""policy_loss (TRL 1.16's eight loss types, behaviour correction modes) against TRL, hand-computed cases, invariances.

TRL's loss lives in ``GRPOTrainer._compute_loss`` and its behaviour weights in
``_generate_and_score_completions``; tests/trl_reference.py drives both on our tensors.
Reading TRL's private trainer attributes is safe because TRL is pinned in requirements/cpu.lock.
"""

from __future__ import annotations

import math
import warnings
import zlib

import pytest
import torch
from trl_reference import trl_compute_loss

from raylign.algos import PolicyLossConfig, policy_loss
from raylign.algos.grpo import AGGREGATION, POLICY_LOSS_TYPES

pytest.importorskip("trl.trainer.grpo_trainer")

F64 = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-12}


def _cfg(**kw) -> PolicyLossConfig:
    """A loss config without the behaviour correction unless asked (most cases here are about the surrogate)."""
    kw.setdefault("vllm_importance_sampling_correction", False)
    with warnings.catch_warnings():  # sequence level + token-sum aggregations warn on purpose
        warnings.simplefilter("ignore")
        return PolicyLossConfig(**kw)


def _batch(seed: int = 0, b: int = 6, t: int = 7, garbage: float = 3.0) -> dict[str, torch.Tensor]:
    """Random float64 rollout batch; padding holds moderate garbage (TRL's code cannot take huge values).

    Sampler logprobs are float32 values, as a rollout engine reports them (TRL reads them as float32).
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    logps = -2 * torch.rand(b, t, generator=g, dtype=F64)
    old = logps + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    ref = logps + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    sampler = (old + 0.4 * torch.randn(b, t, generator=g, dtype=F64)).float().double()
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


def _is(mode: str, low: float | None = None, high: float | None = None) -> dict:
    return {
        "vllm_importance_sampling_correction": True,
        "vllm_importance_sampling_mode": mode,
        "vllm_importance_sampling_clip_min": low,
        "vllm_importance_sampling_clip_max": high,
    }


VARIANTS = {
    "plain": {"epsilon": 0.1},
    "clip_higher": {"epsilon": 0.1, "epsilon_high": 0.28},
    "wide_cap": {"epsilon": 0.1, "epsilon_high": 1.3},  # CISPO's cap is absolute: above 1 here
    "delta": {"epsilon": 0.1, "epsilon_high": 0.15, "delta": 1.2},
    "delta_below_clip": {"epsilon": 0.1, "epsilon_high": 0.28, "delta": 1.1},  # TRL counts clips after delta
    "kl_bias_corrected": {"epsilon": 0.1, "beta": 0.05},
    "kl_plain": {"epsilon": 0.1, "beta": 0.05, "use_bias_correction_kl": False},
    "token_truncate": {"epsilon": 0.1, **_is("token_truncate", None, 1.5)},
    "token_truncate_both": {"epsilon": 0.1, **_is("token_truncate", 0.7, 1.5)},
    "token_mask": {"epsilon": 0.1, **_is("token_mask", 0.6, 1.6)},
    "sequence_truncate": {"epsilon": 0.1, **_is("sequence_truncate", 0.5, 2.0)},
    "sequence_mask": {"epsilon": 0.1, **_is("sequence_mask", None, 3.0)},  # TRL's default mode
    "sequence_mask_both": {"epsilon": 0.1, **_is("sequence_mask", 0.3, 3.0)},
    "off_policy_mask": {"epsilon": 0.1, "off_policy_mask_threshold": 0.05},
    "off_policy_mask_with_is": {"epsilon": 0.1, "off_policy_mask_threshold": 0.05, **_is("token_mask", 0.7, 1.5)},
    "soft_params": {"sapo_temperature_pos": 0.75, "sapo_temperature_neg": 1.5, "vespo_k_pos": 1.5,
                    "vespo_lambda_pos": 2.5, "vespo_k_neg": 2.0, "vespo_lambda_neg": 1.0},
    "all": {"epsilon": 0.1, "epsilon_high": 0.2, "delta": 1.3, "beta": 0.04, "off_policy_mask_threshold": 0.1,
            **_is("token_truncate", None, 1.5)},
}


def _valid(loss_type: str, variant: str) -> bool:
    """VESPO folds token weights into its own sequence weight: TRL refuses it with sequence modes."""
    mode = VARIANTS[variant].get("vllm_importance_sampling_mode", "token")
    return not (loss_type == "vespo" and mode.startswith("sequence"))


CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
FAMILY_METRICS = {"cispo": ("cispo_clip_ratio",), "vespo": ("vespo/phi_seq_mean",), "sapo": ()}
GRID = [(lt, v) for lt in POLICY_LOSS_TYPES for v in sorted(VARIANTS) if _valid(lt, v)]


def _ours(cfg: PolicyLossConfig, data: dict, leaf: torch.Tensor, with_ref: bool):
    # TRL has sampler logprobs only when its vLLM correction is on (the off-policy mask then falls back to old)
    sampler = data["sampler"] if cfg.vllm_importance_sampling_correction else None
    return policy_loss(
        leaf,
        data["old"],
        data["adv"],
        data["mask"],
        cfg,
        ref_logprobs=data["ref"] if with_ref else None,
        sampler_logprobs=sampler,
        entropy=data["entropy"],
    )


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize(("loss_type", "variant"), GRID)
def test_matches_trl_loss_grad_and_metrics(loss_type, variant, level):
    # TRL builds SAPO's temperatures as float32 (torch.where on Python floats): the default 1.05 is not
    # exact there and TRL's own loss moves by ~1e-6; 1.25 is exact in both.
    kw = {"sapo_temperature_neg": 1.25, **VARIANTS[variant]}
    cfg = _cfg(loss_type=loss_type, importance_sampling_level=level, max_completion_length=9, **kw)
    data = _batch(seed=zlib.crc32(f"{loss_type}/{level}/{variant}".encode()))
    with_ref = cfg.beta > 0
    ours_leaf = data["logps"].clone().requires_grad_(True)
    trl_leaf = data["logps"].clone().requires_grad_(True)
    loss, metrics = _ours(cfg, data, ours_leaf, with_ref)
    trl_loss, trl_metrics, trl_rollout = trl_compute_loss(cfg, data, trl_leaf, with_ref)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    loss.backward()
    trl_loss.backward()
    torch.testing.assert_close(ours_leaf.grad, trl_leaf.grad, **TOL)
    assert torch.all(ours_leaf.grad[~data["mask"].bool()] == 0)
    shared = (set(trl_metrics) | set(trl_rollout)) & set(metrics)
    assert {"entropy", *(["kl"] if with_ref else []), *FAMILY_METRICS.get(loss_type, CLIP_METRICS)} <= shared
    for key in sorted(shared):
        want = trl_metrics.get(key, trl_rollout.get(key))
        assert metrics[key].item() == pytest.approx(want, rel=1e-6, abs=1e-12), key
    if cfg.vllm_importance_sampling_correction:  # TRL's rollout metrics, every one of them
        assert {k for k in trl_rollout if k.startswith("sampling/")} <= set(metrics)
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def test_parity_cases_exercise_clipping_truncation_and_masking():
    """Guard for the parity grid: its inputs must actually clip, truncate and mask, or those go untested."""
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
    for variant, params in VARIANTS.items():
        if "vllm_importance_sampling_mode" not in params and "off_policy_mask_threshold" not in params:
            continue
        cfg = _cfg(**params)
        _, m = policy_loss(data["logps"], data["old"], data["adv"], data["mask"], cfg,
                           sampler_logprobs=data["sampler"], ref_logprobs=data["ref"])
        if cfg.off_policy_mask_threshold is not None:
            assert 0 < m["sampling/off_policy_masked_frac"] < 1, variant
        if not cfg.vllm_importance_sampling_correction:
            continue
        if cfg.vllm_importance_sampling_mode.endswith("mask"):
            assert 0 < m["sampling/is_masked_frac"] < 1, variant
        else:
            high, low = cfg.vllm_importance_sampling_clip_max, cfg.vllm_importance_sampling_clip_min
            hit_high = m["sampling/importance_sampling_ratio/max"].item() == pytest.approx(high)
            assert hit_high or m["sampling/importance_sampling_ratio/min"].item() == pytest.approx(low), variant


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


NORMALISER = {"dapo": "num_tokens", "cispo": "num_tokens", "vespo": "num_tokens", "dr_grpo": "num_sequences",
              "grpo": "num_sequences", "sapo": "num_sequences", "luspo": "num_sequences"}


@pytest.mark.parametrize(("loss_type", "norm"), sorted(NORMALISER.items()))
def test_microbatch_split_gives_full_batch_gradient(loss_type, norm):
    data = _batch(seed=3, b=7, t=6)
    cfg = _cfg(loss_type=loss_type, max_completion_length=6, beta=0.02, epsilon=0.1, epsilon_high=1.5,
               off_policy_mask_threshold=0.05, **_is("token_truncate", 0.5, 2.0))
    full = data["logps"].clone().requires_grad_(True)
    loss, _ = policy_loss(full, data["old"], data["adv"], data["mask"], cfg, ref_logprobs=data["ref"],
                          sampler_logprobs=data["sampler"])
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
            sampler_logprobs=data["sampler"][rows],
            **{norm: globals_[norm]},
        )
        total = total + part
    total.backward()
    torch.testing.assert_close(total, loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(split.grad, full.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_on_policy_gradient_is_the_policy_gradient(loss_type):
    """At pi == pi_old == pi_sampler every surrogate's gradient is REINFORCE's, -A per token, normalised.

    PPO's clip, CISPO's cap, SAPO's gate (4/tau sigmoid' = 1 at r = 1) and VESPO's weight (phi(1) = 1)
    all leave the on-policy gradient alone; only the aggregation's normaliser differs.
    """
    data = _batch(seed=11, b=5, t=4, garbage=0.0)
    mask, adv = data["mask"], data["adv"]
    leaf = data["logps"].clone().requires_grad_(True)
    cfg = _cfg(loss_type=loss_type, max_completion_length=4, epsilon_high=5.0 if loss_type == "cispo" else None,
               **_is("token_mask", 0.5, 2.0))
    loss, metrics = policy_loss(leaf, data["logps"], adv, mask, cfg, sampler_logprobs=data["logps"])
    loss.backward()
    lengths = mask.sum(-1, keepdim=True).to(F64)
    per_token_scale = {
        "sequence_mean": 1 / (lengths * 5), "sequence_sum": torch.full_like(lengths, 1 / 5),
        "token_mean": torch.full_like(lengths, 1 / mask.sum().item()),
        "local_token_mean": torch.full_like(lengths, 1 / mask.sum().item()),
        "constant": torch.full_like(lengths, 1 / (5 * 4)),
    }[AGGREGATION[loss_type]]
    torch.testing.assert_close(leaf.grad, -adv[:, None] * per_token_scale * mask, rtol=1e-12, atol=1e-15)
    assert metrics["sampling/importance_sampling_ratio/mean"].item() == 1.0
    assert metrics["sampling/mismatch_kl"].item() == 0.0


def test_gspo_identical_policies_ratio_one_no_clipping():
    data = _batch(seed=4)
    logps = data["logps"].clone().requires_grad_(True)
    cfg = PolicyLossConfig.gspo()
    loss, m = policy_loss(logps, data["logps"], data["adv"], data["mask"], cfg, sampler_logprobs=data["logps"])
    assert m["ratio/mean"].item() == pytest.approx(1.0, abs=1e-15)
    assert m["clip_ratio/region_mean"].item() == 0.0
    assert loss.item() == pytest.approx(-data["adv"].mean().item(), rel=1e-12)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_padding_never_changes_loss_or_gradient(loss_type, level, mode):
    if loss_type == "vespo" and mode.startswith("sequence"):
        pytest.skip("vespo takes token modes only")
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
        delta=1.5,
        off_policy_mask_threshold=0.05,
        **_is(mode, 0.4, 2.0),
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
        ({"vllm_importance_sampling_mode": "token"}, "vllm_importance_sampling_mode"),
        ({"vllm_importance_sampling_clip_max": 0.0}, "clip_max must be > 0"),
        ({"vllm_importance_sampling_clip_min": -1.0}, "clip_min must be >= 0"),
        ({"vllm_importance_sampling_clip_min": 3.0}, r"clip_min \(3.0\) must be below"),
        ({"vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_max": None}, "needs"),
        ({"off_policy_mask_threshold": -0.1}, "off_policy_mask_threshold"),
        ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg"),
        ({"vespo_lambda_pos": -1.0}, "vespo_lambda_pos"),
        ({"loss_type": "vespo"}, "token_truncate or token_mask"),  # TRL's default mode is sequence_mask
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
        policy_loss(*args, PolicyLossConfig())  # TRL's default: the behaviour correction is on
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(data["logps"], data["old"], data["adv"][:3], data["mask"], _cfg())
