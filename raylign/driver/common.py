"""What every job driver does the same way: start Ray, find the checkpoint to resume, load data.

Shared by the offline (SFT/DPO/MPO) and online (GRPO/GSPO) drivers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
from pathlib import Path

import ray

from raylign.config import RaylignConfig
from raylign.data.datasets import VLMDataset, load_dataset, train_eval_split
from raylign.data.validate import validate_dataset

logger = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d+)$")


class LearnerFailed(RuntimeError):
    """A learner died: the run stops and says how to resume (both drivers raise it)."""


TINY, SYNTHETIC = "tiny:", "synthetic:"
_DATA_FILE = {"sft": "sft", "dpo": "preference", "mpo": "preference", "grpo": "prompt", "gspo": "prompt"}


def materialize(cfg: RaylignConfig) -> RaylignConfig:
    """Build what ``tiny:<family>`` models and ``synthetic:<task>`` data name, once, under ``output_dir/.tiny``.

    What ``preset: tiny`` uses; the returned config names the real directories, so every actor and
    the saved config.yaml see plain paths.
    """
    from raylign.data.synthetic import make_dataset
    from raylign.models.tiny import make_tiny_model

    root = Path(cfg.output_dir) / ".tiny"
    model, data = cfg.model, cfg.data
    if model.name_or_path.startswith(TINY):
        family = model.name_or_path[len(TINY):]
        path = root / family
        if not (path / "config.json").exists():
            make_tiny_model(family, path)
        model = dataclasses.replace(model, name_or_path=str(path))
    if data.train.startswith(SYNTHETIC):
        task = data.train[len(SYNTHETIC):]
        path = root / f"data-{task}"
        if not (path / "prompt.parquet").exists():
            make_dataset(task, 256, path, seed=0, kind="all")
        data = dataclasses.replace(data, train=str(path / f"{_DATA_FILE[cfg.method]}.parquet"))
    return dataclasses.replace(cfg, model=model, data=data)


def cpus_wanted(cfg: RaylignConfig) -> float:
    """CPUs the job's actors ask for (a local Ray instance gets at least this many logical CPUs)."""
    learners = cfg.learner.num_learners * cfg.learner.num_cpus_per_learner
    if not cfg.is_online:
        return learners
    return learners + cfg.rollout.num_workers * cfg.rollout.num_cpus_per_worker + cfg.reward.num_workers


def init_ray(cfg: RaylignConfig) -> None:
    """Join the configured cluster, the one `ray job submit` runs us in, or start a local instance.

    Locally, logical CPUs are raised to what the actors ask for: on a 2-core laptop a learner, two
    rollout workers and a reward worker still start (they time-share the cores).
    """
    if ray.is_initialized():
        return
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray_address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    num_cpus = max(os.cpu_count() or 1, math.ceil(cpus_wanted(cfg)))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step (a checkpoint is complete once ``COMPLETE`` exists)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    steps = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / "COMPLETE").exists()
    ]
    return max(steps)[1] if steps else None


def mark_complete(path: Path) -> None:
    """Written last, so a run killed mid-save never resumes from a half-written checkpoint."""
    (path / "COMPLETE").write_text("")


def resolve_resume(cfg: RaylignConfig) -> Path | None:
    """The checkpoint ``train.resume_from_checkpoint`` names (a path, or ``latest`` of this run)."""
    spec = cfg.train.resume_from_checkpoint
    if spec is None:
        return None
    if spec == "latest":
        path = latest_checkpoint(cfg.run_dir)
        if path is None:
            raise FileNotFoundError(
                f"train.resume_from_checkpoint=latest: no complete checkpoint under {cfg.run_dir}/checkpoints"
            )
        return path
    path = Path(spec)
    if not (path / "COMPLETE").exists():
        raise FileNotFoundError(f"train.resume_from_checkpoint={spec}: not a complete raylign checkpoint")
    return path


def resume_command(cfg: RaylignConfig, checkpoint: Path | None) -> str:
    """The command that continues this run."""
    where = str(checkpoint) if checkpoint else "latest"
    return (
        f"raylign {cfg.method} --config {cfg.run_dir / 'config.yaml'} "
        f"--train.resume_from_checkpoint={where}"
    )


def load_job_data(cfg: RaylignConfig, processor, kind: str) -> tuple[VLMDataset, VLMDataset | None]:
    """Train (and eval) datasets of ``kind``, validated before any compute is spent.

    Invalid rows raise a ``DataError`` naming the row and column, or are skipped and counted
    (logged) when ``data.skip_invalid`` is set.
    """
    d = cfg.data
    pixels = dict(min_pixels=d.min_pixels, max_pixels=d.max_pixels)
    train = load_dataset(d.train, kind=kind, **pixels)
    evaluation = load_dataset(d.eval, kind=kind, **pixels) if d.eval else None
    if evaluation is None and d.eval_split_size:
        train, evaluation = train_eval_split(train, d.eval_split_size, seed=cfg.seed)
    max_length = None if kind == "prompt" else d.max_length
    checked = []
    for name, ds in (("train", train), ("eval", evaluation)):
        if ds is None:
            checked.append(None)
            continue
        report = validate_dataset(
            ds, processor, max_length=max_length, max_prompt_length=d.max_prompt_length,
            truncation=d.truncation, skip_invalid=d.skip_invalid,
        )
        if report.skipped:
            logger.warning(
                "data.%s: skipped %d of %d rows (%s); first: %s", name, report.num_rows - report.num_valid,
                report.num_rows, dict(report.skipped), next(iter(report.examples.values())),
            )
        checked.append(report.apply(ds))
    return checked[0], checked[1]


def num_steps(cfg: RaylignConfig, rows: int, rows_per_step: int) -> int:
    """``train.max_steps`` when set, else enough steps for ``num_train_epochs`` over ``rows``."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.num_train_epochs * rows / rows_per_step))


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints of ``run_dir``; returns the deleted ones."""
    root = run_dir / "checkpoints"
    done = sorted(
        (p for p in root.glob("step_*") if _STEP_DIR.match(p.name) and (p / "COMPLETE").exists()),
        key=lambda p: int(p.name.split("_")[1]),
    )
    old = done[:-keep] if keep > 0 else done
    for path in old:
        shutil.rmtree(path)
    return old
