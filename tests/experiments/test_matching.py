"""The bracketing search over lambda, the frontier interpolation and the t-intervals, against
synthetic curves with known answers and scipy's t quantiles."""

from __future__ import annotations

import math

import pytest

from opnorm.experiments.aggregate import difference, half_width, stat, t_quantile
from opnorm.experiments.matching import BracketSearch, bracket, bracket_search, interpolate


def _curve(lam: float) -> float:
    """A monotone clean-accuracy curve: 0.99 at lambda 0, falling by 0.1 per decade of 100 lambda."""
    return 0.99 - 0.1 * math.log10(1 + 100 * lam)


def test_search_expands_then_bisects_until_the_target_is_bracketed_closely():
    calls: list[float] = []

    def acc(lam):
        calls.append(lam)
        return _curve(lam)

    target = 0.70  # reached at lambda = (10**2.9 - 1) / 100 = 7.93
    points = bracket_search(acc, [0.01, 0.1], target, max_new=8, tol=0.005)
    assert calls[:2] == [0.01, 0.1] and calls[2] == 1.0 and calls[3] == 10.0  # outwards by 10 until bracketed
    a, b = bracket(points, target)
    assert points[a] >= target > points[b] and a < b
    assert min(abs(points[a] - target), abs(points[b] - target)) <= 0.005
    for lam in calls[4:]:  # bisection in log-lambda: each new lambda inside the bracket it split
        assert 1.0 < lam < 10.0
    assert len(calls) == len(set(calls)) <= 2 + 8


def test_search_goes_down_when_every_lambda_is_too_strong_and_respects_its_budget():
    points = bracket_search(_curve, [1.0, 10.0], 0.95, max_new=5, tol=0.001)
    a, b = bracket(points, 0.95)
    assert points[a] >= 0.95 > points[b] and min(points) < 1.0
    assert bracket_search(_curve, [1.0, 10.0], 0.95, max_new=0, tol=0.001).keys() == {1.0, 10.0}
    assert bracket(bracket_search(_curve, [1.0, 10.0], 0.95, max_new=0, tol=0.001), 0.95) is None


def test_a_failed_run_counts_as_too_strong_and_is_never_a_bracket_end():
    acc = lambda lam: None if lam >= 5 else _curve(lam)  # noqa: E731  training diverges from lambda 5
    points = bracket_search(acc, [0.1, 10.0], 0.75, max_new=6, tol=0.002)
    assert points[10.0] is None
    a, b = bracket(points, 0.75)
    assert points[a] is not None and points[b] is not None and points[a] >= 0.75 > points[b]
    with pytest.raises(ValueError, match="positive"):
        bracket_search(acc, [0.0], 0.75, max_new=1, tol=0.01)


def test_two_searches_stepped_side_by_side_give_each_search_alone():
    """The study steps both families' searches together (their next lambdas train side by side):
    each ends with the lambdas and accuracies of its search run alone."""
    curves = {"a": _curve, "b": lambda lam: _curve(lam / 30)}
    searches = {f: BracketSearch([0.01, 0.1], 0.7, max_new=6, tol=0.005) for f in curves}
    rounds = 0
    while todo := {f: lams for f, s in searches.items() if (lams := s.pending())}:
        rounds += 1
        for f, lams in todo.items():
            assert len(lams) == (2 if rounds == 1 else 1)  # the sweep first, then one lambda at a time
            for lam in lams:
                searches[f].observe(lam, curves[f](lam))
    for f, curve in curves.items():
        assert searches[f].result() == bracket_search(curve, [0.01, 0.1], 0.7, max_new=6, tol=0.005)
    assert searches["a"].result().keys() != searches["b"].result().keys()
    assert rounds == 1 + max(len(s.result()) - 2 for s in searches.values())


def test_interpolation_on_the_frontier_per_seed():
    out = interpolate(stat([0.9, 0.92]), stat([0.8, 0.78]), stat([0.5, 0.6]), stat([0.7, 0.8]), 0.85)
    assert out["weight"] == pytest.approx(0.5)  # from the mean clean accuracies 0.91 and 0.79
    assert out["values"] == pytest.approx([0.6, 0.7]) and out["mean"] == pytest.approx(0.65)


def test_t_quantiles_and_intervals():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 10, 29, 30, 31, 50, 200, 5000):
        assert t_quantile(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=2e-4), df
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0)
    s = stat([0.8, 0.9, 1.0])
    assert half_width(s) == pytest.approx(scipy_stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3), rel=1e-4)
    assert half_width(stat([0.5])) is None and half_width(0.5) is None
    d, hw = difference(stat([0.1, 0.2, 0.3]), stat([0.2, 0.4, 0.3]))  # paired: differences 0.1, 0.2, 0.0
    assert d == pytest.approx(0.1) and hw == pytest.approx(half_width(stat([0.1, 0.2, 0.0])))
    d, hw = difference(stat([0.1, 0.3]), 1.0)  # against a constant: the one-sample interval
    assert d == pytest.approx(0.8) and hw == pytest.approx(half_width(stat([0.1, 0.3])))
    assert difference(0.2, 0.5) == (pytest.approx(0.3), None)
