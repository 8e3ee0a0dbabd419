"""Generate docs/migration-from-trl.md from raylign's one TRL mapping table (raylign/config/trl.py).

    python docs/gen_migration.py > docs/migration-from-trl.md     # the page (docs/gen_docs.py does this)
    python docs/gen_migration.py --snapshot                       # rewrite raylign/config/trl_fields.json

The page needs no TRL install: it reads the table and the snapshot of TRL's config classes
(``trl_fields.json``: every field and its default), which ``--snapshot`` records from the installed
TRL (the version pinned in requirements/cpu.lock; tests/unit/test_trl_config.py checks the snapshot is
current). No version string is written into either, so neither changes when only a version does.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raylign.config import config_from_dict, config_to_dict  # noqa: E402
from raylign.config import trl as T  # noqa: E402
from raylign.config.loader import _PRESETS, _schema_keys  # noqa: E402

SNAPSHOT = ROOT / "raylign" / "config" / "trl_fields.json"
TITLES = {
    "TrainingArguments": "Shared training arguments (`transformers.TrainingArguments`, in every TRL config)",
    "SFTConfig": "`SFTConfig` (`raylign sft`)", "DPOConfig": "`DPOConfig` (`raylign dpo`, `raylign mpo`)",
    "GRPOConfig": "`GRPOConfig` (`raylign grpo`, `raylign gspo`)",
    "ModelConfig": "`ModelConfig` (what `trl <method> --config` also reads)",
    "ScriptArguments": "`ScriptArguments` / `GRPOScriptArguments` (what `trl <method> --config` also reads)",
}

INTRO = """# Migrating from TRL

