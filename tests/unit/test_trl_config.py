"""A flat TRL config runs unchanged: one table maps it key by key (issue 15, item 2), and the config's bounds
are checked at load (item 5). Configs are written the way TRL's docs write them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from raylign.cli import main as cli
from raylign.config import ConfigError, load_config
from raylign.config import trl as T
from raylign.config.loader import _PRESETS, _schema_keys

# TRL's GSPO recipe (docs "GSPO" / the seed blog): sequence-level ratios, a tiny clip range, no KL.
GSPO = {"model_name_or_path": "Qwen/Qwen2.5-VL-3B-Instruct", "dataset_name": "lmms-lab/multimodal-open-r1-8k-verified",
        "reward_funcs": ["think_format_reward", "accuracy_reward"], "importance_sampling_level": "sequence",
        "epsilon": 3e-4, "epsilon_high": 4e-4, "beta": 0.0, "loss_type": "grpo", "steps_per_generation": 4}
# TRL's MPO recipe (DPOConfig docs): the three-loss mix.
MPO = {"model_name_or_path": "Qwen/Qwen2.5-VL-3B-Instruct", "dataset_name": "HuggingFaceH4/rlaif-v_formatted",
       "loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "per_device_train_batch_size": 2,
       "gradient_accumulation_steps": 8, "bf16": True}


def flat(tmp_path: Path, method: str, values: dict, *overrides: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return load_config(path, list(overrides), method=method)


def test_gspo_as_trl_docs_write_it(tmp_path):
    cfg = flat(tmp_path, "gspo", GSPO)
    g = cfg.grpo
    assert (g.importance_sampling_level, g.epsilon, g.epsilon_high, g.beta, g.loss_type) == ("sequence", 3e-4, 4e-4, 0.0, "grpo")
    # TRL: a generation of 4 x 8 samples feeds 4 optimizer steps of 8 = raylign: 1 prompt x 8 per step, 3 versions stale
    assert (g.num_generations, g.prompts_per_step, g.max_staleness) == (8, 1, 3)
    assert cfg.train.per_device_train_batch_size == 8
    assert cfg.train.learning_rate == 1e-6 and g.max_completion_length == 512  # TRL's defaults, not raylign's
    assert cfg.model.gradient_checkpointing and cfg.train.num_train_epochs == 3.0
    assert cfg.reward.funcs == ["trl.rewards:think_format_reward", "trl.rewards:accuracy_reward"]
    assert (cfg.model.name_or_path, cfg.data.train) == (GSPO["model_name_or_path"], GSPO["dataset_name"])
    assert cfg.rollout.engine == "transformers"  # use_vllm defaults to false in TRL too


def test_mpo_as_trl_docs_write_it(tmp_path):
    cfg = flat(tmp_path, "mpo", MPO)
    assert cfg.dpo.loss_type == ["sigmoid", "bco_pair", "sft"] and cfg.dpo.loss_weights == [0.8, 0.2, 1.0]
    assert cfg.learner.precision == "bf16" and cfg.train.learning_rate == 1e-6 and cfg.dpo.beta == 0.1
    assert (cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps) == (2, 8)
    bare = flat(tmp_path, "mpo", {"model_name_or_path": "m", "dataset_name": "d"})
    assert bare.dpo.loss_type == ["sigmoid", "bco_pair", "sft"]  # `raylign mpo`'s preset wins over TRL's default


def test_the_examples_are_real_trl_configs(tmp_path):
    """The same keys construct TRL's own dataclasses (so the tests above read real TRL configs)."""
    trl = pytest.importorskip("trl")
    model_keys = {"model_name_or_path"}
    script_keys = {"dataset_name", "reward_funcs"}
    for cls, values in ((trl.GRPOConfig, GSPO), (trl.DPOConfig, MPO)):
        kwargs = {k: v for k, v in values.items() if k not in model_keys | script_keys}
        cls(output_dir=str(tmp_path), use_cpu=True, **{**kwargs, "bf16": False})


