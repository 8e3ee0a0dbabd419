"""The one error type bad input raises, with a message that says where and what to do."""

from __future__ import annotations

from raylign.errors import RaylignError


class DataError(RaylignError, ValueError):
    """Bad training data: names the row (when there is one), the column, the problem and the fix."""


def row_error(index: int, column: str, problem: str, fix: str) -> DataError:
    """``row 12, column 'images': <problem>; <fix>`` -- the format every per-row error follows."""
    return DataError(f"row {index}, column '{column}': {problem}; {fix}")
