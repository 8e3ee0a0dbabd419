"""The base of every error whose message is the whole story: what is wrong, where, and the fix.

The CLI prints such an error as one line (no traceback) and exits 2; anything else is an internal
error, also one line but with a pointer to ``--debug``. Imports nothing, so every layer can use it.
"""

from __future__ import annotations


class RaylignError(Exception):
    """Bad input or a stopped run, explained in its message (one line, naming the key, row or file)."""
