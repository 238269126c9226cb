"""OperatorNormRegularizer(metric=FisherKL()): logit changes measured in the softmax's Fisher metric.

References are written out independently: H = diag(s) - s s^T from torch.softmax, psi by hand, exact
(2, H) norms from an eigendecomposition of W^T H W, (inf, H) norms by brute force over the
vertices of the cube, KL divergences from F.kl_div.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from affine_models import DT, affine_layer, gen
from torch import nn

from opnorm.regularizers import ExactPenalty, FDPenalty, FisherKL, OperatorNormRegularizer, PGASolver
from tests.reference import dual, psi

INF = math.inf


def affine(d=4, n=10, seed=0):
    return affine_layer(d, n, seed)


def fisher(model, x):
    """(B, d, d) H(x) = diag(s) - s s^T with s = softmax(f(x))."""
    s = torch.softmax(model(x), dim=1)
    return torch.diag_embed(s) - s.unsqueeze(2) * s.unsqueeze(1)


X = torch.rand(3, 10, generator=gen(1), dtype=DT)
INDEX = torch.arange(3)  # the store's rows


def fast_kl(p, eps, lam, generator, **parts):
    """The fast configuration with the KL metric and a seeded solver (a store of 8 examples)."""
    solver = PGASolver(3, 1, free_update=True, generator=generator)
    return OperatorNormRegularizer.fast(p, 2, eps, lam, num_examples=8, metric=FisherKL(), solver=solver, **parts)


def test_p2_norm_is_the_top_eigenvalue_of_WtHW():
    model, W = affine()
    reg = OperatorNormRegularizer.paper(2, 2, 0.1, metric=FisherKL(), solver=PGASolver(400, generator=gen(2)))
    res = reg.direction(model, X)
    M = W.T @ fisher(model, X) @ W  # (B, n, n)
    exact = torch.linalg.eigvalsh(M)[:, -1].sqrt()
    torch.testing.assert_close(res.sigma, exact, rtol=1e-8, atol=0)
    # u is the dual direction: <u, J v> = sigma
    torch.testing.assert_close((res.u * (res.v @ W.T)).sum(1), res.sigma, rtol=1e-10, atol=0)


def test_pinf_norm_matches_brute_force_over_the_cube_vertices():
    model, W = affine()
    x = X[:1].expand(48, -1)  # one point, 48 random starts
    reg = OperatorNormRegularizer.paper(INF, 2, 0.1, metric=FisherKL(), solver=PGASolver(50, generator=gen(3)))
    res = reg.direction(model, x)
    M = (W.T @ fisher(model, X[:1]) @ W)[0].detach()
    best = max(
        float(torch.tensor(s, dtype=DT) @ M @ torch.tensor(s, dtype=DT))
        for s in itertools.product((-1.0, 1.0), repeat=10)
    )
    assert float(res.sigma.max()) == pytest.approx(math.sqrt(best), rel=1e-10)
    assert bool((res.sigma <= math.sqrt(best) * (1 + 1e-10)).all())  # every start gives a lower bound
    assert bool((res.v.abs() == 1).all())


def test_one_explicit_step_is_the_fisher_power_step():
    model, W = affine()
    v0 = psi(torch.randn(3, 10, generator=gen(4), dtype=DT), INF)
    v1 = PGASolver(1).run(model, X, v0, 1, INF, 0.1, FisherKL(), None, measure=False)[1]
    H = fisher(model, X)
    expected = psi(torch.einsum("nd,bde,ek,bk->bn", W.T, H, W, v0), 1.0)
    torch.testing.assert_close(v1, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("squared,scale_by_eps", [(True, False), (True, True), (False, False), (False, True)])
def test_fd_penalty_is_the_kl_divergence_at_the_power_point(squared, scale_by_eps):
    model, _ = affine()
    eps, lam = 0.3, 0.7
    reg = fast_kl(2, eps, lam, generator=gen(5), penalty=FDPenalty(squared=squared, scale_by_eps=scale_by_eps))
    pen = reg(model, X, INDEX)
    v = reg.last_v
    kl = F.kl_div(
        F.log_softmax(model(X + eps * v), 1), F.log_softmax(model(X), 1), log_target=True, reduction="none"
    ).sum(1)
    s = (2 * kl).sqrt() / eps * (eps if scale_by_eps else 1.0)
    torch.testing.assert_close(pen, lam * (s**2 if squared else s).mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(reg.last_sigma, (2 * kl).sqrt() / eps, rtol=1e-10, atol=0)


def test_fd_penalty_tends_to_the_fisher_quadratic_form_as_eps_shrinks():
    model, W = affine()
    H = fisher(model, X)
    errs = []
    for eps in (1e-2, 1e-3, 1e-4):
        reg = fast_kl(2, eps, 1.0, generator=gen(6))
        pen = reg(model, X, INDEX)
        Wv = reg.last_v @ W.T
        quad = torch.einsum("bd,bde,be->b", Wv, H, Wv).mean()
        errs.append(abs(float((pen / quad).detach()) - 1))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3  # the secant error is O(eps)


@pytest.mark.parametrize("p", [INF, 2.0])
def test_free_update_is_psi_of_the_kl_gradient(p):
    model, W = affine()
    eps = 0.2
    reg = fast_kl(p, eps, 0.5, generator=gen(7))
    index = torch.tensor([4, 0, 7])
    logits, pen = reg.joint(model, X, index)
    (F.cross_entropy(logits, torch.tensor([0, 1, 2])) + pen).backward()
    v = reg.last_v
    diff = torch.softmax(model(X + eps * v), 1) - torch.softmax(model(X), 1)  # d KL / d f(x_p)
    expected = psi(diff @ W, dual(p))
    torch.testing.assert_close(reg.store.directions[index].to(DT), expected, rtol=1e-10, atol=1e-12)


def test_kl_output_validation_and_config():
    from opnorm.cli import build_parser, train_config_from_args
    from opnorm.training.config import TrainConfig
    from opnorm.training.objectives import build_objective

    with pytest.raises(TypeError, match="metric must be an instance of OutputMetric"):
        OperatorNormRegularizer(metric="softmax")
    with pytest.raises(ValueError, match="q equal to the metric's"):
        OperatorNormRegularizer(INF, 1, metric=FisherKL())
    with pytest.raises(ValueError, match="penalty=FDPenalty"):
        OperatorNormRegularizer(2, 2, metric=FisherKL(), penalty=ExactPenalty())
    with pytest.raises(ValueError, match="opnorm.output kl is a 2-norm"):
        TrainConfig(method="opnorm", q=1, opnorm={"output": "kl"}).resolved()
    with pytest.raises(ValueError, match="unknown opnorm.output"):
        TrainConfig(method="opnorm", opnorm={"output": "fisher"}).resolved()
    args = build_parser().parse_args(["train", "--method", "opnorm", "--opnorm-output", "kl"])
    cfg, _, _ = train_config_from_args(args)
    assert cfg.opnorm.output == "kl"
    assert isinstance(build_objective(cfg, nn.Linear(2, 2), num_examples=4).reg.metric, FisherKL)


# ----------------------------------------------------------------------------- CE at the fd point


@pytest.mark.parametrize("p", [INF, 2.0])
def test_perturbed_task_returns_the_fd_point_logits_and_steers_the_free_update(p):
    model, W = affine()
    eps, lam = 0.2, 0.5
    y = torch.tensor([0, 1, 2])
    index = torch.tensor([4, 0, 7])
    reg = fast_kl(p, eps, lam, clip=(0.0, 1.0), generator=gen(7))
    clean, pen, pert = reg.joint(model, X, index, perturbed=True)
    x_p = (X + eps * reg.last_v).clamp(0, 1)
    both = model(torch.cat([X, x_p]))  # one forward of [x; x_p]: bit for bit (BLAS may round f(X) alone differently)
    torch.testing.assert_close(clean, both[:3], rtol=0, atol=0)
    torch.testing.assert_close(pert, both[3:], rtol=0, atol=0)
    torch.testing.assert_close(clean, model(X), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(pert, model(x_p), rtol=1e-14, atol=1e-14)
    kl = F.kl_div(F.log_softmax(pert, 1), F.log_softmax(clean, 1), log_target=True, reduction="none").sum(1)
    torch.testing.assert_close(pen, lam * (2 * kl / eps**2).mean(), rtol=1e-12, atol=0)
    (F.cross_entropy(pert, y) + pen).backward()
    # the next direction is psi_{p*} of the input gradient of the whole loss at x_p: for f = W x + b,
    # W^T [(s_p - e_y) + 2 lam / eps^2 (s_p - s)] per row (the batch mean's 1/B drops out of psi)
    s, s_p = torch.softmax(model(X), 1), torch.softmax(model(x_p), 1)
    grad_f = (s_p - F.one_hot(y, 4).to(DT)) + 2 * lam / eps**2 * (s_p - s)
    expected = psi(grad_f.detach() @ W, dual(p))
    torch.testing.assert_close(reg.store.directions[index].to(DT), expected, rtol=1e-10, atol=1e-12)


def test_perturbed_task_in_the_trainer_and_its_validation():
    from opnorm.cli import build_parser, train_config_from_args
    from opnorm.training.config import TrainConfig
    from opnorm.training.objectives import build_objective

    with pytest.raises(ValueError, match="the exact penalty has none"):
        OperatorNormRegularizer(2, 2, penalty=ExactPenalty()).joint(affine()[0], X, perturbed=True)
    with pytest.raises(ValueError, match="unknown opnorm.task"):
        TrainConfig(method="opnorm", opnorm={"task": "adversarial"}).resolved()
    with pytest.raises(ValueError, match="opnorm.task perturbed"):
        TrainConfig(method="opnorm", opnorm={"task": "perturbed", "penalty": "exact"}).resolved()
    args = build_parser().parse_args(
        [
            "train",
            "--method",
            "opnorm",
            "--opnorm-output",
            "kl",
            "--p",
            "inf",
            "--eps",
            "0.2",
            "--lam",
            "0.5",
            "--opnorm-task",
            "perturbed",
        ]
    )
    cfg, _, _ = train_config_from_args(args)
    assert cfg.opnorm.task == "perturbed"
    model, _ = affine()
    y = torch.tensor([0, 1, 2])
    for task in ("clean", "perturbed"):
        d = cfg.to_dict()
        d["opnorm"]["task"] = task
        obj = build_objective(TrainConfig.from_dict(d).resolved(), model, num_examples=8)
        torch.manual_seed(0)
        loss, _ = obj(model, X, y, torch.tensor([4, 0, 7]))
        x_p = (X + 0.2 * obj.reg.last_v).clamp(0, 1)
        pen = obj.reg.fd_value(model(X), model(x_p))
        ce = F.cross_entropy(model(x_p if task == "perturbed" else X), y)
        torch.testing.assert_close(loss.double(), ce + pen, rtol=1e-6, atol=0)  # the trainer takes CE in float32
