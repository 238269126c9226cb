"""What ``exact`` / ``converged`` promise for the (2, 2) norm, on affine models with a chosen
singular spectrum: wherever they are True, sigma is the norm up to rounding; ``rtol_change``
only stops early. References: the prescribed spectrum and torch.linalg.svdvals of W."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from opnorm.jacobian import jacobian, linearize
from opnorm.power import lanczos_iteration, operator_norm

DT = torch.float64
D, N = 10, 40
ROUNDING = 1e-10

# (name, spectrum, weight of the top singular direction in the start): a clear gap, a gap of
# 1e-3, and starts nearly orthogonal to the top direction, where the estimate first settles
# on sigma_2 and stays there for several iterations
CASES = [
    ("gap", [1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.0], 1.0),
    ("small gap", [1.0, 0.999, 0.998, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05], 1.0),
    ("hidden top", [1.0, 0.9, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01], 1e-6),
    ("hidden top, small gap", [1.0, 0.999, 0.5, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01], 1e-4),
]


def spectral_model(s: list[float], seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """nn.Linear(N, D) with W = U diag(s) V^T (U, V random orthonormal): (model, W, V)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=DT))
    V, _ = torch.linalg.qr(torch.randn(N, D, generator=g, dtype=DT))
    W = U @ torch.diag(torch.tensor(s, dtype=DT)) @ V.T
    lin = nn.Linear(N, D).to(DT)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(torch.randn(D, generator=g, dtype=DT))
    return lin, W, V


def start(V: torch.Tensor, top_weight: float, batch: int, seed: int = 1) -> torch.Tensor:
    """Start vectors (batch, N) in the row space of W with weight top_weight on its top right singular vector."""
    c = torch.randn(batch, D, generator=torch.Generator().manual_seed(seed), dtype=DT)
    c[:, 0] = top_weight * c[:, 0].sign()
    return c @ V.T


