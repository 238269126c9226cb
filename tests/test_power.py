"""Operator norms and spectra of J(x) against independent references.

References are built here without opnorm: explicit Jacobians from
torch.autograd.functional.jacobian, torch.linalg.svdvals, closed forms written out for
an affine model, and brute force over every sign vector.
"""

import itertools
import math

import pytest
import torch
from torch import nn

import opnorm
from opnorm.power import operator_norm, singular_values
from tests.reference import reference_jacobian

DT = torch.float64
INF = math.inf


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 7),
    )


def bn_net():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 6)
    )
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            net(torch.randn(16, 1, 8, 8) * 2 + 0.5)
    return net


MODELS = {"mlp": (mlp, (20,)), "cnn": (cnn, (1, 8, 8)), "bn": (bn_net, (1, 8, 8))}


@pytest.fixture(params=list(MODELS))
def model_and_x(request):
    torch.manual_seed(0)
    make, shape = MODELS[request.param]
    model = make().to(DT)
    x = torch.rand(6, *shape, dtype=DT)
    return model, x


def test_jacobian_matches_reference(model_and_x):
    model, x = model_and_x
    J = opnorm.jacobian_matrix(model, x)
    assert J.shape[0] == x.shape[0] and J.shape[2:] == x.shape[1:]
    torch.testing.assert_close(
        J.reshape(J.shape[0], J.shape[1], -1), reference_jacobian(model, x), rtol=1e-12, atol=1e-12
    )


