"""Means, standard errors and 95 % t-intervals over seeds, for results of the same structure per seed.

Example:
    >>> from opnorm.experiments.aggregate import aggregate, difference, half_width, stat
    >>> aggregate([{"acc": 0.5, "eps": [0, 1]}, {"acc": 1.0, "eps": [0, 1]}])
    {'acc': {'mean': 0.75, 'se': 0.25, 'n': 2, 'values': [0.5, 1.0]}, 'eps': [0, 1]}
    >>> round(half_width(stat([0.8, 0.9, 1.0])), 4)  # t_{0.975, 2} = 4.303 times the standard error
    0.2484
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "stat",
    "aggregate",
    "mean",
    "se",
    "t_quantile",
    "half_width",
    "difference",
    "INTERVAL_TEXT",
    "CONSTANT_KEYS",
]

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


INTERVAL_TEXT = (
    "95 % t-intervals over seeds: mean ± t_{0.975, n-1} x standard error (t = 12.71, 4.30, 3.18 for "
    "2, 3, 4 seeds); a difference between two models is judged on its own interval, paired by seed "
    "(every model of a seed shares its data order); with one seed there is no interval and means are "
    "compared as they are"
)

# two-sided 95 % quantiles t_{0.975, df} of Student's t, df = 1..30
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_quantile(df: int) -> float:
    """``t_{0.975, df}``: the 95 % two-sided quantile of Student's t with ``df >= 1`` degrees of freedom.

    Tabulated up to 30, the Cornish-Fisher expansion beyond (error below 1e-4).
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an int >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def half_width(s: Any) -> float | None:
    """Half-width of the 95 % t-interval of a stat dict's mean (None for one seed or a plain number)."""
    e = se(s)
    return None if e is None else t_quantile(s["n"] - 1) * e


def _values(s: Any) -> list[float]:
    return list(s["values"]) if isinstance(s, dict) else [float(s)]


def difference(a: Any, b: Any) -> tuple[float, float | None]:
    """``mean(b) - mean(a)`` and the half-width of its 95 % t-interval (None: one seed on both sides).

    ``a`` and ``b`` are stat dicts or plain numbers (a plain number is a constant). Two stat
    dicts of as many seeds are paired by seed: the interval is that of the mean of the
    per-seed differences, with n - 1 degrees of freedom. When their counts differ (a NaN left
    out on one side) the standard errors add in quadrature, with the smaller count's degrees of
    freedom (conservative).
    """
    va, vb = _values(a), _values(b)
    d = mean(b) - mean(a)
    if isinstance(a, dict) and isinstance(b, dict) and len(va) == len(vb):
        diffs = [y - x for x, y in zip(va, vb)]
        return d, half_width(stat(diffs))
    spread = [s for s in (a, b) if se(s) is not None]
    if not spread:
        return d, None
    n = min(s["n"] for s in spread)
    return d, t_quantile(n - 1) * math.sqrt(sum(se(s) ** 2 for s in spread))
