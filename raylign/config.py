"""One typed config tree for every raylign job: YAML plus dotted command-line overrides, checked on load.

Every field keeps its help text (and numeric bounds) in ``field(metadata=...)``, so
``config_reference_markdown()`` generates docs/config.md from this file alone. Loading order:
YAML file -> overrides -> method presets for keys the user set nowhere -> type checks -> rules.
Any problem is a one-line ``ConfigError`` that starts with the full dotted key. Names follow TRL
where the concept is the same, so a TRL recipe carries over.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import functools
import json
import operator
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message is one line that starts with the dotted key."""


def _f(default: Any = dataclasses.MISSING, doc: str = "", **bounds: float) -> Any:
    """A field with help text and optional bounds (ge/gt/le/lt); list/dict defaults are copied."""
    meta = {"help": doc, **bounds}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _section(cls: type) -> Any:
    """A nested section built from its own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"help": cls.__doc__ or ""})


Method = Literal["sft", "dpo", "mpo", "grpo", "gspo"]
OFFLINE_METHODS = ("sft", "dpo", "mpo")
ONLINE_METHODS = ("grpo", "gspo")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "sft", "apo_zero", "apo_down")
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the policy (PEFT); `r: 0` trains every weight instead."""

    r: int = _f(0, "LoRA rank; 0 disables LoRA (full fine-tuning).", ge=0)
    lora_alpha: int = _f(16, "LoRA scale numerator (scale = lora_alpha / r).", gt=0)
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch input.", ge=0, lt=1)
    target_modules: list[str] = _f(
        ["all-linear"], "Module names that get adapters; 'all-linear' = every linear layer."
    )


