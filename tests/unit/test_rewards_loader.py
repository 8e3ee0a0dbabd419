"""Reward spec loading: builtins, modules, files, factories, and the exact error messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raylign.rewards.builtin import OverlongPenalty, accuracy_reward, format_reward
from raylign.rewards.loader import (
    RewardLoadError,
    as_spec,
    load_reward_function,
    load_reward_functions,
)

USER_FILE = """
NOT_CALLABLE = 3

def my_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]

def make_constant(value):
    def constant(completions, **kwargs):
        return [value] * len(completions)
    return constant
"""


@pytest.fixture()
def user_file(tmp_path: Path) -> str:
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return str(path)


def test_builtins_and_module_specs() -> None:
    assert load_reward_function("format") is format_reward
    assert load_reward_function(" accuracy ") is accuracy_reward
    assert load_reward_function("raylign.rewards.builtin:format_reward") is format_reward
    fn = load_reward_function("overlong(max_completion_length=10, soft_cache=5)")
    assert isinstance(fn, OverlongPenalty) and fn(completions=["x"], completion_lengths=[8]) == [-0.6]


def test_file_specs_and_factories(user_file: str) -> None:
    fn = load_reward_function(f"{user_file}:my_reward")
    assert fn(completions=["ab", "abc"]) == [2.0, 3.0]
    assert load_reward_function(f"{user_file}:my_reward") is fn  # the file runs once
    assert load_reward_function(f"{user_file}:make_constant(value=0.25)")(completions=[1, 2]) == [0.25, 0.25]
    rel = os.path.relpath(user_file)
    assert load_reward_function(f"{rel}:my_reward") is fn


def test_load_reward_functions_names_and_weights(user_file: str) -> None:
    loaded = load_reward_functions(["format", "accuracy", f"{user_file}:my_reward", "format"], [1, 2, 0.5, 3])
    assert [r.name for r in loaded] == ["format", "accuracy", "my_reward", "format_2"]
    assert [r.weight for r in loaded] == [1.0, 2.0, 0.5, 3.0]
    assert [r.weight for r in load_reward_functions(["format", "accuracy"])] == [1.0, 1.0]


def _message(spec: str) -> str:
    with pytest.raises(RewardLoadError) as info:
        load_reward_function(spec)
    return str(info.value)


def test_error_unknown_builtin() -> None:
    assert _message("formatt") == (
        "reward function spec 'formatt': no builtin reward named 'formatt' (did you mean format?) (builtins: "
        "accuracy, format, overlong); use 'module:function' or 'path/to/file.py:function' for your own"
    )


def test_error_no_such_module() -> None:
    assert _message("no_such_pkg.rewards:fn") == (
        "reward function spec 'no_such_pkg.rewards:fn': no module named 'no_such_pkg.rewards' "
        "(is it installed or on PYTHONPATH?)"
    )


def test_error_no_such_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.py")
    assert _message(f"{missing}:fn") == (
        f"reward function spec '{missing}:fn': file '{missing}' does not exist (looked in '{os.getcwd()}'); "
        "fix the path"
    )


def test_error_missing_attribute(user_file: str) -> None:
    assert (
        _message(f"{user_file}:nope")
        == f"reward function spec '{user_file}:nope': '{user_file}' has no attribute 'nope'"
    )
    assert _message("raylign.rewards.builtin:nope") == (
        "reward function spec 'raylign.rewards.builtin:nope': "
        "'raylign.rewards.builtin' has no attribute 'nope'"
    )


def test_error_not_callable(user_file: str) -> None:
    assert _message(f"{user_file}:NOT_CALLABLE") == (
        f"reward function spec '{user_file}:NOT_CALLABLE': 'NOT_CALLABLE' is not callable (it is a int)"
    )


def test_error_factory_needs_arguments_and_bad_arguments() -> None:
    assert _message("overlong") == (
        "reward function spec 'overlong': builtin 'overlong' needs arguments, e.g. "
        "'overlong(max_completion_length=512, soft_cache=128)'"
    )
    assert _message("overlong(512, 128)") == (
        "reward function spec 'overlong(512, 128)': cannot read arguments (512, 128): only keyword "
        "arguments are allowed; write them as key=literal, ..."
    )
    assert _message("overlong(max_completion_length=10, soft_cache=50)") == (
        "reward function spec 'overlong(max_completion_length=10, soft_cache=50)': calling 'overlong' with "
        "{'max_completion_length': 10, 'soft_cache': 50} failed: ValueError: overlong penalty needs "
        "0 < soft_cache <= max_completion_length, got soft_cache=50, max_completion_length=10"
    )


def test_error_malformed_spec() -> None:
    assert _message(":fn") == (
        "reward function spec ':fn': expected 'module:function' or 'path/to/file.py:function'"
    )
    assert _message("") == (
        "reward function spec '': expected a builtin name, 'module:function' or 'path/to/file.py:function'"
    )


def test_error_weights_length() -> None:
    with pytest.raises(RewardLoadError) as info:
        load_reward_functions(["format", "accuracy"], [1.0])
    assert str(info.value) == (
        "reward_weights has 1 entries but there are 2 reward functions; give one weight per function"
    )


def test_as_spec(user_file: str) -> None:
    assert as_spec("format") == "format"
    assert as_spec(format_reward) == "raylign.rewards.builtin:format_reward"
    fn = load_reward_function(f"{user_file}:my_reward")
    assert as_spec(fn) == f"{user_file}:my_reward"

    def local(completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(RewardLoadError, match="cannot be loaded by name in another process"):
        as_spec(local)
