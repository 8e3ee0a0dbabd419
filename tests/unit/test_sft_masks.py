"""sft.assistant_only_loss (messages rows) and sft.completion_only_loss (prompt/completion rows): TRL's two SFT switches."""

from __future__ import annotations

import torch
from rows import sft_rows

from raylign.config import SFTConfig
from raylign.learner.objectives import SFTObjective
from raylign.models.loading import load_processor


def _mask(processor, rows, **cfg) -> torch.Tensor:
    return SFTObjective(SFTConfig(**cfg)).collate(processor, rows).inputs["completion_mask"].bool()


def test_each_switch_governs_its_own_rows(tiny_qwen_dir):
    processor = load_processor(tiny_qwen_dir)
    chat = sft_rows(1)[0]
    pair = {"prompt": chat["messages"][:1], "completion": chat["messages"][1:], "images": chat["images"]}
    rows = [chat, pair]  # the same text as a messages row and as a prompt/completion row
    assistant = _mask(processor, rows)
    assert torch.equal(assistant[0], assistant[1])  # both: the answer and <|im_end|>
    trl_default = _mask(processor, rows, assistant_only_loss=False)  # TRL: every token of messages rows
    assert trl_default[0].sum() > assistant[0].sum() and torch.equal(trl_default[1], assistant[1])
    everything = _mask(processor, rows, completion_only_loss=False)
    assert torch.equal(everything[0], trl_default[0]) and torch.equal(everything[1], trl_default[0])
