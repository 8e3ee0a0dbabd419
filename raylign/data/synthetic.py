"""Synthetic visual tasks with verifiable answers, drawn with PIL (nothing downloaded), deterministic by seed.

- ``color``: what colour is the big shape? (answered 1-4 for red / green / blue / yellow) -- easy: a tiny model learns it
  from pixels in minutes on a CPU;
- ``count``: how many shapes of a colour are there? (1-4, among other-coloured distractors);
- ``compare``: which side has the bigger shape? (1 = left, 2 = right);
- ``digit``: what digit is shown? (a seven-segment digit 0-9).

Images are small (28..56 pixels a side) so the tiny models stay fast. ``make_dataset`` writes parquet
files, in chunks, with the images as the ``datasets`` Image feature (decoded lazily when read).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image as ImageFeature, List, Value
from PIL import Image, ImageDraw

Task = Literal["color", "count", "compare", "digit"]
OutputKind = Literal["prompt", "sft", "preference", "all"]
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
}
SHAPES = ("circle", "square", "triangle")
ANSWER_HINT = "Put the answer in <answer></answer>."
# Answers are numbers so math-verify (the accuracy reward) can check every task: a word gold answer
# has no math parse, and the accuracy reward then has no opinion (TRL's rule).
COLOR_QUESTION = "What colour is the big shape? Reply with its number: 1 red, 2 green, 3 blue, 4 yellow."
COMPARE_QUESTION = "Which side has the bigger shape? Reply 1 for left, 2 for right."
_CHUNK_ROWS = 1000

# A seven-segment digit: segments a..g as (x0, y0, x1, y1) in a 2 x 4 box (top, upper right, lower right,
# bottom, lower left, upper left, middle).
_SEGMENTS = {
    "a": (0, 0, 2, 0), "b": (2, 0, 2, 2), "c": (2, 2, 2, 4), "d": (0, 4, 2, 4),
    "e": (0, 2, 0, 4), "f": (0, 0, 0, 2), "g": (0, 2, 2, 2),
}  # fmt: skip
_DIGIT_SEGMENTS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abfgcd"]


@dataclass(frozen=True)
class Example:
    """One generated question about one image."""

    image: Image.Image
    question: str
    answer: str  # the verifiable solution
    wrong: str  # a plausible wrong answer (the rejected side of a preference pair)
    reasoning: str  # the <think> text of the demonstration: short, so the answer tokens weigh in SFT
    wrong_reasoning: str = ""  # the <think> text that goes with ``wrong`` (default: reasoning with the answer swapped)


def format_answer(reasoning: str, answer: str) -> str:
    """The demonstration format the format reward checks: ``<think>...</think><answer>...</answer>``."""
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    grey = rng.randint(235, 255)
    return Image.new("RGB", (width, height), (grey, grey, grey))


def _shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _color(rng: random.Random) -> Example:
    width, height = rng.randint(28, 56), rng.randint(28, 56)
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    name = rng.choice(list(COLORS))
    side = min(width, height) * rng.uniform(0.65, 0.85)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    _shape(draw, rng.choice(SHAPES), (x0, y0, x0 + side, y0 + side), COLORS[name])
    others = [c for c in COLORS if c != name]
    if rng.random() < 0.5:  # a small distractor in a corner, another colour
        small = min(width, height) * 0.18
        cx, cy = rng.choice([0, width - small]), rng.choice([0, height - small])
        _shape(draw, rng.choice(SHAPES), (cx, cy, cx + small, cy + small), COLORS[rng.choice(others)])
    code = {c: str(i) for i, c in enumerate(COLORS, start=1)}
    wrong = rng.choice(others)
    return Example(image, COLOR_QUESTION, code[name], code[wrong], f"it is {name}", f"it is {wrong}")


def _count(rng: random.Random) -> Example:
    size, cells = 56, 4
    image = _background(rng, size, size)
    draw = ImageDraw.Draw(image)
    name = rng.choice(list(COLORS))
    k, distractors = rng.randint(1, 4), rng.randint(0, 2)
    cell = size / cells
    slots = rng.sample(range(cells * cells), k + distractors)
    for n, slot in enumerate(slots):
        colour = name if n < k else rng.choice([c for c in COLORS if c != name])
        r, c = divmod(slot, cells)
        s = cell * rng.uniform(0.55, 0.8)
        # A pixel of margin inside the cell: shapes in neighbouring cells never touch (the count stays exact).
        x0, y0 = c * cell + 1 + rng.uniform(0, cell - s - 2), r * cell + 1 + rng.uniform(0, cell - s - 2)
        _shape(draw, rng.choice(SHAPES), (x0, y0, x0 + s, y0 + s), COLORS[colour])
    wrong = rng.choice([str(n) for n in range(1, 5) if n != k])
    return Example(image, f"How many {name} shapes are there?", str(k), wrong, f"I count {k}")


def _compare(rng: random.Random) -> Example:
    width, height = 56, rng.randint(28, 56)
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    half = width / 2
    big = min(half, height) * rng.uniform(0.7, 0.95)
    small = big / rng.uniform(1.6, 2.5)
    answer = rng.choice(["left", "right"])
    for side, offset in (("left", 0.0), ("right", half)):
        s = big if side == answer else small
        x0, y0 = offset + rng.uniform(0, half - s), rng.uniform(0, height - s)
        _shape(draw, rng.choice(SHAPES), (x0, y0, x0 + s, y0 + s), COLORS[rng.choice(list(COLORS))])
    code = {"left": "1", "right": "2"}
    wrong = "right" if answer == "left" else "left"
    return Example(image, COMPARE_QUESTION, code[answer], code[wrong], f"the {answer} one is bigger",
                   f"the {wrong} one is bigger")


def _digit(rng: random.Random) -> Example:
    width, height = rng.randint(36, 56), 56
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    digit = rng.randint(0, 9)
    unit = rng.uniform(9.0, 11.5)  # one segment spans 2 units of height: 4 units = the digit's height
    thick = rng.randint(3, 5)
    x0 = rng.uniform(thick, max(thick, width - 2 * unit - thick))
    y0 = rng.uniform(thick, max(thick, height - 4 * unit - thick))
    colour = COLORS[rng.choice(list(COLORS))]
    for seg in _DIGIT_SEGMENTS[digit]:
        a, b, c, d = _SEGMENTS[seg]
        draw.line([(x0 + a * unit, y0 + b * unit), (x0 + c * unit, y0 + d * unit)], fill=colour, width=thick)
    wrong = str(rng.choice([n for n in range(10) if n != digit]))
    return Example(image, "What digit is shown?", str(digit), wrong, f"it is {digit}")


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "color": _color,
    "count": _count,
    "compare": _compare,
    "digit": _digit,
}


def generate_example(task: Task, index: int, seed: int = 0) -> Example:
    """Example ``index`` of ``task``; the same ``(task, index, seed)`` always draws the same example."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[task](random.Random(seed * 1_000_003 + index))


