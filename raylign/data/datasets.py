"""Datasets through Hugging Face ``datasets``: local parquet / jsonl / arrow / image folders, or hub names.

Rows stay in Arrow (memory-mapped, or streamed with ``streaming=True``); images are decoded when a
row is read, so a dataset larger than RAM is fine. The kind of a dataset follows its columns:

- ``"sft"``: ``messages`` (or ``prompt`` + ``completion``);
- ``"prompt"``: ``prompt`` and any extra columns (e.g. ``solution``, handed to reward functions);
- ``"preference"``: ``prompt``, ``chosen``, ``rejected``;

each with optional images: an ``images`` list, or a single ``image`` column. Images may be stored
as the ``datasets`` Image feature, raw bytes, or file paths (relative ones to the data file's folder).

A dataset with its own column names is read as it is through ``Columns`` (the ``data.*_column``
keys): e.g. multimodal-open-r1's ``problem`` + ``image`` become ``prompt`` + images, and a preference
set's ``chosen`` becomes an SFT ``completion``; ``system_prompt`` puts a system turn before each prompt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import datasets

from raylign.data.chat import is_conversational, to_messages
from raylign.data.errors import DataError
from raylign.data.images import decode_image, fit_image
from raylign.hub import hub_endpoint, hub_offline, hub_reachable

Kind = Literal["sft", "prompt", "preference"]
KINDS: tuple[str, ...] = ("sft", "prompt", "preference")
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("messages",),
    "prompt": ("prompt",),
    "preference": ("prompt", "chosen", "rejected"),
}
IMAGE_COLUMNS = ("images", "image")
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow", ".csv": "csv"}
_READ_CHUNK = 256  # rows fetched from Arrow at a time when iterating


def detect_kind(columns: Sequence[str]) -> Kind:
    """The dataset kind its columns describe (see the module docstring)."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        if "prompt" not in cols:
            raise DataError(
                f"columns {sorted(cols)}: a preference dataset needs an explicit 'prompt' column next to "
                f"'chosen' and 'rejected'; split the shared prompt out of the conversations"
            )
        return "preference"
    if "messages" in cols or {"prompt", "completion"} <= cols:
        return "sft"
    if "prompt" in cols:
        return "prompt"
    raise DataError(
        f"columns {sorted(cols)} match no dataset kind; provide 'messages' (sft), 'prompt' (grpo/gspo) or "
        f"'prompt' + 'chosen' + 'rejected' (dpo/mpo)"
    )


def check_columns(columns: Sequence[str], kind: str) -> None:
    """Raise a DataError naming the missing column when ``columns`` cannot serve ``kind``."""
    if kind not in KINDS:
        raise DataError(f"unknown dataset kind {kind!r}; use one of {', '.join(KINDS)}")
    required = REQUIRED_COLUMNS[kind]
    if kind == "sft" and "messages" not in columns and {"prompt", "completion"} <= set(columns):
        required = ("prompt", "completion")
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(
            f"column '{missing[0]}' is missing: a {kind} dataset needs {', '.join(map(repr, required))}, "
            f"found {sorted(columns)}; rename your columns or choose another kind"
        )


@dataclass(frozen=True)
class Columns:
    """Where a dataset keeps what raylign reads (defaults: raylign's own names)."""

    prompt: str = "prompt"  # read as ``prompt``
    image: str | None = None  # one image or a list per row; None = ``images`` or ``image``
    completion: str | None = None  # read as ``completion`` (an SFT target), e.g. ``chosen``
    system_prompt: str | None = None  # a system turn put before every prompt / conversation


def rename_columns(hf, columns: Columns):
    """``hf`` with the columns ``columns`` names renamed to raylign's (an Arrow rename: no copy)."""
    names = list(hf.column_names or [])
    wanted = [("data.prompt_column", columns.prompt, "prompt"), ("data.completion_column", columns.completion,
              "completion"), ("data.image_column", columns.image, _image_target(hf, columns.image))]
    mapping = {}
    for key, source, target in wanted:
        if source is None or source == target:
            continue
        if source not in names:
            raise DataError(f"{key}: column {source!r} is not in the data; its columns are {sorted(names)}")
        clash = [t for t in (IMAGE_COLUMNS if key == "data.image_column" else (target,)) if t in names]
        if clash:
            raise DataError(f"{key}: {source!r} would be read as {target!r}, but the data has a {clash[0]!r} "
                            f"column too; point {key} at it, or drop one of them")
        mapping[source] = target
    return hf.rename_columns(mapping) if mapping else hf


def _image_target(hf, source: str | None) -> str:
    """``images`` for a list-of-images column, ``image`` for one image per row (from the Arrow features)."""
    feature = (hf.features or {}).get(source) if source else None
    return "images" if isinstance(feature, (list, datasets.List)) else "image"


