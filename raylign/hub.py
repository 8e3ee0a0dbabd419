"""Is the Hugging Face hub usable from here? Answered in seconds, before a hub client retries for minutes.

Without network the hub clients retry with back-off (about 150 s for a model) before failing. raylign
asks first: offline mode set by the user (``HF_HUB_OFFLINE``), or one TCP connect to the endpoint.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_offline() -> bool:
    """Whether the user switched the hub clients to their local caches."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in names)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection within ``timeout`` seconds."""
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:  # no route, no DNS, refused, timed out: all mean "not reachable", which callers report
        return False


def go_offline() -> None:
    """Make the hub clients of this process and of every process started later read only their caches.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import, so its constant is set too when it is
    already imported; Ray workers of a local instance inherit the environment.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