_PARTS = List({"type": Value("string"), "text": Value("string")})
_CHAT = List({"role": Value("string"), "content": _PARTS})
_COMPLETION = List({"role": Value("string"), "content": Value("string")})
_COMMON = {"images": List(ImageFeature()), "solution": Value("string"), "task": Value("string")}
FEATURES: dict[str, Features] = {
    "prompt": Features({"prompt": _CHAT, **_COMMON}),
    "sft": Features({"messages": _CHAT, **_COMMON}),
    "preference": Features({"prompt": _CHAT, "chosen": _COMPLETION, "rejected": _COMPLETION, **_COMMON}),
}


def _user_turn(question: str) -> dict:
    return {
        "role": "user",
        "content": [{"type": "image", "text": None}, {"type": "text", "text": f"{question} {ANSWER_HINT}"}],
    }


def _rows(ex: Example, png: bytes, task: str) -> dict[str, dict]:
    """The example as a row of each output kind."""
    common = {"images": [{"bytes": png, "path": None}], "solution": ex.answer, "task": task}
    user = _user_turn(ex.question)
    right = format_answer(ex.reasoning, ex.answer)
    wrong = format_answer(ex.wrong_reasoning or ex.reasoning.replace(ex.answer, ex.wrong), ex.wrong)
    return {
        "prompt": {"prompt": [user], **common},
        "sft": {
            "messages": [user, {"role": "assistant", "content": [{"type": "text", "text": right}]}],
            **common,
        },
        "preference": {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": right}],
            "rejected": [{"role": "assistant", "content": wrong}],
            **common,
        },
    }


def make_dataset(task: Task, n: int, out: str | Path, seed: int = 0, kind: OutputKind = "all") -> Path:
    """Write ``n`` examples of ``task`` to ``out/<kind>.parquet`` (all three kinds for ``kind="all"``).

    Rows: ``prompt`` (one user turn: an image part and the question) or ``messages`` (plus the
    assistant's ``<think>...</think><answer>...</answer>``) or ``prompt``/``chosen``/``rejected``
    (chosen right, rejected wrong, same format); every kind has ``images`` (one PNG), ``solution``
    (the answer string) and ``task``. Written in chunks of 1,000 rows. Returns ``out``.
    """
    kinds = ["prompt", "sft", "preference"] if kind == "all" else [kind]
    if any(k not in FEATURES for k in kinds):
        raise ValueError(f"unknown output kind {kind!r}; choose prompt, sft, preference or all")
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    schemas = {k: FEATURES[k].arrow_schema for k in kinds}
    writers = {k: pq.ParquetWriter(out / f"{k}.parquet", schemas[k]) for k in kinds}
    try:
        for start in range(0, n, _CHUNK_ROWS):
            chunk: dict[str, list[dict]] = {k: [] for k in kinds}
            for i in range(start, min(n, start + _CHUNK_ROWS)):
                ex = generate_example(task, i, seed)
                buf = BytesIO()
                ex.image.save(buf, format="PNG", compress_level=1)
                rows = _rows(ex, buf.getvalue(), task)
                for k in kinds:
                    chunk[k].append(rows[k])
            for k in kinds:
                writers[k].write_table(pa.Table.from_pylist(chunk[k], schema=schemas[k]))
    finally:
        for w in writers.values():
            w.close()
    return out
