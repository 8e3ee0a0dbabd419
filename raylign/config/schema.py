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
import functools
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from raylign.errors import RaylignError


class ConfigError(RaylignError, ValueError):
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
    prompt_column: str = _f(
        "prompt", "Column holding the prompt (text or chat messages), e.g. 'problem'; read as 'prompt'."
    )
    image_column: str | None = _f(
        None, "Column holding the image(s): one image or a list per row; None = 'images' or 'image'."
    )
    completion_column: str | None = _f(
        None, "Column read as 'completion' (SFT target), e.g. 'chosen' of preference data; None = 'completion'."
    )
    system_prompt: str | None = _f(None, "System message put before every prompt (and SFT conversation).")


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

    num_learners: int = _f(1, "Learner actors (data-parallel ranks); 0 = one learner inside the driver process, no Ray actor.", ge=0)
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
    assistant_only_loss: bool = _f(
        True, "'messages' rows: train only on assistant turns; false trains every text token (TRL's default)."
    )


@dataclass(frozen=True)
class DPOConfig:
    """DPO and MPO (a weighted mix of DPO-family losses)."""

    beta: float = _f(0.1, "Strength of the implicit KL to the reference model.", gt=0)
    loss_type: list[str] = _f(["sigmoid"], f"Losses to mix; any of {', '.join(DPO_LOSS_TYPES)}.")
    loss_weights: list[float] | None = _f(None, "Weight per loss_type entry; None = all 1.0.")
    label_smoothing: float = _f(
        0.0, "Assumed preference-label noise, used by loss_type robust only.", ge=0, lt=0.5
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
    epsilon: float = _f(0.2, "Lower clip range of the importance ratio.", gt=0, le=1)
    epsilon_high: float | None = _f(None, "Upper clip range; None = epsilon.", gt=0)
    delta: float | None = _f(
        None, "Two-sided clip: cap the ratio at delta (> 1) for negative advantages.", gt=1
    )
    importance_sampling_level: Literal["token", "sequence"] = _f(
        "token", "Importance ratio per token, or one per sequence (GSPO)."
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"] = _f(
        "dapo",
        "Surrogate and normalisation (TRL's): grpo/bnpo/dr_grpo/dapo/luspo clip the ratio; cispo caps a "
        "detached ratio at epsilon_high; sapo gates it softly; vespo weights sequences by a Gamma "
        "function of their ratio. docs/grpo.md compares them.",
    )
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
    vllm_importance_sampling_correction: bool = _f(
        True,
        "Weight each token by the behaviour ratio pi_prox / pi_sampler (decoupled PPO), whatever the engine: "
        "corrects both sampler/learner mismatch and staleness. On by default, as TRL.",
    )
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = (
        _f("sequence_mask", "Per token or per sequence; truncate the ratio to the bounds, or zero it outside.")
    )
    vllm_importance_sampling_clip_max: float | None = _f(
        3.0, "Upper bound C_max of the behaviour ratio; None = open.", gt=0
    )
    vllm_importance_sampling_clip_min: float | None = _f(
        None, "Lower bound C_min of the behaviour ratio; None = open.", ge=0
    )
    off_policy_mask_threshold: float | None = _f(
        None,
        "Drop negative-advantage completions whose mean log(pi_sampler / pi) exceeds this (DeepSeek-V3.2); "
        "None = off.",
        ge=0,
    )
    use_bias_correction_kl: bool = _f(True, "Multiply the per-token KL by the importance ratio (TRL's default).")
    sapo_temperature_pos: float = _f(1.0, "SAPO gate temperature for positive advantages.", gt=0)
    sapo_temperature_neg: float = _f(1.05, "SAPO gate temperature for other advantages.", gt=0)
    vespo_k_pos: float = _f(2.0, "VESPO power for non-negative advantages (down-weights ratios < 1).", ge=0)
    vespo_lambda_pos: float = _f(3.0, "VESPO decay for non-negative advantages (down-weights ratios > 1).", ge=0)
    vespo_k_neg: float = _f(3.0, "VESPO power for negative advantages.", ge=0)
    vespo_lambda_neg: float = _f(2.0, "VESPO decay for negative advantages.", ge=0)
    eval_num_prompts: int = _f(64, "Prompts sampled per evaluation.", ge=0)
    log_completions_steps: int = _f(10, "Log sample completions every this many steps; 0 = never.", ge=0)
    num_completions_to_print: int = _f(4, "Completions shown each time they are logged.", ge=0)


@dataclass(frozen=True)
class RolloutConfig:
    """The rollout workers that sample completions."""

    engine: Literal["transformers", "vllm"] = _f("transformers", "Generation engine.")
    num_workers: int = _f(1, "Rollout worker actors; 0 = one engine inside the driver process (colocated, no Ray actor).", ge=0)
    num_gpus_per_worker: float | None = _f(
        None, "GPUs per worker; None = auto (tensor_parallel_size or 0).", ge=0
    )
    num_cpus_per_worker: float = _f(1.0, "CPUs per worker.", ge=0)
    batch_size: int = _f(8, "Prompts per generate call.", ge=1)
    tensor_parallel_size: int = _f(1, "vLLM tensor parallelism per worker.", ge=1)
    gpu_memory_utilization: float = _f(0.5, "Fraction of GPU memory vLLM may take.", gt=0, le=1)
    max_model_len: int | None = _f(None, "vLLM context length; None = prompt + completion limits.", ge=1)
    enable_sleep_mode: bool = _f(False, "Let vLLM free its GPU memory while the learner trains.")
    colocate: bool = _f(
        False,
        "One engine inside each learner actor (same process, same GPU; rollout.num_workers = "
        "learner.num_learners): generation and training take turns, the engine sleeps through updates "
        "where it can, and weights are copied in-process (no process group). docs/scaling.md.",
    )
    engine_kwargs: dict[str, Any] = _f(
        {}, "Extra keyword arguments for the engine constructor, e.g. model_impl."
    )
    resources: dict[str, float] = _f({}, "Custom Ray resources per worker, e.g. {rollout: 1}.", ge=0)


@dataclass(frozen=True)
class RewardConfig:
    """Reward functions and the workers that run them (TRL calls funcs reward_funcs)."""

    funcs: list[str] = _f(["format", "accuracy"], "Builtin names, module:function or path.py:function.")
    reward_weights: list[float] | None = _f(None, "Weight per reward function; None = all 1.0.")
    num_workers: int = _f(1, "Reward worker actors; 0 = score inside the driver process (still in a process pool).", ge=0)
    processes_per_worker: int = _f(2, "Processes per worker that run reward functions.", ge=1)
    timeout_s: float = _f(10.0, "Hard limit per reward call; a timeout scores None and is counted.", gt=0)
    output_lines: int = _f(
        20, "Lines of one reward call's stdout and of its stderr shown; the rest is counted in one summary line.", ge=0
    )
    max_memory_mb: int | None = _f(
        None, "Address-space limit of each reward process; a call past it fails with MemoryError (None = none).", ge=64
    )


@dataclass(frozen=True)
class SyncConfig:
    """Weight broadcast from the learners to the rollout engines."""

    transport: Literal["auto", "collective", "object_store", "inprocess"] = _f(
        "auto", "'auto' = inprocess when learner and engine share a process (colocate, or both 0 workers), "
        "else collective."
    )
    bucket_mb: float = _f(64.0, "Size of each broadcast bucket in MiB.", gt=0)
    timeout_s: float = _f(
        120.0,
        "Limit on each phase of a sync (engine readiness, group build, transfer); a receiver past it is "
        "named in a SyncError and replaced.",
        gt=0,
    )


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
    resource_timeout_s: float | None = _f(
        None,
        "Limit on waiting for the Ray resources of the learners, rollout and reward workers; past it the run stops "
        "naming the request, the keys that asked for it and what the cluster offers. None = 60 s on Ray started "
        "in-process, 900 s when joining a cluster (an autoscaler may add nodes).",
        gt=0,
    )
    preset: Literal["none", "tiny"] = _f(
        "none",
        "'tiny' runs any recipe on a laptop CPU: a tiny random LLaVA and the synthetic colour task (both "
        "built offline under output_dir/.tiny on first use), transformers engine, small batches, 10 steps. "
        "Applied over the YAML file; command-line keys still win.",
    )
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


# ------------------------------------------------------------------ schema introspection


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "any" if tp is Any else getattr(tp, "__name__", str(tp))
