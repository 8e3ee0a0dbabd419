"""The one TRL -> raylign mapping table (``TABLE``) and the converters its rules use; applied by ``trl.py``.

Each entry is a TRL field (``"DPOConfig.loss_type"`` when the meaning depends on the class) and a
``Rule``: mapped to raylign keys, ignored (no meaning here), or refused (cannot be honoured). A field of
TRL's GRPOConfig / DPOConfig / SFTConfig that the table does not name but whose name is a key of the
method's raylign section (``grpo.epsilon``) maps to it as is (``same_name_rule``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Which TRL classes a `raylign <method>` flat file stands for (the `trl <method>` CLI reads all three).
CLASSES: dict[str, tuple[str, ...]] = {
    "sft": ("SFTConfig", "ModelConfig", "ScriptArguments"),
    "dpo": ("DPOConfig", "ModelConfig", "ScriptArguments"),
    "mpo": ("DPOConfig", "ModelConfig", "ScriptArguments"),
    "grpo": ("GRPOConfig", "ModelConfig", "GRPOScriptArguments"),
    "gspo": ("GRPOConfig", "ModelConfig", "GRPOScriptArguments"),
}
RAYLIGN_TOP = ("method", "model", "data", "output_dir", "run_name", "seed", "ray_address", "resource_timeout_s",
               "preset", "train",
               "learner", "sft", "dpo", "grpo", "rollout", "reward", "sync", "logging")
TRL_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward", "get_soft_overlong_punishment")


class CannotHonour(Exception):
    """A TRL value raylign cannot reproduce; the message says why and what to use instead."""


class Flat:
    """The flat file's values plus TRL's defaults for the method's classes; what a converter reads."""

    def __init__(self, values: Mapping[str, Any], method: str, world: int):
        self.values, self.method, self.world = dict(values), method, world
        self.defaults: dict[str, Any] = {}
        for cls in reversed(CLASSES[method]):
            self.defaults.update(snapshot().get(cls, {}))

    def get(self, name: str) -> Any:
        return self.values[name] if name in self.values else self.defaults.get(name)

    def is_set(self, name: str) -> bool:
        return name in self.values

    @property
    def online(self) -> bool:
        return self.method in ("grpo", "gspo")


Converter = Callable[[Any, Flat], dict[str, Any]]


@dataclass(frozen=True)
class Rule:
    """How one TRL field carries over (see the module docstring)."""

    to: tuple[str, ...] = ()  # raylign keys it sets (for the docs; a converter may set several)
    convert: Converter | None = None  # None with one key in `to`: the value as is
    note: str = ""
    ignore: bool = False  # no meaning here: accepted with one logged line
    refuse: str = ""  # cannot honour (unless the value is TRL's default): the reason
    apply_default: bool = True  # TRL's default is applied when the file leaves the field unset
    reads: tuple[str, ...] = ()  # other TRL fields the converter reads (setting one makes its errors the user's)

    @property
    def kind(self) -> str:
        return "refused" if self.refuse else "ignored" if self.ignore else "mapped" if self.to else "fixed"


# ----------------------------------------------------------------------------------------- converters


