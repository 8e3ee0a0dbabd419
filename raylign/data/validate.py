"""Check a dataset before any compute is spent on it.

One pass over the rows, in chunks, reading images as undecoded bytes and decoding each once (on a
few threads: PIL decodes outside the GIL). The first bad row raises one DataError naming the row,
the column, the problem and the fix; with ``skip_invalid=True`` bad rows are counted per reason
instead and left out (``report.apply(ds)``), as are too-long rows under ``truncation="skip"``.

Reasons: ``empty_dataset`` and ``missing_column`` (always raised), ``bad_format``,
``placeholder_mismatch``, ``empty_image``, ``missing_image_file``, ``corrupt_image``,
``decompression_bomb``, ``extreme_aspect_ratio``, ``too_long``, ``control_characters``.
"""

from __future__ import annotations

import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import datasets

from raylign.data.chat import (
    IMAGE_PLACEHOLDERS,
    count_image_parts,
    count_literal_placeholders,
    is_conversational,
    literal_problem,
    to_messages,
)
from raylign.data.datasets import REQUIRED_COLUMNS, VLMDataset, check_columns
from raylign.data.errors import DataError, row_error
from raylign.data.images import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, ImageProblem, check_image
from raylign.data.lengths import LengthCounter

_SKIP_HINT = " (or set skip_invalid=True to skip such rows)"
_COMPLETION_COLUMNS = ("completion", "chosen", "rejected")  # assistant text: never holds an image
_IMAGE_FIX = {
    "empty_image": "re-encode the image or drop the row",
    "bad_image_value": "store images as the datasets Image feature, bytes or file paths",
    "missing_image_file": (
        "fix the path (relative paths are read from the data file's folder) or drop the row"
    ),
    "corrupt_image": "re-encode the image or drop the row",
    "decompression_bomb": "downscale the image, or raise max_image_pixels if it is genuine",
    "extreme_aspect_ratio": "crop or pad the image to a less extreme aspect ratio",
}


@dataclass
class ValidationReport:
    """What validation found: the valid row indices and, per reason, how many rows were skipped."""

    num_rows: int = 0
    valid: list[int] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    examples: dict[str, str] = field(default_factory=dict)  # reason -> the first such message

    @property
    def num_valid(self) -> int:
        return len(self.valid)

    def apply(self, ds: VLMDataset) -> VLMDataset:
        """``ds`` without the invalid rows."""
        if len(self.valid) == self.num_rows:
            return ds
        if ds.streaming:
            keep = set(self.valid)
            return ds._wrap(ds.hf.filter(lambda _, i: i in keep, with_indices=True))
        return ds.select(self.valid)


@dataclass(frozen=True)
class _Problem:
    reason: str
    column: str
    detail: str
    fix: str


def _raw(ds: VLMDataset):
    """The underlying dataset with image decoding switched off (images come as bytes/path dicts)."""
    hf, col = ds.hf, ds.image_column
    feature = (hf.features or {}).get(col) if col else None
    if isinstance(feature, datasets.Image):
        return hf.cast_column(col, datasets.Image(decode=False))
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.Image):
        return hf.cast_column(col, datasets.List(datasets.Image(decode=False)))
    return hf


def _chunks(ds: VLMDataset, size: int) -> Iterator[list[dict[str, Any]]]:
    for columns in _raw(ds).iter(batch_size=size):
        yield [dict(zip(columns, values)) for values in zip(*columns.values())]


def _row_image_values(row: dict[str, Any]) -> list[Any]:
    if "images" in row:
        return list(row["images"] or [])
    return [row["image"]] if row.get("image") is not None else []