@pytest.mark.parametrize("values, expect", [
    ({"use_vllm": True, "vllm_mode": "server"}, {"rollout.engine": "vllm", "rollout.colocate": False}),
    ({"use_vllm": True, "vllm_mode": "colocate"},
     {"rollout.engine": "vllm", "rollout.colocate": True, "rollout.enable_sleep_mode": True}),
    ({"log_completions": True, "logging_steps": 5}, {"grpo.log_completions_steps": 5}),
    ({"bf16": False}, {"learner.precision": "fp32"}),
    ({"gradient_checkpointing": False}, {"model.gradient_checkpointing": False}),
    ({"generation_batch_size": 32}, {"grpo.max_staleness": 3, "grpo.prompts_per_step": 1}),
    ({"per_device_train_batch_size": 4, "num_generations": 4, "gradient_accumulation_steps": 2,
      "steps_per_generation": 4}, {"grpo.prompts_per_step": 2, "grpo.max_staleness": 1}),
    ({"report_to": "wandb", "warmup_steps": 0.1}, {"logging.report_to": ["wandb"], "train.warmup_ratio": 0.1}),
    ({"save_strategy": "no", "eval_strategy": "steps", "eval_steps": 20},
     {"train.save_steps": 0, "train.eval_steps": 20}),
    ({"use_peft": True, "lora_target_modules": ["q_proj", "v_proj"]},
     {"model.lora.r": 16, "model.lora.lora_alpha": 32, "model.lora.target_modules": ["q_proj", "v_proj"]}),
    ({"reward_funcs": ["my_pkg.rewards.iou", "get_soft_overlong_punishment"]},
     {"reward.funcs": ["my_pkg.rewards:iou", "trl.rewards:get_soft_overlong_punishment(max_completion_len=1280, "
                                             "soft_punish_cache=256)"]}),
])
def test_newer_trl_names_map(tmp_path, values, expect):
    cfg = flat(tmp_path, "grpo", {"model_name_or_path": "m", "dataset_name": "d", **values})
    got = {k: _get(cfg, k) for k in expect}
    assert got == expect


def _get(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def test_no_meaning_here_is_one_logged_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="raylign.config"):
        flat(tmp_path, "grpo", {"model_name_or_path": "m", "dataset_name": "d", "remove_unused_columns": True})
    lines = [r.getMessage() for r in caplog.records if "remove_unused_columns" in r.getMessage()]
    assert len(lines) == 1 and "no meaning in raylign" in lines[0]


@pytest.mark.parametrize("method, values, match", [
    ("grpo", {"fp16": True}, r"^fp16: TRL GRPOConfig's fp16=True: raylign trains in fp32 or bf16"),
    ("sft", {"deepspeed": "ds_z3.json"}, r"^deepspeed: .* cannot be honoured here: raylign writes the DeepSpeed config"),
    ("dpo", {"truncation_mode": "keep_start"}, r"^truncation_mode: .* cuts the completion"),
    ("dpo", {"neftune_noise_alpha": 5.0}, r"^neftune_noise_alpha: .* raylign has no equivalent"),
    ("grpo", {"steps_per_generation": 3, "gradient_accumulation_steps": 2}, r"^steps_per_generation: .* not a multiple"),
    ("grpo", {"learnig_rate": 1e-6}, r"^learnig_rate: neither a raylign key nor a field of TRL's GRPOConfig"),
    ("grpo", {"learning_rate": 1e-6, "train": {"learning_rate": 2e-6}}, r"^train.learning_rate: set twice"),
])
def test_what_cannot_be_honoured_is_an_error_that_says_so(tmp_path, method, values, match):
    with pytest.raises(ConfigError, match=match):
        flat(tmp_path, method, {"model_name_or_path": "m", "dataset_name": "d", **values})


def test_trl_env_section_sets_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLIGN_TEST_ENV", "0")  # restored (removed) after the test
    flat(tmp_path, "sft", {"model_name_or_path": "m", "dataset_name": "d", "env": {"RAYLIGN_TEST_ENV": 1}})
    import os

    assert os.environ["RAYLIGN_TEST_ENV"] == "1"
    with pytest.raises(ConfigError, match="^env: expected a mapping"):
        flat(tmp_path, "sft", {"model_name_or_path": "m", "env": ["A=1"]})


