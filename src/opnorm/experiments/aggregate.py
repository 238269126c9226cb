"""Means and standard errors over seeds, for results of the same structure per seed.

Example:
    >>> from opnorm.experiments.aggregate import aggregate
    >>> aggregate([{"acc": 0.5, "eps": [0, 1]}, {"acc": 1.0, "eps": [0, 1]}])
    {'acc': {'mean': 0.75, 'se': 0.25, 'n': 2, 'values': [0.5, 1.0]}, 'eps': [0, 1]}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["stat", "aggregate", "mean", "se", "CONSTANT_KEYS"]

# keys that name the grid a measurement was taken on: equal over seeds, kept as they are
CONSTANT_KEYS = {"eps", "radii", "k", "label", "settings", "lam", "family"}


def stat(values: Sequence[float]) -> dict:
    """``{"mean", "se", "n", "values"}``: se is the standard error of the mean (sample std with
    n - 1, over sqrt(n)); None for a single value. NaN values are left out (and counted out of n)."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(vals)
    if n == 0:
        return {"mean": None, "se": None, "n": 0, "values": list(values)}
    m = sum(vals) / n
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1)) / math.sqrt(n) if n > 1 else None
    return {"mean": m, "se": s, "n": n, "values": vals}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def aggregate(items: list, key: str | None = None) -> Any:
    """Combine per-seed results of one structure: numbers become :func:`stat` dicts, lists are
    combined entry by entry, dicts key by key; strings, bools and the grids named in
    ``CONSTANT_KEYS`` are taken from the first seed. A structure that differs between seeds
    raises ValueError (the seeds did not measure the same thing)."""
    first = items[0]
    if key in CONSTANT_KEYS:
        return first
    if isinstance(first, dict):
        if any(not isinstance(it, dict) or set(it) != set(first) for it in items):
            raise ValueError(f"seeds measured different things under {key!r}")
        return {k: aggregate([it[k] for it in items], k) for k in first}
    if isinstance(first, list):
        if any(not isinstance(it, list) or len(it) != len(first) for it in items):
            raise ValueError(f"seeds measured lists of different lengths under {key!r}")
        return [aggregate([it[i] for it in items], key) for i in range(len(first))]
    if _is_number(first) or first is None:
        return stat(items)
    return first


def mean(s: Any) -> float:
    """The mean of a stat dict (a plain number passes through)."""
    return s["mean"] if isinstance(s, dict) else s


def se(s: Any) -> float | None:
    """The standard error of a stat dict (None for one seed or a plain number)."""
    return s.get("se") if isinstance(s, dict) else None