def _format_problem(kind: str, row: dict[str, Any], n_images: int) -> _Problem | None:
    """Malformed chat columns, or image placeholders that do not match the images."""
    columns = REQUIRED_COLUMNS[kind]
    if kind == "sft" and row.get("messages") is None:
        columns = ("prompt", "completion")
    placeholders, literals = 0, 0
    for col in columns:
        value = row.get(col)
        if not (isinstance(value, str) and value) and not is_conversational(value):
            return _Problem(
                "bad_format",
                col,
                f"expected a non-empty string or a list of chat messages, got {type(value).__name__}",
                "fix the row or drop it",
            )
        if col in _COMPLETION_COLUMNS and isinstance(value, str):
            value = [{"role": "assistant", "content": value}]
        messages = to_messages(value)
        if detail := literal_problem(messages):
            return _Problem("placeholder_mismatch", col, detail, "fix the row or drop it")
        if detail := _control_character(messages):
            return _Problem("control_characters", col, detail, "remove them or replace them by spaces")
        placeholders += count_image_parts(messages)
        literals += count_literal_placeholders(value)
    if (
        kind == "sft"
        and "messages" in columns
        and not any(m.get("role") == "assistant" for m in row["messages"])
    ):
        return _Problem("bad_format", "messages", "no assistant turn to train on", "add an assistant message")
    if placeholders and placeholders != n_images:
        forms = " or ".join(map(repr, IMAGE_PLACEHOLDERS[1:]))
        written = f", {literals} of them written in the text as {forms}" if literals else ""
        return _Problem(
            "placeholder_mismatch",
            columns[0],
            f"{placeholders} image placeholder(s){written} but {n_images} image(s)",
            "give exactly one placeholder per image, in image order: a {'type': 'image'} part, or '<image>' "
            "written where the image goes",
        )
    return None


# C0 control characters and DEL, except tab, newline and carriage return: in text they mean binary
# junk or terminal escapes (they also garble every log and sample view that prints the text).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _control_character(messages: list[dict[str, Any]]) -> str | None:
    for turn, message in enumerate(messages):
        content = message.get("content")
        parts = [content] if isinstance(content, str) else [p.get("text") for p in content or []]
        for text in parts:
            if isinstance(text, str) and (found := _CONTROL.search(text)):
                return f"turn {turn} has the control character {found.group()!r} at offset {found.start()}"
    return None


def validate_dataset(
    ds: VLMDataset,
    processor=None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation: str = "error",
    skip_invalid: bool = False,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
    chunk_size: int = 256,
    num_threads: int = 4,
) -> ValidationReport:
    """Check every row of ``ds`` (see the module docstring); lengths need ``processor``.

    ``truncation`` is the policy collation will use: under ``"truncate_left"`` a row is too long only
    when its images and completion alone exceed the limit.
    """
    check_columns(ds.columns, ds.kind)
    limited = max_length is not None or max_prompt_length is not None
    lengths = (
        LengthCounter(processor, ds.min_pixels, ds.max_pixels) if processor is not None and limited else None
    )
    report = ValidationReport()
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        for chunk in _chunks(ds, chunk_size):
            values = [_row_image_values(row) for row in chunk]
            flat = [v for vs in values for v in vs]
            sizes = iter(
                pool.map(lambda v: _checked(v, max_image_pixels, max_aspect_ratio, ds.base_dir), flat)
            )
            for row, vs in zip(chunk, values):
                index = report.num_rows
                report.num_rows += 1
                row_sizes = [next(sizes) for _ in vs]
                problem = _image_problem(ds, row_sizes) or _format_problem(ds.kind, row, len(vs))
                if problem is None and lengths is not None:
                    found = lengths.check(ds.kind, row, row_sizes, max_length, max_prompt_length, truncation)
                    problem = _Problem("too_long", *found) if found else None
                if problem is None:
                    report.valid.append(index)
                    continue
                error = row_error(index, problem.column, problem.detail, problem.fix + _SKIP_HINT)
                # truncation='skip' drops too-long rows (counted) whatever skip_invalid says.
                if not (skip_invalid or (problem.reason == "too_long" and truncation == "skip")):
                    raise error
                report.skipped[problem.reason] += 1
                report.examples.setdefault(problem.reason, str(error))
    if report.num_rows == 0:
        name = f"dataset {ds.source}" if ds.source else "dataset"
        raise DataError(f"{name} has no rows; check the path, split and filters")
    if not report.valid:
        raise DataError(
            f"every one of the {report.num_rows} rows is invalid ({dict(report.skipped)}); first: "
            f"{next(iter(report.examples.values()))}"
        )
    return report


def _checked(value: Any, max_image_pixels: int, max_aspect_ratio: float, base_dir: str | None):
    """``(width, height)`` of a good image, or the ImageProblem of a bad one (returned, not raised)."""
    try:
        return check_image(value, max_image_pixels, max_aspect_ratio, base_dir)
    except ImageProblem as problem:
        return problem


def _image_problem(ds: VLMDataset, sizes: list) -> _Problem | None:
    for k, size in enumerate(sizes):
        if isinstance(size, ImageProblem):
            column = ds.image_column or "images"
            return _Problem(size.reason, column, f"image {k}: {size.detail}", _IMAGE_FIX[size.reason])
    return None
