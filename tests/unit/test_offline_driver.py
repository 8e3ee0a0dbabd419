"""Offline driver bookkeeping without training: rows per step, the data order across epochs, checkpoint pruning."""

from __future__ import annotations

from raylign.config import config_from_dict
from raylign.driver.common import mark_complete, prune_checkpoints
from raylign.driver.offline import rows_per_step
from raylign.driver.sampler import PromptSampler


def _cfg(**learner):
    return config_from_dict({
        "method": "sft", "model": {"name_or_path": "m"}, "data": {"train": "d.parquet"},
        "train": {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2}, "learner": learner,
    })


def test_rows_per_step_is_the_global_batch():
    assert rows_per_step(_cfg(num_learners=0)) == 6  # in-process: one rank
    assert rows_per_step(_cfg(num_learners=1)) == 6
    assert rows_per_step(_cfg(num_learners=4)) == 24


def test_batches_run_on_across_epoch_boundaries_in_a_seeded_order():
    """The driver takes consecutive rows of the concatenated epochs: every epoch is each row once."""
    sampler = PromptSampler(num_rows=5, seed=7)
    rows = [sampler.take()[1] for _ in range(15)]
    assert [sorted(rows[i : i + 5]) for i in (0, 5, 10)] == [list(range(5))] * 3
    assert rows[:5] != rows[5:10]  # reshuffled per epoch
    again = PromptSampler(num_rows=5, seed=7)
    assert [again.take()[1] for _ in range(15)] == rows
    plain = PromptSampler(num_rows=5, seed=7, shuffle=False)
    assert [plain.take()[1] for _ in range(7)] == [0, 1, 2, 3, 4, 0, 1]


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 10, 4, 6):
        (root / f"step_{step}").mkdir(parents=True)
        mark_complete(root / f"step_{step}")
    (root / "step_12").mkdir()  # being written: not complete, never deleted
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["step_2", "step_4"]
    assert sorted(p.name for p in root.iterdir()) == ["step_10", "step_12", "step_6"]
