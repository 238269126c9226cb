"""Regularizers and adversarial-training losses against independent references.

References are written out here: closed forms of an affine model with an explicit W
(torch.linalg.matrix_norm), explicit Jacobians (torch.autograd.functional.jacobian), the
penalty recomputed by hand from the returned direction, and singular values via SVD.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian as autograd_jacobian

from opnorm.attacks import pgd
from opnorm.regularizers import (
    AdversarialTrainingLoss,
    DirectionStore,
    ExactPenalty,
    FDPenalty,
    FisherKL,
    GlobalSpectralNormRegularizer,
    OperatorNormRegularizer,
    PGASolver,
)
from tests.reference import dual, psi

DT = torch.float64
INF = math.inf
PENALTY = {"fd": FDPenalty, "exact": ExactPenalty}


def affine(d=5, n=12, seed=0):
    """f(x) = W flatten(x) + b with an explicit W: J(x) = W everywhere."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, n, generator=g, dtype=DT)
    lin = nn.Linear(n, d).double()
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(torch.randn(d, generator=g, dtype=DT))
    return nn.Sequential(nn.Flatten(), lin), W


def relu_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5)
    ).double()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def grads(model):
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def zero(model):
    for p in model.parameters():
        p.grad = None


X = torch.rand(4, 3, 4, generator=gen(1), dtype=DT)


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("penalty", ["fd", "exact"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("scale_by_eps", [False, True])
def test_penalty_equals_lam_sigma_on_affine_model(penalty, squared, scale_by_eps):
    model, W = affine()
    lam, eps = 0.7, 0.3
    reg = OperatorNormRegularizer(
        2,
        2,
        eps,
        lam,
        solver=PGASolver(100, generator=gen()),
        penalty=PENALTY[penalty](squared=squared, scale_by_eps=scale_by_eps),
    )
    value = reg(model, X)
    sigma = torch.linalg.matrix_norm(W, 2)
    s = sigma * eps if scale_by_eps else sigma
    expected = lam * s ** (2 if squared else 1)
    torch.testing.assert_close(value.detach(), expected, rtol=1e-8, atol=0)
    torch.testing.assert_close(reg.last_sigma, sigma.expand(4), rtol=1e-8, atol=0)


@pytest.mark.parametrize("p,q", [(INF, 2), (INF, INF), (2, 1), (1, 2), (3, 1.5)])
@pytest.mark.parametrize("penalty", ["fd", "exact"])
def test_penalty_equals_norm_of_W_v_for_other_pairs(p, q, penalty):
    """For any (p, q), the penalty is lam * ||W v||_q^2 with v the returned unit-l_p direction."""
    model, W = affine()
    reg = OperatorNormRegularizer(
        p, q, 0.2, 0.5, solver=PGASolver(20, generator=gen()), penalty=PENALTY[penalty](squared=True)
    )
    value = reg(model, X)
    v = reg.last_v.reshape(4, -1)
    torch.testing.assert_close(torch.linalg.vector_norm(v, ord=p, dim=1), torch.ones(4, dtype=DT))
    per = torch.linalg.vector_norm(v @ W.T, ord=q, dim=1)
    torch.testing.assert_close(value.detach(), 0.5 * (per**2).mean(), rtol=1e-8, atol=0)
    torch.testing.assert_close(reg.last_sigma, per)
    # a lower bound on the true norm: the power method may stop at a local maximum (equality: below)
    closed = {(INF, INF): W.abs().sum(1).max(), (1, 2): W.norm(dim=0).max()}.get((p, q))
    if closed is not None:
        assert bool((per <= closed + 1e-9).all())


@pytest.mark.parametrize("p,q", [(INF, 2), (INF, INF), (2, 1), (1, 2), (3, 1.5)])
@pytest.mark.parametrize("penalty", ["fd", "exact"])
def test_penalty_reaches_the_norm_of_a_rank_one_map(p, q, penalty):
    """W = a b^T: sigma = ||a||_q ||b||_{p*} exactly (one power step from any start reaches psi_{p*}(b))."""
    model, W = affine()
    g = gen(3)
    a, b = torch.randn(5, generator=g, dtype=DT), torch.randn(12, generator=g, dtype=DT)
    with torch.no_grad():
        model[1].weight.copy_(torch.outer(a, b))
    reg = OperatorNormRegularizer(
        p, q, 0.2, 0.5, solver=PGASolver(3, generator=gen()), penalty=PENALTY[penalty](squared=True)
    )
    value = reg(model, X)
    sigma = torch.linalg.vector_norm(a, ord=q) * torch.linalg.vector_norm(b, ord=dual(p))
    torch.testing.assert_close(reg.last_sigma, sigma.expand(4), rtol=1e-9, atol=0)
    torch.testing.assert_close(value.detach(), 0.5 * sigma**2, rtol=1e-9, atol=0)
    maximizer = psi(b.expand(4, -1), dual(p))  # up to sign
    torch.testing.assert_close(reg.last_v.reshape(4, -1).abs(), maximizer.abs(), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- gradients


def _weight_grad(model, reg, x):
    zero(model)
    reg(model, x).backward()
    return grads(model)


def test_fd_and_exact_give_the_same_weight_gradient_on_affine_model():
    model, _ = affine()
    g_fd = _weight_grad(
        model, OperatorNormRegularizer(2, 2, 0.5, 0.3, solver=PGASolver(30, generator=gen()), penalty=FDPenalty()), X
    )
    g_ex = _weight_grad(
        model, OperatorNormRegularizer(2, 2, 0.5, 0.3, solver=PGASolver(30, generator=gen()), penalty=ExactPenalty()), X
    )
    for a, b in zip(g_fd, g_ex):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # d/dW lam * ||W v||^2 = 2 lam (W v) v^T (mean over the batch); the bias gets nothing
    assert torch.count_nonzero(g_fd[1]) == 0


@pytest.mark.parametrize("p,q,squared", [(2, 2, True), (INF, 2, False), (2, 1, True)])
def test_fd_and_exact_agree_on_relu_net_inside_linear_region(p, q, squared):
    model = relu_net()
    x = torch.rand(6, 3, 4, generator=gen(2), dtype=DT)
    eps = 1e-7  # the ball stays inside every example's linear region
    fd = OperatorNormRegularizer(p, q, eps, 0.2, solver=PGASolver(10, generator=gen(3)), penalty=FDPenalty(squared))
    ex = OperatorNormRegularizer(p, q, eps, 0.2, solver=PGASolver(10, generator=gen(3)), penalty=ExactPenalty(squared))
    g_fd, g_ex = _weight_grad(model, fd, x), _weight_grad(model, ex, x)
    torch.testing.assert_close(fd.last_v, ex.last_v)
    for a, b in zip(g_fd, g_ex):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_no_gradient_flows_through_v():
    """The weight gradient equals that of the penalty recomputed by hand with v held fixed."""
    model = relu_net()
    x = torch.rand(5, 3, 4, generator=gen(4), dtype=DT)
    eps, lam = 0.05, 0.4
    reg = OperatorNormRegularizer(2, 2, eps, lam, solver=PGASolver(5, generator=gen()), penalty=FDPenalty())
    zero(model)
    pen = reg(model, x)
    assert all(p.grad is None for p in model.parameters()), "the power method must not touch parameter grads"
    pen.backward()
    got = grads(model)
    v = reg.last_v.detach()
    zero(model)
    manual = lam * ((torch.linalg.vector_norm(model(x + eps * v) - model(x), dim=1) / eps) ** 2).mean()
    manual.backward()
    for a, b in zip(got, grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pen.detach(), manual.detach())


def test_exact_penalty_gradient_is_danskins():
    """exact: grad_theta lam * <u, J v>^2 with u, v fixed, J from an explicit Jacobian (create_graph)."""
    model = relu_net()
    x = torch.rand(3, 3, 4, generator=gen(5), dtype=DT)
    reg = OperatorNormRegularizer(2, 2, 0.0, 0.6, solver=PGASolver(15, generator=gen()), penalty=ExactPenalty())
    zero(model)
    reg(model, x).backward()
    got = grads(model)
    v = reg.last_v
    zero(model)
    vals = []
    for b in range(x.shape[0]):
        J = autograd_jacobian(lambda inp: model(inp.unsqueeze(0)).squeeze(0), x[b], create_graph=True).reshape(5, -1)
        jv = J @ v[b].reshape(-1)
        vals.append((F.normalize(jv.detach(), dim=0) * jv).sum() ** 2)
    (0.6 * torch.stack(vals).mean()).backward()
    for a, b in zip(got, grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_logits_argument_shares_the_clean_forward():
    model = relu_net()
    x = torch.rand(5, 3, 4, generator=gen(6), dtype=DT)
    a = OperatorNormRegularizer(2, 2, 0.1, 0.3, solver=PGASolver(3, generator=gen()))(model, x)
    b = OperatorNormRegularizer(2, 2, 0.1, 0.3, solver=PGASolver(3, generator=gen()))(model, x, logits=model(x))
    torch.testing.assert_close(a, b)
    reg = OperatorNormRegularizer(2, 2, 0.1, 0.3, solver=PGASolver(3, generator=gen()))
    logits, pen = reg.joint(model, x)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(pen, a)


# ----------------------------------------------------------------------------- modes and variants


def bn_dropout_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 7),
    ).double()
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.rand(16, 1, 6, 6, dtype=DT))
    return net


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_restored_and_power_method_in_eval_mode(training):
    from opnorm.power import operator_norm

    net = bn_dropout_net()
    net.train(training)
    net[3].train(not training)  # a submodule with its own flag
    before = {name: m.training for name, m in net.named_modules()}
    x = torch.rand(4, 1, 6, 6, generator=gen(7), dtype=DT)
    reg = OperatorNormRegularizer(2, 2, 0.1, 1.0, solver=PGASolver(60, generator=gen()), penalty=FDPenalty())
    running = net[1].running_mean.clone()
    res = reg.direction(net, x)
    assert {name: m.training for name, m in net.named_modules()} == before
    torch.testing.assert_close(net[1].running_mean, running)  # statistics untouched
    ref_net = copy.deepcopy(net)
    if training:  # train-mode BatchNorm: the function with x's batch statistics
        with torch.no_grad():
            h = ref_net[0](x)
            ref_net[1].running_mean = h.mean(dim=(0, 2, 3))
            ref_net[1].running_var = h.var(dim=(0, 2, 3), unbiased=False)
    ref = operator_norm(ref_net, x, 2, 2, method="exact").sigma  # eval-mode J, exact SVD
    torch.testing.assert_close(res.sigma, ref, rtol=1e-6, atol=0)
    reg(net, x).backward()
    assert {name: m.training for name, m in net.named_modules()} == before


def test_dynamic_equals_static_on_affine_model():
    model, W = affine()
    a = OperatorNormRegularizer(2, 2, 0.4, solver=PGASolver(8, dynamic=False, generator=gen()))(model, X)
    b = OperatorNormRegularizer(2, 2, 0.4, solver=PGASolver(8, dynamic=True, generator=gen()))(model, X)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("p,q", [(2, 2), (INF, 2)])
def test_dynamic_linearizes_inside_the_ball(p, q):
    """Against a hand-written loop on explicit Jacobians at x + eps v_{k-1}."""
    model = relu_net(1)
    x = torch.rand(3, 3, 4, generator=gen(8), dtype=DT)
    eps, iters = 0.5, 4
    reg = OperatorNormRegularizer(
        p, q, eps, 1.0, solver=PGASolver(iters, dynamic=True, generator=gen(9)), penalty=FDPenalty(squared=False)
    )
    reg.direction(model, x)
    v = OperatorNormRegularizer(p, q, eps, solver=PGASolver(generator=gen(9))).initial_vectors(x).reshape(3, -1)
    for b in range(3):
        vb = v[b]
        for _ in range(iters):
            point = x[b] + eps * vb.reshape(x[b].shape)
            J = autograd_jacobian(lambda inp: model(inp.unsqueeze(0)).squeeze(0), point).reshape(5, -1)
            u = psi((J @ vb).unsqueeze(0), q)[0]
            vb = psi((J.T @ u).unsqueeze(0), dual(p))[0]
        torch.testing.assert_close(reg.last_v[b].reshape(-1), vb)
        J0 = autograd_jacobian(lambda inp: model(inp.unsqueeze(0)).squeeze(0), x[b]).reshape(5, -1)
        torch.testing.assert_close(reg.last_sigma[b], torch.linalg.vector_norm(J0 @ vb, ord=q))
    # and it differs from the static method here (the ball leaves the linear region)
    static = OperatorNormRegularizer(p, q, eps, solver=PGASolver(iters, generator=gen(9)))
    static.direction(model, x)
    assert not torch.allclose(static.last_v, reg.last_v)


@pytest.mark.parametrize("p,q", [(2, 2), (INF, 2)])
def test_dynamic_fast_penalty_stores_the_dynamic_direction(p, q):
    """The penalty's own solve (no sigma measured at x) finds the direction of direction()
    (checked above against explicit Jacobians), cold and warm."""
    model = relu_net(1)
    x = torch.rand(3, 3, 4, generator=gen(8), dtype=DT)
    index = torch.tensor([2, 0, 1])
    fast, ref = (
        OperatorNormRegularizer.fast(
            p, q, 0.5, num_examples=3, solver=PGASolver(4, 1, dynamic=True, free_update=True, generator=gen(9))
        )
        for _ in range(2)
    )
    for _ in range(2):  # the first visit runs iters = 4 iterations, the second warm_iters = 1
        ref.direction(model, x, index)
        with torch.no_grad():  # no backward: the store keeps what the explicit iterations found
            fast(model, x, index)
        torch.testing.assert_close(fast.initial_vectors(x, index), ref.last_v)
        torch.testing.assert_close(fast.last_v, ref.last_v)


def test_kl_dynamic_fast_penalty_stores_its_direction():
    """With the KL metric (the solver's explicit loop, not the power method), cold (iters) and
    warm (warm_iters) visits of the penalty store what direction() finds."""
    model = relu_net(1)
    x = torch.rand(3, 3, 4, generator=gen(8), dtype=DT)
    index = torch.tensor([2, 0, 1])
    fast, ref = (
        OperatorNormRegularizer.fast(
            INF,
            2,
            0.3,
            num_examples=3,
            metric=FisherKL(),
            solver=PGASolver(3, 1, dynamic=True, free_update=True, generator=gen(9)),
        )
        for _ in range(2)
    )
    for _ in range(2):
        ref.direction(model, x, index)
        with torch.no_grad():
            fast(model, x, index)
        torch.testing.assert_close(fast.last_v, ref.last_v)
        torch.testing.assert_close(fast.initial_vectors(x, index), ref.last_v)


def test_removed_fd_iteration_is_refused_by_configs_and_cli():
    """opnorm_iteration was removed: an older config with "linear" loads, one with "fd" is an
    error (never silently the linear iteration), and the flag is gone."""
    from opnorm.cli import build_parser
    from opnorm.training.config import TrainConfig

    old = {"method": "opnorm", "opnorm_iteration": "linear", "opnorm_mode": "paper"}
    assert TrainConfig.from_dict(old).resolved().opnorm.mode == "paper"
    with pytest.raises(ValueError, match="opnorm_iteration 'fd' was removed"):
        TrainConfig.from_dict({**old, "opnorm_iteration": "fd"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--method", "opnorm", "--opnorm-iteration", "fd"])


def test_warm_start_reuses_directions_by_index():
    model = relu_net()
    x = torch.rand(4, 3, 4, generator=gen(10), dtype=DT)
    reg = OperatorNormRegularizer(2, 2, 0.1, solver=PGASolver(3, generator=gen()), store=DirectionStore(12))
    index = torch.tensor([7, 3, 11, 5])
    reg.direction(model, x, index)
    v0 = reg.initial_vectors(x[[1, 0]], torch.tensor([3, 7]))
    torch.testing.assert_close(v0, reg.last_v[[1, 0]])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(p=0.5), "p must"),
        (dict(q="two"), "q must"),
        (dict(eps=-0.1), "eps"),
        (dict(solver=PGASolver), "solver"),
        (dict(penalty="secant"), "penalty"),
        (dict(metric="kl"), "metric"),
        (dict(store=12), "store"),
        (dict(lam=-1.0), "lam"),
        (dict(eps=0.0, penalty=FDPenalty()), "eps > 0"),
        (dict(q=1, metric=FisherKL()), "q equal to the metric's"),
        (dict(metric=FisherKL(), penalty=ExactPenalty()), "penalty=FDPenalty"),
    ],
)
def test_operator_norm_regularizer_validates(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        OperatorNormRegularizer(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(iters=0), "iters"),
        (dict(warm_iters=-1), "warm_iters"),
        (dict(step=0.0), "step"),
        (dict(route="fast"), "route"),
    ],
)
def test_pga_solver_validates(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PGASolver(**kwargs)


# ----------------------------------------------------------------------------- global spectral norm


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6)
    ).double()


