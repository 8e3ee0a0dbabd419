"""Every kind of bad input gives one exact error before compute, or is skipped and counted."""

from __future__ import annotations

import io
import json
import struct
import zlib

import datasets
import pytest
from PIL import Image

from raylign.data.collate import collate_preference, collate_sft
from raylign.data.datasets import VLMDataset, load_dataset
from raylign.data.errors import DataError
from raylign.data.lengths import LengthCounter
from raylign.data.validate import validate_dataset
from raylign.models.loading import load_processor

HINT = " (or set skip_invalid=True to skip such rows)"
FEATURES = datasets.Features({"prompt": datasets.Value("string"), "images": datasets.List(datasets.Image())})


def _png(w: int = 40, h: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A tiny PNG that claims ``w x h`` pixels: what a decompression bomb looks like before decoding."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def _dataset(images_per_row: list[list[bytes]], prompts: list | None = None) -> VLMDataset:
    rows = {
        "prompt": prompts or ["what colour?"] * len(images_per_row),
        "images": [[{"bytes": b, "path": None} for b in imgs] for imgs in images_per_row],
    }
    return VLMDataset(datasets.Dataset.from_dict(rows, features=FEATURES))


def _error(ds: VLMDataset, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        validate_dataset(ds, **kwargs)
    return str(info.value)


def test_good_rows_pass():
    report = validate_dataset(_dataset([[_png()], [_png(30, 50), _png()]]))
    assert report.valid == [0, 1] and not report.skipped


def test_empty_image_bytes():
    assert _error(_dataset([[_png()], [b""]])) == (
        "row 1, column 'images': image 0: the image bytes are empty; re-encode the image or drop the row"
        + HINT
    )


def test_corrupt_image_bytes():
    assert _error(_dataset([[_png(), b"not an image"]])) == (
        "row 0, column 'images': image 1: the data is not an image format PIL can read; "
        "re-encode the image or drop the row" + HINT
    )
    truncated = _png(64, 64)[:60]
    assert _error(_dataset([[truncated]])) == (
        "row 0, column 'images': image 0: the image cannot be decoded (OSError: image file is truncated); "
        "re-encode the image or drop the row" + HINT
    )


def test_missing_image_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png())
    lines = [
        {"prompt": "colour?", "images": ["imgs/a.png"]},
        {"prompt": "colour?", "images": ["imgs/gone.png"]},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    ds = load_dataset(tmp_path / "data.jsonl", cache_dir=str(tmp_path / "cache"))
    assert ds[0]["images"][0].size == (40, 40)  # relative paths read from the file's folder
    assert _error(ds) == (
        f"row 1, column 'images': image 0: image file not found: {tmp_path}/imgs/gone.png; fix the path "
        f"(relative paths are read from the data file's folder) or drop the row" + HINT
    )


def test_decompression_bomb():
    # Above raylign's limit (8192^2) but below PIL's: refused from the header, never decoded.
    assert _error(_dataset([[_png_header(9000, 9000)]])) == (
        "row 0, column 'images': image 0: the image is 9000x9000 = 81000000 pixels, above "
        "max_image_pixels=67108864 (a possible decompression bomb); downscale the image, or raise "
        "max_image_pixels if it is genuine" + HINT
    )
    # Above PIL's own limit: PIL refuses at open, and that is reported the same way.
    message = _error(_dataset([[_png_header(100_000, 100_000)]]), max_image_pixels=10**12)
    assert message.startswith(
        "row 0, column 'images': image 0: PIL refused it as a decompression bomb (Image size"
    )


def test_extreme_aspect_ratio():
    assert _error(_dataset([[_png(300, 1)]])) == (
        "row 0, column 'images': image 0: the image is 300x1, aspect ratio 300 above 200 "
        "(Qwen-VL's processor refuses it); crop or pad the image to a less extreme aspect ratio" + HINT
    )


def test_placeholder_mismatch():
    two_parts = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}
    ]
    ds = VLMDataset.from_list([{"prompt": two_parts, "images": [Image.new("RGB", (30, 30))]}])
    assert _error(ds) == (
        "row 0, column 'prompt': 2 image placeholder(s) but 1 image(s); give exactly one placeholder per "
        "image, in image order: a {'type': 'image'} part, or '<image>' written where the image goes" + HINT
    )


