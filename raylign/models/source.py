"""Where a model comes from -- a local directory, the local hub cache, or the hub -- checked in seconds.

Light on purpose (no torch, no transformers): the CLI runs this before anything starts, and
``loading`` runs it before every ``from_pretrained``, so a missing directory or an offline machine is
one line naming the key and the fix, never a hub client's repo-id error or minutes of retries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from raylign.errors import RaylignError
from raylign.hub import go_offline, hub_endpoint, hub_offline, hub_reachable

Source = Literal["local", "cache", "hub"]
_HUB_FIX = "download it where there is network (`hf download NAME --local-dir DIR`) and give DIR"


class ModelSourceError(RaylignError, ValueError):
    """A model name that names nothing loadable from here; the message says what to do."""


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_model_source(name_or_path: str | os.PathLike, key: str = "model.name_or_path") -> Source:
    """Where ``name_or_path`` loads from; raises ModelSourceError naming ``key`` when it cannot load.

    A hub id that is cached while the hub is unreachable switches the hub clients to offline mode
    (see ``hub.go_offline``), so they read the cache instead of retrying for minutes.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{key}: {name} has no config.json, so it is no Hugging Face model "
                                   "directory; give the directory that holds config.json and the weights")
        return "local"
    if path.exists():
        raise ModelSourceError(f"{key}: {name} is a file; give the model's directory (with config.json)")
    if not _is_hub_id(name):
        raise ModelSourceError(f"{key}: directory {name} does not exist (looked from {os.getcwd()}); give a "
                               "local model directory, or a hub id such as Qwen/Qwen2.5-VL-3B-Instruct "
                               "(a hub id needs network or a copy in the local Hugging Face cache)")
    cached = _cached(name)
    if hub_offline():
        if cached:
            return "cache"
        raise ModelSourceError(f"{key}: {name} is neither a local directory nor in the Hugging Face cache, "
                               f"and HF_HUB_OFFLINE is set; {_HUB_FIX}")
    if hub_reachable():
        return "hub"
    if cached:
        go_offline()
        return "cache"
    raise ModelSourceError(f"{key}: {name} is neither a local directory nor in the Hugging Face cache, and "
                           f"the hub ({hub_endpoint()}) is not reachable from here; {_HUB_FIX}")
