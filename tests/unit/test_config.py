"""The config tree: loading, overrides, type checks, combination rules, presets, round trip, docs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from raylign.config import (
    ConfigError,
    RaylignConfig,
    config_from_dict,
    config_reference_markdown,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
)

BASE = ["--model.name_or_path=tiny", "--data.train=data.parquet"]


def load(method: str = "sft", *overrides: str) -> RaylignConfig:
    return load_config(None, [*BASE, *overrides], method=method)


def error_of(method: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(method, *overrides)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_defaults_and_run_name():
    cfg = load("sft")
    assert cfg.method == "sft" and cfg.model.name_or_path == "tiny" and cfg.data.train == "data.parquet"
    assert cfg.train.learning_rate == 1e-5 and cfg.train.max_steps == -1
    assert cfg.learner.zero_stage == 2 and cfg.learner.resources == {}
    assert cfg.reward.funcs == ["format", "accuracy"] and cfg.model.lora.target_modules == ["all-linear"]
    assert cfg.run_name.startswith("sft-") and cfg.run_dir.parent.name == "runs"
    assert not cfg.is_online and load("gspo").is_online
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_list_defaults_are_not_shared():
    a, b = load(), load()
    assert a.reward.funcs == b.reward.funcs and a.reward.funcs is not b.reward.funcs


@pytest.mark.parametrize(
    "key, expected",
    [
        ("train.learnng_rate", "train.learning_rate"),
        ("rollout.num_worker", "rollout.num_workers"),
        ("learning_rate", "train.learning_rate"),  # a flat TRL key points at its section
        ("sft.beta", "dpo.beta or grpo.beta"),
    ],
)
def test_unknown_key_names_it_and_suggests(key, expected):
    msg = error_of("sft", f"--{key}=1")
    assert msg.startswith(f"{key}: unknown key") and f"did you mean {expected}?" in msg


def test_unknown_key_in_yaml_dict_names_dotted_path():
    typo = r"^grpo\.num_generation: unknown key \(did you mean grpo\.num_generations"
    with pytest.raises(ConfigError, match=typo):
        config_from_dict({"method": "grpo", "model": {"name_or_path": "m"}, "data": {"train": "d"},
                          "grpo": {"num_generation": 4}})
    with pytest.raises(ConfigError, match=r"^model\.lora\.rank: unknown key"):
        config_from_dict({"method": "sft", "model": {"name_or_path": "m", "lora": {"rank": 4}},
                          "data": {"train": "d"}})


def test_unknown_key_below_a_leaf():
    assert error_of("sft", "--train.learning_rate.x=1").startswith("train.learning_rate.x: unknown key")


@pytest.mark.parametrize(
    "override, message",
    [
        ("--rollout.num_workers=four", "rollout.num_workers: expected int, got str 'four'"),
        ("--train.max_steps=true", "train.max_steps: expected int, got bool True"),
        ("--train.per_device_train_batch_size=8.0",
         "train.per_device_train_batch_size: expected int, got float"),
        ("--model.dtype=bf16",
         "model.dtype: expected one of auto, float32, bfloat16, float16, got 'bf16' "
         "(did you mean bfloat16?)"),
        ("--dpo.loss_weights=[1.0, x]", "dpo.loss_weights[1]: expected float, got str 'x'"),
        ("--learner.resources={gpu_a: big}", "learner.resources.gpu_a: expected float, got str 'big'"),
        ("--model.freeze_vision_tower=1", "model.freeze_vision_tower: expected bool, got int 1"),
        ("--train=3", "train: expected a mapping of keys, got 3"),
        ("--data.eval_split_size=half", "data.eval_split_size: expected int | float, got str 'half'"),
        ("--model.name_or_path=null", "model.name_or_path: expected str, got NoneType None"),
    ],
)
def test_wrong_types(override, message):
    assert error_of("sft", override).startswith(message)


def test_type_widening_and_optionals():
    cfg = load("sft", "--train.learning_rate=1", "--learner.num_gpus_per_learner=1",
               "--train.save_total_limit=3")
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.learner.num_gpus_per_learner == 1.0 and cfg.train.save_total_limit == 3
    assert load("sft", "--data.eval_split_size=100").data.eval_split_size == 100  # int = rows, kept an int
    assert isinstance(load("sft", "--data.eval_split_size=100").data.eval_split_size, int)
    assert load("sft", "--data.eval_split_size=0.1").data.eval_split_size == 0.1


def test_required_keys():
    with pytest.raises(ConfigError, match=r"^model\.name_or_path: required"):
        load_config(None, ["--data.train=d"], method="sft")
    with pytest.raises(ConfigError, match=r"^method: required"):
        load_config(None, BASE)


@pytest.mark.parametrize(
    "method, overrides, key",
    [
        ("mpo", ["--dpo.loss_type=[sigmoid, sft]", "--dpo.loss_weights=[1.0]"], "dpo.loss_weights:"),
        ("dpo", ["--dpo.loss_type=[sigmoid, kto]"], "dpo.loss_type: unknown loss 'kto'"),
        ("dpo", ["--dpo.loss_type=[sigmoid, sigmoid]"], "dpo.loss_type: lists a loss twice"),
        ("dpo", ["--dpo.loss_type=[]"], "dpo.loss_type: must name at least one loss"),
        ("grpo", ["--grpo.epsilon=0.2", "--grpo.epsilon_high=0.1"],
         "grpo.epsilon_high: 0.1 is below grpo.epsilon"),
        ("grpo", ["--grpo.num_generations=1"], "grpo.num_generations: grpo compares"),
        ("gspo", ["--grpo.num_generations=1"], "grpo.num_generations: gspo compares"),
        ("grpo", ["--grpo.prompts_per_step=3", "--grpo.num_generations=3", "--learner.num_learners=2"],
         "grpo.prompts_per_step: prompts_per_step * num_generations = 9"),
        ("grpo", ["--grpo.max_staleness=-1"], "grpo.max_staleness: must be >= 0, got -1"),
        ("grpo", ["--reward.reward_weights=[1.0]"],
         "reward.reward_weights: has 1 weights for 2 reward.funcs"),
        ("grpo", ["--reward.funcs=[]"], "reward.funcs: grpo needs at least one reward function"),
        ("sft", ["--model.lora.r=-1"], "model.lora.r: must be >= 0, got -1"),
        ("sft", ["--model.lora.r=8", "--model.lora.target_modules=[]"], "model.lora.target_modules: empty"),
        ("sft", ["--learner.zero_stage=4"], "learner.zero_stage: must be <= 3, got 4"),
        ("sft", ["--learner.zero_stage=-1"], "learner.zero_stage: must be >= 0, got -1"),
        ("sft", ["--learner.offload_param"], "learner.offload_param: needs learner.zero_stage 3"),
        ("sft", ["--learner.zero_stage=0", "--learner.offload_optimizer"],
         "learner.offload_optimizer: needs"),
        ("sft", ["--learner.backend=nccl", "--learner.num_gpus_per_learner=0"],
         "learner.backend: nccl needs GPUs"),
        ("sft", ["--learner.num_gpus_per_learner=1.5"],
         "learner.num_gpus_per_learner: Ray needs a whole number"),
        ("sft", ["--learner.resources={learner: -1}"], "learner.resources.learner: must be >= 0, got -1.0"),
        ("sft", ["--data.eval_split_size=1.0"], "data.eval_split_size: a float must be a fraction in [0, 1)"),
        ("sft", ["--data.eval_split_size=-0.1"], "data.eval_split_size: a float must be a fraction"),
        ("sft", ["--data.eval_split_size=-5"], "data.eval_split_size: a float must be a fraction"),
        ("sft", ["--data.eval=e.parquet", "--data.eval_split_size=0.1"],
         "data.eval_split_size: set data.eval or"),
        ("sft", ["--data.min_pixels=500000"], "data.min_pixels: 500000 > data.max_pixels 401408"),
        ("sft", ["--data.max_prompt_length=1024"], "data.max_prompt_length: 1024 leaves no room"),
        ("grpo", ["--rollout.engine=vllm", "--rollout.colocate"],
         "rollout.colocate: a colocated vLLM engine"),
        ("grpo", ["--rollout.colocate", "--learner.num_learners=2"],
         "rollout.num_workers: with rollout.colocate each learner actor holds one engine: set it to "
         "learner.num_learners (2)"),
        ("grpo", ["--rollout.colocate", "--rollout.num_gpus_per_worker=0.5"],
         "rollout.num_gpus_per_worker: a colocated engine runs inside its learner actor"),
        ("grpo", ["--rollout.colocate", "--sync.transport=collective"], "sync.transport: colocated engines"),
        ("grpo", ["--rollout.tensor_parallel_size=2"],
         "rollout.tensor_parallel_size: > 1 needs rollout.engine vllm"),
        ("grpo", ["--rollout.enable_sleep_mode"], "rollout.enable_sleep_mode: needs rollout.engine vllm"),
        ("grpo", ["--rollout.max_model_len=600"], "rollout.max_model_len: 600 < data.max_prompt_length"),
        ("grpo", ["--rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization: must be <= 1"),
        ("grpo", ["--grpo.delta=1.0"], "grpo.delta: must be > 1, got 1.0"),
        ("grpo", ["--grpo.vllm_importance_sampling_clip_max=0"], "grpo.vllm_importance_sampling_clip_max: must be > 0"),
        ("grpo", ["--grpo.vllm_importance_sampling_clip_min=3.0"],
         "grpo.vllm_importance_sampling_clip_min: 3.0 must be below grpo.vllm_importance_sampling_clip_max 3.0"),
        ("grpo", ["--grpo.vllm_importance_sampling_mode=token_truncate", "--grpo.vllm_importance_sampling_clip_max=null"],
         "grpo.vllm_importance_sampling_mode: token_truncate needs"),
        ("grpo", ["--grpo.loss_type=vespo"], "grpo.vllm_importance_sampling_mode: loss_type vespo folds"),
        ("grpo", ["--grpo.top_p=0"], "grpo.top_p: must be > 0"),
        ("sft", ["--train.max_steps=0"], "train.max_steps: 0 steps would train nothing"),
        ("sft", ["--train.resume_from_checkpoint=latest"],
         "train.resume_from_checkpoint: 'latest' needs run_name"),
        ("sft", ["--run_name=a/b"], "run_name: must be one directory name"),
        ("sft", ["--logging.report_to=[tensorboard, comet]"], "logging.report_to: unknown sink 'comet'"),
        ("sft", ["--logging.report_to=[none, wandb]"], "logging.report_to: 'none' cannot be combined"),
    ],
)
def test_combination_rules(method, overrides, key):
    assert error_of(method, *overrides).startswith(key)


def test_rules_only_bind_where_they_matter():
    assert load("sft", "--grpo.num_generations=1").grpo.num_generations == 1  # offline ignores grpo
    assert load("grpo", "--data.max_prompt_length=2048").data.max_prompt_length == 2048
    cfg = load("grpo", "--learner.num_learners=4", "--rollout.max_model_len=768")
    assert cfg.learner.num_learners == 4 and cfg.rollout.max_model_len == 768
    cfg = load("grpo", "--rollout.engine=vllm", "--rollout.colocate", "--rollout.enable_sleep_mode")
    assert cfg.rollout.colocate and cfg.rollout.enable_sleep_mode
    cfg = load("grpo", "--rollout.colocate", "--learner.num_learners=0", "--rollout.num_workers=0")
    assert cfg.rollout.colocate  # both in the driver process: colocated already
    resumed = load("sft", "--run_name=r1", "--train.resume_from_checkpoint=latest")
    assert resumed.train.resume_from_checkpoint == "latest"


def test_mpo_preset_and_explicit_values_win():
    cfg = load("mpo")
    assert cfg.dpo.loss_type == ["sigmoid", "bco_pair", "sft"] and cfg.dpo.loss_weights == [0.8, 0.2, 1.0]
    assert load("dpo").dpo.loss_type == ["sigmoid"] and load("dpo").dpo.loss_weights is None
    own_types = load("mpo", "--dpo.loss_type=[sigmoid, sft]").dpo
    assert own_types.loss_type == ["sigmoid", "sft"] and own_types.loss_weights is None
    own_weights = load("mpo", "--dpo.loss_weights=[1, 1, 1]").dpo
    assert own_weights.loss_type == ["sigmoid", "bco_pair", "sft"]
    assert own_weights.loss_weights == [1.0, 1.0, 1.0]
    assert load("mpo", "--dpo.loss_weights=null").dpo.loss_weights is None  # explicit null counts as set


def test_gspo_preset_and_explicit_values_win():
    g = load("gspo").grpo
    assert (g.importance_sampling_level, g.epsilon, g.epsilon_high, g.beta, g.loss_type) == (
        "sequence", 3e-4, 4e-4, 0.0, "grpo")
    g = load("grpo").grpo
    assert (g.importance_sampling_level, g.epsilon, g.epsilon_high) == ("token", 0.2, None)
    assert g.loss_type == "dapo"
    g = load("gspo", "--grpo.epsilon=0.2", "--grpo.loss_type=dapo", "--grpo.beta=0.04").grpo
    assert (g.epsilon, g.epsilon_high, g.loss_type, g.beta) == (0.2, None, "dapo", 0.04)
    assert g.importance_sampling_level == "sequence"
    assert load("gspo", "--grpo.importance_sampling_level=token").grpo.importance_sampling_level == "token"


def test_presets_respect_the_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {train: d}\ngrpo:\n  epsilon_high: 0.001\n")
    g = load_config(path, method="gspo").grpo
    assert (g.epsilon, g.epsilon_high) == (3e-4, 1e-3)


def test_parse_overrides_forms():
    parsed = parse_overrides([
        "--rollout.num_workers=4", "--train.max_steps", "-1", "--model.freeze_vision_tower",
        "--train.learning_rate", "1e-5", "--reward.funcs=format,accuracy", "--dpo.loss_weights=[0.5, 1]",
        "--train.save_total_limit=null", "--learner.resources.learner=1", "data.train=x.jsonl",
        "--rollout.engine_kwargs={model_impl: transformers}",
    ])
    assert parsed == {
        "rollout.num_workers": 4, "train.max_steps": -1, "model.freeze_vision_tower": True,
        "train.learning_rate": 1e-5, "reward.funcs": "format,accuracy", "dpo.loss_weights": [0.5, 1],
        "train.save_total_limit": None, "learner.resources.learner": 1, "data.train": "x.jsonl",
        "rollout.engine_kwargs": {"model_impl": "transformers"},
    }
    with pytest.raises(ConfigError, match="^stray: unexpected argument"):
        parse_overrides(["stray"])


def test_overrides_apply_over_file_and_split_lists(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: dpo\nmodel: {name_or_path: m}\ndata: {train: d}\n"
                    "train: {learning_rate: 2e-5, max_steps: 10}\nlearner: {resources: {a: 1}}\n")
    cfg = load_config(path, ["--train.max_steps", "20", "--reward.funcs=format,accuracy,len.py:fn",
                             "--learner.resources.b=0.5", "--logging.report_to=none"])
    assert cfg.method == "dpo" and cfg.train.learning_rate == 2e-5 and cfg.train.max_steps == 20
    assert cfg.reward.funcs == ["format", "accuracy", "len.py:fn"] and cfg.logging.report_to == ["none"]
    assert cfg.learner.resources == {"a": 1.0, "b": 0.5}
    assert load_config(path, method="dpo").method == "dpo"
    with pytest.raises(ConfigError, match=r"^method: .* says `method: dpo` but the command is `raylign mpo`"):
        load_config(path, method="mpo")  # a file written for another method is refused, not silently re-used
    with pytest.raises(ConfigError, match="^method: --method=dpo contradicts the `sft` command"):
        load_config(path, ["--method=dpo"], method="sft")


@pytest.mark.parametrize(
    "text, match",
    [("model: [unclosed", "^--config: cannot parse"), ("- a\n- b\n", "^--config: .* must hold a mapping")],
)
def test_bad_files(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, method="sft")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="^--config: file not found"):
        load_config(tmp_path / "missing.yaml", method="sft")


def test_save_config_round_trip(tmp_path):
    cfg = load("mpo", "--train.learning_rate=3e-6", "--learner.resources={learner: 1}",
               "--data.eval_split_size=50", "--train.save_total_limit=2",
               "--rollout.engine_kwargs={model_impl: vllm, enforce_eager: true}")
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert path.read_text().startswith("# Resolved raylign config")
    again = load_config(path)
    assert again == cfg and isinstance(again.data.eval_split_size, int)
    assert yaml.safe_load(path.read_text())["dpo"]["loss_weights"] == [0.8, 0.2, 1.0]
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_reference_markdown_covers_every_key():
    md = config_reference_markdown()
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    keys = [row.split("`")[1] for row in rows]
    flat = config_to_dict(load())

    def leaves(d: dict, prefix: str = "") -> list[str]:
        out = []
        for k, v in d.items():
            sections = ("model", "data", "lora", "train", "learner", "sft", "dpo", "grpo", "rollout",
                        "reward", "sync", "logging")
            out += leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and k in sections else [prefix + k]
        return out

    assert sorted(keys) == sorted(leaves(flat)) and len(keys) > 100
    assert "| `model.name_or_path` | `str` | **required** |" in md
    assert all(row.count(" | ") == 3 for row in rows)  # no unescaped pipe inside a cell


@pytest.mark.parametrize("recipe", sorted(Path(__file__).resolve().parents[2].glob("jobs/*_qwen2_5_vl_3b.yaml")))
def test_preset_tiny_turns_any_recipe_into_a_cpu_run_and_the_command_line_still_wins(recipe):
    method = recipe.name.split("_")[0]
    cfg = load_config(recipe, ["--preset=tiny", "--train.max_steps=3"], method=method)
    assert cfg.model.name_or_path == "tiny:llava" and cfg.data.train == "synthetic:color"
    assert cfg.rollout.engine == "transformers" and cfg.rollout.tensor_parallel_size == 1
    assert cfg.learner.num_learners == 1 and cfg.learner.num_gpus_per_learner is None
    assert cfg.train.max_steps == 3  # given on the command line, over the preset's 10
    assert load_config(recipe, [], method=method).model.name_or_path.startswith("Qwen/")
