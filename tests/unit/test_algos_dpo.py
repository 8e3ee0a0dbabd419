"""dpo_loss (DPO variants and MPO mixes) against TRL 1.16 and hand-computed values.

TRL's loss lives in ``DPOTrainer._compute_loss``; it is driven on a trainer made with
``object.__new__`` and a stub model whose fused-LM-head output is our per-token logprob leaf
(zero where the label is ignored, as TRL's fused head returns).
Reading TRL's private trainer attributes is safe because TRL is pinned in requirements/cpu.lock.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from raylign.algos import DPOLossConfig, dpo_loss, sft_loss
from raylign.algos.dpo import LOSS_TYPES

DPOTrainer = pytest.importorskip("trl.trainer.dpo_trainer").DPOTrainer

F64 = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-12}


class _StubModel:
    """Returns ``token_logps`` as TRL's fused LM head would: zero on ignored labels."""

    training = True

    def __init__(self, token_logps: torch.Tensor):
        self.token_logps = token_logps

    def __call__(self, labels, **_):
        keep = labels[:, 1:] != -100
        zeros = torch.zeros_like(self.token_logps)
        return SimpleNamespace(
            log_probs=self.token_logps * keep, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def _trl_dpo(cfg: DPOLossConfig, token_logps, mask, ref_chosen, ref_rejected):
    """TRL's loss and logged metrics; ``token_logps``/``mask`` are ``[2B, T]``, chosen rows first."""
    tr = object.__new__(DPOTrainer)
    tr.model = model = _StubModel(token_logps)
    tr.accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    tr.aux_loss_enabled, tr.ld_alpha, tr.precompute_ref_logps = False, None, True
    tr.f_divergence_type, tr.use_weighting = "reverse_kl", False
    tr.loss_types, tr.loss_weights = list(cfg.loss_type), list(cfg.weights)
    tr.beta, tr.label_smoothing = cfg.beta, cfg.label_smoothing
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._total_train_tokens, tr._tp_size = 0, 1
    completion_mask = torch.cat(
        [torch.zeros(mask.shape[0], 1, dtype=torch.long), mask], dim=1
    )  # prompt token first
    inputs = {
        "input_ids": torch.ones_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = tr._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in tr._metrics["train"].items()}


def _ours(cfg: DPOLossConfig, token_logps, mask, ref_chosen, ref_rejected, **kw):
    """Our loss from the same per-token tensors, the way a learner would call it."""
    seq = torch.where(mask.bool(), token_logps, 0).sum(-1)
    chosen, rejected = seq.chunk(2)
    (c_tok, _), (c_mask, r_mask) = token_logps.chunk(2), mask.chunk(2)
    chosen_nll, _ = sft_loss(c_tok, c_mask)
    return dpo_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        cfg,
        chosen_nll=chosen_nll,
        chosen_lengths=c_mask.sum(-1),
        rejected_lengths=r_mask.sum(-1),
        **kw,
    )


def _pairs(seed: int, b: int = 5, t: int = 6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (2 * b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    token_logps = -3 * torch.rand(2 * b, t, generator=g, dtype=F64)
    token_logps[~mask.bool()] = 1e6  # garbage in padding
    seq = torch.where(mask.bool(), token_logps, 0).sum(-1)
    logratios = torch.randn(2 * b, generator=g, dtype=F64)
    logratios[[0, b, 1, b + 1]] = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64)  # pairs of both orders
    ref_chosen, ref_rejected = (seq - logratios).chunk(2)
    return token_logps, mask, ref_chosen, ref_rejected


CONFIGS = {t: DPOLossConfig(loss_type=(t,), beta=0.3) for t in LOSS_TYPES if t != "robust"}
CONFIGS["robust"] = DPOLossConfig(loss_type=("robust",), beta=0.3, label_smoothing=0.1)
CONFIGS["mpo"] = DPOLossConfig(
    loss_type=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0), beta=0.1
)
CONFIGS["ipo+apo_zero"] = DPOLossConfig(loss_type=("ipo", "apo_zero"), loss_weights=(0.5, 2.0), beta=0.2)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_trl_loss_grad_and_metrics(name):
    cfg = CONFIGS[name]
    token_logps, mask, ref_c, ref_r = _pairs(seed=sorted(CONFIGS).index(name))
    ours_leaf = token_logps.clone().requires_grad_(True)
    trl_leaf = token_logps.clone().requires_grad_(True)
    loss, metrics = _ours(cfg, ours_leaf, mask, ref_c, ref_r)
    trl_loss, trl_metrics = _trl_dpo(cfg, trl_leaf, mask, ref_c, ref_r)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    loss.backward()
    trl_loss.backward()
    torch.testing.assert_close(ours_leaf.grad, trl_leaf.grad, **TOL)
    assert ours_leaf.grad.abs().sum() > 0
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
    ):
        assert metrics[key].item() == pytest.approx(trl_metrics[key], rel=1e-6, abs=1e-12), key
    assert 0 < metrics["rewards/accuracies"] < 1  # both orderings present, so accuracy is really tested
    components = sum(w * metrics[f"loss/{t}"] for t, w in zip(cfg.loss_type, cfg.weights))
    torch.testing.assert_close(components, metrics["loss"], rtol=1e-12, atol=0)
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def _hand_inputs():
    """chosen log-ratio +1, rejected -1, so with beta=0.5: beta*delta = 1, rewards +-0.5."""
    t = lambda x: torch.tensor([x], dtype=F64)
    return t(-1.0).requires_grad_(True), t(-3.0), t(-2.0), t(-2.0)


