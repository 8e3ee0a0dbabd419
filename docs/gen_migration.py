"""Generate docs/migration-from-trl.md: TRL config fields -> raylign dotted keys.

    python docs/gen_migration.py > docs/migration-from-trl.md

Two sources of rows, both checked here so the page cannot name a key that does not exist:

- same name, same meaning (a DESIGN.md contract): every TRL field whose name is the leaf of a raylign
  key in one of the sections that class maps to (``SECTIONS``), found by walking the typed config;
- renamed concepts, written out in ``RENAMED``; each raylign key there must exist in the typed config
  and each TRL name in TRL's dataclass (``check_tables`` raises otherwise).

The raylign defaults come from the typed config. The page depends on the installed TRL and
transformers versions, which its first lines record.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from typing import Any

from raylign.config import RaylignConfig

# TRL class -> raylign sections searched for a same-named key, in order ("" = top level).
SECTIONS: dict[str, tuple[str, ...]] = {
    "TrainingArguments": ("train", "", "model", "learner", "logging"),
    "SFTConfig": ("sft", "data", "train"),
    "DPOConfig": ("dpo", "data", "train"),
    "GRPOConfig": ("grpo", "reward", "rollout", "data", "train"),
    "ModelConfig": ("model", "model.lora"),
    "ScriptArguments": ("data",),
}

# TRL class -> {TRL field: (raylign key, note)} for concepts with another name (or worth a note).
RENAMED: dict[str, dict[str, tuple[str, str]]] = {
    "TrainingArguments": {
        "output_dir": ("output_dir", "Parent of run directories: a run writes to `output_dir/run_name`."),
        "run_name": ("run_name", "Names the run directory (default `<method>-<timestamp>`)."),
        "bf16": ("learner.precision", "`bf16`; the default `auto` is bf16 on GPU and fp32 on CPU."),
        "deepspeed": ("learner.zero_stage", ("raylign writes the DeepSpeed config from `learner.*` "
                                             "(`zero_stage`, `offload_optimizer`, `offload_param`).")),
        "eval_strategy": ("train.eval_steps", "Evaluate every N steps; 0 = never."),
        "save_strategy": ("train.save_steps", "Checkpoint every N steps; 0 = only at the end."),
        "logging_strategy": ("train.logging_steps", "Log every N steps."),
        "report_to": ("logging.report_to", "metrics.jsonl is always written as well."),
        "project": ("logging.project", ""),
    },
    "SFTConfig": {
        "assistant_only_loss": ("sft.completion_only_loss", "Loss on the assistant (completion) tokens only."),
        "shuffle_dataset": ("data.shuffle", ""),
        "truncation_mode": ("data.truncation", "`error`, `skip` (counted) or `truncate_left` the prompt."),
    },
    "DPOConfig": {
        "truncation_mode": ("data.truncation", "`error`, `skip` (counted) or `truncate_left` the prompt."),
        "loss_type": ("dpo.loss_type", "Several entries mix losses (MPO); `raylign mpo` presets the mix."),
    },
    "GRPOConfig": {
        "use_vllm": ("rollout.engine", "`vllm`; the default `transformers` engine runs anywhere."),
        "vllm_mode": ("rollout.colocate", ("`colocate` = true (needs `rollout.enable_sleep_mode`); "
                                           "`server` = false: rollout workers on their own GPUs.")),
        "vllm_gpu_memory_utilization": ("rollout.gpu_memory_utilization", ""),
        "vllm_tensor_parallel_size": ("rollout.tensor_parallel_size", ""),
        "vllm_max_model_length": ("rollout.max_model_len", ""),
        "vllm_enable_sleep_mode": ("rollout.enable_sleep_mode", ""),
        "vllm_model_impl": ("rollout.engine_kwargs", "`{model_impl: ...}`"),
        "vllm_importance_sampling_correction": ("grpo.tis_cap", "A cap turns the correction on; null = off."),
        "vllm_importance_sampling_cap": ("grpo.tis_cap", ""),
        "generation_batch_size": ("grpo.prompts_per_step", ("raylign counts prompts: samples per step = "
                                                            "prompts_per_step x num_generations.")),
        "steps_per_generation": ("grpo.max_staleness", ("Different mechanism: rollouts stream continuously "
                                                        "and may lag the learner by at most this many policy versions.")),
        "log_completions": ("grpo.log_completions_steps", "Every N steps; 0 = never."),
        "shuffle_dataset": ("data.shuffle", ""),
        "loss_type": ("grpo.loss_type", "`grpo`, `bnpo`, `dr_grpo` or `dapo` (the default in both)."),
    },
    "ModelConfig": {
        "model_name_or_path": ("model.name_or_path", ""),
        "use_peft": ("model.lora.r", "LoRA is on when `r` > 0."),
        "lora_r": ("model.lora.r", ""),
        "lora_target_modules": ("model.lora.target_modules", ""),
    },
    "ScriptArguments": {
        "dataset_name": ("data.train", "A hub name or a local parquet/jsonl/Arrow/image folder."),
        "dataset_test_split": ("data.eval", "An evaluation dataset, or hold out `data.eval_split_size` rows."),
    },
}

INTRO = """# Migrating from TRL