def _whole(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise CannotHonour(f"{name}={value!r}: raylign counts steps in whole numbers (TRL's fraction-of-run "
                           f"form has no equivalent)")
    return int(value)


def _to(key: str, fn: Callable[[Any], Any] = lambda v: v) -> Converter:
    return lambda v, flat: {key: fn(v)}


def _steps(key: str, name: str) -> Converter:
    return lambda v, flat: {key: _whole(name, v)}


def _choice(key: str, name: str, allowed: Mapping[Any, Any]) -> Converter:
    def convert(v: Any, flat: Flat) -> dict[str, Any]:
        if v not in allowed:
            raise CannotHonour(f"{name}={v!r}: raylign supports {', '.join(map(repr, allowed))}")
        out = allowed[v]
        return out if isinstance(out, dict) else {key: out}
    return convert


def _only(name: str, *ok: Any, why: str) -> Converter:
    """A TRL switch raylign has one fixed setting of."""
    def convert(v: Any, flat: Flat) -> dict[str, Any]:
        if v not in ok:
            raise CannotHonour(f"{name}={v!r}: {why}")
        return {}
    return convert


def _precision(v: Any, flat: Flat) -> dict[str, Any]:
    if not flat.is_set("bf16"):  # TRL's None/True means bf16 on GPU; raylign's `auto` also keeps CPUs at fp32
        return {"learner.precision": "auto"}
    return {"learner.precision": "bf16" if v else "fp32"}


def _report_to(v: Any, flat: Flat) -> dict[str, Any]:
    sinks = [v] if isinstance(v, str) or v is None else list(v)
    sinks = ["none" if s in (None, "none") else s for s in sinks] or ["none"]
    if "all" in sinks:
        raise CannotHonour("report_to='all': name the sinks (tensorboard, wandb, mlflow)")
    return {"logging.report_to": sinks}


def _warmup(v: Any, flat: Flat) -> dict[str, Any]:
    if isinstance(v, float) and 0 < v < 1:  # transformers 5: a float below 1 is a ratio of the run
        return {"train.warmup_ratio": v, "train.warmup_steps": 0}
    return {"train.warmup_steps": _whole("warmup_steps", v)}


def _strategy(key: str, steps_field: str) -> Converter:
    def convert(v: Any, flat: Flat) -> dict[str, Any]:
        if v == "no":
            return {key: 0}
        if v == "steps":
            steps = flat.get(steps_field)
            return {key: _whole(steps_field, steps if steps is not None else flat.get("logging_steps"))}
        raise CannotHonour(f"{key.split('.')[1].replace('steps', 'strategy')}={v!r}: raylign counts in "
                           f"steps; use 'steps' with {steps_field}")
    return convert


def _truncation(v: Any, flat: Flat) -> dict[str, Any]:
    if v == "keep_end":
        return {"data.truncation": "truncate_left"}
    raise CannotHonour(f"truncation_mode={v!r} cuts the completion; raylign never trains on a cut answer: "
                       f"use keep_end (= data.truncation truncate_left), or set data.truncation error/skip")


def _sft_losses(v: Any, flat: Flat) -> dict[str, Any]:
    # TRL: completion_only_loss None = completion only for prompt/completion rows; assistant_only_loss for messages.
    completion = flat.get("completion_only_loss")
    return {"sft.completion_only_loss": True if completion is None else bool(completion),
            "sft.assistant_only_loss": bool(flat.get("assistant_only_loss"))}


def _grpo_batches(v: Any, flat: Flat) -> dict[str, Any]:
    """TRL's batch geometry -> raylign's: samples per optimizer step and how far a generation is reused."""
    per_device, accum = flat.get("per_device_train_batch_size"), flat.get("gradient_accumulation_steps")
    n, gen_batch, per_gen = flat.get("num_generations"), flat.get("generation_batch_size"), flat.get("steps_per_generation")
    world_batch = per_device * flat.world
    if gen_batch is not None and per_gen is not None:
        raise CannotHonour("generation_batch_size and steps_per_generation: TRL accepts only one of them")
    if gen_batch is not None:
        if gen_batch % world_batch:
            raise CannotHonour(f"generation_batch_size={gen_batch} is not a multiple of per_device_train_batch_size "
                               f"x learners = {world_batch}")
        per_gen = gen_batch // world_batch
    per_gen = accum if per_gen is None else per_gen
    step_samples = world_batch * accum
    if step_samples % n:
        raise CannotHonour(f"per_device_train_batch_size x learners x gradient_accumulation_steps = {step_samples} "
                           f"samples per step is not a multiple of num_generations={n}")
    if per_gen % accum:
        raise CannotHonour(f"steps_per_generation={per_gen} is not a multiple of gradient_accumulation_steps="
                           f"{accum}, so a generation would end inside an optimizer step")
    return {"train.per_device_train_batch_size": per_device, "grpo.num_generations": n,
            "grpo.prompts_per_step": step_samples // n, "grpo.max_staleness": per_gen // accum - 1}


def _offline_batches(v: Any, flat: Flat) -> dict[str, Any]:
    return {"train.per_device_train_batch_size": flat.get("per_device_train_batch_size"),
            "train.gradient_accumulation_steps": flat.get("gradient_accumulation_steps")}


def _batches(v: Any, flat: Flat) -> dict[str, Any]:
    return _grpo_batches(v, flat) if flat.online else _offline_batches(v, flat)


def _engine(v: Any, flat: Flat) -> dict[str, Any]:
    if not v:
        return {"rollout.engine": "transformers"}
    mode = flat.get("vllm_mode")
    if mode not in ("colocate", "server"):
        raise CannotHonour(f"vllm_mode={mode!r}: use 'colocate' or 'server'")
    colocate = {"rollout.colocate": True, "rollout.enable_sleep_mode": True} if mode == "colocate" else {
        "rollout.colocate": False}
    return {"rollout.engine": "vllm", **colocate}


def _log_completions(v: Any, flat: Flat) -> dict[str, Any]:
    if not v:
        return {"grpo.log_completions_steps": 0}
    return {"grpo.log_completions_steps": _whole("logging_steps", flat.get("logging_steps"))}


def _scale_rewards(v: Any, flat: Flat) -> dict[str, Any]:
    value = {True: "group", False: "none"}.get(v, v) if isinstance(v, bool) else v
    return _choice("grpo.scale_rewards", "scale_rewards", {"group": "group", "batch": "batch", "none": "none"})(value, flat)


def _reward_funcs(v: Any, flat: Flat) -> dict[str, Any]:
    if v is None:
        return {}
    specs = []
    for name in [v] if isinstance(v, str) else v:
        if name == "get_soft_overlong_punishment":  # what `trl grpo`'s registry builds
            specs.append("trl.rewards:get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256)")
        elif name in TRL_REWARDS:
            specs.append(f"trl.rewards:{name}")
        elif "." in name and ":" not in name:
            module, _, fn = name.rpartition(".")
            specs.append(f"{module}:{fn}")
        else:
            specs.append(name)
    return {"reward.funcs": specs}


def _lora(v: Any, flat: Flat) -> dict[str, Any]:
    if not v:
        return {"model.lora.r": 0}
    targets = flat.get("lora_target_modules")
    out = {"model.lora.r": flat.get("lora_r"), "model.lora.lora_alpha": flat.get("lora_alpha"),
           "model.lora.lora_dropout": flat.get("lora_dropout")}
    if targets is not None:
        out["model.lora.target_modules"] = [targets] if isinstance(targets, str) else list(targets)
    return out


def _dpo_loss(v: Any, flat: Flat) -> dict[str, Any]:
    return {"dpo.loss_type": [v] if isinstance(v, str) else list(v)}


_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant"}
_SAME = "same name and meaning"
_FIXED = "raylign's only setting"
_BATCH_NOTE = ("GRPO: one optimizer step trains per_device_train_batch_size x learners x gradient_accumulation_steps "
               "samples = grpo.prompts_per_step x num_generations; a generation reused for "
               "steps_per_generation / gradient_accumulation_steps steps becomes grpo.max_staleness = that - 1.")

TABLE: dict[str, Rule] = {
    # ---- transformers.TrainingArguments (every TRL config)
    "output_dir": Rule(("output_dir",), note="Parent of run directories (`output_dir/run_name`).", apply_default=False),
    "run_name": Rule(("run_name",), note="Names the run directory.", apply_default=False),
    "seed": Rule(("seed",), note=_SAME),
    "learning_rate": Rule(("train.learning_rate",), note=_SAME),
    "weight_decay": Rule(("train.weight_decay",), note=_SAME),
    "adam_beta1": Rule(("train.adam_beta1",), note=_SAME),
    "adam_beta2": Rule(("train.adam_beta2",), note=_SAME),
    "adam_epsilon": Rule(("train.adam_epsilon",), note=_SAME),
    "max_grad_norm": Rule(("train.max_grad_norm",), note=_SAME),
    "num_train_epochs": Rule(("train.num_train_epochs",), note=_SAME),
    "max_steps": Rule(("train.max_steps",), note=_SAME),
    "lr_scheduler_type": Rule(("train.lr_scheduler_type",),
                              _choice("train.lr_scheduler_type", "lr_scheduler_type", _SCHEDULERS)),
    "warmup_steps": Rule(("train.warmup_steps", "train.warmup_ratio"), _warmup,
                         note="A float below 1 is a ratio of the run (transformers 5), `train.warmup_ratio`."),
    "per_device_train_batch_size": Rule(("train.per_device_train_batch_size", "grpo.prompts_per_step"), _batches,
                                        note=_BATCH_NOTE, reads=("gradient_accumulation_steps", "num_generations",
                                                                 "steps_per_generation", "generation_batch_size")),
    "gradient_accumulation_steps": Rule(("train.gradient_accumulation_steps", "grpo.prompts_per_step"),
                                        lambda v, f: {}, note="See per_device_train_batch_size."),
    "logging_steps": Rule(("train.logging_steps",), _steps("train.logging_steps", "logging_steps")),
    "logging_strategy": Rule(convert=_only("logging_strategy", "steps", "no", why="raylign logs every "
                                           "train.logging_steps steps"), note="metrics.jsonl is always written."),
    "save_steps": Rule(("train.save_steps",), lambda v, f: {}, note="See save_strategy."),
    "save_strategy": Rule(("train.save_steps",), _strategy("train.save_steps", "save_steps"), reads=("save_steps",),
                          note="`no` = 0: raylign still saves the final checkpoint."),
    "eval_steps": Rule(("train.eval_steps",), lambda v, f: {}, note="See eval_strategy."),
    "eval_strategy": Rule(("train.eval_steps",), _strategy("train.eval_steps", "eval_steps"), reads=("eval_steps",)),
    "save_total_limit": Rule(("train.save_total_limit",), note=_SAME),
    "resume_from_checkpoint": Rule(("train.resume_from_checkpoint",), note=_SAME),
    "bf16": Rule(("learner.precision",), _precision,
                 note="TRL's default (bf16 unless fp16) is raylign's `auto`, which keeps a CPU run in fp32."),
    "fp16": Rule(("learner.precision",), _only("fp16", False, None, why="raylign trains in fp32 or bf16; set bf16: "
                                               "true instead"), note="true is refused: raylign trains in fp32 or bf16."),
    "gradient_checkpointing": Rule(("model.gradient_checkpointing",), note=_SAME),
    "activation_checkpointing": Rule(("model.gradient_checkpointing",),
                                     lambda v, f: {} if v is None else {"model.gradient_checkpointing": bool(v)},
                                     note="transformers 5's new name for gradient_checkpointing."),
    "report_to": Rule(("logging.report_to",), _report_to, note="metrics.jsonl is always written as well."),
    "project": Rule(("logging.project",), note=_SAME, apply_default=False),
    "disable_tqdm": Rule(("logging.progress_bar",), _to("logging.progress_bar", lambda v: not v)),
    "optim": Rule(convert=_only("optim", "adamw_torch", "adamw_torch_fused", "adamw_hf",
                                why="raylign's optimizer is AdamW (DeepSpeed's, torch_adam on CPU)"),
                  note="AdamW only."),
    "remove_unused_columns": Rule(ignore=True, note="Extra columns always reach the reward functions."),
    "use_cpu": Rule(ignore=True, note="Placement follows learner.num_gpus_per_learner."),
    "dataloader_num_workers": Rule(ignore=True, note="Rows are read and decoded by the learners."),
    "dataloader_pin_memory": Rule(ignore=True, note="Rows are read and decoded by the learners."),
    "per_device_eval_batch_size": Rule(ignore=True, note="Evaluation batches are sized by raylign."),
    "logging_first_step": Rule(ignore=True, note="Every step is logged from step 1."),
    "log_level": Rule(ignore=True, note="Python logging decides."),
    "deepspeed": Rule(refuse="raylign writes the DeepSpeed config itself from learner.zero_stage, "
                             "learner.offload_optimizer and learner.offload_param"),
    "push_to_hub": Rule(refuse="raylign saves HF-format checkpoints under the run directory; push them yourself"),
    "torch_compile": Rule(refuse="raylign does not compile the policy"),
    "use_liger_kernel": Rule(refuse="raylign computes logprobs in chunks (learner.logprob_chunk_size) instead"),
    # ---- SFTConfig
    "SFTConfig.max_length": Rule(("data.max_length",), note=_SAME),
    "SFTConfig.truncation_mode": Rule(("data.truncation",), _truncation),
    "SFTConfig.shuffle_dataset": Rule(ignore=True, note="TRL shuffles before packing; batches are shuffled "
                                                        "either way (data.shuffle)."),
    "completion_only_loss": Rule(("sft.completion_only_loss", "sft.assistant_only_loss"), _sft_losses,
                                 reads=("assistant_only_loss",),
                                 note="None (TRL's default) = true for prompt/completion rows."),
    "assistant_only_loss": Rule(("sft.assistant_only_loss",), lambda v, f: {},
                                note="See completion_only_loss; TRL's default false trains every token of `messages`."),
    "SFTConfig.loss_type": Rule(convert=_only("loss_type", "nll", why="raylign's SFT loss is the NLL"),
                                note="`nll` only."),
    "packing": Rule(refuse="raylign does not pack rows"),
    "padding_free": Rule(refuse="raylign pads each micro-batch"),
    "dataset_text_field": Rule(ignore=True, note="raylign reads `messages` or prompt/completion columns."),
    # ---- DPOConfig
    "DPOConfig.max_length": Rule(("data.max_length",), note=_SAME),
    "DPOConfig.truncation_mode": Rule(("data.truncation",), _truncation),
    "DPOConfig.loss_type": Rule(("dpo.loss_type",), _dpo_loss, note="Several entries mix losses (MPO)."),
    "DPOConfig.beta": Rule(("dpo.beta",), note=_SAME),
    "loss_weights": Rule(("dpo.loss_weights",), note=_SAME),
    "label_smoothing": Rule(("dpo.label_smoothing",), note=_SAME),
    "precompute_ref_log_probs": Rule(("dpo.precompute_ref_log_probs",), note=_SAME),
    "disable_dropout": Rule(convert=_only("disable_dropout", False, None, why="raylign trains with the model's own "
                                          "dropout settings (0 in Qwen2.5-VL and LLaVA)"), note=_FIXED),
    # ---- GRPOConfig
    "GRPOConfig.beta": Rule(("grpo.beta",), note=_SAME),
    "GRPOConfig.loss_type": Rule(("grpo.loss_type",), note=_SAME),
    "GRPOConfig.shuffle_dataset": Rule(("data.shuffle",), note=_SAME),
    "num_generations": Rule(("grpo.num_generations",), lambda v, f: {}, note="See per_device_train_batch_size."),
    "steps_per_generation": Rule(("grpo.max_staleness",), lambda v, f: {}, note=_BATCH_NOTE),
    "generation_batch_size": Rule(("grpo.max_staleness",), lambda v, f: {},
                                  note="In samples: steps_per_generation = it / (per_device_train_batch_size x learners)."),
    "max_completion_length": Rule(("grpo.max_completion_length",), note=_SAME),
    "temperature": Rule(("grpo.temperature",), note=_SAME),
    "top_p": Rule(("grpo.top_p",), note=_SAME),
    "top_k": Rule(("grpo.top_k",), lambda v, f: {"grpo.top_k": v or 0}, note=_SAME),
    "epsilon": Rule(("grpo.epsilon",), note=_SAME),
    "epsilon_high": Rule(("grpo.epsilon_high",), note=_SAME),
    "delta": Rule(("grpo.delta",), note=_SAME),
    "importance_sampling_level": Rule(("grpo.importance_sampling_level",), note=_SAME),
    "scale_rewards": Rule(("grpo.scale_rewards",), _scale_rewards, note="true = group, false = none (older TRL)."),
    "mask_truncated_completions": Rule(("grpo.mask_truncated_completions",), note=_SAME),
    "num_iterations": Rule(("grpo.num_iterations",), note=_SAME),
    "reward_weights": Rule(("reward.reward_weights",), note=_SAME),
    "log_completions": Rule(("grpo.log_completions_steps",), _log_completions, reads=("logging_steps",),
                            note="true = every logging_steps; written to samples.jsonl."),
    "num_completions_to_print": Rule(("grpo.num_completions_to_print",),
                                     lambda v, f: {} if v is None else {"grpo.num_completions_to_print": v}),
    "use_vllm": Rule(("rollout.engine", "rollout.colocate"), _engine, reads=("vllm_mode",),
                     note="true = vllm; vllm_mode colocate = rollout.colocate + enable_sleep_mode, server = own GPUs."),
    "vllm_mode": Rule(("rollout.colocate",), lambda v, f: {}, note="See use_vllm."),
    "vllm_gpu_memory_utilization": Rule(("rollout.gpu_memory_utilization",), note=_SAME),
    "vllm_tensor_parallel_size": Rule(("rollout.tensor_parallel_size",), note=_SAME),
    "vllm_importance_sampling_cap": Rule(("grpo.vllm_importance_sampling_clip_max",),
                                         lambda v, f: {} if v is None else {"grpo.vllm_importance_sampling_clip_max": v},
                                         note="Deprecated in TRL 1.6 for vllm_importance_sampling_clip_max."),
    "vllm_enable_sleep_mode": Rule(("rollout.enable_sleep_mode",),
                                   lambda v, f: {"rollout.enable_sleep_mode": True} if v else {}),
    "vllm_max_model_length": Rule(("rollout.max_model_len",), note=_SAME),
    "vllm_model_impl": Rule(("rollout.engine_kwargs",), lambda v, f: {"rollout.engine_kwargs": {"model_impl": v}}
                            if f.get("use_vllm") and v not in (None, "vllm") else {}),
    "vllm_server_host": Rule(ignore=True, note="raylign starts its own engines (rollout.num_workers)."),
    "vllm_server_port": Rule(ignore=True, note="raylign starts its own engines (rollout.num_workers)."),
    "vllm_server_base_url": Rule(ignore=True, note="raylign starts its own engines (rollout.num_workers)."),
    "top_entropy_quantile": Rule(convert=_only("top_entropy_quantile", 1.0, why="raylign trains every token"),
                                 note=_FIXED),
    "multi_objective_aggregation": Rule(convert=_only("multi_objective_aggregation", "sum_then_normalize",
                                                      why="raylign sums the weighted rewards, then normalizes"),
                                        note=_FIXED),
    "log_multimodal": Rule(ignore=True, note="samples.jsonl keeps a thumbnail of each logged prompt's image."),
    "ds3_gather_for_generation": Rule(ignore=True, note="Weights reach the engines by the broadcaster."),
    # ---- ModelConfig and the scripts' arguments
    "model_name_or_path": Rule(("model.name_or_path",), note=_SAME, apply_default=False),
    "dtype": Rule(("model.dtype",), _choice("model.dtype", "dtype", {"auto": "auto", "float32": "float32",
                  "bfloat16": "bfloat16", "float16": "float16"}), apply_default=False,
                  note="TRL's float32 default is not applied: raylign's `auto` follows learner.precision."),
    "attn_implementation": Rule(("model.attn_implementation",), lambda v, f: {} if v is None else
                                {"model.attn_implementation": v}, note=_SAME),
    "use_peft": Rule(("model.lora.r",), _lora, reads=("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"),
                     note="true = LoRA with lora_r, lora_alpha, lora_dropout (TRL's defaults)."),
    "lora_r": Rule(("model.lora.r",), lambda v, f: {}, note="See use_peft."),
    "lora_alpha": Rule(("model.lora.lora_alpha",), lambda v, f: {}, note="See use_peft."),
    "lora_dropout": Rule(("model.lora.lora_dropout",), lambda v, f: {}, note="See use_peft."),
    "lora_target_modules": Rule(("model.lora.target_modules",), lambda v, f: {}, note="See use_peft."),
    "load_in_4bit": Rule(refuse="raylign does not quantize the policy"),
    "load_in_8bit": Rule(refuse="raylign does not quantize the policy"),
    "dataset_name": Rule(("data.train",), note="A hub name or a local file/folder.", apply_default=False),
    "dataset_train_split": Rule(convert=_only("dataset_train_split", "train", why="raylign reads the train split"),
                                note="`train` only."),
    "dataset_test_split": Rule(ignore=True, note="Evaluate on data.eval or data.eval_split_size rows."),
    "reward_funcs": Rule(("reward.funcs",), _reward_funcs,
                         note="TRL's registry names become `trl.rewards:<name>`; `pkg.mod.fn` becomes `pkg.mod:fn`."),
    "reward_model_name_or_path": Rule(refuse="raylign scores with reward functions, not reward models"),
}


@functools.cache
def snapshot() -> dict[str, dict[str, Any]]:
    """TRL's classes and their field defaults, as recorded by docs/gen_migration.py --snapshot."""
    return json.loads((Path(__file__).with_name("trl_fields.json")).read_text())
