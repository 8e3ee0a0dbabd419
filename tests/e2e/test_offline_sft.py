"""SFT through the offline driver teaches a tiny random VLM the colour task: greedy exact match on held-out rows.

The task: "What colour is the big shape?", answered with one of 4 codes (``<think>it is red</think>
<answer>1</answer>``), so chance is 25%. The random model answers nothing (no ``<answer>`` tag: 0%);
after 80 steps of 16 rows it answers all 64 held-out rows correctly (measured 1.0 with data seeds
42, 1, 2, 3; 0.33-0.48 at step 40). LLaVA is the family used: its SigLIP tower gives 16 image
tokens and learns the colour within this budget, where the tiny Qwen2.5-VL (1-4 image tokens)
needs about 3x the steps.
"""

from __future__ import annotations

from raylign.config import config_from_dict
from raylign.data.synthetic import make_dataset
from raylign.driver.metrics import read_metrics
from raylign.driver.offline import run

STEPS = 80


def test_sft_raises_greedy_exact_match_on_held_out_rows(tiny_llava_dir, tmp_path):
    data = make_dataset("color", 320, tmp_path / "data", kind="sft")
    cfg = config_from_dict({
        "method": "sft",
        "model": {"name_or_path": str(tiny_llava_dir)},
        "data": {"train": str(data / "sft.parquet"), "eval_split_size": 64},
        "output_dir": str(tmp_path / "runs"), "run_name": "sft",
        "train": {"learning_rate": 3e-3, "warmup_ratio": 0.1, "per_device_train_batch_size": 16,
                  "max_steps": STEPS, "eval_steps": STEPS},
        "learner": {"num_learners": 0},
        "logging": {"report_to": ["none"], "progress_bar": False},
    })
    rows = read_metrics(run(cfg))
    before, after = rows[0], rows[-1]
    print({k: (before.get(k), after.get(k)) for k in ("eval/accuracy", "eval/loss", "eval/answered")})
    assert before["step"] == 0 and after["step"] == STEPS
    assert before["eval/accuracy"] == 0.0  # the random model writes no <answer> tag
    assert after["eval/accuracy"] >= 0.75  # chance is 0.25 (4 colours)
    assert after["eval/answered"] == 1.0
    assert after["eval/loss"] < 0.1 * before["eval/loss"]
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert after["epoch"] == STEPS * 16 / 256  # 320 rows - 64 held out
