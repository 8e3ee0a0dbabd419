"""How the CLI ends on an error: one line, the right exit status, a traceback only when asked for.

In-process (``cli.main``) and without Ray; the cases a user types are in tests/e2e/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import constants as hub_constants

from raylign import cli
from raylign.config import ConfigError
from raylign.driver.preflight import check_inputs
from raylign.errors import RaylignError
from raylign.models.source import ModelSourceError, check_model_source

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: refused at once, and no network is touched


def run_main(capsys, argv):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.err.splitlines()


def test_a_raylign_error_is_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("RAYLIGN_DEBUG", raising=False)
    rc, err = run_main(capsys, ["sft", "--model.name_or_path=m", "--data.train=d", "--train.max_steps=0"])
    assert rc == 2 and err == [
        "raylign: error: train.max_steps: 0 steps would train nothing; use -1 to derive it from epochs"
    ]


def test_an_internal_error_is_one_line_exit_1_pointing_at_debug(capsys, monkeypatch):
    monkeypatch.delenv("RAYLIGN_DEBUG", raising=False)

    def broken(args):
        raise KeyError("a\nmulti-line\nmessage")

    monkeypatch.setattr(cli, "_config_docs", broken)
    rc, err = run_main(capsys, ["config-docs"])
    assert rc == 1 and len(err) == 1
    assert err[0] == ("raylign: error: KeyError: 'a\\nmulti-line\\nmessage' (an internal error: rerun with --debug "
                      "or RAYLIGN_DEBUG=1 for the traceback, and report it)")


@pytest.mark.parametrize("how", ["--debug", "top-level --debug", "RAYLIGN_DEBUG=1"])
def test_debug_raises_with_the_traceback(monkeypatch, how):
    argv = ["sft", "--model.name_or_path=m", "--data.train=d", "--train.max_steps=0"]
    monkeypatch.delenv("RAYLIGN_DEBUG", raising=False)
    if how == "--debug":
        argv.append("--debug")
    elif how == "top-level --debug":
        argv.insert(0, "--debug")
    else:
        monkeypatch.setenv("RAYLIGN_DEBUG", "1")
    with pytest.raises(ConfigError, match="train.max_steps"):
        cli.main(argv)


def test_a_remote_error_is_reported_by_its_cause():
    """Ray wraps a task's exception (``RayTaskError.cause``); the line shows the cause, not the remote traceback."""

    class Wrapped(Exception):
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last):\n  File ...\n" + str(cause))
            self.cause = cause

    inner = RaylignError("row 3, column 'images': corrupt; re-encode it")
    assert cli.error_line(Wrapped(inner)) == "row 3, column 'images': corrupt; re-encode it"
    assert cli._cause(Wrapped(inner)) is inner


# --------------------------------------------------------------------------- hub without network


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty private Hugging Face cache, the hub unreachable, offline mode off (restored afterwards)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    return cache


def cache_model(cache, repo_id: str, model_dir) -> None:
    """Lay ``model_dir`` out as the hub client caches a download (refs/main -> snapshots/<sha>/)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    sha = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)


def test_hub_id_not_cached_and_hub_unreachable_fails_at_once(hub_cache):
    with pytest.raises(ModelSourceError) as err:
        check_model_source("someorg/some-vlm")
    assert str(err.value) == (
        f"model.name_or_path: someorg/some-vlm is neither a local directory nor in the Hugging Face cache, and "
        f"the hub ({UNREACHABLE}) is not reachable from here; download it where there is network "
        "(`hf download NAME --local-dir DIR`) and give DIR"
    )


def test_hub_id_not_cached_in_offline_mode_fails_at_once(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="and HF_HUB_OFFLINE is set; download it where there is network"):
        check_model_source("someorg/some-vlm")


def test_cached_hub_id_without_network_loads_from_the_cache(hub_cache, tiny_llava_dir):
    """The hub client would retry for minutes; raylign switches it to offline mode and the cache serves."""
    import os
    import time

    from raylign.models.loading import load_processor

    cache_model(hub_cache, "someorg/tiny-llava", tiny_llava_dir)
    assert check_model_source("someorg/tiny-llava") == "cache"
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_constants.HF_HUB_OFFLINE is True  # workers inherit it
    start = time.monotonic()
    processor = load_processor("someorg/tiny-llava")
    assert time.monotonic() - start < 20 and processor.tokenizer is not None


def test_local_directory_checks(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert check_model_source(tmp_path) == "local"
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelSourceError, match="has no config.json, so it is no Hugging Face model directory"):
        check_model_source(tmp_path)
    with pytest.raises(ModelSourceError, match=r"directory \./nope does not exist \(looked from "):
        check_model_source("./nope")


# --------------------------------------------------------------------------- preflight of a whole config


def test_preflight_passes_a_good_config_and_skips_what_the_driver_builds(tmp_path, tiny_llava_dir):
    from raylign.config import config_from_dict

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "hi"}) + "\n")
    good = {"method": "grpo", "model": {"name_or_path": str(tiny_llava_dir)}, "data": {"train": str(data)},
            "output_dir": str(tmp_path), "reward": {"funcs": ["format", "accuracy"]}}
    check_inputs(config_from_dict(good))
    check_inputs(config_from_dict({**good, "model": {"name_or_path": "tiny:llava"},
                                   "data": {"train": "synthetic:color"}}))
    bad = config_from_dict({**good, "reward": {"funcs": ["format", "raylign.rewards.builtin:acuracy_reward"]}})
    with pytest.raises(ConfigError, match=r"^reward.funcs\[1\]: .* has no attribute 'acuracy_reward' "
                                          r"\(did you mean accuracy_reward\?\)"):
        check_inputs(bad)


# --------------------------------------------------------------------------- checkpoints to resume from


def test_resume_errors_name_the_key_and_what_to_use_instead(tmp_path):
    from raylign.config import config_from_dict
    from raylign.driver.resume import latest_checkpoint, mark_complete, resolve_resume, resume_command

    base = {"method": "sft", "model": {"name_or_path": "m"}, "data": {"train": "d"},
            "output_dir": str(tmp_path), "run_name": "r"}

    def resume(spec):
        return resolve_resume(config_from_dict({**base, "train": {"resume_from_checkpoint": spec}}))

    with pytest.raises(ConfigError, match=r"^train.resume_from_checkpoint: 'latest' found no complete checkpoint "
                                          r".*start without --resume"):
        resume("latest")
    with pytest.raises(ConfigError, match=r"^train.resume_from_checkpoint: /no/such/dir does not exist; give a "):
        resume("/no/such/dir")
    done, cut = tmp_path / "r" / "checkpoints" / "step_2", tmp_path / "r" / "checkpoints" / "step_4"
    done.mkdir(parents=True)
    cut.mkdir()
    mark_complete(done)
    with pytest.raises(ConfigError, match=rf"is not a complete raylign checkpoint .* the newest complete one "
                                          rf"there is {done}$"):
        resume(str(cut))
    assert resume("latest") == done == latest_checkpoint(tmp_path / "r") == resume(str(done))
    cfg = config_from_dict(base)
    assert resume_command(cfg, done) == (f"raylign sft --config {tmp_path / 'r' / 'config.yaml'} "
                                         f"--train.resume_from_checkpoint={done}")
    assert resume_command(cfg, None) == f"raylign sft --config {tmp_path / 'r' / 'config.yaml'}"