def test_missing_column_and_empty_dataset():
    ds = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "wrong": ["c"]})
    with pytest.raises(DataError) as info:
        VLMDataset(ds, kind="preference")
    assert str(info.value) == (
        "column 'rejected' is missing: a preference dataset needs 'prompt', 'chosen', 'rejected', found "
        "['chosen', 'prompt', 'wrong']; rename your columns or choose another kind"
    )
    empty = VLMDataset(
        datasets.Dataset.from_dict(
            {"prompt": []}, features=datasets.Features({"prompt": datasets.Value("string")})
        )
    )
    assert _error(empty) == "dataset has no rows; check the path, split and filters"


@pytest.mark.parametrize("kind", ["prompt", "preference", "sft"])
def test_too_long_counts_image_tokens_exactly(tiny_model_dir, kind):
    processor = load_processor(tiny_model_dir)
    prompt = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it?"}]}
    ]
    images = [Image.new("RGB", (50, 37), (1, 2, 3))]
    row = {"prompt": prompt, "images": images}
    if kind == "preference":
        row |= {"chosen": "red", "rejected": "blue"}
    if kind == "sft":
        row = {
            "messages": prompt + [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
            "images": images,
        }
    ds = VLMDataset.from_list([row])
    # The true lengths, from the processor itself.
    pair = collate_preference(
        processor, [{"prompt": prompt, "chosen": "red", "rejected": "blue", "images": images}]
    )
    prompt_len = int(pair["completion_mask"][0].nonzero()[0])
    full_len = int(
        collate_sft(processor, [{"prompt": prompt, "completion": "red", "images": images}])[
            "attention_mask"
        ].sum()
    )
    if kind == "sft":
        assert _error(ds, processor=processor, max_length=full_len - 1) == (
            f"row 0, column 'messages': the row has {full_len} tokens, above max_length={full_len - 1}; "
            f"shorten it, lower max_pixels, raise the limit, or set truncation='truncate_left'" + HINT
        )
    else:
        assert _error(ds, processor=processor, max_prompt_length=prompt_len - 1) == (
            f"row 0, column 'prompt': the prompt has {prompt_len} tokens, "
            f"above max_prompt_length={prompt_len - 1}; shorten it, lower max_pixels, raise the limit, "
            f"or set truncation='truncate_left'" + HINT
        )
    longest = max(full_len, int(pair["attention_mask"].sum(1).max()))
    report = validate_dataset(ds, processor=processor, max_length=longest, max_prompt_length=prompt_len)
    assert report.num_valid == 1


def test_image_token_counts_match_the_processor(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    counter = LengthCounter(processor, max_pixels=40 * 40)
    for w, h in [(28, 28), (56, 56), (100, 30), (30, 100), (300, 290), (20, 9)]:
        from raylign.data.images import fit_image

        image = fit_image(Image.new("RGB", (w, h)), max_pixels=40 * 40)
        batch = collate_sft(processor, [{"prompt": "x", "completion": "y", "images": [image]}])
        assert counter.image_tokens(w, h) == int((batch["input_ids"] == processor.image_token_id).sum()), (
            w,
            h,
        )


def test_skip_invalid_counts_every_reason(tmp_path):
    bad = [
        [b""],
        [b"junk"],
        [_png_header(9000, 9000)],
        [_png(300, 1)],
        [{"bytes": None, "path": str(tmp_path / "x.png")}],
    ]
    rows = {
        "prompt": ["ok", "a", "b", "c", "d", "e", "ok"],
        "images": [[{"bytes": _png(), "path": None}]]
        + [[b if isinstance(b, dict) else {"bytes": b, "path": None} for b in imgs] for imgs in bad]
        + [[{"bytes": _png(), "path": None}]],
    }
    ds = VLMDataset(datasets.Dataset.from_dict(rows, features=FEATURES))
    report = validate_dataset(ds, skip_invalid=True, chunk_size=3)
    assert report.valid == [0, 6] and report.num_rows == 7
    assert dict(report.skipped) == {
        "empty_image": 1,
        "corrupt_image": 1,
        "decompression_bomb": 1,
        "extreme_aspect_ratio": 1,
        "missing_image_file": 1,
    }
    kept = report.apply(ds)
    assert len(kept) == 2 and kept[1]["prompt"] == "ok"
