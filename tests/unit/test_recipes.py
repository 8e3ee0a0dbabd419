"""jobs/: every recipe loads with the typed config, says what it promises, and runs on the tiny model
through the one override line at its top; jobs/submit.py builds and follows a job; docs/ shows the
recipes as they are (method pages, generated reference and migration table).
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

from raylign.config import load_config

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("dpo", "grpo", "gspo", "mpo", "sft")
# The seed recipes: one per method on Qwen2.5-VL-3B-Instruct. Every other YAML in jobs/ must load too.
RECIPES = [ROOT / "jobs" / f"{m}_qwen2_5_vl_3b.yaml" for m in METHODS]
ALL_YAML = sorted((ROOT / "jobs").glob("*.yaml"))
MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
DATASETS = {  # TRL's VLM alignment recipes
    "sft": "HuggingFaceH4/llava-instruct-mix-vsft",
    "dpo": "HuggingFaceH4/rlaif-v_formatted",
    "mpo": "HuggingFaceH4/rlaif-v_formatted",
    "grpo": "lmms-lab/multimodal-open-r1-8k-verified",
    "gspo": "lmms-lab/multimodal-open-r1-8k-verified",
}
TINY_DATA = {"sft": "sft", "dpo": "preference", "mpo": "preference", "grpo": "prompt", "gspo": "prompt"}
GPUS_PER_NODE = 8


def recipe_id(path: Path) -> str:
    return path.stem


def tiny_command(recipe: Path) -> list[str]:
    """The tokens of the recipe's `# tiny:` line (there must be exactly one)."""
    lines = [ln for ln in recipe.read_text().splitlines() if ln.startswith("# tiny:")]
    assert len(lines) == 1, f"{recipe.name}: needs exactly one '# tiny: raylign <method> --config ...' line"
    return shlex.split(lines[0][len("# tiny:"):])


def test_one_recipe_per_method():
    assert [load_config(p).method for p in RECIPES] == list(METHODS)


@pytest.mark.parametrize("path", ALL_YAML, ids=recipe_id)
def test_every_yaml_in_jobs_is_a_valid_config(path):
    assert load_config(path).method in METHODS


@pytest.mark.parametrize("recipe", RECIPES, ids=recipe_id)
def test_recipe_loads_and_mirrors_trl(recipe):
    cfg = load_config(recipe)
    assert recipe.name.startswith(cfg.method + "_")
    assert cfg.model.name_or_path == MODEL and cfg.data.train == DATASETS[cfg.method]
    assert cfg.learner.precision in ("auto", "bf16"), "bf16 on GPU"
    assert cfg.model.gradient_checkpointing
    if cfg.is_online:
        assert cfg.rollout.engine == "vllm" and cfg.reward.funcs == ["format", "accuracy"]
    if cfg.method in ("dpo", "mpo"):
        assert cfg.learner.zero_stage == 3, "policy + reference model: ZeRO-3 shards both"


@pytest.mark.parametrize("recipe", RECIPES, ids=recipe_id)
def test_recipe_fills_one_node_of_eight_gpus(recipe):
    cfg = load_config(recipe)
    learner_gpus = cfg.learner.num_learners * (cfg.learner.num_gpus_per_learner or 1)
    rollout_gpus = 0
    if cfg.is_online and not cfg.rollout.colocate:
        per_worker = cfg.rollout.num_gpus_per_worker or cfg.rollout.tensor_parallel_size
        rollout_gpus = cfg.rollout.num_workers * per_worker
    assert learner_gpus + rollout_gpus == GPUS_PER_NODE
    assert cfg.learner.resources == {} and cfg.rollout.resources == {}, \
        "custom resources belong on the cluster command line, or a plain 8-GPU box never schedules the actors"
    if cfg.is_online:  # one optimizer step per generated batch
        samples = cfg.grpo.prompts_per_step * cfg.grpo.num_generations
        t = cfg.train
        assert samples == cfg.learner.num_learners * t.per_device_train_batch_size * t.gradient_accumulation_steps


def test_gspo_and_mpo_carry_the_paper_values():
    gspo = load_config(ROOT / "jobs" / "gspo_qwen2_5_vl_3b.yaml").grpo
    assert (gspo.importance_sampling_level, gspo.epsilon, gspo.epsilon_high, gspo.beta, gspo.loss_type) == (
        "sequence", 3e-4, 4e-4, 0.0, "grpo")
    mpo = load_config(ROOT / "jobs" / "mpo_qwen2_5_vl_3b.yaml").dpo
    assert mpo.loss_type == ["sigmoid", "bco_pair", "sft"] and mpo.loss_weights == [0.8, 0.2, 1.0]
    grpo = load_config(ROOT / "jobs" / "grpo_qwen2_5_vl_3b.yaml").grpo
    assert grpo.importance_sampling_level == "token" and grpo.epsilon == 0.2


