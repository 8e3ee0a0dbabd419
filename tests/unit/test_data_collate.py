"""Collation on both tiny VLM families: targets, padding, mRoPE, generation prompts, preference layout."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from raylign.algos.sft import sft_loss
from raylign.data.chat import encode_for_generation, render_prompt, to_messages
from raylign.data.collate import (
    collate_completions,
    collate_preference,
    collate_sft,
    completion_messages_of,
    pack_targets,
    row_images,
)
from raylign.data.errors import DataError
from raylign.models.loading import load_model, load_processor

IMAGE_RUN = re.compile(r"(<\|image_pad\|>)+|(<image>)+")


@pytest.fixture(scope="module")
def family(tiny_model_dir):
    return load_model(tiny_model_dir), load_processor(tiny_model_dir)


def _collapse(text: str) -> str:
    """Each run of image tokens as one token (runs of adjacent LLaVA images merge, on both sides alike)."""
    return IMAGE_RUN.sub(lambda m: m.group(0)[: m.group(0).index(">") + 1], text)


def _img(w: int, h: int, colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def _rows():
    two_images = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "image"},
                    {"type": "text", "text": "which is bigger?"},
                ],
            },
            {"role": "assistant", "content": "<think>the left one</think><answer>left</answer>"},
        ],
        "images": [_img(48, 40), _img(28, 100, (0, 30, 200))],
    }
    multi_turn = {
        "messages": [
            {"role": "system", "content": "look carefully"},
            {"role": "user", "content": "what digit is shown?"},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and here?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<answer>3</answer>"}]},
        ],
        "images": [Image.new("L", (56, 56), 100)],  # grey scale: collation converts to RGB
    }
    text_only = {"prompt": "how many?", "completion": "<answer>2</answer>"}
    return [two_images, multi_turn, text_only]


def _forward(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        return model(**inputs).logits


def test_targets_are_exactly_the_assistant_text_and_loss_uses_only_them(family):
    model, processor = family
    batch = collate_sft(processor, _rows())
    tok = processor.tokenizer
    decoded = [tok.decode(batch["input_ids"][b][batch["completion_mask"][b].bool()]) for b in range(3)]
    assert decoded == [
        "<think>the left one</think><answer>left</answer><|im_end|>",
        "7<|im_end|><answer>3</answer><|im_end|>",
        "<answer>2</answer><|im_end|>",
    ]
    assert (batch["completion_mask"] <= batch["attention_mask"]).all()
    logits = _forward(model, batch)
    index, mask = pack_targets(batch["completion_mask"])
    logprobs = torch.log_softmax(logits.float(), -1)
    token_logp = logprobs.gather(1, (index - 1).clamp(min=0).unsqueeze(-1).expand(-1, -1, logprobs.shape[-1]))
    token_logp = token_logp.gather(2, batch["input_ids"].gather(1, index).unsqueeze(-1)).squeeze(-1)
    loss, metrics = sft_loss(token_logp, mask)
    # Reference: shift labels as HF does, ignore every non-target position.
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    assert torch.allclose(loss, ref, atol=1e-5)
    assert metrics["num_tokens"] == batch["completion_mask"].sum()


def test_vision_tensors_cover_every_image(family):
    _, processor = family
    batch = collate_sft(processor, _rows())
    if "image_grid_thw" in batch:  # Qwen: 3 images, patches concatenated; mRoPE needs mm_token_type_ids
        assert batch["image_grid_thw"].shape == (3, 3)
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
        assert "mm_token_type_ids" in batch
    else:
        assert batch["pixel_values"].shape[:2] == (3, 3)
    assert batch["input_ids"].shape == batch["completion_mask"].shape == batch["attention_mask"].shape


def test_right_padded_rows_match_each_row_alone(family):
    """Each padded row gives the logits of the processor's own one-row input (Qwen: same mRoPE positions)."""
    model, processor = family
    rows = _rows()
    batch = collate_sft(processor, rows)
    assert batch["attention_mask"][:, 0].all() and not batch["attention_mask"][:, -1].all()  # right padding
    logits = _forward(model, batch)
    for b, row in enumerate(rows):
        images = row_images(row)
        messages = row.get("messages") or to_messages(row["prompt"]) + completion_messages_of(
            row["completion"]
        )
        text = render_prompt(processor, messages, len(images), add_generation_prompt=False)
        alone = processor(text=[text], images=[images] if images else None, return_tensors="pt")
        n = alone["input_ids"].shape[1]
        assert int(batch["attention_mask"][b].sum()) == n
        assert torch.equal(batch["input_ids"][b, :n], alone["input_ids"][0])
        with torch.no_grad():
            torch.testing.assert_close(logits[b, :n], model(**alone).logits[0], atol=1e-5, rtol=1e-5)