A TRL recipe runs unchanged: `raylign grpo|gspo|dpo|mpo|sft --config recipe.yaml` accepts a *flat*
TRL config — the keyword arguments of `GRPOConfig` / `DPOConfig` / `SFTConfig`, or the YAML file
`trl grpo --config` reads (with `ModelConfig` and the script's dataset and reward arguments) — and
maps it key by key through one table (`TABLE` in `raylign/config/trl.py`), the one this page is
generated from (`python docs/gen_migration.py > docs/migration-from-trl.md`):

- **mapped**: the TRL field sets the raylign key(s) shown, translated where the meaning needs it;
- **fixed**: raylign has one setting of it (TRL's default, as a rule); any other value is an error;
- **ignored**: the field has no meaning in raylign; it is accepted with one logged line;
- **refused**: raylign cannot honour the field's TRL meaning: any value but TRL's default is an error that says so.
  A TRL field this page does not name is treated the same way.

Keys the file leaves unset get **TRL's defaults**, so the same file means the same run in both
(the table below lists where they differ from raylign's own defaults); `raylign gspo` and
`raylign mpo` still bring their method presets for keys the file leaves unset. A flat file may
also hold raylign sections (`rollout: {num_workers: 4}`) for what TRL has no name for, and the
command line takes raylign's dotted keys (`--rollout.num_workers=4`). TRL's `env:` mapping sets
environment variables, as in TRL. A raylign-style file (sections only) keeps raylign's defaults.

```yaml
# the GSPO recipe as TRL's docs write it: raylign gspo --config gspo.yaml
model_name_or_path: Qwen/Qwen2.5-VL-3B-Instruct
dataset_name: lmms-lab/multimodal-open-r1-8k-verified
reward_funcs: [think_format_reward, accuracy_reward]
importance_sampling_level: sequence
epsilon: 3.0e-4
epsilon_high: 4.0e-4
beta: 0.0
loss_type: grpo
steps_per_generation: 4
```

Reward functions keep TRL's signature (`fn(prompts, completions, **kwargs) -> list[float | None]`)
and keyword arguments: the dataset's extra columns, `completion_ids`, the images (`images`, one list
per sample, and `image`, its first image), `trainer_state` (`global_step`, `max_steps`, `epoch`),
and `log_metric(name, value)` / `log_extra(column, values)`, whose values land in `metrics.jsonl`
and `samples.jsonl`.

## Trained tokens: where raylign and TRL differ on purpose

For a preference pair or a prompt/completion row TRL tokenizes the chat template's rendering of
the prompt plus the answer and trains on everything after the prompt, which for ChatML templates
(Qwen, LLaVA-on-Qwen) is the answer, `<|im_end|>` **and the newline the template writes after it**.
raylign trains on the answer and `<|im_end|>` only. The newline is a token the policy never
samples (generation stops at `<|im_end|>`), so TRL's DPO/MPO logps carry one extra, constant-ish
term per answer (its `logps/chosen` is lower by that token's logprob, and the MPO mix's SFT part
averages over one more token). raylign's choice teaches the same stop and nothing after it; we
consider TRL's trailing token a (harmless for the margin, not for the logged logps and the SFT term)
defect. With a template that writes nothing after `<|im_end|>` the two train identical tokens and
agree on loss, grad norm and logps to 1e-4 (tests/unit/test_trl_parity.py runs TRL's DPOTrainer,
the MPO mix and SFTTrainer side by side with raylign).
"""


# ----------------------------------------------------------------------------------------- snapshot


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    try:
        json.dumps(value)
    except TypeError:
        return repr(value)
    return value


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return _jsonable(f.default_factory())
    return None if f.default is dataclasses.MISSING else _jsonable(f.default)


def trl_snapshot() -> dict[str, dict[str, Any]]:
    """Every field of TRL's config classes (and transformers' TrainingArguments) with its default."""
    from transformers import TrainingArguments
    from trl import DPOConfig, GRPOConfig, ModelConfig, ScriptArguments, SFTConfig
    from trl.scripts.grpo import GRPOScriptArguments

    classes = (TrainingArguments, SFTConfig, DPOConfig, GRPOConfig, ModelConfig, ScriptArguments, GRPOScriptArguments)
    return {c.__name__: {f.name: _default(f) for f in dataclasses.fields(c)} for c in classes}


def snapshot_text() -> str:
    return json.dumps(trl_snapshot(), indent=1, sort_keys=True) + "\n"


# ----------------------------------------------------------------------------------------- the page


def _code(value: Any) -> str:
    return f"`{json.dumps(value)}`"


def own_fields(cls: str) -> list[str]:
    """The fields a class adds to TrainingArguments (or to ScriptArguments), in the snapshot's order."""
    snap = T.snapshot()
    base = {"SFTConfig": "TrainingArguments", "DPOConfig": "TrainingArguments", "GRPOConfig": "TrainingArguments",
            "GRPOScriptArguments": "ScriptArguments"}.get(cls)
    return [f for f in snap[cls] if base is None or f not in snap[base]]


def class_rows(cls: str) -> tuple[list[str], list[str]]:
    """Table rows for the fields the table names, and the names of the others."""
    rows, others = [], []
    classes = {"ScriptArguments": ("ScriptArguments", "GRPOScriptArguments")}.get(cls, (cls,))
    for c in classes:
        for field in own_fields(c):
            rule = T.rule_for(field, c if c != "TrainingArguments" else "")
            if rule is None:
                others.append(field)
                continue
            where = ", ".join(f"`{k}`" for k in rule.to) or "—"
            note = rule.refuse + "." if rule.refuse else rule.note
            default = T.snapshot()[c][field]
            rows.append(f"| `{field}` | {rule.kind} | {where} | {_code(default)} | {note} |")
    return rows, others


def differing_defaults(method: str) -> list[tuple[str, Any, Any]]:
    """(raylign key, raylign's default, TRL's default) for each key a flat file of `method` resolves differently."""
    base = {"method": method, "model": {"name_or_path": "m"}, "data": {"train": "d"}, "run_name": "r"}
    ours = _flat_dict(config_to_dict(config_from_dict(base)))
    tree = T.from_trl({}, method, {k for k, _, _ in _PRESETS.get(method, [])})
    merged = {**ours, **tree}
    return [(k, ours[k], merged[k]) for k in _schema_keys() if k in tree and merged[k] != ours[k]]


def _flat_dict(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}." in {key[: len(prefix) + len(k) + 1] for key in _schema_keys()}:
            out.update(_flat_dict(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def migration_markdown() -> str:
    """The whole page."""
    lines = [INTRO, "## Defaults a flat TRL file gets that differ from raylign's own", "",
             "| method | raylign key | raylign default | TRL default (applied to a flat file) |",
             "| --- | --- | --- | --- |"]
    for method in ("sft", "dpo", "grpo"):
        for key, ours, theirs in differing_defaults(method):
            lines.append(f"| {method} | `{key}` | {_code(ours)} | {_code(theirs)} |")
    lines.append("")
    for cls in TITLES:
        rows, others = class_rows(cls)
        lines += [f"## {TITLES[cls]}", "", "| TRL field | how | raylign | TRL default | note |",
                  "| --- | --- | --- | --- | --- |", *rows, ""]
        if others:
            lines += ["Other fields (accepted at their TRL default, refused otherwise): "
                      + ", ".join(f"`{f}`" for f in others) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if "--snapshot" in sys.argv:
        SNAPSHOT.write_text(snapshot_text())
    else:
        sys.stdout.write(migration_markdown())