def test_spectral_norm_exact_and_power(model_and_x):
    model, x = model_and_x
    ref = torch.linalg.svdvals(reference_jacobian(model, x))[:, 0]
    exact = operator_norm(model, x, 2, 2, method="exact")
    torch.testing.assert_close(exact.sigma, ref, rtol=1e-6, atol=0)
    power = operator_norm(
        model, x, 2, 2, method="power", iters=500, rtol_change=1e-13, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(power.sigma, ref, rtol=1e-4, atol=0)
    assert power.stopped.all() and not power.converged.any()  # a settled iterate proves nothing
    auto = operator_norm(model, x)
    torch.testing.assert_close(auto.sigma, ref, rtol=1e-4, atol=0)
    for res in (exact, power):  # v attains sigma with unit norm; u = psi_2(J v)
        J = reference_jacobian(model, x)
        Jv = torch.einsum("bdn,bn->bd", J, res.v.reshape(x.shape[0], -1))
        torch.testing.assert_close(Jv.norm(dim=1), res.sigma, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(res.v.reshape(x.shape[0], -1).norm(dim=1), torch.ones(x.shape[0], dtype=DT))
        torch.testing.assert_close(res.u, Jv / Jv.norm(dim=1, keepdim=True))


def test_top_k_singular_values(model_and_x):
    model, x = model_and_x
    ref = torch.linalg.svdvals(reference_jacobian(model, x))[:, :3]
    torch.testing.assert_close(singular_values(model, x, 3, method="exact"), ref, rtol=1e-9, atol=1e-12)
    got = singular_values(
        model, x, 3, method="power", iters=400, rtol_change=1e-12, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-8)
    res = singular_values(model, x, 3, return_vectors=True, method="power", iters=400, rtol_change=1e-12)
    J = reference_jacobian(model, x)
    V = res.V.reshape(x.shape[0], -1, 3)
    torch.testing.assert_close(J @ V, res.U * res.values[:, None, :], rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------- affine closed forms


def affine(n=10, d=4, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n, d).to(DT)
    return lin, lin.weight.detach()


def dual(p):
    return 1.0 if p == INF else (INF if p == 1 else p / (p - 1))


def brute_inf(W, q):
    """max over all sign vectors s of ||W s||_q."""
    n = W.shape[1]
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=DT)
    return torch.linalg.vector_norm(signs @ W.T, ord=q, dim=1).max()


def closed_form(W, p, q):
    if p == 2 and q == 2:
        return torch.linalg.svdvals(W)[0]
    if p == 1:
        return torch.linalg.vector_norm(W, ord=q, dim=0).max()
    if q == INF:
        return torch.linalg.vector_norm(W, ord=dual(p), dim=1).max()
    if p == INF:
        return brute_inf(W, q)
    if q == 1:  # ||W||_{p->1} = ||W^T||_{inf->p*}
        return brute_inf(W.T, dual(p))
    raise AssertionError


PAIRS = [
    (2, 2),
    (1, 1),
    (1, 2),
    (1, 3.0),
    (1, INF),
    (1.5, INF),
    (2, INF),
    (INF, INF),
    (INF, 2),
    (INF, 1),
    (INF, 3.0),
    (2, 1),
    (3.0, 1),
]


@pytest.mark.parametrize("p,q", PAIRS)
def test_affine_closed_forms_and_brute_force(p, q):
    lin, W = affine(n=12, d=4)
    x = torch.randn(3, 12, dtype=DT)
    ref = closed_form(W, p, q)
    res = operator_norm(lin, x, p, q, method="exact")
    assert res.exact.all()
    torch.testing.assert_close(res.sigma, ref.expand(3), rtol=1e-10, atol=0)
    Jv = res.v @ W.T
    torch.testing.assert_close(torch.linalg.vector_norm(Jv, ord=q, dim=1), res.sigma, rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.linalg.vector_norm(res.v, ord=p, dim=1), torch.ones(3, dtype=DT))
    # the power method never exceeds the true norm (equality: the rank-one test below)
    pw = operator_norm(lin, x, p, q, method="power", iters=50)
    assert torch.all(pw.sigma <= ref * (1 + 1e-10))
    if p == 2 and q == 2:
        torch.testing.assert_close(pw.sigma, ref.expand(3), rtol=1e-6, atol=0)


@pytest.mark.parametrize("p,q", PAIRS)
def test_power_method_reaches_the_norm_of_a_rank_one_map(p, q):
    """W = a b^T: ||W||_{p->q} = ||a||_q ||b||_{p*}, attained at v = psi_{p*}(b) up to sign, which
    one power step reaches from any start with b^T v0 != 0: equality, not a lower bound."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, generator=g, dtype=DT), torch.randn(12, generator=g, dtype=DT)
    lin = nn.Linear(12, 4, bias=True).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.outer(a, b))
    x = torch.randn(3, 12, generator=g, dtype=DT)
    ref = torch.linalg.vector_norm(a, ord=q) * torch.linalg.vector_norm(b, ord=dual(p))
    pw = operator_norm(lin, x, p, q, method="power", iters=5, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(pw.sigma, ref.expand(3), rtol=1e-10, atol=0)
    assert bool((torch.linalg.vector_norm(pw.v, ord=p, dim=1) <= 1 + 1e-10).all())


def test_np_hard_pair_without_enumeration_is_lower_bound():
    lin, W = affine(n=12, d=4)
    x = torch.randn(2, 12, dtype=DT)
    ref = brute_inf(W, 2)
    res = operator_norm(lin, x, INF, 2, method="exact", max_enumerate=4)
    assert not res.exact.any()
    assert torch.all(res.sigma <= ref * (1 + 1e-12))
    assert torch.all(res.sigma >= 0.98 * ref)  # many restarts find (nearly) the maximum here


def test_history_and_iterations():
    lin, W = affine()
    x = torch.randn(2, 10, dtype=DT)
    res = operator_norm(lin, x, INF, 2, method="power", iters=7, rtol_change=0, return_history=True)
    assert res.iterations == 7 and len(res.history) == 7
    for k, h in enumerate(res.history):
        if k:  # ascent: sigma never decreases
            assert torch.all(h["sigma"] >= res.history[k - 1]["sigma"] - 1e-12)
        torch.testing.assert_close(torch.linalg.vector_norm(h["v"] @ W.T, dim=1), h["sigma"])


def test_model_mode_and_state_restored():
    torch.manual_seed(0)
    net = bn_net().to(DT)
    stats = net[1].running_mean.clone()
    net[0].weight.grad = None
    x = torch.rand(4, 1, 8, 8, dtype=DT)
    for method in ("exact", "power"):
        operator_norm(net, x, method=method, iters=3)
        singular_values(net, x, 2, method=method, iters=3)
    assert net.training and net[1].training
    assert torch.equal(net[1].running_mean, stats)
    assert net[0].weight.grad is None


def test_deterministic_with_generator():
    torch.manual_seed(0)
    net = mlp().to(DT)
    x = torch.rand(3, 20, dtype=DT)
    a = operator_norm(net, x, INF, 2, method="power", iters=5, generator=torch.Generator().manual_seed(3))
    b = operator_norm(net, x, INF, 2, method="power", iters=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.v, b.v) and torch.equal(a.sigma, b.sigma)


# ----------------------------------------------------------------------- bad input


class NotTwoD(nn.Module):
    def forward(self, x):
        return x * 2


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(p=0.5), ValueError, "p"),
        (dict(q=float("nan")), ValueError, "q"),
        (dict(q=-2), ValueError, "q"),
        (dict(p="two"), ValueError, "p"),
        (dict(iters=0, method="power"), ValueError, "iters"),
        (dict(iters=2.5), ValueError, "iters must be an integer"),
        (dict(rtol_change=-1.0), ValueError, "rtol_change"),
        (dict(tol=1e-3), TypeError, "renamed rtol_change"),
        (dict(method="svd"), ValueError, "method"),
        (dict(v0=torch.zeros(2, 5)), ValueError, "v0"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    lin = nn.Linear(10, 3).to(DT)
    with pytest.raises(exc, match=match):
        operator_norm(lin, torch.rand(2, 10, dtype=DT), **kwargs)


def test_bad_inputs():
    lin = nn.Linear(10, 3).to(DT)
    x = torch.rand(2, 10, dtype=DT)
    with pytest.raises(ValueError, match="NaN or inf"):
        operator_norm(lin, torch.where(x > 0.5, torch.nan, x))
    with pytest.raises(ValueError, match="NaN or inf"):
        operator_norm(lin, x.clone().fill_(math.inf))
    with pytest.raises(ValueError, match="non-empty"):
        operator_norm(lin, x[:0])
    with pytest.raises(ValueError, match="2-D"):
        operator_norm(NotTwoD(), x.reshape(2, 2, 5))
    with pytest.raises(TypeError, match="dtype"):
        operator_norm(lin, x.float())
    with pytest.raises(ValueError, match="device"):
        operator_norm(lin, torch.empty(2, 10, dtype=DT, device="meta"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        operator_norm(lin, x.tolist())
    with pytest.raises(ValueError, match="k must be"):
        singular_values(lin, x, 4)
