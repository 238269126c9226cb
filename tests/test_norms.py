"""Properties of the l_p algebra: duality maps, steepest ascent, projections."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import opnorm
from opnorm.norms import (
    clip_box,
    conjugate,
    duality_map,
    lp_norm,
    norm_order,
    order_json,
    order_text,
    project_lp_ball,
    steepest_ascent,
)


@pytest.fixture(autouse=True, scope="module")
def float64_default():
    """float64 for this module only: a module-level set_default_dtype leaks into every other test."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
batches = arrays("float64", st.tuples(st.integers(1, 4), st.integers(1, 9)), elements=finite)
orders = st.sampled_from([1, 1.3, 2, 3, 7.5, math.inf])


def dual_norm(z, r):
    return lp_norm(z, conjugate(r))


@settings(max_examples=200, deadline=None)
@given(batches, orders)
def test_duality_map_unit_and_attains(arr, r):
    z = torch.from_numpy(arr)
    psi = duality_map(z, r)
    nz = lp_norm(z, r)
    pairing = (psi * z).sum(dim=1)
    assert torch.allclose(pairing, nz, rtol=1e-9, atol=1e-9)
    nonzero = nz > 0
    assert torch.allclose(dual_norm(psi, r)[nonzero], torch.ones(int(nonzero.sum())), rtol=1e-9)
    assert torch.all(psi[~nonzero] == 0)


def test_duality_map_special_cases():
    z = torch.tensor([[3.0, -4.0, 0.0], [1.0, -1.0, 0.5]])
    assert torch.equal(duality_map(z, 1), torch.sign(z))
    assert torch.allclose(duality_map(z, 2)[0], torch.tensor([0.6, -0.8, 0.0]))
    # l_inf: signed one-hot, ties split evenly
    assert torch.equal(duality_map(z, "inf"), torch.tensor([[0.0, -1.0, 0.0], [0.5, -0.5, 0.0]]))


@settings(max_examples=100, deadline=None)
@given(batches, orders)
def test_steepest_ascent_is_optimal(arr, p):
    g = torch.from_numpy(arr)
    v = steepest_ascent(g, p)
    assert torch.all(lp_norm(v, p) <= 1 + 1e-9)
    best = (v * g).sum(1)
    # no random feasible direction does better
    w = torch.randn(64, *g.shape[1:])
    for b in range(g.shape[0]):
        cand = w / lp_norm(w, p)[:, None]
        assert torch.all((cand @ g[b]) <= best[b] + 1e-9 * (1 + best[b].abs()))


@settings(max_examples=150, deadline=None)
@given(batches, st.sampled_from([1, 2, math.inf]), st.floats(0.0, 50.0))
def test_projection_feasible_idempotent_nearest(arr, p, eps):
    x = torch.from_numpy(arr)
    P = project_lp_ball(x, p, eps)
    assert torch.all(lp_norm(P, p) <= eps * (1 + 1e-9) + 1e-9)
    assert torch.allclose(project_lp_ball(P, p, eps), P, atol=1e-9)
    # points already inside stay put
    inside = lp_norm(x, p) <= eps
    assert torch.allclose(P[inside], x[inside])
    # nearest point: variational inequality <x - P, y - P> <= 0 for every feasible y,
    # and no feasible y is closer
    y = torch.randn(256, x.shape[1])
    y = project_lp_ball(y, p, eps) if eps > 0 else torch.zeros_like(y)
    for b in range(x.shape[0]):
        ip = (y - P[b]) @ (x[b] - P[b])
        assert torch.all(ip <= 1e-7 * (1 + (x[b] - P[b]).norm() * (y - P[b]).norm(dim=1)))
        assert torch.all((x[b] - y).norm(dim=1) >= (x[b] - P[b]).norm() - 1e-9)


def test_l1_projection_matches_bisection():
    torch.manual_seed(0)
    x = torch.randn(20, 50) * 3
    eps = 2.0
    P = project_lp_ball(x, 1, eps)
    for b in range(x.shape[0]):
        lo, hi = 0.0, x[b].abs().max().item()
        for _ in range(200):  # soft threshold found by bisection, independent of sorting
            mid = (lo + hi) / 2
            if (x[b].abs() - mid).clamp_min(0).sum() > eps:
                lo = mid
            else:
                hi = mid
        ref = torch.sign(x[b]) * (x[b].abs() - hi).clamp_min(0)
        assert torch.allclose(P[b], ref, atol=1e-10)


def test_per_example_eps_and_shapes():
    x = torch.randn(3, 2, 4, 4)
    eps = torch.tensor([0.1, 1.0, 10.0])
    for p in (1, 2, "inf"):
        P = project_lp_ball(x, p, eps)
        assert P.shape == x.shape
        assert torch.all(lp_norm(P, p) <= eps * (1 + 1e-9))


def test_norm_order_convention_and_errors():
    assert norm_order("inf") == math.inf == norm_order(float("inf")) == norm_order("INF")
    assert norm_order(2) == 2.0 and norm_order(1.5) == 1.5 and norm_order("3") == 3.0
    assert conjugate(1) == math.inf and conjugate("inf") == 1 and conjugate(2) == 2 and conjugate(3) == 1.5
    for bad in (0.5, -1, float("nan"), "abc"):
        with pytest.raises(ValueError, match="p"):
            norm_order(bad)
    with pytest.raises(TypeError):
        norm_order(None)
    with pytest.raises(ValueError, match=r"\{1, 2, inf\}"):
        project_lp_ball(torch.zeros(1, 3), 3, 1.0)
    with pytest.raises(ValueError, match="eps"):
        project_lp_ball(torch.zeros(1, 3), 2, -1.0)
    with pytest.raises(ValueError, match="clip"):
        clip_box(torch.zeros(1), (1.0, 0.0))


def test_public_api_reexports():
    assert opnorm.duality_map is duality_map and opnorm.project_lp_ball is project_lp_ball


@pytest.mark.parametrize("p", [1, 1.5, 2, 3, math.inf])
def test_order_text_and_json_read_back_as_the_order(p):
    assert order_text(math.inf) == "inf" and order_text(2.0) == "2" and order_text(1.5) == "1.5"
    assert order_json(math.inf) == "inf" and order_json(2.0) == 2.0 and isinstance(order_json(2.0), float)
    assert norm_order(order_text(float(p))) == p and norm_order(order_json(float(p))) == p
