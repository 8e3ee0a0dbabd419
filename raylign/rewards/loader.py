"""Turn reward specs (strings from a config) into reward functions.

A spec is one of::

    format                                   a builtin (see builtin.BUILTIN_REWARDS)
    overlong(max_completion_length=512, soft_cache=128)   a builtin factory with its arguments
    my_pkg.rewards:iou_reward                a module on the path (Python's import rules)
    path/to/rewards.py:iou_reward            a file, relative to the current directory

Any target may carry ``(key=literal, ...)``: the target is then a factory called with those
keyword arguments, and what it returns is the reward function. Specs are plain strings so a
process pool (or a Ray actor on another node) can load the same functions itself.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from raylign.errors import RaylignError
from raylign.rewards.builtin import BUILTIN_FACTORIES, BUILTIN_REWARDS, RewardFn

_SPEC = re.compile(r"\s*(?P<target>[^()]+?)\s*(?:\((?P<args>.*)\))?\s*", re.DOTALL)


class RewardLoadError(RaylignError, ValueError):
    """A reward spec names nothing usable; the message names the spec and what is wrong."""


@dataclass(frozen=True)
class LoadedReward:
    """One reward function with the name its metrics use and its weight in the sum."""

    name: str
    spec: str
    weight: float
    fn: RewardFn


def _fail(spec: str, problem: str) -> RewardLoadError:
    return RewardLoadError(f"reward function spec {spec!r}: {problem}")


def _split(spec: str) -> tuple[str, dict[str, Any] | None]:
    """``target`` and its keyword arguments (None when the spec has no parentheses)."""
    match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if match is None:
        raise _fail(str(spec), "expected a builtin name, 'module:function' or 'path/to/file.py:function'")
    args = match.group("args")
    if args is None:
        return match.group("target"), None
    try:
        call = ast.parse(f"f({args})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError("only keyword arguments are allowed")
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
        if len(kwargs) != len(call.keywords):
            raise ValueError("'**' is not allowed")
    except (SyntaxError, ValueError) as err:
        raise _fail(spec, f"cannot read arguments ({args}): {err}; write them as key=literal, ...") from None
    return match.group("target"), kwargs


def _import_file(spec: str, path: str) -> ModuleType:
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise _fail(spec, f"file {path!r} does not exist (looked in {os.getcwd()!r}); fix the path")
    # One module per file, registered so pickling and repeated loads see the same objects.
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
    name = f"_raylign_reward_{stem}_{hashlib.sha1(full.encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise _fail(spec, f"running file {path!r} failed: {type(err).__name__}: {err}") from err
    return module


def _import_module(spec: str, name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            raise _fail(spec, f"no module named {name!r} (is it installed or on PYTHONPATH?)") from None
        raise _fail(spec, f"importing module {name!r} failed: {type(err).__name__}: {err}") from err
    except Exception as err:
        raise _fail(spec, f"importing module {name!r} failed: {type(err).__name__}: {err}") from err


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _resolve(spec: str, target: str) -> tuple[str, Callable[..., Any]]:
    """(name, object) for a target: a builtin, or ``module:attr`` / ``file.py:attr``."""
    if ":" not in target:
        if target in BUILTIN_REWARDS:
            return target, BUILTIN_REWARDS[target]
        if target in BUILTIN_FACTORIES:
            return target, BUILTIN_FACTORIES[target]
        names = sorted([*BUILTIN_REWARDS, *BUILTIN_FACTORIES])
        raise _fail(
            spec,
            f"no builtin reward named {target!r}{_did_you_mean(target, names)} "
            f"(builtins: {', '.join(names)}); use 'module:function' or 'path/to/file.py:function' for your own",
        )
    where, _, attr = target.rpartition(":")
    if not where or not attr:
        raise _fail(spec, "expected 'module:function' or 'path/to/file.py:function'")
    module = _import_file(spec, where) if where.endswith(".py") else _import_module(spec, where)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise _fail(spec, f"{where!r} has no attribute {attr!r}{_did_you_mean(part, public)}")
        obj = getattr(obj, part)
    return attr.rpartition(".")[2], obj


def reward_name_and_function(spec: str) -> tuple[str, RewardFn]:
    """The metric name and the reward function of one spec (see the module docstring)."""
    target, kwargs = _split(spec)
    name, obj = _resolve(spec, target)
    if not callable(obj):
        raise _fail(spec, f"{name!r} is not callable (it is a {type(obj).__name__})")
    if kwargs is None:
        if target in BUILTIN_FACTORIES:
            raise _fail(
                spec,
                f"builtin {target!r} needs arguments, e.g. "
                "'overlong(max_completion_length=512, soft_cache=128)'",
            )
        return name, obj
    try:
        fn = obj(**kwargs)
    except Exception as err:
        raise _fail(spec, f"calling {name!r} with {kwargs} failed: {type(err).__name__}: {err}") from err
    if not callable(fn):
        raise _fail(spec, f"{name!r}(...) returned a {type(fn).__name__}, not a reward function")
    return name, fn


def load_reward_function(spec: str) -> RewardFn:
    """The reward function a spec names; raises ``RewardLoadError`` saying what is wrong."""
    return reward_name_and_function(spec)[1]


def load_reward_functions(specs: Sequence[str], weights: Sequence[float] | None = None) -> list[LoadedReward]:
    """Load every spec; ``weights`` (TRL's ``reward_weights``) default to 1.0 each.

    Names are unique: a second function with the same name gets a ``_2`` suffix, and so on.
    """
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise RewardLoadError("no reward functions given; name at least one (e.g. 'accuracy')")
    if weights is None:
        weights = [1.0] * len(specs)
    if len(weights) != len(specs):
        raise RewardLoadError(
            f"reward_weights has {len(weights)} entries but there are {len(specs)} reward functions; "
            "give one weight per function"
        )
    loaded: list[LoadedReward] = []
    seen: dict[str, int] = {}
    for spec, weight in zip(specs, weights, strict=True):
        name, fn = reward_name_and_function(spec)
        seen[name] = seen.get(name, 0) + 1
        unique = name if seen[name] == 1 else f"{name}_{seen[name]}"
        loaded.append(LoadedReward(unique, spec, float(weight), fn))
    return loaded


def as_spec(reward: str | Callable[..., Any]) -> str:
    """A spec string for ``reward``: strings pass through; a module-level function becomes ``module:name``.

    Functions defined in ``__main__`` or inside another function cannot be re-imported by a pool
    process; put them in a file and pass ``'path/to/file.py:function'`` instead.
    """
    if isinstance(reward, str):
        return reward
    module = getattr(reward, "__module__", None)
    qualname = getattr(reward, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<locals>" in qualname:
        raise RewardLoadError(
            f"reward function {reward!r} cannot be loaded by name in another process; "
            "define it at module level in a file and pass 'path/to/file.py:function'"
        )
    loaded_from_file = getattr(sys.modules.get(module), "__file__", None)
    if module.startswith("_raylign_reward_") and loaded_from_file:
        spec = f"{loaded_from_file}:{qualname}"  # a file spec loaded earlier: load the same file again
    else:
        spec = f"{module}:{qualname}"
    if load_reward_function(spec) is not reward:
        raise RewardLoadError(f"reward function {reward!r} is not what {spec!r} loads; pass a spec string")
    return spec
