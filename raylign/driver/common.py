"""What every job driver does the same way: start Ray, find the checkpoint to resume, load data.

Shared by the offline (SFT/DPO/MPO) and online (GRPO/GSPO) drivers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

import ray

from raylign.config import RaylignConfig
from raylign.data.datasets import Columns, VLMDataset, load_dataset, train_eval_split
from raylign.data.validate import validate_dataset
from raylign.driver.preflight import SYNTHETIC, TINY
from raylign.driver.resume import (  # noqa: F401 (the drivers use them as common.*)
    checkpoint_dir, latest_checkpoint, mark_complete, prune_checkpoints, resolve_resume, resume_command,
)
from raylign.errors import RaylignError

logger = logging.getLogger(__name__)


class LearnerFailed(RaylignError, RuntimeError):
    """A learner died: the run stops and says how to resume (both drivers raise it)."""


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
    # preset "none" from here on: the config now holds what the preset set, so config.yaml (and the resume
    # command that reads it) does not lay the preset over the run's own overrides a second time.
    return dataclasses.replace(cfg, model=model, data=data, preset="none")


def cpus_wanted(cfg: RaylignConfig) -> float:
    """CPUs the job's actors ask for (a local Ray instance gets at least this many logical CPUs)."""
    learners = cfg.learner.num_learners * cfg.learner.num_cpus_per_learner
    if not cfg.is_online:
        return learners
    return learners + cfg.rollout.num_workers * cfg.rollout.num_cpus_per_worker + cfg.reward.num_workers


def joins_cluster(cfg: RaylignConfig) -> bool:
    """Whether the job joins a running cluster (``ray_address`` or ``RAY_ADDRESS``) rather than starting Ray here."""
    return bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))


def resource_timeout_s(cfg: RaylignConfig) -> float:
    """``resource_timeout_s``, or its default: 900 s on a cluster, where an autoscaler may add nodes; 60 s locally."""
    if cfg.resource_timeout_s is not None:
        return cfg.resource_timeout_s
    return 900.0 if joins_cluster(cfg) else 60.0


def init_ray(cfg: RaylignConfig) -> None:
    """Join the configured cluster, the one `ray job submit` runs us in, or start a local instance.

    Locally, logical CPUs are raised to what the actors ask for: on a 2-core laptop a learner, two
    rollout workers and a reward worker still start (they time-share the cores).
    """
    if ray.is_initialized():
        return
    if joins_cluster(cfg):
        ray.init(address=cfg.ray_address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    num_cpus = max(os.cpu_count() or 1, math.ceil(cpus_wanted(cfg)))
    # "local": a new instance even when a `ray start` cluster runs on this machine (ray.init would join it).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def load_job_data(cfg: RaylignConfig, processor, kind: str) -> tuple[VLMDataset, VLMDataset | None]:
    """Train (and eval) datasets of ``kind``, validated before any compute is spent.

    Invalid rows raise a ``DataError`` naming the row and column, or are skipped and counted
    (logged) when ``data.skip_invalid`` is set.
    """
    d = cfg.data
    pixels = dict(min_pixels=d.min_pixels, max_pixels=d.max_pixels)
    columns = Columns(d.prompt_column, d.image_column, d.completion_column, d.system_prompt)
    train = load_dataset(d.train, kind=kind, columns=columns, **pixels)
    evaluation = load_dataset(d.eval, kind=kind, columns=columns, **pixels) if d.eval else None
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
