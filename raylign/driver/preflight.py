"""What a job checks before it starts anything: each model, data source, checkpoint and reward spec it names.

The CLI runs ``check_inputs`` before it imports a driver (no Ray, no torch, no model), so a typo or a
missing file costs seconds, not the minute it takes to start Ray, load models and reach the first
use. Each failure is one ``RaylignError`` line that names the key and the fix. ``tiny:`` models and
``synthetic:`` data are built by the driver and not checked here.
"""

from __future__ import annotations

from pathlib import Path

from raylign.config import ConfigError, RaylignConfig
from raylign.driver.resume import resolve_resume
from raylign.models.source import check_model_source

# Names the driver builds on first use (``common.materialize``), not paths.
TINY, SYNTHETIC = "tiny:", "synthetic:"


def check_model(cfg: RaylignConfig) -> None:
    if not cfg.model.name_or_path.startswith(TINY):
        check_model_source(cfg.model.name_or_path)


def check_data(cfg: RaylignConfig) -> None:
    """A data path that looks local must exist (a hub name is checked when it loads: it may be cached)."""
    for key, source in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if source is None or source.startswith(SYNTHETIC) or Path(source).expanduser().exists():
            continue
        from raylign.data.datasets import looks_local  # only on this error path: it imports `datasets`

        if looks_local(source):
            raise ConfigError(f"{key}: {source} does not exist (looked from {Path.cwd()}); give a parquet, "
                              "jsonl, json, arrow or csv file, a dataset directory, or a hub dataset name")


def check_rewards(cfg: RaylignConfig) -> None:
    """Load every reward spec here, once, so a typo fails now and not after Ray and the models started."""
    if not cfg.is_online:
        return
    from raylign.rewards.loader import RewardLoadError, reward_name_and_function

    for i, spec in enumerate(cfg.reward.funcs):
        try:
            reward_name_and_function(spec)
        except RewardLoadError as err:  # add the key; the loader's message already says what is wrong
            raise ConfigError(f"reward.funcs[{i}]: {err}") from err


def check_inputs(cfg: RaylignConfig) -> None:
    """Raise a one-line RaylignError for the first input of ``cfg`` that cannot be used."""
    resolve_resume(cfg)
    check_model(cfg)
    check_data(cfg)
    check_rewards(cfg)