def _log1pexp(x: float) -> float:  # -log(sigmoid(-x))
    return math.log1p(math.exp(x))


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


HAND = {
    "sigmoid": _log1pexp(-1),
    "hinge": 0.0,
    "ipo": 0.0625,  # lengths (2, 4): (1/2 + 1/4 - 1/(2*0.5))^2
    "robust": _log1pexp(-1) - 0.1 * 1 / 0.8,  # -logsig(z) - eps*z/(1-2eps) at z=1, eps=0.1
    "bco_pair": 2 * _log1pexp(-0.5),
    "sft": 1.7,
    "apo_zero": 2 * _sig(-0.5),
    "apo_down": _sig(0.5) + 1 - _sig(1.0),
}


@pytest.mark.parametrize("loss_type", sorted(HAND))
def test_hand_computed(loss_type):
    cfg = DPOLossConfig(loss_type=loss_type, beta=0.5, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    pc, pr, rc, rr = _hand_inputs()
    loss, m = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        cfg,
        chosen_nll=torch.tensor(1.7, dtype=F64),
        chosen_lengths=torch.tensor([2]),
        rejected_lengths=torch.tensor([4]),
    )
    assert loss.item() == pytest.approx(HAND[loss_type], rel=1e-12, abs=1e-15)
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margins"].item() == pytest.approx(1.0)
    assert m["rewards/accuracies"].item() == 1.0


def test_hand_sigmoid_gradient():
    pc, pr, rc, rr = _hand_inputs()
    pr.requires_grad_(True)
    loss, _ = dpo_loss(pc, pr, rc, rr, DPOLossConfig(beta=0.5))
    loss.backward()
    # d/d chosen of -logsig(beta*delta) = -beta * sigmoid(-beta*delta)
    assert pc.grad.item() == pytest.approx(-0.5 * _sig(-1.0), rel=1e-12)
    assert pr.grad.item() == pytest.approx(0.5 * _sig(-1.0), rel=1e-12)


def test_bco_pair_running_mean_shift_and_metric():
    pc, pr, rc, rr = _hand_inputs()
    cfg = DPOLossConfig(loss_type="bco_pair", beta=0.5)
    loss, m = dpo_loss(pc, pr, rc, rr, cfg, bco_reward_mean=torch.tensor(0.5, dtype=F64))
    # rewards shifted by 0.5: -logsig(0) - logsig(-(-1)) = log 2 + log(1 + e^-1)
    assert loss.item() == pytest.approx(math.log(2) + _log1pexp(-1), rel=1e-12)
    assert m["bco/reward_mean"].item() == pytest.approx(0.0)  # mean of (+0.5, -0.5)
    assert "bco/reward_mean" not in dpo_loss(pc, pr, rc, rr, DPOLossConfig(beta=0.5))[1]


def test_sft_component_accepts_per_sequence_nll():
    pc, pr, rc, rr = _hand_inputs()
    per_seq = torch.tensor([1.0, 2.0], dtype=F64)
    loss, m = dpo_loss(
        pc.expand(2),
        pr.expand(2),
        rc.expand(2),
        rr.expand(2),
        DPOLossConfig(loss_type="sft"),
        chosen_nll=per_seq,
    )
    assert loss.item() == pytest.approx(1.5) and m["loss/sft"].item() == pytest.approx(1.5)


def test_reference_logps_get_no_gradient():
    pc, pr, rc, rr = _hand_inputs()
    rc.requires_grad_(True)
    loss, _ = dpo_loss(pc, pr, rc, rr, DPOLossConfig())
    loss.backward()
    assert rc.grad is None and pc.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": ("sigmoid", "kto")}, "unknown DPO loss_type"),
        ({"loss_type": ()}, "at least one"),
        ({"loss_type": ("sigmoid", "sigmoid")}, "repeats"),
        ({"loss_type": ("sigmoid", "sft"), "loss_weights": (1.0,)}, "one weight per loss type"),
        ({"beta": 0.0}, "beta"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, r"\[0, 0.5\)"),
        ({"label_smoothing": 0.1}, "only used by loss_type 'robust'"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOLossConfig(**kwargs)


def test_config_normalises_lists_and_strings():
    cfg = DPOLossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1, 2])
    assert cfg.loss_type == ("sigmoid", "sft") and cfg.loss_weights == (1.0, 2.0)
    assert DPOLossConfig(loss_type="ipo").loss_type == ("ipo",)
    hash(cfg)  # frozen and hashable


def test_missing_side_inputs_raise():
    pc, pr, rc, rr = _hand_inputs()
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(pc, pr, rc, rr, DPOLossConfig(loss_type="sft"))
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(pc, pr, rc, rr, DPOLossConfig(loss_type="ipo"))
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(pc, pr.expand(2), rc, rr, DPOLossConfig())
