"""`raylign report`: plots exist only for logged keys, are real pictures, the summary names the best step."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from raylign.driver.metrics import MetricsLogger
from raylign.report import best_step, main, wall_time
from raylign.report_plots import ema

GRPO_PLOTS = {"rewards.png", "lengths.png", "policy.png", "time.png", "pipeline.png", "training.png"}


def _png_b64(size: int = 96) -> str:
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.stack([xx * 255 // size, yy * 255 // size, (xx ^ yy) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _grpo_run(root: Path, name: str, seed: int, with_eval: bool) -> Path:
    """30 plausible GRPO steps through the real MetricsLogger (NaN -> null), and a few samples."""
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "grpo", "run_name": name, "seed": seed}))
    rng = np.random.default_rng(seed)
    with MetricsLogger(run, report_to=["none"]) as logger:
        for step in range(1, 31):
            r = 0.2 + 0.6 * step / 30 + rng.normal(0, 0.05)
            metrics = {
                "reward/mean": r, "reward/format/mean": min(1.0, r + 0.2), "reward/accuracy/mean": r - 0.1,
                "completion_length/mean": 80 + rng.normal(0, 5), "completion_length/max": 128,
                "completion_length/truncated_fraction": 0.1 * rng.random(),
                "kl": float("nan") if step == 7 else 0.001 * step, "clip_ratio/low_mean": 0.01 * rng.random(),
                "clip_ratio/high_mean": 0.02 * rng.random(), "clip_ratio/region_mean": 0.03 * rng.random(),
                "time/generate": 2 + rng.random(), "time/reward": 0.2, "time/train": 1.5 + rng.random(),
                "time/sync": 0.3, "time/wait": 0.1 * rng.random(), "staleness/mean": 0.5, "staleness/max": 1,
                "throughput/generate_tokens_per_s": 900 + 50 * rng.random(),
                "throughput/train_tokens_per_s": 1500 + 50 * rng.random(),
                "loss": float("inf") if step == 12 else 0.1 * rng.normal(), "grad_norm": 1 + rng.random(),
                "learning_rate": 1e-6,
            }
            if with_eval and step % 5 == 0:
                metrics["eval/accuracy"] = {25: 0.9, 30: 0.85}.get(step, step / 40)
            logger.log(step, metrics)
        logger.log_samples(30, [
            {"prompt": [{"role": "user",
                         "content": [{"type": "image"}, {"type": "text", "text": "How many dots?"}]}],
             "completion": "<think>count</think> 3 | done", "reward": 1.5,
             "rewards": {"format": 1.0, "accuracy": 0.5}, "image": _png_b64()},
            {"prompt": "Colour of the square?", "completion": "red", "reward": 0.0, "reward/format": None},
        ])
    return run


def _sft_run(root: Path) -> Path:
    run = root / "sft-a"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "sft", "run_name": "sft-a"}))
    with MetricsLogger(run, report_to=["none"]) as logger:
        for step in range(1, 21):
            lr = 1e-5 * (1 - step / 20)
            logger.log(step, {"loss": 2.0 / step**0.5, "grad_norm": 3.0 / step, "learning_rate": lr})
    return run


def _assert_real_picture(path: Path) -> None:
    with Image.open(path) as im:
        assert im.width >= 800 and im.height >= 500, (path.name, im.size)
        pixels = np.asarray(im.convert("RGB")).astype(np.int32)
    colours = len(np.unique(pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2]))
    assert colours >= 20, (path.name, colours)
    assert pixels.std() > 10, (path.name, pixels.std())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a = _grpo_run(root, "grpo-a", seed=0, with_eval=True)
    b = _grpo_run(root, "grpo-b", seed=1, with_eval=False)
    (b / "images").mkdir()
    Image.open(io.BytesIO(base64.b64decode(_png_b64(200)))).save(b / "images" / "s0.png")
    with open(b / "samples.jsonl", "a") as f:
        for reward, image in [(1, "images/s0.png"), (0, "missing.png")]:
            row = {"step": 30, "prompt": "p", "completion": "c", "reward": reward, "image": image}
            f.write(json.dumps(row) + "\n")
    out = main([str(a), str(b)], str(root / "report"))
    return a, b, out


def test_plots_are_real_pictures(two_runs):
    _, _, out = two_runs
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == GRPO_PLOTS
    for name in pngs:
        _assert_real_picture(out / name)


def test_summary_names_best_step_and_samples(two_runs):
    _, _, out = two_runs
    md = (out / "summary.md").read_text()
    assert "| grpo-a | grpo | 30 | 30 |" in md
    assert "| 25 | eval/accuracy | 0.9 |" in md  # best by eval accuracy, not the last eval
    assert "`kl` x1" in md and "`loss` x1" in md  # NaN / inf were logged as null and are counted
    assert "| step | image | prompt | completion | reward |" in md
    assert "&lt;think&gt;count&lt;/think&gt; 3 \\| done" in md  # escaped, so the table survives
    assert "[image] How many dots?" in md and "**1.5** (format 1, accuracy 0.5)" in md
    for png in GRPO_PLOTS:
        assert f"]({png})" in md

    summary = json.loads((out / "summary.json").read_text())
    a, b = summary["runs"]
    assert a["best"] == {"step": 25, "metric": "eval/accuracy", "value": 0.9}
    assert b["best"]["metric"] == "reward/mean"
    assert b["best"]["value"] == pytest.approx(max(b_row["reward/mean"] for b_row in _rows(two_runs[1])))
    assert a["null_counts"] == {"kl": 1, "loss": 1} and b["unreadable_images"] == 1
    assert a["final"]["eval/accuracy"] == 0.85


def test_thumbnails_are_small_and_linked(two_runs):
    _, _, out = two_runs
    thumbs = sorted((out / "thumbs").glob("*.png"))
    assert [t.name for t in thumbs] == ["grpo-a_0.png", "grpo-b_0.png", "grpo-b_2.png"]  # b_3 is missing
    for t in thumbs:
        with Image.open(t) as im:
            assert max(im.size) == 64
        assert f"![](thumbs/{t.name})" in (out / "summary.md").read_text()
    assert "(unreadable image)" in (out / "summary.md").read_text()


def test_offline_run_gets_loss_plot_only(tmp_path):
    out = main([str(_sft_run(tmp_path))], None)
    assert out == tmp_path / "sft-a" / "report"  # default: inside the run
    assert {p.name for p in out.glob("*.png")} == {"training.png"}
    _assert_real_picture(out / "training.png")
    best = json.loads((out / "summary.json").read_text())["runs"][0]["best"]
    assert best["metric"] == "loss" and best["step"] == 20
    assert "| sft-a | sft | 20 | 20 |" in (out / "summary.md").read_text()


def test_sparse_run_does_not_crash(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "kl": null}\n{"step": 2}\n')
    out = main([str(run)], str(tmp_path / "out"))
    assert list(out.glob("*.png")) == []
    assert "(no plottable metrics)" in (out / "summary.md").read_text()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        main([str(tmp_path / "nope")], str(tmp_path / "out2"))


def test_wall_time_sums_resumed_segments_and_best_ties():
    rows = [{"step": i, "time/elapsed": e} for i, e in enumerate([10.0, 20.0, 5.0, 15.0])]
    assert wall_time(rows) == 35.0
    tie = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.5}]
    assert best_step(tie) == {"step": 1, "metric": "loss", "value": 0.5}
    assert best_step([{"step": 1}]) is None
    assert ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull toward 0
    assert math.isclose(ema([0.0, 1.0], 0.5)[1], 2 / 3)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
