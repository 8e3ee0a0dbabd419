"""Runs at the start of every Python process whose ``PYTHONPATH`` has this directory (vLLM's engine core,
its workers, its model inspection): installs raylign's torchvision-free substitute
(``raylign.models.torchvision_free``), then runs the ``sitecustomize`` this one shadows, if any."""

import importlib.machinery
import importlib.util
import os
import sys

from raylign.models.torchvision_free import install_hook

install_hook()

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here]
)
if _spec is not None and _spec.loader is not None:
    _shadowed = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_shadowed)
