"""Chunked target logprobs equal a plain full-vocabulary forward pass, values and gradients."""

from __future__ import annotations

import pytest
import torch
from rows import sft_rows

from raylign.data.collate import collate_sft
from raylign.learner.logprobs import target_logprobs
from raylign.learner.model import backbone_and_head
from raylign.models.loading import load_model, load_processor


def _reference(model, batch, temperature: float):
    """Full-vocab logits of the whole sequence, then pick each target from the position before it."""
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    logits = model(**inputs).logits.float() / temperature
    logp = logits.log_softmax(-1)
    rows, lps, ents = [], [], []
    for b in range(batch["input_ids"].shape[0]):
        pos = torch.nonzero(batch["completion_mask"][b]).squeeze(-1)
        lps.append(logp[b, pos - 1].gather(-1, batch["input_ids"][b, pos].unsqueeze(-1)).squeeze(-1))
        ents.append(-(logp[b, pos - 1].exp() * logp[b, pos - 1]).sum(-1))
        rows.append(len(pos))
    return lps, ents, rows


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir):
    model = load_model(tiny_model_dir).eval()
    batch = collate_sft(load_processor(tiny_model_dir), sft_rows(3))
    batch["completion_mask"][1, -5:] = 0  # rows of different target counts exercise the left packing
    return model, batch


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_full_vocab_forward(model_and_batch, temperature):
    model, batch = model_and_batch
    backbone, head = backbone_and_head(model)
    with torch.no_grad():
        ref_lp, ref_ent, counts = _reference(model, batch, temperature)
        for chunk in (1, 7, 10_000):
            out = target_logprobs(
                backbone, head, batch, torch.device("cpu"), temperature, chunk, with_entropy=True
            )
            assert out.mask.sum(1).tolist() == counts
            for b, n in enumerate(counts):
                torch.testing.assert_close(out.logprobs[b, :n], ref_lp[b], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(out.entropy[b, :n], ref_ent[b], rtol=1e-5, atol=1e-5)
                assert float(out.logprobs[b, n:].abs().sum()) == 0.0  # padding holds zeros


def test_chunked_gradients_equal_unchunked(model_and_batch):
    model, batch = model_and_batch
    backbone, head = backbone_and_head(model)
    grads = []
    for chunk in (5, 10_000):
        model.zero_grad()
        out = target_logprobs(backbone, head, batch, torch.device("cpu"), 1.0, chunk)
        (out.logprobs * torch.linspace(0.5, 1.5, out.logprobs.shape[1])).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_target_at_position_zero_is_refused(model_and_batch):
    model, batch = model_and_batch
    bad = dict(batch, completion_mask=batch["completion_mask"].clone())
    bad["completion_mask"][0, 0] = 1
    with pytest.raises(ValueError, match="position 0"):
        target_logprobs(*backbone_and_head(model), bad, torch.device("cpu"))
