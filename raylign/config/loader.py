"""Loading: YAML + dotted overrides -> method presets -> typed build -> rules (see rules.py)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from raylign.config import trl
from raylign.config.rules import _require, validate
from raylign.config.schema import ConfigError, RaylignConfig, _hints, _is_section, _type_name  # noqa: F401

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


# `preset: tiny`: any recipe on a laptop CPU (the driver builds `tiny:` models and `synthetic:` data).
TINY_PRESET: dict[str, Any] = {
    "model.name_or_path": "tiny:llava", "model.dtype": "auto", "model.gradient_checkpointing": False,
    "model.attn_implementation": "sdpa",
    "data.train": "synthetic:color", "data.eval": None, "data.eval_split_size": 16, "data.prompt_column": "prompt",
    "data.image_column": None, "data.completion_column": None, "data.system_prompt": None,
    "train.max_steps": 10, "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 1,
    "train.learning_rate": 5e-4, "train.eval_steps": 0,
    "learner.num_learners": 1, "learner.zero_stage": 2, "learner.precision": "auto", "learner.backend": "auto",
    "learner.num_gpus_per_learner": None, "learner.offload_optimizer": False, "learner.offload_param": False,
    "learner.resources": {},
    "rollout.engine": "transformers", "rollout.num_workers": 1, "rollout.num_gpus_per_worker": None,
    "rollout.tensor_parallel_size": 1, "rollout.enable_sleep_mode": False, "rollout.colocate": False,
    "rollout.max_model_len": None, "rollout.engine_kwargs": {}, "rollout.resources": {},
    "reward.num_workers": 0,
    "grpo.prompts_per_step": 4, "grpo.num_generations": 4, "grpo.max_completion_length": 32,
    "logging.report_to": ["tensorboard"],
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
    if method is not None and tree.get("method", method) != method:  # refused: presets and data differ by method
        raise ConfigError(f"method: {path} says `method: {tree['method']}` but the command is `raylign {method}`; "
                          f"run `raylign {tree['method']}` or drop `method:` from the file")
    method = method or tree.get("method")
    if trl.is_flat(tree):  # a TRL GRPOConfig/DPOConfig/SFTConfig file: one table maps it (config/trl.py)
        flat = trl.from_trl(tree, str(method), {k for k, _, _ in _PRESETS.get(str(method), [])})
        tree = {}
        for key, value in flat.items():
            _set_dotted(tree, key, value)
    if parsed.get("preset", tree.get("preset")) == "tiny":  # over the file, under the command line
        for key, value in TINY_PRESET.items():
            _set_dotted(tree, key, copy.deepcopy(value))
    for key, value in parsed.items():
        _set_dotted(tree, key, value)
    if method is not None:
        tree["method"] = method
    return config_from_dict(tree)


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"--config: file not found: {path} (looked from {Path.cwd()})")
    if path.is_dir():  # anything else readable is fine: /dev/null, a pipe from `--config <(...)`
        raise ConfigError(f"--config: {path} is a directory; give a YAML file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); give a YAML file saved as UTF-8") from e
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror or e}") from e
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