def with_system(prompt: Any, system: str, num_images: int) -> list[dict[str, Any]]:
    """The prompt as chat messages with ``system`` as its first turn (an existing system turn is kept)."""
    messages = to_messages(prompt, num_images)
    if messages and messages[0].get("role") == "system":
        return messages
    return [{"role": "system", "content": system}, *messages]


class VLMDataset:
    """A ``datasets`` dataset (map-style or streaming) whose rows come out ready for collation.

    Reading a row decodes its images and returns them as RGB PIL images under ``images``, resized
    into ``[min_pixels, max_pixels]`` (aspect kept) when those are set; the other columns pass as is.
    """

    def __init__(
        self,
        hf: datasets.Dataset | datasets.IterableDataset,
        kind: Kind | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        source: str = "",
        base_dir: str | None = None,
        system_prompt: str | None = None,
    ):
        columns = list(hf.column_names or [])
        self.kind: Kind = kind or detect_kind(columns)
        check_columns(columns, self.kind)
        self.hf = hf
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.source = source
        self.base_dir = base_dir
        self.system_prompt = system_prompt

    @property
    def columns(self) -> list[str]:
        return list(self.hf.column_names or [])

    @property
    def image_column(self) -> str | None:
        """``images`` (a list per row), ``image`` (one per row), or None for text-only data."""
        return next((c for c in IMAGE_COLUMNS if c in self.columns), None)

    @property
    def extra_columns(self) -> list[str]:
        """Columns besides the kind's own and the images, e.g. ``solution`` (reward functions get them)."""
        own = set(REQUIRED_COLUMNS[self.kind]) | {"messages", "completion"} | set(IMAGE_COLUMNS)
        return [c for c in self.columns if c not in own]

    @property
    def streaming(self) -> bool:
        return isinstance(self.hf, datasets.IterableDataset)

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("a streaming dataset has no length; iterate it, or load it with streaming=False")
        return len(self.hf)

    def _wrap(self, hf) -> VLMDataset:
        return VLMDataset(hf, self.kind, self.min_pixels, self.max_pixels, self.source, self.base_dir,
                          self.system_prompt)

    def prepare(self, row: dict[str, Any]) -> dict[str, Any]:
        """A raw row with its images decoded, RGB and resized, under ``images`` (and the system turn added)."""
        row = dict(row)
        if "image" in row:
            single = row.pop("image")
            many = single if isinstance(single, (list, tuple)) else [] if single is None else [single]
            row.setdefault("images", many)
        images = row.get("images") or []
        row["images"] = [
            fit_image(decode_image(v, self.base_dir), self.min_pixels, self.max_pixels) for v in images
        ]
        if self.system_prompt:
            for col in ("prompt", "messages"):
                if isinstance(row.get(col), str) or is_conversational(row.get(col)):
                    row[col] = with_system(row[col], self.system_prompt, len(row["images"]))
                    break  # one system turn: a messages row's prompt is its own first turns
        return row

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.prepare(self.hf[int(index)])

    def rows(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The rows at ``indices`` (one Arrow read for all of them)."""
        columns = self.hf[list(map(int, indices))]
        return [self.prepare(dict(zip(columns, values))) for values in zip(*columns.values())]

    def iter_batches(self, batch_size: int) -> Iterator[list[dict[str, Any]]]:
        """Lists of ``batch_size`` prepared rows (the last may be shorter), read in Arrow chunks."""
        for columns in self.hf.iter(batch_size=batch_size):
            yield [self.prepare(dict(zip(columns, values))) for values in zip(*columns.values())]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.iter_batches(_READ_CHUNK):
            yield from batch

    def select(self, indices: Sequence[int]) -> VLMDataset:
        return self._wrap(self.hf.select(indices))

    def shard(self, num_shards: int, index: int) -> VLMDataset:
        """Rows ``index, index + num_shards, ...``: one data-parallel rank's share."""
        if self.streaming:
            from datasets.distributed import split_dataset_by_node

            return self._wrap(split_dataset_by_node(self.hf, rank=index, world_size=num_shards))
        return self._wrap(self.hf.shard(num_shards, index, contiguous=False))

    def shuffle(self, seed: int = 0) -> VLMDataset:
        """Shuffled view (map-style: an index permutation; streaming: a shuffle buffer)."""
        return self._wrap(self.hf.shuffle(seed=seed))

    @classmethod
    def from_list(cls, rows: list[dict[str, Any]], kind: Kind | None = None, **kwargs: Any) -> VLMDataset:
        """An in-memory dataset from row dicts (PIL images become the Image feature)."""
        return cls(datasets.Dataset.from_list(rows), kind, **kwargs)


def load_dataset(
    source: str | os.PathLike,
    split: str = "train",
    kind: Kind | None = None,
    streaming: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    cache_dir: str | None = None,
    columns: Columns | None = None,
) -> VLMDataset:
    """Load a dataset from a local file or folder, or from the hub by name.

    Local: a ``.parquet`` / ``.jsonl`` / ``.json`` / ``.arrow`` / ``.csv`` file, a folder written by
    ``save_to_disk``, or any folder ``datasets`` reads (parquet files, an image folder with a
    ``metadata.jsonl``). ``kind`` is detected from the columns (after ``columns`` renames them)
    when not given.
    """
    columns = columns or Columns()
    path = Path(os.path.expanduser(os.fspath(source)))
    if path.exists():
        hf = _load_local(path, split, streaming, cache_dir)
        base_dir = str(path if path.is_dir() else path.parent)
    elif looks_local(os.fspath(source)):
        raise DataError(
            f"dataset path {os.fspath(source)} does not exist; check the path "
            f"(a relative one starts at {os.getcwd()})"
        )
    else:
        hf = _load_hub(os.fspath(source), split, streaming, cache_dir)
        base_dir = None
    return VLMDataset(rename_columns(hf, columns), kind, min_pixels, max_pixels, source=os.fspath(source),
                      base_dir=base_dir, system_prompt=columns.system_prompt)


def _load_local(path: Path, split: str, streaming: bool, cache_dir: str | None):
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        hf = datasets.load_from_disk(str(path))
        if isinstance(hf, datasets.DatasetDict):
            if split not in hf:
                raise DataError(
                    f"{path} has splits {sorted(hf)}, not {split!r}; set data.split to one of them"
                )
            hf = hf[split]
        return hf.to_iterable_dataset() if streaming else hf
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"{path}: unknown data file type {path.suffix!r}; use one of {', '.join(_BUILDERS)}"
            )
        if path.stat().st_size == 0:  # `datasets` raises a bare StopIteration on an empty jsonl
            raise DataError(f"dataset {path} is empty (0 bytes); give a data file with rows")
        try:
            return datasets.load_dataset(
                builder, data_files=str(path), split="train", streaming=streaming, cache_dir=cache_dir
            )
        except ValueError as e:  # a file with a schema and no rows: `datasets` says "corresponds to no data"
            if "corresponds to no data" not in str(e):
                raise
            raise DataError(f"dataset {path} has no rows; check the path, split and filters") from e
    return datasets.load_dataset(str(path), split=split, streaming=streaming, cache_dir=cache_dir)


