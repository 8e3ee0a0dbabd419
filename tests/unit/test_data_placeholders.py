"""Image placeholders written in the text ("<image>", "<|image_pad|>") for SFT, DPO and GRPO, both families.

The rule (raylign.data.chat): a literal placeholder in a user turn is the image at that position;
placeholders must equal the images. A row that keeps the rule trains; one that breaks it stops at
validation with one line naming row, column and fix, and never reaches the learner.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from raylign.algos import PolicyLossConfig
from raylign.config import DPOConfig, LearnerConfig, ModelConfig, SFTConfig, TrainConfig
from raylign.data.chat import to_messages
from raylign.data.datasets import VLMDataset
from raylign.data.errors import DataError
from raylign.data.validate import validate_dataset
from raylign.learner.learner import Learner
from raylign.learner.objectives import PolicyObjective, PreferenceObjective, SFTObjective
from raylign.models.loading import load_processor
from raylign.protocol import RolloutRequest, SamplingParams, TrainSample
from raylign.rollout.hf import TransformersEngine

GOOD_TEXT = "<image>\nWhat colour is the square?"  # LLaVA-style: the literal marks the one image
BAD_TEXT = "<image> <image>"  # the row 3: two literals, one real image
QWEN_TEXT = "Look: <|vision_start|><|image_pad|><|vision_end|> and say the colour."  # Qwen's rendered form


def _image(i: int) -> Image.Image:
    return Image.new("RGB", (28, 28), (40 * i, 200, 30))


def _prompt_row(text: str, i: int) -> dict:
    return {"prompt": [{"role": "user", "content": text}], "images": [_image(i)]}


def _row(method: str, text: str, i: int) -> dict:
    if method == "sft":
        user = {"role": "user", "content": [{"type": "text", "text": text}]}
        answer = {"role": "assistant", "content": [{"type": "text", "text": "red"}]}
        return {"messages": [user, answer], "images": [_image(i)]}
    if method == "dpo":
        return {**_prompt_row(text, i), "chosen": "red", "rejected": "blue"}
    return _prompt_row(text, i)


def _kind(method: str) -> str:
    return {"sft": "sft", "dpo": "preference", "grpo": "prompt"}[method]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava"])
def family(request, tiny_qwen_dir, tiny_llava_dir):
    """A tiny model dir and one learner (with a reference, for DPO) shared by the three methods."""
    path = tiny_qwen_dir if request.param == "qwen2_5_vl" else tiny_llava_dir
    train = TrainConfig(learning_rate=1e-3, per_device_train_batch_size=4)
    learner = Learner(ModelConfig(name_or_path=str(path)), train, LearnerConfig(zero_stage=0), 4, reference=True)
    yield path, learner
    learner.close()


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_a_row_with_more_placeholders_than_images_stops_at_validation(family, method):
    path, _ = family
    rows = [_row(method, GOOD_TEXT, i) for i in range(3)] + [_row(method, BAD_TEXT, 3)]
    column = "messages" if method == "sft" else "prompt"
    with pytest.raises(DataError) as err:
        validate_dataset(VLMDataset.from_list(rows, kind=_kind(method)), load_processor(path), max_length=512)
    message = str(err.value)
    assert message.startswith(
        f"row 3, column '{column}': 2 image placeholder(s), 2 of them written in the text as "
        "'<|image_pad|>' or '<image>' but 1 image(s); give exactly one placeholder per image"
    ), message
    assert "\n" not in message


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_rows_with_literal_placeholders_validate_and_train(family, method):
    path, learner = family
    rows = [_row(method, GOOD_TEXT, 0), _row(method, QWEN_TEXT, 1)] * 2
    report = validate_dataset(VLMDataset.from_list(rows, kind=_kind(method)), learner.processor, max_length=512)
    assert report.num_valid == 4
    if method == "sft":
        items, objective = rows, SFTObjective(SFTConfig())
    elif method == "dpo":
        items, objective = rows, PreferenceObjective(DPOConfig())
    else:
        items, objective = _sampled(path, rows), PolicyObjective(PolicyLossConfig())
    result = learner.update(items, objective)
    assert not result.skipped and torch.isfinite(torch.tensor(result.metrics["loss"]))


def _sampled(path, rows: list[dict]) -> list[TrainSample]:
    """GRPO samples from the real transformers engine, prompted with the literal placeholders."""
    engine = TransformersEngine(str(path), batch_size=2)
    requests = [
        RolloutRequest(f"r{i}", r["prompt"], tuple(r["images"]), sampling=SamplingParams(n=1, max_tokens=6, seed=i))
        for i, r in enumerate(rows)
    ]
    samples = []
    for i, rollout in enumerate(engine.generate(requests)):
        (c,) = rollout.completions
        r = rollout.request
        samples.append(TrainSample(r.uid, r.prompt, r.images, c.token_ids, c.logprobs, (-1.0) ** i, 0))
    return samples


def test_literal_placeholders_become_image_parts_in_place():
    assert to_messages("<image> <image>", 1)[0]["content"] == [
        {"type": "image"}, {"type": "text", "text": " "}, {"type": "image"}
    ]
    assert to_messages([{"role": "user", "content": QWEN_TEXT}], 1)[0]["content"] == [
        {"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": " and say the colour."}
    ]
    plain = to_messages([{"role": "user", "content": "What colour?"}], 1)[0]["content"]
    assert plain == [{"type": "image"}, {"type": "text", "text": "What colour?"}]  # no literal: image first, as TRL


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"prompt": "x", "chosen": "the <image> is red", "rejected": "blue"},
            "row 0, column 'chosen': the assistant turn contains the image placeholder '<image>'; remove it "
            "(images belong in the prompt); fix the row or drop it",
        ),
        (
            {"prompt": "<image> a video: <|video_pad|>", "chosen": "red", "rejected": "blue"},
            "row 0, column 'prompt': the text contains the vision token '<|video_pad|>', which is not an image "
            "placeholder (raylign feeds images only); remove it; fix the row or drop it",
        ),
    ],
)
def test_placeholders_outside_a_user_turn_and_other_vision_tokens_are_refused(row, expected):
    ds = VLMDataset.from_list([{**row, "images": [_image(0)]}], kind="preference")
    with pytest.raises(DataError) as err:
        validate_dataset(ds)
    assert str(err.value) == expected + " (or set skip_invalid=True to skip such rows)"


def test_the_collator_refuses_a_miscounted_row_that_skipped_validation(tiny_llava_dir):
    from raylign.data.collate import collate_completions

    processor = load_processor(tiny_llava_dir)
    # A prompt already rendered with two explicit image parts, one image: the processor must never see it.
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(DataError, match=r"batch row 0: the chat text has 2 image placeholder\(s\) '<image>' but 1"):
        collate_completions(processor, [prompt], [[_image(0)]], [[5, 6]])


def test_truncation_skip_drops_and_counts_a_too_long_row(tiny_qwen_dir):
    """``data.truncation: skip`` skips (counted) instead of raising 'the prompt has N tokens, above ...'."""
    processor = load_processor(tiny_qwen_dir)
    rows = [_prompt_row("short", 0), _prompt_row("word " * 300, 1), _prompt_row("short too", 2)]
    ds = VLMDataset.from_list(rows, kind="prompt")
    with pytest.raises(DataError, match=r"^row 1, column 'prompt': the prompt has \d+ tokens, above max_prompt_length=64"):
        validate_dataset(ds, processor, max_prompt_length=64, truncation="error")
    report = validate_dataset(ds, processor, max_prompt_length=64, truncation="skip")
    assert report.valid == [0, 2] and report.skipped == {"too_long": 1}
    assert len(report.apply(ds)) == 2
