"""Bad input, typed as a user types it: one line naming the key/row/file and the fix, in seconds.

Each case asserts: a non-zero exit, a last stderr line that names what is wrong and what to do, no
traceback (unless --debug), and the time it took. The config cases run the real command in a
subprocess and must fail before Ray or any model starts (about a second each); the data cases run
``cli.main`` in this process (the drivers are imported once) for both ``sft`` and ``grpo``. Nothing
here touches the network: the hub is either in offline mode or pointed at a refused local port.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import datasets
import pytest
import yaml
from PIL import Image

from raylign import cli
from raylign.data.synthetic import make_dataset

# Measured 0.2-6 s on 2 busy cores; the bugs this guards against took 35-150 s (Ray started, hub retries).
FAIL_FAST_S = 20.0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset("color", 8, tmp_path_factory.mktemp("bad_inputs") / "data")


@pytest.fixture
def config(tmp_path, tiny_llava_dir, data) -> Path:
    """A GRPO config that would run: each case breaks one thing of it from the command line."""
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump({
        "method": "grpo", "model": {"name_or_path": str(tiny_llava_dir)},
        "data": {"train": str(data / "prompt.parquet")}, "output_dir": str(tmp_path / "runs"), "run_name": "bad",
        "train": {"max_steps": 1}, "learner": {"num_learners": 0}, "rollout": {"num_workers": 0},
        "reward": {"num_workers": 0, "funcs": ["format", "accuracy"]}, "logging": {"report_to": ["none"]},
    }))
    return path


def raylign(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """(exit status, stderr, seconds) of the real command; the hub is offline unless ``env`` says otherwise."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("RAYLIGN_DEBUG", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "raylign", *args], capture_output=True, text=True, timeout=120,
                          env=full_env, check=False)
    return proc.returncode, proc.stderr, time.monotonic() - start


def assert_one_line(rc: int, stderr: str, seconds: float, *fragments: str) -> str:
    last = stderr.strip().splitlines()[-1]
    assert rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert last.startswith("raylign: error: ") and all(f in last for f in fragments), last
    assert seconds < FAIL_FAST_S, f"{seconds:.1f} s to fail: {last}"
    assert "Started a local Ray instance" not in stderr
    return last


# ------------------------------------------------------------------------------ config, model, rewards


@pytest.mark.parametrize("override, fragments", [
    pytest.param("--model.name_or_path=/nonexistent/dir", (
        "model.name_or_path: directory /nonexistent/dir does not exist",
        "a hub id needs network or a copy in the local Hugging Face cache"), id="missing-model-dir"),
    pytest.param("--train.resume_from_checkpoint=latest", (
        "train.resume_from_checkpoint: 'latest' found no complete checkpoint under",
        "start without --resume"), id="resume-latest-before-any-run"),
    pytest.param("--data.train=/nonexistent/x.parquet", (
        "data.train: /nonexistent/x.parquet does not exist", "give a parquet, jsonl"), id="missing-data-file"),
    pytest.param("--reward.funcs=[format,accuracyy]", (
        "reward.funcs[1]: ", "no builtin reward named 'accuracyy' (did you mean accuracy?)"), id="reward-typo"),
    pytest.param("--reward.funcs=[/nonexistent/r.py:fn]", (
        "reward.funcs[0]: ", "file '/nonexistent/r.py' does not exist", "fix the path"), id="reward-file-missing"),
])
def test_config_mistake_fails_before_anything_starts(config, override, fragments):
    assert_one_line(*raylign("grpo", "--config", str(config), override), *fragments)


