"""kl_penalty: hand-computed values and gradients of Schulman's k1/k2/k3 estimators.

k3 is also checked against TRL inside GRPO's loss (tests/unit/test_algos_grpo.py, beta > 0).
"""

from __future__ import annotations

import math

import pytest
import torch

from raylign.algos import kl_penalty

F64 = torch.float64


@pytest.mark.parametrize(
    ("estimator", "value", "grad"),
    [
        # d = ref - logp = -0.5 - (-1.0) = 0.5
        ("k1", -0.5, 1.0),
        ("k2", 0.125, -0.5),  # d^2/2, d/dlogp = -d
        ("k3", math.exp(0.5) - 0.5 - 1, 1 - math.exp(0.5)),  # d/dlogp = 1 - e^d
    ],
)
def test_hand_computed(estimator, value, grad):
    logp = torch.tensor([[-1.0]], dtype=F64, requires_grad=True)
    kl = kl_penalty(logp, torch.tensor([[-0.5]], dtype=F64), estimator)
    assert kl.shape == (1, 1)
    assert kl.item() == pytest.approx(value, rel=1e-12)
    kl.sum().backward()
    assert logp.grad.item() == pytest.approx(grad, rel=1e-12)


def test_k3_is_non_negative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    assert (kl_penalty(logp, ref) >= 0).all()
    assert torch.equal(kl_penalty(logp, logp), torch.zeros_like(logp))


def test_k3_matches_trl_expression():
    g = torch.Generator().manual_seed(1)
    logp, ref = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(3, 5, generator=g, dtype=F64)
    trl = torch.exp(ref - logp) - (ref - logp) - 1  # GRPOTrainer._compute_loss
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), trl, rtol=1e-12, atol=0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(torch.zeros(2), torch.zeros(3))