def test_global_spectral_norm_converges_to_matrix_norm_with_conv_reshape():
    net = conv_net()
    reg = GlobalSpectralNormRegularizer(net, iters=1, lam=0.25)
    first = reg()
    true = [
        torch.linalg.matrix_norm(m.weight.detach().reshape(m.weight.shape[0], -1), 2)
        for m in net.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    # every estimate is a lower bound; one iteration per call converges over calls
    assert all(reg.last_sigmas[n] <= float(t) + 1e-9 for n, t in zip(reg.layer_names, true))
    for _ in range(300):
        value = reg(net)
    for name, t in zip(reg.layer_names, true):
        assert reg.last_sigmas[name] == pytest.approx(float(t), rel=1e-6)
    torch.testing.assert_close(value.detach(), 0.25 * torch.stack(true).pow(2).sum(), rtol=1e-6, atol=0)
    assert float(first.detach()) <= float(value.detach()) + 1e-9
    assert set(reg.state_dict()) == {f"u_{i}" for i in range(3)}


def test_global_spectral_norm_gradient_matches_svd():
    net = conv_net()
    reg = GlobalSpectralNormRegularizer(net, iters=1, lam=0.1)
    for _ in range(300):
        reg()
    zero(net)
    reg().backward()
    got = [m.weight.grad.clone() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zero(net)
    ref = sum(
        torch.linalg.matrix_norm(m.weight.reshape(m.weight.shape[0], -1), 2) ** 2
        for m in net.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    (0.1 * ref).backward()
    want = [m.weight.grad for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_global_spectral_norm_validates():
    with pytest.raises(ValueError, match="no nn.Linear"):
        GlobalSpectralNormRegularizer(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="iters"):
        GlobalSpectralNormRegularizer(conv_net(), iters=0)
    with pytest.raises(ValueError, match="another model"):
        GlobalSpectralNormRegularizer(conv_net())(conv_net())


# ----------------------------------------------------------------------------- adversarial training


def small_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 20), nn.ReLU(), nn.Linear(20, 4))


XB = torch.rand(8, 1, 4, 4, generator=gen(11))
YB = torch.randint(0, 4, (8,), generator=gen(12))


@pytest.mark.parametrize("frac", [1.0, 0.5])
def test_at_loss_is_ce_on_the_mixed_batch(frac):
    model = small_classifier()
    at = AdversarialTrainingLoss("ce", eps=0.2, p=INF, steps=3, adv_fraction=frac)
    torch.manual_seed(5)
    loss = at(model, XB, YB)
    assert all(p.grad is None for p in model.parameters())
    m = round(frac * 8)
    torch.manual_seed(5)
    x_adv = pgd(model, XB[:m], YB[:m], eps=0.2, p=INF, loss="ce", steps=3)
    want = F.cross_entropy(model(torch.cat([x_adv, XB[m:]])), YB)
    torch.testing.assert_close(loss, want)
    assert (x_adv - XB[:m]).abs().max() <= 0.2 + 1e-6


@pytest.mark.parametrize("frac", [1.0, 0.5])
@pytest.mark.parametrize("squared", [True, False])
def test_logit_at_is_clean_ce_plus_logit_penalty(frac, squared):
    model = small_classifier()
    at = AdversarialTrainingLoss("logit", eps=0.2, p=2, q=2, steps=3, lam=0.7, squared=squared, adv_fraction=frac)
    torch.manual_seed(5)
    loss = at(model, XB, YB)
    m = round(frac * 8)
    torch.manual_seed(5)
    x_adv = pgd(model, XB[:m], YB[:m], eps=0.2, p=2, loss="logit", steps=3)
    dist = (model(x_adv) - model(XB[:m])).norm(dim=1)
    want = F.cross_entropy(model(XB), YB) + 0.7 * (dist**2 if squared else dist).mean()
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("squared", [True, False])
def test_logit_at_matches_opnorm_with_matched_eps_and_lam_on_affine_model(squared):
    """The theorem: lam * max ||f(x+delta) - f(x)||_2^s = lam * (eps sigma)^s for f affine."""
    model, W = affine()
    x = X.reshape(4, 12)
    y = torch.tensor([0, 1, 2, 3])
    sigma = torch.linalg.matrix_norm(W, 2)
    eps, lam = 0.3, 0.5
    at = AdversarialTrainingLoss(
        "logit", eps=eps, p=2, q=2, steps=60, step_size=10 * eps, lam=lam, squared=squared, clip=None
    )
    reg = OperatorNormRegularizer(
        2, 2, eps, lam, solver=PGASolver(200, generator=gen()), penalty=FDPenalty(squared=squared, scale_by_eps=True)
    )
    ce = F.cross_entropy(model(x), y)
    want = lam * ((eps * sigma) ** 2 if squared else eps * sigma)
    torch.testing.assert_close(reg(model, x), want, rtol=1e-6, atol=0)
    got = at(model, x, y) - ce  # finite-step PGD from a random start: a lower bound that converges
    assert got <= want * (1 + 1e-9)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)


def test_trades_loss():
    model = small_classifier()
    at = AdversarialTrainingLoss("trades", eps=0.3, p=2, steps=3, lam=4.0, adv_fraction=0.5)  # lam: TRADES' beta
    torch.manual_seed(6)
    loss = at(model, XB, YB)
    torch.manual_seed(6)
    x_adv = pgd(model, XB[:4], eps=0.3, p=2, loss="kl", steps=3)
    clean, adv = model(XB), model(x_adv)
    kl = F.kl_div(F.log_softmax(adv, 1), F.log_softmax(clean[:4], 1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(loss, F.cross_entropy(clean, YB) + 4.0 * kl)


def test_at_without_adversarial_examples_is_clean_ce():
    model = small_classifier()
    torch.testing.assert_close(
        AdversarialTrainingLoss("ce", eps=0.2, adv_fraction=0.0)(model, XB, YB), F.cross_entropy(model(XB), YB)
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="mart"), "kind"),
        (dict(eps=-1.0), "eps"),
        (dict(adv_fraction=1.5), "adv_fraction"),
        (dict(steps=0), "steps"),
        (dict(p=0), "p must"),
    ],
)
def test_at_validates(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AdversarialTrainingLoss(**kwargs)


# ----------------------------------------------------------------------------- DDP


DDP_SCRIPT = textwrap.dedent(
    """
    import copy, json, os, sys, torch, torch.distributed as dist, torch.nn.functional as F
    from torch import nn
    from opnorm.regularizers import (OperatorNormRegularizer, GlobalSpectralNormRegularizer, AdversarialTrainingLoss,
                                     ExactPenalty, FDPenalty, PGASolver)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).double()
    shards = [(torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(10 + r), dtype=torch.float64),
               torch.randint(0, 5, (6,), generator=torch.Generator().manual_seed(20 + r))) for r in range(world)]

    def loss_of(kind, model, x, y, r):
        if kind in ("fd", "exact"):
            solver = PGASolver(5, generator=torch.Generator().manual_seed(r))
            reg = OperatorNormRegularizer(2, 2, 0.05, 0.5, solver=solver,
                                          penalty=FDPenalty() if kind == "fd" else ExactPenalty())
            logits, pen = reg.joint(model, x)
            return F.cross_entropy(logits, y) + pen
        if kind == "snr":
            return F.cross_entropy(model(x), y) + GlobalSpectralNormRegularizer(model, lam=0.3)(model)
        torch.manual_seed(100 + r)
        return AdversarialTrainingLoss(kind, eps=0.1, p=2, steps=2, adv_fraction=0.5)(model, x, y)

    results = {}
    for kind in ("fd", "exact", "snr", "ce", "trades"):
        wrapped, plain = copy.deepcopy(net), copy.deepcopy(net)
        ddp = nn.parallel.DistributedDataParallel(wrapped)
        loss_of(kind, ddp, *shards[rank], rank).backward()
        got = [p.grad.clone() for p in wrapped.parameters()]
        ref = [torch.zeros_like(p) for p in plain.parameters()]
        for r in range(world):  # DDP averages the per-process gradients
            plain.zero_grad()
            loss_of(kind, plain, *shards[r], r).backward()
            ref = [a + p.grad / world for a, p in zip(ref, plain.parameters())]
        results[kind] = max(float((a - b).abs().max()) for a, b in zip(got, ref))
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
    """
)


def test_regularizers_on_ddp_wrapped_model(tmp_path):
    """Under DDP (2 gloo processes) every objective's gradient equals the average of the
    single-process gradients of the two shards: the penalty goes through the wrapper."""
    script = tmp_path / "ddp_regularizers.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(errors) == sorted(["fd", "exact", "snr", "ce", "trades"])
        for kind, err in errors.items():  # max |DDP grad - averaged single-process grad|
            assert err <= 1e-12, (rank, kind, err)
