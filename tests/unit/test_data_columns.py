"""Hub rows as they are: data.prompt_column / image_column / completion_column / system_prompt (issue 15, item 1)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import datasets
import pytest
from PIL import Image

from raylign.config import load_config
from raylign.data.datasets import Columns, load_dataset
from raylign.data.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = "Think in <think></think>, answer in <answer></answer>."


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def open_r1_rows(path: Path, n: int = 4) -> Path:
    """A local copy with the exact columns and Arrow types of lmms-lab/multimodal-open-r1-8k-verified."""
    features = datasets.Features({
        "image": datasets.Image(), "problem": datasets.Value("string"), "solution": datasets.Value("string"),
        "original_question": datasets.Value("string"), "original_answer": datasets.Value("string"),
    })
    rows = {"image": [{"bytes": _png(c), "path": None} for c in ("red", "blue", "green", "white")[:n]],
            "problem": [f"What is {i} + 1?" for i in range(n)], "solution": [f"{i + 1}" for i in range(n)],
            "original_question": ["q"] * n, "original_answer": ["a"] * n}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def test_open_r1_rows_load_without_glue(tmp_path):
    ds = load_dataset(open_r1_rows(tmp_path / "r1.parquet"), kind="prompt",
                      columns=Columns(prompt="problem", image="image", system_prompt=SYSTEM))
    row = ds[1]
    assert row["prompt"] == [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is 1 + 1?"}]}]
    assert len(row["images"]) == 1 and row["images"][0].getpixel((0, 0)) == (0, 0, 255)
    assert row["solution"] == "2" and "problem" not in row
    assert ds.extra_columns == ["solution", "original_question", "original_answer"]  # what rewards receive
    assert ds.shuffle(seed=0).select([0])[0]["prompt"][0]["role"] == "system"  # views keep the system turn


def test_without_the_keys_the_raw_rows_name_the_missing_column(tmp_path):
    with pytest.raises(DataError, match="column 'prompt' is missing"):
        load_dataset(open_r1_rows(tmp_path / "r1.parquet"), kind="prompt")


def test_image_column_holding_lists_and_a_preference_set_as_sft(tmp_path):
    rows = [{"question": "Which colour?", "pictures": [{"bytes": _png("red"), "path": None}] * 2,
             "prompt": [{"role": "user", "content": "Which colour?"}],
             "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}]}]
    features = datasets.Features({
        "question": datasets.Value("string"), "pictures": datasets.List(datasets.Image()),
        "prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "chosen": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "rejected": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
    })
    path = tmp_path / "pref.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    sft = load_dataset(path, kind="sft", columns=Columns(image="pictures", completion="chosen"))
    row = sft[0]
    assert sft.kind == "sft" and row["completion"] == [{"role": "assistant", "content": "red"}]
    assert len(row["images"]) == 2  # a list column stays a list
    assert load_dataset(path, columns=Columns(completion="chosen")).kind == "sft"  # detected after the rename


@pytest.mark.parametrize("columns, match", [
    (Columns(prompt="question"), "data.prompt_column: 'question' would be read as 'prompt', but the data has a 'prompt'"),
    (Columns(prompt="nope"), r"data.prompt_column: column 'nope' is not in the data; its columns are \["),
    (Columns(image="nope"), "data.image_column: column 'nope' is not in the data"),
])
def test_bad_column_keys_name_the_key(tmp_path, columns, match):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi", "question": "hi?"}\n')
    with pytest.raises(DataError, match=match):
        load_dataset(path, kind="prompt", columns=columns)


def test_grpo_recipe_reads_the_raw_schema(tmp_path, tiny_qwen_dir):
    """The shipped recipe, its model and data pointed at local copies, validates and yields chat prompts."""
    from raylign.driver.common import load_job_data
    from raylign.models.loading import load_processor

    cfg = load_config(ROOT / "jobs" / "grpo_qwen2_5_vl_3b.yaml",
                      [f"--model.name_or_path={tiny_qwen_dir}", f"--data.train={open_r1_rows(tmp_path / 'r1.parquet')}",
                       "--data.eval_split_size=1"], method="grpo")
    assert (cfg.data.prompt_column, cfg.data.image_column) == ("problem", "image") and "<think>" in cfg.data.system_prompt
    train, held_out = load_job_data(cfg, load_processor(tiny_qwen_dir), "prompt")
    assert len(train) == 3 and len(held_out) == 1
    row = train[0]
    assert row["prompt"][0] == {"role": "system", "content": cfg.data.system_prompt}
    assert row["prompt"][1]["content"][0] == {"type": "image"} and len(row["images"]) == 1
    tiny = load_config(ROOT / "jobs" / "grpo_qwen2_5_vl_3b.yaml", ["--preset=tiny"], method="grpo").data
    assert dataclasses.astuple(Columns(tiny.prompt_column, tiny.image_column, tiny.completion_column,
                                       tiny.system_prompt)) == dataclasses.astuple(Columns())
