"""Loading datasets from every local format, kind detection, held-out splits, image fitting."""

from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image

from raylign.data.datasets import VLMDataset, detect_kind, load_dataset, train_eval_split
from raylign.data.errors import DataError
from raylign.data.images import fit_image, fitted_size
from raylign.data.synthetic import make_dataset
from raylign.data.validate import validate_dataset


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return make_dataset("compare", 40, tmp_path_factory.mktemp("synthetic"), seed=3)


def _load(path, tmp_path, **kwargs) -> VLMDataset:
    return load_dataset(path, cache_dir=str(tmp_path / "cache"), **kwargs)


def test_parquet_kinds_and_lazy_images(synthetic_dir, tmp_path):
    kinds = {
        name: _load(synthetic_dir / f"{name}.parquet", tmp_path) for name in ("prompt", "sft", "preference")
    }
    assert {name: ds.kind for name, ds in kinds.items()} == {
        "prompt": "prompt",
        "sft": "sft",
        "preference": "preference",
    }
    prompt = kinds["prompt"]
    assert isinstance(prompt.hf.features["images"].feature, datasets.Image)  # stored encoded, decoded on read
    assert prompt.extra_columns == ["solution", "task"] and len(prompt) == 40
    row = prompt[5]
    assert row["images"][0].mode == "RGB" and row["solution"] in ("1", "2")
    assert [r["solution"] for r in prompt.rows([5, 6])] == [row["solution"], prompt[6]["solution"]]
    batches = list(prompt.iter_batches(16))
    assert [len(b) for b in batches] == [16, 16, 8]


def test_streaming_parquet(synthetic_dir, tmp_path):
    ds = _load(synthetic_dir / "sft.parquet", tmp_path, streaming=True)
    assert ds.streaming and ds.kind == "sft"
    rows = list(ds)
    assert len(rows) == 40 and rows[0]["images"][0].size[0] == 56
    train, held = train_eval_split(ds, 10)
    assert len(list(held)) == 10 and len(list(train)) == 30
    report = validate_dataset(ds)  # one streamed pass, images checked from their bytes
    assert report.num_valid == 40 and len(list(report.apply(ds))) == 40


def test_save_to_disk_dir_and_splits(tmp_path):
    rows = [
        {
            "prompt": f"q{i}",
            "chosen": "a",
            "rejected": "b",
            "image": Image.new("RGBA", (20, 10), (0, 0, 0, 0)),
        }
        for i in range(4)
    ]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "dd")
    ds = _load(tmp_path / "dd", tmp_path)
    assert ds.kind == "preference" and ds.image_column == "image"
    row = ds[0]
    assert "image" not in row and row["images"][0].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    with pytest.raises(DataError, match=r"has splits \['train'\], not 'test'; set data.split to one of them"):
        _load(tmp_path / "dd", tmp_path, split="test")


def test_image_folder_with_metadata(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    meta = []
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (30, 30), (255, 0, 0) if colour == "red" else (0, 0, 255)).save(folder / f"{i}.png")
        meta.append({"file_name": f"{i}.png", "prompt": "what colour?", "solution": colour})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    ds = _load(folder, tmp_path)
    assert ds.kind == "prompt" and len(ds) == 2
    colours = {r["solution"]: r["images"][0].getpixel((1, 1)) for r in ds}
    assert colours == {"red": (255, 0, 0), "blue": (0, 0, 255)}
    assert validate_dataset(ds).num_valid == 2  # the single `image` column is checked as well


def test_missing_local_path_and_unreachable_hub(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"^dataset path \./nope\.parquet does not exist; check the path"):
        load_dataset("./nope.parquet")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DataError) as info:
        load_dataset("someone/some-vlm-data")
    assert str(info.value) == (
        "dataset 'someone/some-vlm-data' is not a local path and the Hugging Face hub (http://127.0.0.1:9) "
        "is not reachable; download it where there is network (datasets.load_dataset(...).save_to_disk(dir)) "
        "and pass the local path, or set HF_HUB_OFFLINE=1 to use a cached copy"
    )


def test_detect_kind():
    assert detect_kind(["messages", "images"]) == "sft"
    assert detect_kind(["prompt", "completion"]) == "sft"
    assert detect_kind(["prompt", "image", "solution"]) == "prompt"
    assert detect_kind(["prompt", "chosen", "rejected"]) == "preference"
    with pytest.raises(DataError, match=r"^columns \['question'\] match no dataset kind"):
        detect_kind(["question"])
    with pytest.raises(DataError, match="needs an explicit 'prompt' column"):
        detect_kind(["chosen", "rejected"])


def test_train_eval_split(synthetic_dir, tmp_path):
    ds = _load(synthetic_dir / "prompt.parquet", tmp_path)
    train, held = train_eval_split(ds, 0.25, seed=1)
    assert (len(train), len(held)) == (30, 10)
    _, again = train_eval_split(ds, 0.25, seed=1)
    _, other = train_eval_split(ds, 0.25, seed=2)

    def source_rows(d):  # the rows of ds each split holds
        return d.hf._indices.column(0).to_pylist()

    assert source_rows(held) == source_rows(again) != source_rows(other)
    assert sorted(source_rows(train) + source_rows(held)) == list(range(40))
    assert len(train_eval_split(ds, 7)[1]) == 7
    with pytest.raises(DataError, match="choose a size between 1 and 39 rows or a fraction in"):
        train_eval_split(ds, 40)


def test_fit_image_keeps_aspect_and_bounds():
    big = fit_image(Image.new("RGB", (1000, 500)), max_pixels=56 * 56)
    assert big.width * big.height <= 56 * 56 and abs(big.width / big.height - 2) < 0.1
    small = fit_image(Image.new("L", (10, 10)), min_pixels=28 * 28)
    assert small.mode == "RGB" and small.width * small.height >= 28 * 28
    w, h = fitted_size(28, 4200, max_pixels=3136)
    assert (w, h) == (5, 627) and w * h <= 3136 and h / w <= 150  # the aspect ratio cannot grow by rounding
    assert fitted_size(40, 30, 28 * 28, 56 * 56) == (40, 30)
    ds = VLMDataset.from_list([{"prompt": "x", "images": [Image.new("RGB", (400, 300))]}], max_pixels=56 * 56)
    assert ds[0]["images"][0].size == (64, 48)