def test_trl_defaults_fill_what_a_flat_file_leaves_unset(tmp_path):
    sft = flat(tmp_path, "sft", {"model_name_or_path": "m", "dataset_name": "d"})
    assert sft.train.learning_rate == 2e-5 and not sft.sft.assistant_only_loss and sft.sft.completion_only_loss
    assert flat(tmp_path, "dpo", {"model_name_or_path": "m", "dataset_name": "d"}).train.learning_rate == 1e-6
    # A flat file may carry raylign sections; the command line still takes raylign keys and wins.
    cfg = flat(tmp_path, "grpo", {"model_name_or_path": "m", "dataset_name": "d", "rollout": {"num_workers": 2}},
               "--train.learning_rate=3e-6")
    assert cfg.rollout.num_workers == 2 and cfg.train.learning_rate == 3e-6
    # A raylign-style file keeps raylign's own defaults.
    assert load_config(None, ["--model.name_or_path=m", "--data.train=d"], method="sft").train.learning_rate == 1e-5


def test_every_method_resolves_trl_defaults_to_a_valid_config():
    for method in T.CLASSES:
        tree = T.from_trl({"model_name_or_path": "m", "dataset_name": "d"}, method,
                          {k for k, _, _ in _PRESETS.get(method, [])})
        assert set(tree) <= set(_schema_keys()), set(tree) - set(_schema_keys())


def test_design_lists_the_measured_differing_defaults():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "docs"))
    from gen_migration import differing_defaults

    grpo = {k: (ours, theirs) for k, ours, theirs in differing_defaults("grpo")}
    assert grpo["train.learning_rate"] == (1e-5, 1e-6) and grpo["grpo.max_completion_length"] == (256, 512)
    assert {k: v for k, *v in differing_defaults("sft")}["sft.assistant_only_loss"] == [True, False]


def test_snapshot_is_current():
    # TRL is pinned in requirements/cpu.lock; the snapshot records that version's fields and defaults.
    pytest.importorskip("trl")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "docs"))
    from gen_migration import SNAPSHOT, snapshot_text

    assert json.loads(SNAPSHOT.read_text()) == json.loads(snapshot_text()), "run python docs/gen_migration.py --snapshot"


# ---------------------------------------------------------------- item 5: bounds at load, one line at the CLI


@pytest.mark.parametrize("override, match", [
    ("--grpo.epsilon=0", r"^grpo.epsilon: must be > 0, got 0"),
    ("--grpo.epsilon=1.5", r"^grpo.epsilon: must be <= 1, got 1.5"),
    ("--grpo.epsilon_high=0", r"^grpo.epsilon_high: must be > 0"),
    ("--dpo.label_smoothing=0.5", r"^dpo.label_smoothing: must be < 0.5, got 0.5"),
    ("--dpo.label_smoothing=0.1", r"^dpo.label_smoothing: 0.1 is used by dpo.loss_type robust only"),
])
def test_bounds_are_config_errors_at_load(override, match, capsys):
    method = "grpo" if "grpo" in override else "dpo"
    base = ["--model.name_or_path=m", "--data.train=d"]
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*base, override], method=method)
    assert cli([method, *base, override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raylign: error: " + override[2:].split("=")[0]) and "\n" not in err


@pytest.mark.parametrize("key, field, probes", [
    ("grpo.epsilon", "epsilon", (1e-9, 0.2, 1.0, 1.0000001)),
    ("grpo.epsilon_high", "epsilon_high", (0.0, 0.28, 5.0)),
    ("grpo.delta", "delta", (1.0, 1.0000001, 2.0)),
    ("grpo.beta", "beta", (0.0, 0.04)),
    ("dpo.beta", "beta", (1e-9, 0.1)),
    ("dpo.label_smoothing", "label_smoothing", (0.0, 0.49, 0.5)),
])
def test_the_loss_accepts_exactly_what_the_config_accepts(key, field, probes):
    """Each bound has one source at load (the schema); the loss configs agree on every probed value."""
    from raylign.algos import DPOLossConfig, PolicyLossConfig

    base = ["--model.name_or_path=m", "--data.train=d"]
    extra = ["--dpo.loss_type=[robust]"] if key == "dpo.label_smoothing" else []
    method = key.split(".")[0]
    for value in probes:
        try:
            load_config(None, [*base, *extra, f"--{key}={value}"], method=method)
            config_ok = True
        except ConfigError:
            config_ok = False
        loss_cls = PolicyLossConfig if method == "grpo" else DPOLossConfig
        kwargs = {field: value, **({"loss_type": ("robust",)} if extra else {})}
        try:
            loss_cls(**kwargs)
            loss_ok = True
        except ValueError:
            loss_ok = False
        assert config_ok == loss_ok, f"{key}={value}: config {'accepts' if config_ok else 'refuses'}, loss does not agree"