@pytest.mark.parametrize("recipe", RECIPES, ids=recipe_id)
def test_tiny_override_line_runs_on_a_small_cpu_machine(recipe):
    """The one documented line loads, points at the tiny model and data, and asks for <= 2 CPUs, no GPU."""
    tokens = tiny_command(recipe)
    assert tokens[0] == "raylign" and tokens[2:4] == ["--config", f"jobs/{recipe.name}"]
    cfg = load_config(ROOT / tokens[3], tokens[4:], method=tokens[1])
    assert cfg.method == load_config(recipe).method
    assert cfg.model.name_or_path == "runs/tiny-qwen"
    assert cfg.data.train == f"runs/tiny-data/{TINY_DATA[cfg.method]}.parquet"
    assert cfg.train.max_steps > 0 and cfg.learner.precision == "auto", "fp32 on CPU comes from 'auto'"
    assert cfg.learner.num_gpus_per_learner in (None, 0) and not cfg.learner.resources
    cpus = cfg.learner.num_learners * cfg.learner.num_cpus_per_learner
    if cfg.is_online:
        assert cfg.rollout.engine == "transformers" and not cfg.rollout.resources
        assert cfg.rollout.num_gpus_per_worker in (None, 0)
        assert cfg.grpo.max_completion_length <= 64, "a random tiny model rarely stops early"
        cpus += cfg.rollout.num_workers * cfg.rollout.num_cpus_per_worker + cfg.reward.num_workers
    assert cpus <= 2


@pytest.mark.parametrize("recipe", RECIPES, ids=recipe_id)
def test_tiny_data_has_the_columns_the_method_needs(recipe, tmp_path):
    """`raylign make-dataset` writes the file the tiny line names, with the columns of the method's kind."""
    pytest.importorskip("raylign.data.synthetic")
    import pyarrow.parquet as pq

    from raylign.data.datasets import check_columns, detect_kind
    from raylign.data.synthetic import make_dataset

    tokens = tiny_command(recipe)
    cfg = load_config(ROOT / tokens[3], tokens[4:], method=tokens[1])
    make_dataset(task="color", n=4, out=tmp_path / "tiny-data", seed=0)
    path = tmp_path / Path(cfg.data.train).relative_to("runs")
    columns = pq.read_schema(path).names
    check_columns(columns, TINY_DATA[cfg.method])
    assert detect_kind(columns) == TINY_DATA[cfg.method]


# ------------------------------------------------------------------ jobs/submit.py


@pytest.fixture(scope="module")
def submit():
    spec = importlib.util.spec_from_file_location("raylign_jobs_submit", ROOT / "jobs" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeClient:
    """JobSubmissionClient's surface that jobs/submit.py uses."""

    def __init__(self, address, statuses=("SUCCEEDED",), logs=("step 1\n", "step 2\n"), broken=False):
        self.address, self.statuses, self.logs, self.broken = address, list(statuses), logs, broken
        self.submitted: dict = {}

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        return "raysubmit_test"

    async def tail_job_logs(self, job_id):
        for line in self.logs:
            yield line
        if self.broken:
            raise RuntimeError("WebSocket connection closed unexpectedly")

    def get_job_status(self, job_id):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]


def test_submit_builds_the_cli_equivalent_job(submit, capsys):
    clients = []
    rc = submit.main(
        [str(ROOT / "jobs" / "grpo_qwen2_5_vl_3b.yaml"), "--address", "http://head:8265", "--env", "A=1",
         "--", "--train.max_steps=5", "--run_name=my run"],
        client_factory=lambda addr: clients.append(FakeClient(addr)) or clients[-1],
    )
    out = capsys.readouterr()
    assert rc == 0 and "step 1\nstep 2\n" in out.out and "SUCCEEDED" in out.err
    job = clients[0].submitted
    assert clients[0].address == "http://head:8265"
    assert shlex.split(job["entrypoint"]) == ["raylign", "grpo", "--config", "jobs/grpo_qwen2_5_vl_3b.yaml",
                                               "--train.max_steps=5", "--run_name=my run"]
    assert job["runtime_env"]["working_dir"] == str(ROOT) and job["runtime_env"]["env_vars"]["A"] == "1"
    assert ".venv/" in job["runtime_env"]["excludes"] and job["metadata"]["raylign_method"] == "grpo"
    # the entrypoint's own overrides load: what the cluster runs is a valid config
    tokens = shlex.split(job["entrypoint"])
    assert load_config(ROOT / tokens[3], tokens[4:], method=tokens[1]).train.max_steps == 5


