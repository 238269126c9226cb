"""Argument checks shared by the whole package: one place, one wording.

Each check returns the normalized value or raises a one-line ``TypeError`` / ``ValueError``
that names the argument and says what is accepted.

Example:
    >>> from opnorm.validation import integer, number
    >>> number("0.5", "lr", lo=0.0, strict=True)
    0.5
    >>> integer(3.0, "epochs", lo=1)
    3
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["number", "integer", "box", "one_of"]


def number(value: Any, name: str, *, lo: float = 0.0, strict: bool = False, finite: bool = True) -> float:
    """A float >= lo (> lo with ``strict``); ``finite=False`` also admits +inf. Strings are parsed."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(v) or (finite and math.isinf(v)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if v < lo or (strict and v == lo):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {lo:g}, got {v:g}")
    return v


def integer(value: Any, name: str, *, lo: int = 0, hi: int | None = None) -> int:
    """An int in [lo, hi]; integral floats and numeric strings are accepted, bools are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        v = int(value) if not isinstance(value, float) or value.is_integer() else None
    except ValueError:
        v = None
    if v is None:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")
    return v


def box(clip: Any, name: str = "clip") -> tuple[float, float] | None:
    """None, or a pair (lo, hi) of finite floats with lo < hi: the input box of x + delta."""
    if clip is None:
        return None
    try:
        lo, hi = (float(c) for c in clip)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be None or a pair (lo, hi) of floats, got {clip!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must be (lo, hi) with finite lo < hi, got {clip!r}")
    return lo, hi


def one_of(value: Any, valid: tuple[str, ...], name: str) -> str:
    """A case-insensitive choice among ``valid`` ('_' and '-' are the same), returned as spelled there."""
    if isinstance(value, str):
        key = value.strip().lower().replace("_", "-")
        for v in valid:
            if v.replace("_", "-") == key:
                return v
    raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