raylign keeps TRL's names where the concept is the same, so most of a TRL recipe carries over as
dotted keys: `--learning_rate 1e-6` becomes `--train.learning_rate=1e-6` on the command line, or
`train: {{learning_rate: 1.0e-6}}` in YAML. Reward functions keep TRL's signature
(`fn(prompts, completions, **columns) -> list[float | None]`); TRL's `reward_funcs=[...]` trainer
argument is `reward.funcs` (builtin names such as `format` and `accuracy`, `module:function` or
`path.py:function`). Unknown keys are an error that names the closest valid key.

Generated by `python docs/gen_migration.py > docs/migration-from-trl.md` from the typed config
(`raylign/config/schema.py`) and the installed TRL ({trl}) and transformers ({transformers}).
A field not listed has no raylign equivalent yet. The full key reference is docs/config.md.
"""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_keys(cls: type = RaylignConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf key of the typed config as a dotted path, with its dataclass field."""
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            out.update(config_keys(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = f
    return out


def trl_classes() -> dict[str, type]:
    """TRL's config dataclasses (and the transformers TrainingArguments they extend), by name."""
    from transformers import TrainingArguments
    from trl import DPOConfig, GRPOConfig, ModelConfig, ScriptArguments, SFTConfig

    return {c.__name__: c for c in (TrainingArguments, SFTConfig, DPOConfig, GRPOConfig, ModelConfig, ScriptArguments)}


def own_fields(name: str, classes: dict[str, type]) -> list[str]:
    """The fields a TRL class adds to TrainingArguments (all fields for the non-training classes)."""
    names = [f.name for f in dataclasses.fields(classes[name])]
    if name in ("SFTConfig", "DPOConfig", "GRPOConfig"):
        base = {f.name for f in dataclasses.fields(classes["TrainingArguments"])}
        names = [n for n in names if n not in base]
    return names


def _same_name(field: str, sections: tuple[str, ...], keys: dict[str, Any]) -> str | None:
    for section in sections:
        key = f"{section}.{field}" if section else field
        if key in keys:
            return key
    return None


def default_text(f: dataclasses.Field) -> str:
    """The default of a typed-config field as it appears in YAML (JSON spelling)."""
    if f.default_factory is not dataclasses.MISSING:
        return f"`{json.dumps(f.default_factory())}`"
    return "required" if f.default is dataclasses.MISSING else f"`{json.dumps(f.default)}`"


def table_rows(name: str, classes: dict[str, type], keys: dict[str, dataclasses.Field]) -> list[tuple[str, str, str]]:
    """(TRL field, raylign key, note) for every mapped field of one TRL class, in TRL's order."""
    renamed = RENAMED.get(name, {})
    rows = []
    for field in own_fields(name, classes):
        if field in renamed:
            rows.append((field, *renamed[field]))
        elif (key := _same_name(field, SECTIONS[name], keys)) is not None:
            rows.append((field, key, ""))
    return rows


def check_tables(classes: dict[str, type], keys: dict[str, Any]) -> None:
    """Raise when RENAMED names a TRL field or a raylign key that does not exist."""
    for name, table in RENAMED.items():
        fields = {f.name for f in dataclasses.fields(classes[name])}
        for trl_field, (key, _) in table.items():
            if trl_field not in fields:
                raise ValueError(f"RENAMED[{name!r}]: TRL {name} has no field {trl_field!r}")
            if key not in keys:
                raise ValueError(f"RENAMED[{name!r}][{trl_field!r}]: raylign has no key {key!r}")


TITLES = {
    "TrainingArguments": "Shared training arguments (`transformers.TrainingArguments`, in all three configs)",
    "SFTConfig": "`SFTConfig`", "DPOConfig": "`DPOConfig` (DPO and MPO)", "GRPOConfig": "`GRPOConfig` (GRPO and GSPO)",
    "ModelConfig": "`ModelConfig` (TRL example scripts)", "ScriptArguments": "`ScriptArguments` (TRL example scripts)",
}


def migration_markdown() -> str:
    """The whole page."""
    import transformers
    import trl

    classes, keys = trl_classes(), config_keys()
    check_tables(classes, keys)
    lines = [INTRO.format(trl=trl.__version__, transformers=transformers.__version__)]
    for name in SECTIONS:
        lines += [f"## {TITLES[name]}", "", "| TRL | raylign | raylign default | note |", "| --- | --- | --- | --- |"]
        for field, key, note in table_rows(name, classes, keys):
            lines.append(f"| `{field}` | `{key}` | {default_text(keys[key])} | {note} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(migration_markdown())