@pytest.mark.parametrize("final,code", [("FAILED", 1), ("STOPPED", 1), ("SUCCEEDED", 0)])
def test_submit_exit_status_follows_the_job(submit, capsys, final, code):
    rc = submit.main([str(ROOT / "jobs" / "sft_qwen2_5_vl_3b.yaml")],
                     client_factory=lambda addr: FakeClient(addr, statuses=(final,)))
    assert rc == code and final in capsys.readouterr().err


def test_follow_survives_a_broken_log_stream(submit, capsys):
    client = FakeClient("x", statuses=("RUNNING", "RUNNING", "FAILED"), broken=True)
    lines: list[str] = []
    assert submit.follow(client, "id", lines.append, poll_s=0) == "FAILED"
    assert lines == ["step 1\n", "step 2\n"] and "log stream ended early" in capsys.readouterr().err


def test_submit_usage_errors(submit, tmp_path, capsys):
    outside = tmp_path / "r.yaml"
    outside.write_text("method: grpo\n")
    assert submit.main([str(outside), "--dry-run"]) == 2
    assert "outside --working-dir" in capsys.readouterr().err
    nomethod = ROOT / "pyproject.toml"
    assert submit.main([str(nomethod), "--dry-run"]) == 2
    with pytest.raises(submit.SubmitError, match="not set"):
        submit.parse_env(["NOT_SET_ANYWHERE"], environ={})
    assert submit.parse_env(["TOKEN", "B=2=3"], environ={"TOKEN": "t"}) == {"TOKEN": "t", "B": "2=3"}


def test_submit_dry_run_prints_the_job(submit, capsys):
    assert submit.main([str(ROOT / "jobs" / "dpo_qwen2_5_vl_3b.yaml"), "--dry-run", "--pip", "wandb==0.19.0"]) == 0
    out = capsys.readouterr().out
    assert "entrypoint: raylign dpo --config jobs/dpo_qwen2_5_vl_3b.yaml" in out and "wandb==0.19.0" in out


# ------------------------------------------------------------------ docs show the recipes as they are


def _docs_tiny_command(page: Path, method: str) -> list[str]:
    """The tiny-model command of a method page: the `raylign <method> ... runs/tiny-qwen ...` shell line."""
    text = page.read_text().replace("\\\n", " ")
    lines = [ln for ln in text.splitlines() if ln.startswith(f"raylign {method} ") and "runs/tiny-qwen" in ln]
    assert len(lines) == 1, f"{page.name}: expected one tiny-model command"
    return shlex.split(lines[0])


@pytest.mark.parametrize("recipe", RECIPES, ids=recipe_id)
def test_method_page_shows_its_recipe_and_commands(recipe):
    method = load_config(recipe).method
    page = ROOT / "docs" / f"{method}.md"
    text = page.read_text()
    assert f"raylign {method} --config jobs/{recipe.name}" in text
    assert f"python jobs/submit.py jobs/{recipe.name}" in text and "ray job submit" in text
    assert _docs_tiny_command(page, method) == tiny_command(recipe), f"{page.name}: tiny command differs from the recipe's"
    sys.path.insert(0, str(ROOT / "docs"))
    from gen_docs import with_recipes

    assert f"<!-- recipe: jobs/{recipe.name} -->" in text
    assert with_recipes(text, ROOT) == text, f"{page.name}: recipe block is stale; run python docs/gen_docs.py"


def test_generated_reference_and_migration_table_are_current():
    # The migration page comes from raylign/config/trl_table.py and its TRL snapshot: no TRL import needed.
    sys.path.insert(0, str(ROOT / "docs"))
    from gen_docs import stale

    old = stale(("config.md", "migration-from-trl.md"))
    assert not old, f"stale: {[p.name for p in old]}; run python docs/gen_docs.py"


def test_migration_table_names_only_real_keys():
    from raylign.config import trl
    from raylign.config.loader import _schema_keys

    trl.check_table(set(_schema_keys()))
    assert trl.TABLE["epsilon_high"].to == ("grpo.epsilon_high",) and "rollout.engine" in trl.TABLE["use_vllm"].to
    assert trl.TABLE["DPOConfig.beta"].to == ("dpo.beta",) and trl.TABLE["learning_rate"].to == ("train.learning_rate",)
    assert len(trl.TABLE) >= 60
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(trl.TABLE, "use_vllm", trl.Rule(("rollout.no_such_key",)))
        with pytest.raises(ValueError, match="no_such_key"):
            trl.check_table(set(_schema_keys()))

