"""Bounds from field metadata and the cross-field rules; each failure names the offending key."""

from __future__ import annotations

import dataclasses
import difflib
import operator
from typing import Any

from raylign.config.schema import DPO_LOSS_TYPES, REPORT_TO, ConfigError, RaylignConfig, _is_section

# ------------------------------------------------------------------------------------------ rules

_BOUND_OPS = {
    "ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")
}


def _check_bounds(section: Any, prefix: str = "") -> None:
    """Apply each field's ge/gt/le/lt metadata (to every element of a list or dict)."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if _is_section(type(value)):
            _check_bounds(value, key + ".")
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            for name, (op, sign) in _BOUND_OPS.items():
                if name in f.metadata and isinstance(v, (int, float)) and not op(v, f.metadata[name]):
                    where = key if sub is None else f"{key}.{sub}"
                    raise ConfigError(f"{where}: must be {sign} {f.metadata[name]}, got {v}")


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _whole_if_above_one(value: float | None, key: str) -> None:
    """Ray grants fractional GPUs only below 1."""
    ok = value is None or value <= 1 or float(value).is_integer()
    _require(ok, key, f"Ray needs a whole number above 1, got {value}")


def _check_model_data(cfg: RaylignConfig) -> None:
    m, d = cfg.model, cfg.data
    _require(bool(m.name_or_path), "model.name_or_path", "must not be empty")
    _require(m.lora.r == 0 or bool(m.lora.target_modules), "model.lora.target_modules",
             "empty while lora.r > 0")
    _require(bool(d.train), "data.train", "must not be empty")
    split = d.eval_split_size
    _require(split >= 0 if isinstance(split, int) else 0 <= split < 1, "data.eval_split_size",
             f"a float must be a fraction in [0, 1) and an int a row count >= 0, got {split}")
    _require(d.eval is None or split == 0, "data.eval_split_size",
             "set data.eval or data.eval_split_size, not both")
    _require(d.min_pixels <= d.max_pixels, "data.min_pixels",
             f"{d.min_pixels} > data.max_pixels {d.max_pixels}")
    _require(cfg.is_online or d.max_prompt_length < d.max_length, "data.max_prompt_length",
             f"{d.max_prompt_length} leaves no room for a completion within data.max_length {d.max_length}")


def _check_train_learner(cfg: RaylignConfig) -> None:
    t, lr = cfg.train, cfg.learner
    _require(t.max_steps != 0, "train.max_steps",
             "0 steps would train nothing; use -1 to derive it from epochs")
    _require(t.resume_from_checkpoint != "", "train.resume_from_checkpoint",
             "empty; give a path, 'latest' or null")
    _require(not lr.offload_param or lr.zero_stage == 3, "learner.offload_param",
             "needs learner.zero_stage 3")
    _require(not lr.offload_optimizer or lr.zero_stage >= 1, "learner.offload_optimizer",
             "needs learner.zero_stage >= 1")
    _require(not (lr.backend == "nccl" and lr.num_gpus_per_learner == 0), "learner.backend",
             "nccl needs GPUs but learner.num_gpus_per_learner is 0; use gloo or auto")
    _whole_if_above_one(lr.num_gpus_per_learner, "learner.num_gpus_per_learner")


def _check_dpo(cfg: RaylignConfig) -> None:
    p = cfg.dpo
    _require(bool(p.loss_type), "dpo.loss_type", "must name at least one loss")
    for name in p.loss_type:
        close = difflib.get_close_matches(name, DPO_LOSS_TYPES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        _require(name in DPO_LOSS_TYPES, "dpo.loss_type",
                 f"unknown loss {name!r}{hint}; allowed: {', '.join(DPO_LOSS_TYPES)}")
    _require(len(set(p.loss_type)) == len(p.loss_type), "dpo.loss_type", f"lists a loss twice: {p.loss_type}")
    _require(p.loss_weights is None or len(p.loss_weights) == len(p.loss_type), "dpo.loss_weights",
             f"has {len(p.loss_weights or [])} weights for {len(p.loss_type)} dpo.loss_type entries")
    _require(p.label_smoothing == 0 or "robust" in p.loss_type, "dpo.label_smoothing",
             f"{p.label_smoothing} is used by dpo.loss_type robust only (TRL 1.16's sigmoid has no smoothing); "
             f"add robust or set it to 0")


def _check_grpo(cfg: RaylignConfig) -> None:
    g = cfg.grpo
    _require(g.epsilon_high is None or g.epsilon_high >= g.epsilon, "grpo.epsilon_high",
             f"{g.epsilon_high} is below grpo.epsilon {g.epsilon}")
    low, high, mode = g.vllm_importance_sampling_clip_min, g.vllm_importance_sampling_clip_max, \
        g.vllm_importance_sampling_mode
    _require(low is None or high is None or low < high, "grpo.vllm_importance_sampling_clip_min",
             f"{low} must be below grpo.vllm_importance_sampling_clip_max {high}")
    _require(not (g.vllm_importance_sampling_correction and mode.endswith("truncate") and low is None
                  and high is None), "grpo.vllm_importance_sampling_mode",
             f"{mode} needs grpo.vllm_importance_sampling_clip_max or _clip_min")
    _require(not (g.loss_type == "vespo" and g.vllm_importance_sampling_correction and mode.startswith("sequence")),
             "grpo.vllm_importance_sampling_mode", "loss_type vespo folds token weights into its sequence weight: "
             "use token_truncate or token_mask")
    if not cfg.is_online:
        return
    _require(g.num_generations >= 2, "grpo.num_generations",
             f"{cfg.method} compares completions within a group, so it needs >= 2, got {g.num_generations}")
    samples = g.prompts_per_step * g.num_generations
    _require(samples % max(1, cfg.learner.num_learners) == 0, "grpo.prompts_per_step",
             f"prompts_per_step * num_generations = {samples} samples per step do not split evenly "
             f"over learner.num_learners = {cfg.learner.num_learners}")


def _check_rollout_reward(cfg: RaylignConfig) -> None:
    r, rw = cfg.rollout, cfg.reward
    vllm = r.engine == "vllm"
    _require(vllm or r.tensor_parallel_size == 1, "rollout.tensor_parallel_size",
             "> 1 needs rollout.engine vllm")
    _require(vllm or not r.enable_sleep_mode, "rollout.enable_sleep_mode", "needs rollout.engine vllm")
    _require(not (vllm and r.colocate) or r.enable_sleep_mode, "rollout.colocate",
             "a colocated vLLM engine needs rollout.enable_sleep_mode true to free memory for training")
    _whole_if_above_one(r.num_gpus_per_worker, "rollout.num_gpus_per_worker")
    need = cfg.data.max_prompt_length + cfg.grpo.max_completion_length
    _require(not cfg.is_online or r.max_model_len is None or r.max_model_len >= need, "rollout.max_model_len",
             f"{r.max_model_len} < data.max_prompt_length + grpo.max_completion_length = {need}")
    _require(not cfg.is_online or bool(rw.funcs), "reward.funcs",
             f"{cfg.method} needs at least one reward function")
    _require(rw.reward_weights is None or len(rw.reward_weights) == len(rw.funcs), "reward.reward_weights",
             f"has {len(rw.reward_weights or [])} weights for {len(rw.funcs)} reward.funcs")


def _check_colocate(cfg: RaylignConfig) -> None:
    """``rollout.colocate`` puts one engine inside each learner actor: the rollout sizing keys do not apply."""
    r, n = cfg.rollout, cfg.learner.num_learners
    if not r.colocate:
        return
    _require(r.num_workers == n, "rollout.num_workers",
             f"with rollout.colocate each learner actor holds one engine: set it to learner.num_learners ({n})")
    _require(r.tensor_parallel_size == 1, "rollout.tensor_parallel_size",
             "a colocated engine uses its learner's one GPU; use 1, or rollout.colocate false")
    _require(r.num_gpus_per_worker is None and not r.resources, "rollout.num_gpus_per_worker",
             "a colocated engine runs inside its learner actor on that actor's GPU; leave "
             "rollout.num_gpus_per_worker and rollout.resources unset (size learner.num_gpus_per_learner)")
    _require(cfg.sync.transport in ("auto", "inprocess"), "sync.transport",
             "colocated engines are loaded inside their learner actors; use auto or inprocess")


def _check_top_logging(cfg: RaylignConfig) -> None:
    name = str(cfg.run_name)
    _require(bool(cfg.output_dir), "output_dir", "must not be empty")
    _require(bool(name) and "/" not in name and name not in (".", ".."), "run_name",
             f"must be one directory name, got {name!r}")
    for sink in cfg.logging.report_to:
        _require(sink in REPORT_TO, "logging.report_to",
                 f"unknown sink {sink!r}; allowed: {', '.join(REPORT_TO)}")
    _require("none" not in cfg.logging.report_to or len(cfg.logging.report_to) == 1, "logging.report_to",
             "'none' cannot be combined with other sinks")


def validate(cfg: RaylignConfig) -> None:
    """Bounds and cross-field rules; raises ConfigError naming the first offending key."""
    _check_bounds(cfg)
    for check in (_check_model_data, _check_train_learner, _check_dpo, _check_grpo, _check_rollout_reward,
                  _check_colocate, _check_top_logging):
        check(cfg)


