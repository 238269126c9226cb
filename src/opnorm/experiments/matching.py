"""Matching a regularizer's clean accuracy to adversarial training's: the bracketing search over
lambda and the robust accuracy interpolated on the frontier.

Clean accuracy falls as lambda grows. :func:`bracket_search` adds lambdas until one lies above
and one below the target accuracy: by a factor ``expand`` outwards while every lambda is on
one side, then by bisection in log-lambda between the two nearest bracketing lambdas until
one of them is within ``tol`` of the target. :class:`BracketSearch` is the same search step by
step (several searches can train their next lambdas side by side). :func:`interpolate` then
reads a quantity (robust accuracy) at the target clean accuracy, per seed, on the line between
the bracketing lambdas.

Example:
    >>> import math
    >>> from opnorm.experiments.matching import bracket, bracket_search
    >>> acc = lambda lam: 0.99 - 0.1 * math.log10(1 + 100 * lam)  # falls with lambda
    >>> points = bracket_search(acc, [0.01, 0.1], target=0.80, max_new=6, tol=0.005)
    >>> above, below = bracket(points, 0.80)  # (lambda above the target, lambda below it)
    >>> acc(above) > 0.80 > acc(below)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable

from opnorm.experiments.aggregate import stat

__all__ = ["BracketSearch", "bracket_search", "bracket", "interpolate", "round_lambda"]


def round_lambda(lam: float) -> float:
    """lambda to 3 significant digits: a run's name and settings stay short and stable."""
    return float(f"{lam:.3g}")


def bracket(points: dict[float, float | None], target: float) -> tuple[float, float] | None:
    """The bracketing pair (a, b) nearest in log-lambda: acc(a) >= target > acc(b), or None.

    ``points``: lambda -> mean clean accuracy (None: the run failed; it counts as below the
    target when searching, and is never returned)."""
    above = [lam for lam, a in points.items() if a is not None and a >= target]
    below = [lam for lam, a in points.items() if a is not None and a < target]
    if not above or not below:
        return None
    return min(((a, b) for a in above for b in below), key=lambda ab: abs(math.log(ab[0] / ab[1])))


def _next_lambda(points: dict, target: float, tol: float, expand: float) -> float | None:
    above = [lam for lam, a in points.items() if a is not None and a >= target]
    below = [lam for lam, a in points.items() if a is None or a < target]  # a failed run: lambda too strong
    if not below:
        return max(above) * expand
    if not above:
        return min(below) / expand
    a, b = min(((a, b) for a in above for b in below), key=lambda ab: abs(math.log(ab[0] / ab[1])))
    if min(abs(points[lam] - target) for lam in (a, b) if points[lam] is not None) <= tol:
        return None  # close enough
    return math.sqrt(a * b)


class BracketSearch:
    """The bracketing search, one step at a time: evaluate every lambda of :meth:`pending`,
    :meth:`observe` each, and ask again until :meth:`pending` is empty.

    Args:
        lams: the sweep's lambdas (> 0), evaluated first. target: the accuracy to bracket (AT's).
        max_new: most lambdas to add (0: the sweep only). tol: stop bisecting once a
            bracketing lambda is within tol of the target. expand: factor outwards while
            every lambda is on one side.

    Added lambdas are rounded to 3 significant digits (:func:`round_lambda`); the search stops
    early when it would repeat a lambda.

    Example:
        >>> from opnorm.experiments.matching import BracketSearch
        >>> search = BracketSearch([1.0, 10.0], target=0.9, max_new=3, tol=0.01)
        >>> search.pending()
        [1.0, 10.0]
        >>> for lam in search.pending():
        ...     search.observe(lam, 0.95 if lam < 5 else 0.5)
        >>> search.pending()  # bisection in log-lambda
        [3.16]
    """

    def __init__(self, lams: list[float], target: float, *, max_new: int, tol: float, expand: float = 10.0) -> None:
        if not lams or any(not (lam > 0) for lam in lams):
            raise ValueError(f"lams must be positive lambdas, got {lams!r}")
        if max_new < 0 or not (tol >= 0) or not (expand > 1):
            raise ValueError(f"need max_new >= 0, tol >= 0 and expand > 1, got {max_new!r}, {tol!r}, {expand!r}")
        self.sweep, self.target = sorted(lams), target
        self.max_new, self.tol, self.expand = max_new, tol, expand
        self.points: dict[float, float | None] = {}  # lambda -> accuracy (None: the run failed)

    def pending(self) -> list[float]:
        """The lambdas to evaluate now (the sweep's, then one added at a time); [] when done."""
        missing = [lam for lam in self.sweep if lam not in self.points]
        if missing:
            return missing
        if len(self.points) - len(self.sweep) >= self.max_new:
            return []
        nxt = _next_lambda(self.points, self.target, self.tol, self.expand)
        if nxt is None or round_lambda(nxt) in self.points:
            return []
        return [round_lambda(nxt)]

    def observe(self, lam: float, accuracy: float | None) -> None:
        """Record lambda's mean clean accuracy (None: training failed)."""
        self.points[lam] = accuracy

    def result(self) -> dict[float, float | None]:
        """lambda -> accuracy, sorted by lambda."""
        return dict(sorted(self.points.items()))


def bracket_search(
    accuracy: Callable[[float], float | None],
    lams: list[float],
    target: float,
    *,
    max_new: int,
    tol: float,
    expand: float = 10.0,
) -> dict[float, float | None]:
    """Evaluate ``accuracy`` at ``lams``, then at up to ``max_new`` added lambdas
    (:class:`BracketSearch`); returns lambda -> accuracy.

    ``accuracy``: lambda -> mean clean accuracy (None where training failed), assumed to fall
    as lambda grows; the other arguments are :class:`BracketSearch`'s.
    """
    search = BracketSearch(lams, target, max_new=max_new, tol=tol, expand=expand)
    while todo := search.pending():
        for lam in todo:
            search.observe(lam, accuracy(lam))
    return search.result()


def interpolate(clean_a: dict, clean_b: dict, value_a: dict, value_b: dict, target: float) -> dict:
    """A stat over seeds of ``value`` at clean accuracy ``target`` on the line between two lambdas.

    The weight ``w = (target - mean(clean_a)) / (mean(clean_b) - mean(clean_a))`` comes from
    the means; each seed's value is ``value_a + w (value_b - value_a)`` (stat dicts of the
    same seeds). Equal mean clean accuracies give w = 0.5.

    Example:
        >>> from opnorm.experiments.aggregate import stat
        >>> from opnorm.experiments.matching import interpolate
        >>> round(interpolate(stat([0.9]), stat([0.8]), stat([0.5]), stat([0.7]), 0.85)["mean"], 6)
        0.6
    """
    ca, cb = clean_a["mean"], clean_b["mean"]
    w = 0.5 if cb == ca else (target - ca) / (cb - ca)
    return {**stat([a + w * (b - a) for a, b in zip(value_a["values"], value_b["values"])]), "weight": w}
