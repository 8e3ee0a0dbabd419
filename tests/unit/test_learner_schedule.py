"""Learning-rate schedules: hand-computed values and transformers' schedulers as the reference."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from raylign.learner.schedule import lr_at, lr_multiplier, num_warmup_steps

_HF = {
    "constant": lambda opt, w, n: get_constant_schedule_with_warmup(opt, w),
    "linear": get_linear_schedule_with_warmup,
    "cosine": get_cosine_schedule_with_warmup,
}


def test_hand_computed_values():
    # 10 steps, 2 warmup, peak 1e-3
    assert lr_at(0, 1e-3, 10, "linear", warmup_steps=2) == 0.0
    assert lr_at(1, 1e-3, 10, "linear", warmup_steps=2) == pytest.approx(5e-4)
    assert lr_at(2, 1e-3, 10, "linear", warmup_steps=2) == pytest.approx(1e-3)
    assert lr_at(6, 1e-3, 10, "linear", warmup_steps=2) == pytest.approx(5e-4)
    assert lr_at(10, 1e-3, 10, "linear", warmup_steps=2) == 0.0
    assert lr_at(6, 1e-3, 10, "cosine", warmup_steps=2) == pytest.approx(5e-4)  # half way: cos(pi/2)
    assert lr_at(4, 1e-3, 10, "cosine", warmup_steps=2) == pytest.approx(
        1e-3 * 0.5 * (1 + math.cos(math.pi / 4))
    )
    assert lr_at(9, 1e-3, 10, "constant", warmup_steps=2) == 1e-3
    assert lr_at(0, 1e-3, 10, "constant") == 1e-3  # no warmup: the first step already has the peak


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_matches_transformers(kind, warmup):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = _HF[kind](opt, warmup, 17)
    for step in range(20):
        assert lr_at(step, 2.0, 17, kind, warmup_steps=warmup) == pytest.approx(
            opt.param_groups[0]["lr"], abs=1e-12
        )
        opt.step()
        sched.step()


def test_warmup_ratio_and_errors():
    assert num_warmup_steps(100, warmup_ratio=0.05) == 5
    assert num_warmup_steps(10, warmup_ratio=0.11) == 2  # ceil, as transformers
    assert num_warmup_steps(100, warmup_steps=7, warmup_ratio=0.5) == 7  # steps win over the ratio
    with pytest.raises(ValueError, match="unknown lr_scheduler_type"):
        lr_multiplier(5, 10, 0, "exponential")
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_multiplier(-1, 10, 0, "linear")
