"""Synthetic tasks: deterministic, answers true to the pixels, all row kinds, 20k rows in bounded memory."""

from __future__ import annotations

import re
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from raylign.data.datasets import load_dataset
from raylign.data.synthetic import COLORS, TASKS, generate_example, make_dataset
from raylign.data.validate import validate_dataset

FORMAT = re.compile(r"^<think>[^<]+</think><answer>([^<]+)</answer>$")


def _colour_pixels(image) -> Counter:
    lookup = {rgb: name for name, rgb in COLORS.items()}
    return Counter({lookup[rgb]: n for n, rgb in image.getcolors(maxcolors=1 << 16) if rgb in lookup})


def _components(image, rgb) -> int:
    """Connected blobs of exactly ``rgb`` (4-neighbour flood fill)."""
    w, h = image.size
    pixels = image.load()
    todo = {(x, y) for x in range(w) for y in range(h) if pixels[x, y] == rgb}
    blobs = 0
    while todo:
        blobs += 1
        stack = [todo.pop()]
        while stack:
            x, y = stack.pop()
            for n in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if n in todo:
                    todo.remove(n)
                    stack.append(n)
    return blobs


def test_deterministic_by_seed(tmp_path):
    a = pq.read_table(make_dataset("digit", 30, tmp_path / "a", seed=1, kind="sft") / "sft.parquet")
    b = pq.read_table(make_dataset("digit", 30, tmp_path / "b", seed=1, kind="sft") / "sft.parquet")
    c = pq.read_table(make_dataset("digit", 30, tmp_path / "c", seed=2, kind="sft") / "sft.parquet")
    assert a.equals(b) and not a.equals(c)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_answers_are_true_to_the_pixels(task):
    allowed = {
        "color": {"1", "2", "3", "4"},
        "count": {"1", "2", "3", "4"},
        "compare": {"1", "2"},
        "digit": set("0123456789"),
    }
    answers = Counter()
    for i in range(60):
        ex = generate_example(task, i, seed=0)
        assert ex.answer in allowed[task] and ex.wrong in allowed[task] and ex.wrong != ex.answer
        assert 28 <= min(ex.image.size) and max(ex.image.size) <= 56
        answers[ex.answer] += 1
        if task == "color":
            assert str(list(COLORS).index(_colour_pixels(ex.image).most_common(1)[0][0]) + 1) == ex.answer
        if task == "count":
            colour = ex.question.split()[2]
            assert ex.question == f"How many {colour} shapes are there?"
            assert _components(ex.image, COLORS[colour]) == int(ex.answer)
        if task == "compare":
            half = ex.image.width // 2
            left = sum(_colour_pixels(ex.image.crop((0, 0, half, ex.image.height))).values())
            right = sum(_colour_pixels(ex.image.crop((half, 0, ex.image.width, ex.image.height))).values())
            assert ex.answer == ("1" if left > right else "2")
    assert len(answers) == len(allowed[task])  # every answer occurs


def test_all_kinds_are_written_and_load(tmp_path):
    out = make_dataset("color", 50, tmp_path, seed=0, kind="all")
    loaded = {
        k: load_dataset(out / f"{k}.parquet", cache_dir=str(tmp_path / "cache"))
        for k in ("prompt", "sft", "preference")
    }
    assert {k: ds.kind for k, ds in loaded.items()} == {
        "prompt": "prompt",
        "sft": "sft",
        "preference": "preference",
    }
    for ds in loaded.values():
        validate_dataset(ds)
        assert len(ds) == 50
    prompt, sft, pref = (loaded[k][7] for k in ("prompt", "sft", "preference"))
    assert prompt["prompt"][0]["content"][0]["type"] == "image" and len(prompt["images"]) == 1
    assert prompt["solution"] == sft["solution"] == pref["solution"]
    assert prompt["images"][0].tobytes() == sft["images"][0].tobytes()
    assert FORMAT.match(sft["messages"][1]["content"][0]["text"]).group(1) == sft["solution"]
    assert FORMAT.match(pref["chosen"][0]["content"]).group(1) == pref["solution"]
    assert FORMAT.match(pref["rejected"][0]["content"]).group(1) != pref["solution"]


def _rss_anon_mb() -> float:
    """Anonymous resident memory: what holding decoded images grows (mmapped Arrow pages are not in it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def test_20k_rows_generate_fast_and_stream_in_bounded_memory(tmp_path):
    start = time.perf_counter()
    out = make_dataset("count", 20_000, tmp_path, seed=0, kind="prompt")  # 56x56 images: ~188 MB decoded
    generate_s = time.perf_counter() - start
    ds = load_dataset(out / "prompt.parquet", cache_dir=str(tmp_path / "cache"))
    before = peak = _rss_anon_mb()
    decoded_mb, rows = 0.0, 0
    start = time.perf_counter()
    for batch in ds.iter_batches(256):
        for row in batch:
            image = row["images"][0]
            decoded_mb += image.width * image.height * len(image.getbands()) / 2**20
            rows += 1
        peak = max(peak, _rss_anon_mb())
    read_s = time.perf_counter() - start
    print(
        f"\ngenerate: {20_000 / generate_s:,.0f} rows/s; read+decode: {rows / read_s:,.0f} rows/s; "
        f"decoded {decoded_mb:.0f} MB; RssAnon growth {peak - before:.1f} MB"
    )
    assert rows == 20_000
    assert generate_s < 30
    assert decoded_mb > 150
    assert peak - before < 64


@pytest.mark.parametrize("task", sorted(TASKS))
def test_rejected_reasoning_agrees_with_its_wrong_answer(task, tmp_path):
    """The pair differs in what it says about the image, so preference learning has to look at it."""
    import pyarrow.parquet as pq

    rows = pq.read_table(make_dataset(task, 20, tmp_path, seed=0, kind="preference") / "preference.parquet").to_pylist()
    for row in rows:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        think = lambda text: text.split("</think>")[0]  # noqa: E731
        assert think(chosen) != think(rejected)