def looks_local(source: str) -> bool:
    """Whether ``source`` is meant as a local path (else it is a hub dataset name)."""
    return source.startswith(("/", ".", "~")) or Path(source).suffix.lower() in _BUILDERS


def _load_hub(name: str, split: str, streaming: bool, cache_dir: str | None):
    if not hub_offline() and not hub_reachable():
        raise DataError(
            f"dataset {name!r} is not a local path and the Hugging Face hub ({hub_endpoint()}) is not "
            f"reachable; download it where there is network (datasets.load_dataset(...).save_to_disk(dir)) "
            f"and pass the local path, or set HF_HUB_OFFLINE=1 to use a cached copy"
        )
    try:
        return datasets.load_dataset(name, split=split, streaming=streaming, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(
            f"could not load dataset {name!r} from the hub ({type(e).__name__}: {e}); check the name "
            f"and split, or pass a local path"
        ) from e


def train_eval_split(
    ds: VLMDataset, eval_split_size: float | int, seed: int = 0
) -> tuple[VLMDataset, VLMDataset]:
    """Hold out ``eval_split_size`` rows (an int) or that fraction (a float in (0, 1)) for evaluation.

    Map-style datasets are split at random (by ``seed``); a streaming one gives its first rows
    (an int size only).
    """
    if not isinstance(ds, VLMDataset):
        ds = VLMDataset(ds)
    if ds.streaming:
        if not isinstance(eval_split_size, int) or eval_split_size < 1:
            raise DataError(
                "a streaming dataset can hold out a number of rows only; set eval_split_size to an int"
            )
        return ds._wrap(ds.hf.skip(eval_split_size)), ds._wrap(ds.hf.take(eval_split_size))
    n = len(ds)
    size = eval_split_size if isinstance(eval_split_size, int) else round(eval_split_size * n)
    if not 0 < size < n:
        raise DataError(
            f"eval_split_size={eval_split_size} leaves {n - size} training and {size} eval rows out of {n}; "
            f"choose a size between 1 and {n - 1} rows or a fraction in (0, 1)"
        )
    parts = ds.hf.train_test_split(test_size=size, seed=seed, shuffle=True)
    return ds._wrap(parts["train"]), ds._wrap(parts["test"])