def test_generation_prompts_are_left_padded_and_decode_to_the_chat_text(family):
    model, processor = family
    prompts = [
        "what colour is the big shape?",
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "compare"}],
            }
        ],
    ]
    images = [[_img(40, 40)], [_img(56, 28), _img(30, 30)]]
    batch = encode_for_generation(processor, prompts, images)
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padding
    for b, (p, imgs) in enumerate(zip(prompts, images)):
        text = processor.tokenizer.decode(batch["input_ids"][b][mask[b].bool()])
        assert _collapse(text) == _collapse(render_prompt(processor, p, len(imgs)))
        assert text.count(processor.image_token) == int(
            (batch["input_ids"][b] == processor.image_token_id).sum()
        )
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=4, do_sample=False)[
            :, batch["input_ids"].shape[1] :
        ]
        for b, (p, imgs) in enumerate(zip(prompts, images)):
            one = encode_for_generation(processor, [p], [imgs])
            alone = model.generate(**one, max_new_tokens=4, do_sample=False)[0, one["input_ids"].shape[1] :]
            assert torch.equal(together[b, : len(alone)], alone)


def test_collate_completions_masks_exactly_the_completion_ids(family):
    model, processor = family
    prompts = [
        "what digit is shown?",
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}],
    ]
    images = [[], [_img(44, 52)]]
    tok = processor.tokenizer
    completions = [tok.encode("<think>x</think>") + [tok.eos_token_id], tok.encode("7")]
    batch = collate_completions(processor, prompts, images, completions)
    assert batch["completion_mask"].sum(1).tolist() == [len(c) for c in completions]
    index, mask = pack_targets(batch["completion_mask"])
    for b, ids in enumerate(completions):
        assert batch["input_ids"][b, index[b][mask[b]]].tolist() == ids
        prompt_ids = encode_for_generation(processor, [prompts[b]], [images[b]])["input_ids"][0]
        assert batch["input_ids"][b, : len(prompt_ids)].tolist() == prompt_ids.tolist()
    assert _forward(model, batch).shape[:2] == batch["input_ids"].shape
    with pytest.raises(DataError, match=r"^batch row 1: the completion contains image token id\(s\)"):
        collate_completions(processor, prompts, images, [completions[0], [processor.image_token_id]])


def test_preference_batch_layout(family):
    model, processor = family
    rows = [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}],
            "chosen": [{"role": "assistant", "content": "<answer>red</answer>"}],
            "rejected": [{"role": "assistant", "content": "<answer>blue and green</answer>"}],
            "images": [_img(40, 40)],
        },
        {
            "prompt": "which side?",
            "chosen": "left",
            "rejected": "right",
            "images": [_img(56, 30), _img(30, 56)],
        },
    ]
    batch = collate_preference(processor, rows)
    tok = processor.tokenizer
    targets = [tok.decode(batch["input_ids"][b][batch["completion_mask"][b].bool()]) for b in range(4)]
    assert targets == [
        "<answer>red</answer><|im_end|>",
        "left<|im_end|>",
        "<answer>blue and green</answer><|im_end|>",
        "right<|im_end|>",
    ]
    # The prompt part of row b and row b + B is the same.
    for b in range(2):
        start = int(batch["completion_mask"][b].nonzero()[0])
        assert torch.equal(batch["input_ids"][b, :start], batch["input_ids"][b + 2, :start])
    if "image_grid_thw" in batch:
        assert batch["image_grid_thw"].shape[0] == 6
        assert torch.equal(batch["image_grid_thw"][:3], batch["image_grid_thw"][3:])
    else:
        assert batch["pixel_values"].shape[0] == 6
    assert torch.isfinite(_forward(model, batch)).all()


def test_pack_targets():
    cm = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]])
    index, mask = pack_targets(cm)
    assert index.tolist() == [[1, 2, 4], [3, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False], [False, False, False]]


def test_truncation_policies(family):
    _, processor = family
    long_text = " ".join(["look carefully and reply"] * 30)
    row = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": long_text},
                    {"type": "image"},
                    {"type": "text", "text": "colour?"},
                ],
            },
            {"role": "assistant", "content": "<answer>red</answer>"},
        ],
        "images": [_img(56, 56)],
    }
    full = collate_sft(processor, [row])
    n = full["input_ids"].shape[1]
    image_tokens = int((full["input_ids"] == processor.image_token_id).sum())
    with pytest.raises(
        DataError, match=rf"^batch row 0: it has {n} tokens, above max_length=40 \({image_tokens} of them"
    ):
        collate_sft(processor, [row], max_length=40)
    skipped: list[int] = []
    kept = collate_sft(processor, [row, _rows()[2]], max_length=40, truncation="skip", skipped=skipped)
    assert skipped == [0] and kept["input_ids"].shape[0] == 1
    cut = collate_sft(processor, [row], max_length=n - 20, truncation="truncate_left")
    assert cut["input_ids"].shape[1] == n - 20
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, 20:])  # only leading text went
    assert torch.equal(cut["completion_mask"][0], full["completion_mask"][0, 20:])
    assert "pixel_values" in cut
    with pytest.raises(DataError, match="truncate_left may drop only the"):
        collate_sft(processor, [row], max_length=image_tokens + 5, truncation="truncate_left")
    pair = {"prompt": row["messages"][:1], "chosen": "red", "rejected": "blue", "images": row["images"]}
    short = collate_preference(processor, [pair], max_prompt_length=n - 30, truncation="truncate_left")
    assert int(short["completion_mask"][0].nonzero()[0]) == n - 30
