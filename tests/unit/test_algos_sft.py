"""sft_loss against TRL 1.16 SFTTrainer, hand-computed values and invariances.

TRL's loss lives in ``SFTTrainer.compute_loss``; it is driven on a trainer made with
``object.__new__`` and a stub model whose fused-LM-head output is our per-token logprob leaf.
TRL has no per-sequence mean for SFT, so ``"sequence_mean"`` is checked against a hand-written
float64 reference instead.
Reading TRL's private trainer attributes is safe because TRL is pinned in requirements/cpu.lock.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from raylign.algos import sft_loss

SFTTrainer = pytest.importorskip("trl.trainer.sft_trainer").SFTTrainer

F64 = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-12}


def _trl_sft(token_logps, mask, num_items_in_batch=None):
    """TRL's NLL loss; ``num_items_in_batch`` is TRL's global token count (None: local)."""
    mask = mask.bool()

    def model(labels, **_):  # the fused LM head: logprob 0 where the label is ignored
        keep = labels != -100
        zeros = torch.zeros_like(token_logps)
        return SimpleNamespace(
            log_probs=torch.where(keep, token_logps, 0), label_mask=keep, entropy=zeros, is_top1=keep & False
        )

    tr = object.__new__(SFTTrainer)
    tr.model = SimpleNamespace(training=True)
    tr.accelerator = SimpleNamespace(parallelism_config=None, num_processes=1, gather_for_metrics=lambda x: x)
    tr.args = SimpleNamespace(loss_type="nll", average_tokens_across_devices=False)
    tr.aux_loss_enabled, tr.compute_loss_func, tr.label_smoother = False, None, None
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._total_train_tokens, tr._tp_size = 0, 1
    ids = torch.ones_like(mask, dtype=torch.long)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.masked_fill(~mask, -100),
    }
    return tr.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)


def _batch(seed=0, b=6, t=5, garbage=1e6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    logps = -3 * torch.rand(b, t, generator=g, dtype=F64)
    logps[~mask.bool()] = garbage
    return logps, mask


def test_token_mean_matches_trl():
    logps, mask = _batch()
    ours = logps.clone().requires_grad_(True)
    theirs = logps.clone().requires_grad_(True)
    loss, metrics = sft_loss(ours, mask)
    trl_loss = _trl_sft(theirs, mask)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    loss.backward()
    trl_loss.backward()
    torch.testing.assert_close(ours.grad, theirs.grad, **TOL)
    assert metrics["num_tokens"].item() == mask.sum().item()
    assert metrics["nll"].item() == pytest.approx(loss.item())


def test_global_token_count_matches_trl_num_items_in_batch():
    """Per micro-batch, ``num_tokens`` plays TRL's ``num_items_in_batch`` (gradient accumulation)."""
    logps, mask = _batch(seed=1)
    total = mask.sum()
    for rows in (slice(0, 2), slice(2, 6)):
        ours = logps[rows].clone().requires_grad_(True)
        theirs = logps[rows].clone().requires_grad_(True)
        loss, _ = sft_loss(ours, mask[rows], num_tokens=total)
        trl_loss = _trl_sft(theirs, mask[rows], num_items_in_batch=total)
        torch.testing.assert_close(loss, trl_loss, **TOL)
        loss.backward()
        trl_loss.backward()
        torch.testing.assert_close(ours.grad, theirs.grad, **TOL)


def test_hand_computed():
    logps = torch.tensor([[-1.0, -2.0, 5.0], [-0.5, 7.0, 7.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, _ = sft_loss(logps, mask)
    assert loss.item() == pytest.approx(3.5 / 3, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(logps.grad, -mask.to(F64) / 3, rtol=0, atol=1e-15)
    seq_loss, _ = sft_loss(logps, mask, "sequence_mean")
    assert seq_loss.item() == pytest.approx((1.5 + 0.5) / 2, rel=1e-12)


def test_sequence_mean_matches_reference():
    logps, mask = _batch(seed=2)
    leaf = logps.clone().requires_grad_(True)
    loss, _ = sft_loss(leaf, mask, "sequence_mean")
    loss.backward()
    ref_leaf = logps.clone().requires_grad_(True)
    per_seq = []
    for row, m in zip(ref_leaf, mask.bool()):  # straightforward loop: empty rows count as 0
        per_seq.append(-row[m].sum() / max(int(m.sum()), 1))
    ref = torch.stack(per_seq).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, **TOL)


@pytest.mark.parametrize(
    ("aggregation", "norm"), [("token_mean", "num_tokens"), ("sequence_mean", "num_sequences")]
)
def test_microbatch_split_gives_full_batch_gradient(aggregation, norm):
    logps, mask = _batch(seed=3, b=7)
    full = logps.clone().requires_grad_(True)
    loss, _ = sft_loss(full, mask, aggregation)
    loss.backward()
    split = logps.clone().requires_grad_(True)
    counts = {"num_tokens": mask.sum(), "num_sequences": 7}
    total = sum(
        sft_loss(split[r], mask[r], aggregation, **{norm: counts[norm]})[0]
        for r in (slice(0, 1), slice(1, 4), slice(4, 7))
    )
    total.backward()
    torch.testing.assert_close(total, loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(split.grad, full.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_padding_never_changes_loss_or_gradient(aggregation):
    results = []
    for garbage in (0.0, 1e300, -1e300):
        logps, mask = _batch(seed=4, garbage=garbage)
        leaf = logps.requires_grad_(True)
        loss, _ = sft_loss(leaf, mask, aggregation)
        loss.backward()
        results.append((loss, leaf.grad))
        assert torch.all(leaf.grad[~mask.bool()] == 0)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_empty_mask_gives_zero_not_nan():
    loss, metrics = sft_loss(torch.zeros(2, 3, requires_grad=True), torch.zeros(2, 3))
    assert loss.item() == 0.0 and metrics["nll"].item() == 0.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="aggregation"):
        sft_loss(torch.zeros(2, 3), torch.ones(2, 3), "sum")
    with pytest.raises(ValueError, match="mask"):
        sft_loss(torch.zeros(2, 3), torch.ones(2, 4))
