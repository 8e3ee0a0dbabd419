"""How a step's micro-batch metrics become one number each: weighted means, except extremes (max / min)."""

from __future__ import annotations

import pytest
import torch

from raylign.learner.learner import _MetricSums


def test_means_are_weighted_and_extremes_are_extremes():
    acc = _MetricSums(torch.device("cpu"))
    micro = [  # (loss, metrics, tokens)
        (0.5, {"sampling/importance_sampling_ratio/mean": 1.2, "sampling/importance_sampling_ratio/max": 2.5,
               "sampling/importance_sampling_ratio/min": 0.4}, 3.0),
        (0.25, {"sampling/importance_sampling_ratio/mean": 0.9, "sampling/importance_sampling_ratio/max": 1.1,
                "sampling/importance_sampling_ratio/min": 0.7}, 1.0),
    ]
    for loss, metrics, weight in micro:
        acc.add(torch.tensor(loss), {k: torch.tensor(v) for k, v in metrics.items()}, torch.tensor(weight))
    out = acc.reduce()
    assert out["loss"] == pytest.approx(0.75)  # each micro-batch loss already carries the global normaliser
    assert out["sampling/importance_sampling_ratio/mean"] == pytest.approx((1.2 * 3 + 0.9) / 4)
    assert out["sampling/importance_sampling_ratio/max"] == 2.5  # not a mean of maxima
    assert out["sampling/importance_sampling_ratio/min"] == pytest.approx(0.4)