@dataclass(frozen=True)
class ModelConfig:
    """The policy model (the reference model is a frozen copy of it)."""

    name_or_path: str = _f(doc="HF model directory or hub id of the policy.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Dtype the weights load in; 'auto' follows learner.precision."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = _f("sdpa", "Attention kernel.")
    freeze_vision_tower: bool = _f(False, "Keep the vision encoder's weights fixed.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    lora: LoraConfig = _section(LoraConfig)


@dataclass(frozen=True)
class DataConfig:
    """Datasets: parquet/jsonl file, Arrow directory, image folder or hub name."""

    train: str = _f(doc="Training data: parquet/jsonl path, Arrow dir, image folder or hub dataset name.")
    eval: str | None = _f(None, "Evaluation data in the same forms; None = hold out eval_split_size.")
    eval_split_size: int | float = _f(
        0.0, "Held out from train when eval is None: a float is a fraction in [0, 1), an int a row count."
    )
    max_length: int = _f(1024, "Max tokens of prompt + completion (offline methods).", ge=1)
    max_prompt_length: int = _f(512, "Max prompt tokens, image tokens included.", ge=1)
    truncation: Literal["error", "skip", "truncate_left"] = _f(
        "error", "Too-long rows: raise, drop (counted), or cut the prompt from the left."
    )
    skip_invalid: bool = _f(
        False, "Drop (and count) rows with unreadable images or bad fields instead of raising."
    )
    min_pixels: int = _f(3136, "Images smaller than this many pixels are upscaled.", ge=1)
    max_pixels: int = _f(401408, "Images larger than this many pixels are downscaled.", ge=1)
    shuffle: bool = _f(True, "Shuffle the training rows each epoch (seeded).")


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule and step bookkeeping (TRL/transformers names)."""

    learning_rate: float = _f(1e-5, "Peak AdamW learning rate.", ge=0)
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay.", ge=0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = _f(0.999, "AdamW beta2.", ge=0, lt=1)
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", gt=0)
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this; 0 disables clipping.", ge=0)
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = _f("linear", "Decay after warmup.")
    warmup_ratio: float = _f(0.0, "Fraction of total steps spent warming up.", ge=0, le=1)
    warmup_steps: int = _f(0, "Warmup steps; when > 0 it wins over warmup_ratio.", ge=0)
    per_device_train_batch_size: int = _f(
        8, "Micro-batch rows (offline) or samples (online) per learner.", ge=1
    )
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated per optimizer step.", ge=1)
    num_train_epochs: float = _f(1.0, "Epochs over the training data when max_steps is -1.", gt=0)
    max_steps: int = _f(-1, "Optimizer steps to run; -1 derives it from num_train_epochs.", ge=-1)
    logging_steps: int = _f(1, "Write metrics every this many steps.", ge=1)
    save_steps: int = _f(0, "Checkpoint every this many steps; 0 = only at the end.", ge=0)
    eval_steps: int = _f(0, "Evaluate every this many steps; 0 = never.", ge=0)
    save_total_limit: int | None = _f(
        None, "Keep at most this many checkpoints (oldest deleted); None = all.", ge=1
    )
    resume_from_checkpoint: str | None = _f(
        None, "Checkpoint dir to resume from, or 'latest' = newest checkpoint of output_dir/run_name."
    )


@dataclass(frozen=True)
class LearnerConfig:
    """The DeepSpeed data-parallel learners and their Ray resources."""

    num_learners: int = _f(1, "Learner processes (data-parallel ranks).", ge=1)
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage, 0..3.", ge=0, le=3)
    offload_optimizer: bool = _f(False, "Keep optimizer state in CPU memory (ZeRO >= 1).")
    offload_param: bool = _f(False, "Keep parameters in CPU memory (ZeRO-3 only).")
    precision: Literal["auto", "fp32", "bf16"] = _f("auto", "'auto' = bf16 on GPU, fp32 on CPU.")
    backend: Literal["auto", "nccl", "gloo"] = _f(
        "auto", "torch.distributed backend; 'auto' = nccl on GPU, else gloo."
    )
    num_gpus_per_learner: float | None = _f(
        None, "GPUs per learner actor; None = 1 if GPUs exist, else 0.", ge=0
    )
    num_cpus_per_learner: float = _f(1.0, "CPUs per learner actor.", ge=0)
    logprob_chunk_size: int = _f(
        1024, "Tokens per chunk when computing logprobs (bounds logits memory).", ge=1
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK"] = _f("PACK", "Ray placement-group strategy.")
    resources: dict[str, float] = _f({}, "Custom Ray resources per learner, e.g. {learner: 1}.", ge=0)


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning loss."""

    aggregation: Literal["token_mean", "sequence_mean"] = _f(
        "token_mean", "Average the loss over all tokens, or per sequence then over sequences."
    )
    completion_only_loss: bool = _f(True, "Train only on completion tokens (prompt tokens masked).")


@dataclass(frozen=True)
class DPOConfig:
    """DPO and MPO (a weighted mix of DPO-family losses)."""

    beta: float = _f(0.1, "Strength of the implicit KL to the reference model.", gt=0)
    loss_type: list[str] = _f(["sigmoid"], f"Losses to mix; any of {', '.join(DPO_LOSS_TYPES)}.")
    loss_weights: list[float] | None = _f(None, "Weight per loss_type entry; None = all 1.0.")
    label_smoothing: float = _f(
        0.0, "Assumed preference-label noise (robust/sigmoid), in [0, 0.5].", ge=0, le=0.5
    )
    precompute_ref_log_probs: bool = _f(
        False, "Compute reference logprobs once before training, then drop it."
    )


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO and GSPO: group sampling, advantages and the clipped policy loss."""

    num_generations: int = _f(8, "Completions sampled per prompt (the group).", ge=1)
    prompts_per_step: int = _f(8, "Prompts sampled per optimizer step.", ge=1)
    max_completion_length: int = _f(256, "Max generated tokens per completion.", ge=1)
    temperature: float = _f(1.0, "Sampling temperature.", gt=0)
    top_p: float = _f(1.0, "Nucleus sampling mass.", gt=0, le=1)
    top_k: int = _f(0, "Top-k sampling; 0 disables.", ge=0)
    epsilon: float = _f(0.2, "Lower clip range of the importance ratio.", ge=0)
    epsilon_high: float | None = _f(None, "Upper clip range; None = epsilon.", ge=0)
    delta: float | None = _f(
        None, "Two-sided clip: cap the ratio at delta (> 1) for negative advantages.", gt=1
    )
    importance_sampling_level: Literal["token", "sequence"] = _f(
        "token", "Importance ratio per token, or one per sequence (GSPO)."
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = _f("dapo", "How token losses are normalized.")
    beta: float = _f(0.0, "KL penalty coefficient; 0 = no reference model.", ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = _f("k3", "KL estimator used when beta > 0.")
    scale_rewards: Literal["group", "batch", "none"] = _f(
        "group", "Divide advantages by the group/batch std, or not."
    )
    advantage_estimator: Literal["grpo", "rloo"] = _f("grpo", "Group-mean baseline, or leave-one-out.")
    mask_truncated_completions: bool = _f(
        False, "Exclude completions cut at max_completion_length from the loss."
    )
    num_iterations: int = _f(1, "Optimizer passes over each generated batch.", ge=1)
    max_staleness: int = _f(0, "Max policy versions a rollout may lag the learner; 0 = on-policy.", ge=0)
    dynamic_sampling: bool = _f(False, "Drop groups whose rewards are all equal and sample more (DAPO).")
    max_dynamic_sampling_rounds: int = _f(
        3, "Extra sampling rounds allowed per step with dynamic_sampling.", ge=1
    )
    tis_cap: float | None = _f(
        None, "Truncated importance-sampling cap on learner/sampler ratios; None = off.", ge=1
    )
    eval_num_prompts: int = _f(64, "Prompts sampled per evaluation.", ge=0)
    log_completions_steps: int = _f(10, "Log sample completions every this many steps; 0 = never.", ge=0)
    num_completions_to_print: int = _f(4, "Completions shown each time they are logged.", ge=0)


@dataclass(frozen=True)
class RolloutConfig:
    """The rollout workers that sample completions."""

    engine: Literal["transformers", "vllm"] = _f("transformers", "Generation engine.")
    num_workers: int = _f(1, "Rollout worker actors.", ge=1)
    num_gpus_per_worker: float | None = _f(
        None, "GPUs per worker; None = auto (tensor_parallel_size or 0).", ge=0
    )
    num_cpus_per_worker: float = _f(1.0, "CPUs per worker.", ge=0)
    batch_size: int = _f(8, "Prompts per generate call.", ge=1)
    tensor_parallel_size: int = _f(1, "vLLM tensor parallelism per worker.", ge=1)
    gpu_memory_utilization: float = _f(0.5, "Fraction of GPU memory vLLM may take.", gt=0, le=1)
    max_model_len: int | None = _f(None, "vLLM context length; None = prompt + completion limits.", ge=1)
    enable_sleep_mode: bool = _f(False, "Let vLLM free its GPU memory while the learner trains.")
    colocate: bool = _f(False, "Share GPUs with the learners instead of using separate ones.")
    engine_kwargs: dict[str, Any] = _f(
        {}, "Extra keyword arguments for the engine constructor, e.g. model_impl."
    )
    resources: dict[str, float] = _f({}, "Custom Ray resources per worker, e.g. {rollout: 1}.", ge=0)


@dataclass(frozen=True)
class RewardConfig:
    """Reward functions and the workers that run them (TRL calls funcs reward_funcs)."""

    funcs: list[str] = _f(["format", "accuracy"], "Builtin names, module:function or path.py:function.")
    reward_weights: list[float] | None = _f(None, "Weight per reward function; None = all 1.0.")
    num_workers: int = _f(1, "Reward worker actors.", ge=1)
    processes_per_worker: int = _f(2, "Processes per worker that run reward functions.", ge=1)
    timeout_s: float = _f(10.0, "Hard limit per reward call; a timeout scores None and is counted.", gt=0)


@dataclass(frozen=True)
class SyncConfig:
    """Weight broadcast from the learners to the rollout engines."""

    transport: Literal["auto", "collective", "object_store", "inprocess"] = _f(
        "auto", "'auto' = inprocess when colocated in one process, else collective."
    )
    bucket_mb: float = _f(64.0, "Size of each broadcast bucket in MiB.", gt=0)
    timeout_s: float = _f(120.0, "Give up on a sync after this many seconds.", gt=0)


@dataclass(frozen=True)
class LoggingConfig:
    """Metrics sinks (metrics.jsonl is always written)."""

    report_to: list[str] = _f(["tensorboard"], f"Extra sinks: any of {', '.join(REPORT_TO)}.")
    project: str = _f("raylign", "Project name for wandb/mlflow.")
    progress_bar: bool = _f(True, "Show a progress bar in the driver.")


@dataclass(frozen=True)
class RaylignConfig:
    """A whole raylign job."""

    method: Method = _f(doc="Training method; set by the subcommand.")
    model: ModelConfig = _f(doc=ModelConfig.__doc__ or "")
    data: DataConfig = _f(doc=DataConfig.__doc__ or "")
    output_dir: str = _f("runs", "Parent directory of run directories.")
    run_name: str | None = _f(None, "Run directory name under output_dir; None = '<method>-<timestamp>'.")
    seed: int = _f(42, "Seed for data order, sampling and init.", ge=0, lt=2**32)
    ray_address: str | None = _f(None, "None = start Ray in-process; 'auto' = join the running cluster.")
    train: TrainConfig = _section(TrainConfig)
    learner: LearnerConfig = _section(LearnerConfig)
    sft: SFTConfig = _section(SFTConfig)
    dpo: DPOConfig = _section(DPOConfig)
    grpo: GRPOConfig = _section(GRPOConfig)
    rollout: RolloutConfig = _section(RolloutConfig)
    reward: RewardConfig = _section(RewardConfig)
    sync: SyncConfig = _section(SyncConfig)
    logging: LoggingConfig = _section(LoggingConfig)

    def __post_init__(self) -> None:
        if self.run_name is None:  # resolved once, so the saved config names the real directory
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            object.__setattr__(self, "run_name", f"{self.method}-{stamp}")

    @property
    def run_dir(self) -> Path:
        """output_dir/run_name."""
        return Path(self.output_dir) / str(self.run_name)

    @property
    def is_online(self) -> bool:
        """True for the sampling methods (grpo, gspo)."""
        return self.method in ONLINE_METHODS


# ---------------------------------------------------------------------------------------------------
# Presets: defaults a method brings for keys the user set nowhere. A key whose guard keys the user set
# is left alone too (e.g. a custom dpo.loss_type keeps equal weights instead of the 3-entry MPO mix).

_PRESETS: dict[str, list[tuple[str, Any, tuple[str, ...]]]] = {
    "mpo": [
        ("dpo.loss_type", ["sigmoid", "bco_pair", "sft"], ()),
        ("dpo.loss_weights", [0.8, 0.2, 1.0], ("dpo.loss_type",)),
    ],
    "gspo": [  # GSPO paper setup as TRL documents it: sequence ratios, tiny clip range, loss_type grpo
        ("grpo.importance_sampling_level", "sequence", ()),
        ("grpo.epsilon", 3e-4, ()),
        ("grpo.epsilon_high", 4e-4, ("grpo.epsilon",)),
        ("grpo.beta", 0.0, ()),
        ("grpo.loss_type", "grpo", ()),
    ],
}


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads `1e-5` as a float (YAML 1.1 wants `1.0e-5`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_value(raw: str, key: str) -> Any:
    """One command-line value as YAML: 4 -> int, 1e-5 -> float, [a, b] -> list, null -> None."""
    try:
        return yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {_one_line(e)}") from e


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _schema_keys(cls: type = RaylignConfig, prefix: str = "") -> list[str]:
    """Every leaf key as a dotted path, in declaration order."""
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        keys += _schema_keys(tp, f"{prefix}{f.name}.") if _is_section(tp) else [prefix + f.name]
    return keys


def _unknown_key(key: str) -> ConfigError:
    """Error naming the key plus the closest valid key: same section first, then same name elsewhere."""
    keys = _schema_keys()
    section, _, leaf = key.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == section]
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    close = close or [k for k in keys if k.rpartition(".")[2] == leaf]
    close = close or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return ConfigError(f"{key}: unknown key{hint}; `raylign config-docs` lists every key")


def _check_key(key: str) -> None:
    """Raise unless `key` names a field; keys below a dict field (learner.resources.gpu_a) are free."""
    cls: Any = RaylignConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part not in _hints(cls):
            raise _unknown_key(key)
        tp = _hints(cls)[part]
        if not _is_section(tp):
            if i < len(parts) - 1 and dict not in (get_origin(tp), *map(get_origin, get_args(tp))):
                raise _unknown_key(key)
            return
        cls = tp


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """['--a.b=1', '--c.d', '2', '--flag'] -> {'a.b': 1, 'c.d': 2, 'flag': True}; values parsed as YAML."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        body = tok[2:] if tok.startswith("--") else tok
        if "=" in body:
            key, raw, i = *body.split("=", 1), i + 1
        elif not tok.startswith("--"):
            raise ConfigError(f"{tok}: unexpected argument; overrides look like --section.key=value")
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            key, raw, i = body, tokens[i + 1], i + 2
        else:  # a bare flag: --model.freeze_vision_tower
            key, raw, i = body, "true", i + 1
        _check_key(key)
        out[key] = _yaml_value(raw, key)
    return out


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    tree[leaf] = value


def _is_set(tree: Mapping, key: str) -> bool:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _apply_presets(tree: dict, method: str) -> None:
    """Fill the method's preset values into keys (and guard keys) the user left unset."""
    presets = _PRESETS.get(method, [])
    chosen = [(k, v) for k, v, guards in presets if not any(_is_set(tree, g) for g in (k, *guards))]
    for key, value in chosen:  # decided before writing: a preset value is no user choice
        _set_dotted(tree, key, copy.deepcopy(value))


# --------------------------------------------------------------------------------- types and building


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "any" if tp is Any else getattr(tp, "__name__", str(tp))


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {shown}")


def _split_list(value: str, elem: Any, key: str) -> list:
    """'a,b' for a list field (TRL accepts a bare string for loss_type/report_to)."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    return parts if elem is str else [_yaml_value(p, key) for p in parts]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against `tp`; int -> float is the only widening, bool is never an int."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        close = difflib.get_close_matches(str(value), args, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{key}: expected one of {', '.join(args)}, got {value!r}{hint}")
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if value is None and len(members) < len(args):
            return None
        if len(members) == 1:
            return _coerce(value, members[0], key)
        for member in members:  # first member that accepts the value wins (int before float keeps rows)
            if _accepts(value, member):
                return _coerce(value, member, key)
        raise _type_error(key, tp, value)
    if origin is list:
        value = _split_list(value, args[0], key) if isinstance(value, str) else value
        if not isinstance(value, list):
            raise _type_error(key, tp, value)
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(key, tp, value)
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise _type_error(key, tp, value)


def _accepts(value: Any, tp: Any) -> bool:
    try:
        _coerce(value, tp, "")
    except ConfigError:  # only a probe: the caller reports the union's own error
        return False
    return True


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate section `cls` from a mapping, reporting unknown/missing keys with their dotted path."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        shown = repr(data) if len(repr(data)) <= 60 else repr(data)[:57] + "..."
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {shown}")
    hints = _hints(cls)
    for name in data:
        if name not in hints:
            raise _unknown_key(f"{prefix}{name}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if _is_section(tp):
            kwargs[f.name] = _build(tp, data.get(f.name), key + ".")
        elif f.name in data:
            kwargs[f.name] = _coerce(data[f.name], tp, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required; set it in the YAML file or with --{key}=...")
    return cls(**kwargs)


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


def _check_grpo(cfg: RaylignConfig) -> None:
    g = cfg.grpo
    _require(g.epsilon_high is None or g.epsilon_high >= g.epsilon, "grpo.epsilon_high",
             f"{g.epsilon_high} is below grpo.epsilon {g.epsilon}")
    if not cfg.is_online:
        return
    _require(g.num_generations >= 2, "grpo.num_generations",
             f"{cfg.method} compares completions within a group, so it needs >= 2, got {g.num_generations}")
    samples = g.prompts_per_step * g.num_generations
    _require(samples % cfg.learner.num_learners == 0, "grpo.prompts_per_step",
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
                  _check_top_logging):
        check(cfg)


# ------------------------------------------------------------------------------------------ public API


def config_from_dict(d: Mapping[str, Any]) -> RaylignConfig:
    """Build and validate a config from nested plain data (method presets fill unset keys)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"config: expected a mapping of sections, got {type(d).__name__}")
    tree = copy.deepcopy(dict(d))
    if isinstance(tree.get("method"), str):
        _apply_presets(tree, tree["method"])
    train = tree.get("train")
    _require(tree.get("run_name") is not None or not isinstance(train, Mapping)
             or train.get("resume_from_checkpoint") != "latest", "train.resume_from_checkpoint",
             "'latest' needs run_name set to the run to resume (its directory under output_dir)")
    cfg = _build(RaylignConfig, tree, "")
    validate(cfg)
    return cfg


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), method: str | None = None
) -> RaylignConfig:
    """YAML file (optional) + dotted overrides (`--a.b=v` or `--a.b v`) + method, checked and resolved."""
    tree = _read_yaml(Path(path)) if path is not None else {}
    parsed = parse_overrides(overrides)
    if method is not None and parsed.get("method", method) != method:
        raise ConfigError(f"method: --method={parsed['method']} contradicts the `{method}` command")
    for key, value in parsed.items():
        _set_dotted(tree, key, value)
    if method is not None:  # the subcommand wins over the file's method
        tree["method"] = method
    return config_from_dict(tree)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: cannot parse {path}: {_one_line(e)}") from e
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections, got {type(data).__name__}")
    return data or {}


