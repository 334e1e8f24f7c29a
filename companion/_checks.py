"""Argument checks shared by the package's modules (private: not part of the public API)."""
from __future__ import annotations

__all__ = ["check_count"]


def check_count(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is a Python ``int`` (not a ``bool``) at least ``minimum``; else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