@pytest.mark.parametrize("name,s,top_weight", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("rtol_change", [1e-2, 1e-3, 1e-6, 0.0])
def test_converged_bounds_the_error(name, s, top_weight, rtol_change):
    """Every iteration count and stopping tolerance: converged / exact imply the norm up to rounding."""
    model, W, V = spectral_model(s)
    true = torch.linalg.svdvals(W)[0]
    x = torch.randn(6, N, generator=torch.Generator().manual_seed(2), dtype=DT)
    v0 = start(V, top_weight, 6)
    for iters in (2, 5, D, 3 * D):
        res = operator_norm(model, x, method="lanczos", iters=iters, rtol_change=rtol_change, v0=v0)
        err = (res.sigma - true).abs() / true
        assert torch.equal(res.converged, res.exact)
        assert torch.all(err[res.converged] <= ROUNDING), (iters, err, res.converged)
        assert torch.all(res.sigma <= true * (1 + ROUNDING))  # always a lower bound
        assert res.iterations <= D
        if iters >= D and rtol_change == 0:
            assert res.converged.all()  # d iterations span the output space


def test_stopping_rule_is_not_an_error_bound():
    """A start nearly orthogonal to the top direction: the estimate settles on sigma_2 = 0.9 and
    the rule stops there, 10 % below the norm; such a result must not claim convergence."""
    model, W, V = spectral_model(CASES[2][1])
    true = torch.linalg.svdvals(W)[0]
    x = torch.zeros(4, N, dtype=DT)
    res = operator_norm(model, x, method="lanczos", iters=D, rtol_change=1e-3, v0=start(V, 1e-6, 4))
    err = (res.sigma - true).abs() / true
    assert res.stopped.all() and (err > 0.05).all()  # stopped by the rule, far off
    assert not res.converged.any() and not res.exact.any()
    full = operator_norm(model, x, method="lanczos", iters=D, rtol_change=0, v0=start(V, 1e-6, 4))
    assert full.converged.all() and torch.all((full.sigma - true).abs() <= ROUNDING * true)


def test_start_in_an_invariant_subspace_goes_on():
    """J v0 spanned by the bottom left singular vectors: the Krylov space closes after a few
    steps without the top one. Lanczos must not report that as the norm: it continues
    orthogonally and is exact after d iterations."""
    s = [3.0, 2.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    model, W, V = spectral_model(s)
    v0 = V[:, 6:].sum(dim=1).expand(3, N).clone()  # J v0 lies in span(u_7..u_10): invariant under J J^T
    x = torch.zeros(3, N, dtype=DT)
    for iters in (4, 6, D - 1):
        low = operator_norm(model, x, method="lanczos", iters=iters, rtol_change=0, v0=v0)
        assert not low.converged.any()  # the basis does not span the output space yet
    res = operator_norm(model, x, method="lanczos", iters=D, rtol_change=0, v0=v0)
    torch.testing.assert_close(res.sigma, torch.full((3,), 3.0, dtype=DT), rtol=ROUNDING, atol=0)
    assert res.converged.all()
    Jv = res.v @ W.T
    torch.testing.assert_close(Jv.norm(dim=1), res.sigma, rtol=ROUNDING, atol=0)  # v attains sigma


def test_lanczos_iteration_on_a_rank_deficient_matrix():
    """alpha = 0 (a start in the left null space) and exhausted spaces: exact after d steps."""
    s = [2.0, 1.0, 0.5, 0, 0, 0, 0, 0, 0, 0]
    _, W, _ = spectral_model(s)
    U = torch.linalg.svd(W)[0]
    u0 = U[:, 5:8].sum(dim=1).expand(2, D).clone()  # in the left null space: J^T u0 = 0
    run = lanczos_iteration(lambda v: v @ W.T, lambda u: u @ W, u0, iters=D)
    torch.testing.assert_close(run.sigma, torch.full((2,), 2.0, dtype=DT), rtol=ROUNDING, atol=0)
    assert run.exact.all() and not run.stopped.any() and run.iterations == D
    torch.testing.assert_close((run.v @ W.T).norm(dim=1), run.sigma, rtol=ROUNDING, atol=0)


@pytest.mark.parametrize("n,width", [(8, 6), (20, 4)])
def test_exhausted_spaces_without_a_stopping_rule(n, width):
    """Rank-deficient J (hidden width < d, or fewer inputs than logits) and rtol_change=0: the
    rounding noise left when a Krylov space is exhausted must count as zero, else it becomes a
    basis vector and sigma overshoots the norm while exact says True."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, width), nn.ReLU(), nn.Linear(width, D)).to(DT)
    x = torch.rand(16, n, dtype=DT)
    true = torch.linalg.matrix_norm(jacobian(model, x), 2)
    lin = linearize(model, x)
    sigma, v, u, k, exact, stopped = lanczos_iteration(lin.matvec, lin.rmatvec, lin.logits, iters=D)
    assert exact.all()
    torch.testing.assert_close(sigma, true, rtol=ROUNDING, atol=0)
    res = operator_norm(model, x, method="lanczos", iters=D, rtol_change=0)
    assert res.exact.all()
    torch.testing.assert_close(res.sigma, true, rtol=ROUNDING, atol=0)


@pytest.mark.parametrize("iters", [1, 3, 20])
def test_auto_is_exact_for_the_spectral_norm(iters):
    """auto never picks an uncertified (2, 2) route, whatever iters says."""
    model, W, V = spectral_model(CASES[3][1])
    x = torch.randn(5, N, generator=torch.Generator().manual_seed(3), dtype=DT)
    res = operator_norm(model, x, iters=iters, v0=start(V, 1e-4, 5))
    assert res.method == "exact" and res.converged.all()
    torch.testing.assert_close(res.sigma, torch.linalg.svdvals(W)[0].expand(5), rtol=ROUNDING, atol=0)


def test_power_method_never_claims_convergence():
    model, W, V = spectral_model(CASES[2][1])
    x = torch.zeros(3, N, dtype=DT)
    res = operator_norm(model, x, method="power", iters=50, rtol_change=1e-3, v0=start(V, 1e-6, 3))
    assert res.stopped.all() and not res.converged.any()
    assert torch.all(res.sigma < 0.95 * torch.linalg.svdvals(W)[0])  # stuck at sigma_2 (the rule held there)
    assert math.isclose(float(res.sigma.max()), 0.9, rel_tol=1e-2)
