"""Argument checks shared by every layer of the package (it imports nothing from attnkit)."""

from __future__ import annotations


def check_positive_int(name: str, value: object) -> int:
    """Return `value` if it is an integer >= 1 (bools excluded), else raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value