def config_to_dict(cfg: RaylignConfig) -> dict[str, Any]:
    """Nested plain data (fresh copies); config_from_dict(config_to_dict(c)) == c."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RaylignConfig, run_dir: str | Path) -> Path:
    """Write the resolved config to run_dir/config.yaml (loadable with load_config)."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Resolved raylign config. Re-run: raylign {cfg.method} --config {path.name}\n"
    path.write_text(header + yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False))
    return path


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists inline: `loss_type: [sigmoid, bco_pair, sft]`."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


# ------------------------------------------------------------------------------------------ docs


def _sections(cls: type = RaylignConfig, prefix: str = "") -> list[tuple[str, type]]:
    out = [(prefix, cls)]
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if _is_section(tp):
            out += _sections(tp, f"{prefix}{f.name}.")
    return out


def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        return f"`{json.dumps(f.default_factory())}`"
    return "**required**" if f.default is dataclasses.MISSING else f"`{json.dumps(f.default)}`"


def _help_text(f: dataclasses.Field) -> str:
    bounds = [f"{sign} {f.metadata[n]}" for n, (_, sign) in _BOUND_OPS.items() if n in f.metadata]
    return f.metadata.get("help", "") + (f" Must be {' and '.join(bounds)}." if bounds else "")


def config_reference_markdown() -> str:
    """A Markdown reference: one table (key, type, default, help) per section."""
    lines = ["# Configuration reference", "",
             "Generated by `raylign config-docs` from `raylign/config.py`. Set keys in a YAML file "
             "(`--config`) or on the command line: `--train.learning_rate=2e-5` or "
             "`--rollout.num_workers 4`.",
             "Unknown keys, wrong types and impossible combinations are errors naming the key.", ""]
    for prefix, cls in _sections():
        lines += [f"## `{prefix.rstrip('.')}`" if prefix else "## top level", "", cls.__doc__ or "", "",
                  "| key | type | default | help |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            tp = _hints(cls)[f.name]
            if not _is_section(tp):
                row = [f"`{prefix}{f.name}`", f"`{_type_name(tp)}`", _default_text(f), _help_text(f)]
                cells = (c.replace("|", "\\|").replace("<", "&lt;") for c in row)
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
