"""Argument checks shared across the package: a user mistake is a ValueError naming the argument."""

from __future__ import annotations


def check_int(name: str, value: int, minimum: int, maximum: int | None = None) -> None:
    """``value`` must be an int (not a bool) in ``[minimum, maximum]`` (no upper bound when None)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