def test_hub_name_without_network_fails_in_seconds(config, tmp_path):
    """Offline mode with an empty cache, and a hub endpoint that refuses connections (no network touched)."""
    empty_cache = {"HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    assert_one_line(*raylign("grpo", "--config", str(config), "--model.name_or_path=someorg/some-vlm",
                             env=empty_cache),
                    "model.name_or_path: someorg/some-vlm is neither a local directory nor in the Hugging Face "
                    "cache, and HF_HUB_OFFLINE is set", "hf download")
    no_network = {**empty_cache, "HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}
    assert_one_line(*raylign("grpo", "--config", str(config), "--model.name_or_path=someorg/some-vlm",
                             env=no_network),
                    "the hub (http://127.0.0.1:9) is not reachable from here", "hf download")


def test_config_file_that_is_no_utf8_text(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("run_name: caf\xe9\n".encode("latin-1"))
    assert_one_line(*raylign("sft", "--config", str(latin1)),
                    f"--config: {latin1} is not UTF-8 text (byte 0xe9 at offset 13)", "saved as UTF-8")
    # /dev/null is an empty config, not "file not found": the first missing key is named
    assert_one_line(*raylign("sft", "--config", "/dev/null"), "model.name_or_path: required")


def test_debug_shows_the_traceback(config):
    rc, stderr, _ = raylign("grpo", "--config", str(config), "--reward.funcs=[accuracyy]", "--debug")
    assert rc != 0 and "Traceback (most recent call last)" in stderr and "did you mean accuracy?" in stderr


# ------------------------------------------------------------------------------ bad rows, sft and grpo


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` in its header and has no pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _user_text(row: dict, column: str) -> dict:
    turn = next(m for m in row[column] if m["role"] == "user")
    return next(p for p in turn["content"] if p["type"] == "text")


def _set_image(data: bytes | None, path: str | None = None):
    return lambda row, column: row.__setitem__("images", [{"bytes": data, "path": path}])


BAD_ROWS = {  # case -> (break row 2, what the error line must say)
    "corrupt-bytes": (_set_image(b"not an image at all"),
                      ("row 2, column 'images': image 0: the data is not an image format PIL can read",
                       "re-encode the image or drop the row")),
    "1x5000": (_set_image(_png(1, 5000)),
               ("row 2, column 'images': image 0: the image is 1x5000, aspect ratio 5000 above 200",
                "crop or pad the image")),
    "header-claims-50000x50000": (_set_image(_png_header(50000, 50000)),
                                  ("row 2, column 'images': image 0: PIL refused it as a decompression bomb",
                                   "downscale the image")),
    "missing-image-file": (_set_image(None, "missing.png"),
                           ("row 2, column 'images': image 0: image file not found: ", "missing.png; fix the path")),
    "two-placeholders-one-image": (lambda row, col: row[col][0]["content"].insert(0, {"type": "image"}),
                                   ("row 2, column '{col}': 2 image placeholder(s) but 1 image(s)",
                                    "give exactly one placeholder per image")),
    "prompt-too-long": (lambda row, col: _user_text(row, col).__setitem__("text", "word " * 3000),
                        ("row 2, column '{col}': the ", " tokens, above max_", "shorten it")),
    "control-characters": (lambda row, col: _user_text(row, col).__setitem__("text", "what\x1b[2J colour?"),
                           ("row 2, column '{col}': turn 0 has the control character '\\x1b' at offset 4",
                            "remove them or replace them by spaces")),
    "empty-dataset": (None, ("has no rows; check the path, split and filters",)),
}


def _write_broken(source: Path, out: Path, column: str, breaks) -> Path:
    ds = datasets.load_dataset("parquet", data_files=str(source), split="train")
    ds = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))
    rows = [ds[i] for i in range(6)] if breaks is not None else []
    if breaks is not None:
        breaks(rows[2], column)
    table = datasets.Dataset.from_list(rows, features=ds.features) if rows else ds.select([])
    table.to_parquet(str(out))
    return out


@pytest.fixture(scope="module")
def drivers_imported():
    """Import the drivers once, so each case's time is its own (the first import takes seconds)."""
    import raylign.driver.offline  # noqa: F401
    import raylign.driver.online  # noqa: F401


@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_bad_rows_name_row_column_and_fix(method, data, tiny_llava_dir, tmp_path, drivers_imported, monkeypatch):
    monkeypatch.delenv("RAYLIGN_DEBUG", raising=False)
    column = "messages" if method == "sft" else "prompt"
    source = data / ("sft.parquet" if method == "sft" else "prompt.parquet")
    for case, (breaks, fragments) in BAD_ROWS.items():
        broken = _write_broken(source, tmp_path / f"{case}.parquet", column, breaks)
        err = io.StringIO()
        start = time.monotonic()
        with contextlib.redirect_stderr(err):
            rc = cli.main([method, f"--model.name_or_path={tiny_llava_dir}", f"--data.train={broken}",
                           f"--output_dir={tmp_path / 'runs'}", f"--run_name={case}", "--learner.num_learners=0",
                           "--rollout.num_workers=0", "--reward.num_workers=0", "--logging.report_to=[none]"])
        seconds = time.monotonic() - start
        text = err.getvalue()
        last = text.strip().splitlines()[-1]  # progress bars of `datasets` may come before it
        assert rc == 2 and "Traceback" not in text and last.startswith("raylign: error: "), (case, text)
        assert all(f.format(col=column) in last for f in fragments), (case, last)
        assert seconds < FAIL_FAST_S, (case, seconds)


def test_tiny_images_are_upscaled_not_refused(data, tiny_llava_dir, tmp_path):
    """A 1x1 image is valid: it is resized up to data.min_pixels like every small image."""
    from raylign.data.datasets import load_dataset
    from raylign.data.validate import validate_dataset

    broken = _write_broken(data / "prompt.parquet", tmp_path / "1x1.parquet", "prompt", _set_image(_png(1, 1)))
    ds = load_dataset(str(broken), kind="prompt", min_pixels=3136, max_pixels=401408)
    assert validate_dataset(ds).num_valid == 6
    width, height = ds[2]["images"][0].size
    assert width * height >= 3136 and width == height
