"""PGASolver(step=...): finite PGA steps for the direction, kept in the DirectionStore.

References are written out independently on float64 affine models f(x) = W x + b, where
every gradient has a closed form: projections onto the l_inf ball by clamping, onto the
l_2 ball by rescaling, onto the pixel box by clamping x + eps v.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from affine_models import DT, affine_layer, gen
from torch import nn

from opnorm.regularizers import FisherKL, OperatorNormRegularizer, PGASolver

INF = math.inf
X = torch.rand(3, 10, generator=gen(11), dtype=DT)
INDEX = torch.tensor([2, 0, 5])


def fast(p, eps, lam=1.0, *, step, iters=3, warm_iters=1, free_update=True, dynamic=False, generator=None, **parts):
    """The fast configuration (a store of 8 examples) with a finite-step solver."""
    solver = PGASolver(iters, warm_iters, step=step, dynamic=dynamic, free_update=free_update, generator=generator)
    return OperatorNormRegularizer.fast(p, 2, eps, lam, num_examples=8, solver=solver, **parts)


def ascent(g: torch.Tensor, p: float) -> torch.Tensor:
    """argmax_{||a||_p <= 1} <a, g> per row, for p in {2, inf}."""
    return torch.sign(g) if p == INF else g / g.norm(dim=1, keepdim=True)


def project(v: torch.Tensor, p: float) -> torch.Tensor:
    """onto the unit l_p ball, p in {2, inf}."""
    return v.clamp(-1, 1) if p == INF else v / v.norm(dim=1, keepdim=True).clamp_min(1.0)


def leaves_the_ball(v: torch.Tensor, p: float) -> bool:
    """Some row of v lies outside the unit l_p ball (so the projection under test has work to do)."""
    return bool((v.abs().amax(dim=1) if p == INF else v.norm(dim=1)).gt(1 + 1e-6).any())


def box(v: torch.Tensor, eps: float) -> torch.Tensor:
    """v such that x + eps v is x + eps v clamped into [0, 1]."""
    return ((X + eps * v).clamp(0, 1) - X) / eps


def start(p: float) -> torch.Tensor:
    v = torch.randn(3, 10, generator=gen(12), dtype=DT)
    return torch.sign(v) * 0.6 if p == INF else 0.7 * v / v.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("p", [INF, 2.0])
@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
def test_free_update_is_one_projected_step_along_the_penalty_gradient(p, clip):
    model, W = affine_layer(4, 10)
    eps, lam, step = 0.2, 0.5, 0.6
    reg = fast(p, eps, lam, step=step, warm_iters=0, clip=clip)
    v0 = start(p)
    reg.store.put(INDEX, v0)
    assert reg.store.directions.dtype == DT  # a PGA iterate is not a sign vector: no int8 store
    logits, pen = reg.joint(model, X, INDEX)
    torch.testing.assert_close(reg.last_v, v0)  # warm_iters=0: the stored iterate is the point
    d = (X + eps * v0).clamp(0, 1) - X if clip else eps * v0
    # penalty lam * mean ||W d||^2 / eps^2: its input gradient at x_p is (2 lam / (B eps^2)) W^T W d
    torch.testing.assert_close(pen, lam * ((d @ W.T) ** 2).sum(1).mean() / eps**2, rtol=1e-12, atol=0)
    pen.backward()
    raw = v0 + step * ascent(d @ W.T @ W, p)
    assert leaves_the_ball(raw, p)
    expected = project(raw, p)
    if clip:
        expected = box(expected, eps)
    torch.testing.assert_close(reg.store.directions[INDEX], expected, rtol=1e-12, atol=1e-14)
    assert bool((reg.store.directions[INDEX].flatten(1).norm(p=p, dim=1) <= 1 + 1e-12).all())


@pytest.mark.parametrize("p", [INF, 2.0])
def test_explicit_iteration_is_one_projected_step_of_the_linear_model(p):
    model, W = affine_layer(4, 10)
    eps, step = 0.2, 0.6
    reg = fast(p, eps, step=step, warm_iters=1, free_update=False)
    v0 = start(p)
    reg.store.put(INDEX, v0)
    reg.joint(model, X, INDEX)
    # the linear model's logit-loss gradient at v0: J^T psi_2(J v0), J = W
    jv = v0 @ W.T
    raw = v0 + step * ascent((jv / jv.norm(dim=1, keepdim=True)) @ W, p)
    assert leaves_the_ball(raw, p)
    expected = project(raw, p)
    torch.testing.assert_close(reg.last_v, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(reg.store.directions[INDEX], expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("p", [INF, 2.0])
def test_a_huge_step_lands_on_the_power_method(p):
    # PAPER.md section 4: as the step grows the projection of the step lands on the sphere, at
    # the power method's next iterate (for p = inf already at step 2: |v| <= 1 and the step 2 sign)
    model, _ = affine_layer(4, 10)
    banks = []
    for step in (None, 2.0 if p == INF else 1e9):
        reg = fast(p, 0.2, step=step, iters=2, dynamic=True, metric=FisherKL(), generator=gen(13))
        logits, pen = reg.joint(model, X, INDEX)
        (F.cross_entropy(logits, torch.tensor([0, 1, 2])) + pen).backward()
        banks.append(reg.store.directions[INDEX].to(DT))
    torch.testing.assert_close(banks[1], banks[0], rtol=1e-6, atol=1e-8)


def test_explicit_iteration_with_clip_keeps_the_point_in_the_box():
    model, W = affine_layer(4, 10)
    eps, step = 0.2, 0.6
    reg = fast(INF, eps, step=step, warm_iters=1, free_update=False, clip=(0.0, 1.0))
    v0 = start(INF)
    reg.store.put(INDEX, v0)
    reg.joint(model, X, INDEX)
    jv = v0 @ W.T  # the step follows the linearization at x; then the l_inf ball, then the box
    raw = v0 + step * ascent((jv / jv.norm(dim=1, keepdim=True)) @ W, INF)
    assert leaves_the_ball(raw, INF)
    expected = box(project(raw, INF), eps)
    assert not torch.allclose(expected, project(raw, INF))
    torch.testing.assert_close(reg.last_v, expected, rtol=1e-12, atol=1e-14)


def test_step_validation_config_and_cli():
    from opnorm.cli import build_parser, train_config_from_args
    from opnorm.training.config import TrainConfig
    from opnorm.training.objectives import build_objective

    for bad, match in (
        (0.0, "step must be > 0"),
        (-0.5, "step must be > 0"),
        (math.nan, "step must be a finite number"),
        (True, "step must be a number"),
        ("big", "step must be a number"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            PGASolver(step=bad)
    with pytest.raises(ValueError, match="p in 1, 2, inf"):
        OperatorNormRegularizer(3, 2, solver=PGASolver(step=0.5))
    OperatorNormRegularizer(3, 2, solver=PGASolver(step=INF))  # the power method works for every p
    with pytest.raises(ValueError, match="opnorm.step must be > 0"):
        TrainConfig(method="opnorm", opnorm={"step": 0}).resolved()
    with pytest.raises(ValueError, match="opnorm.step projects onto the l_p ball"):
        TrainConfig(method="opnorm", p=3, eps=0.1, opnorm={"step": 0.5}).resolved()
    args = build_parser().parse_args(["train", "--method", "opnorm", "--p", "inf", "--opnorm-step", "0.5"])
    cfg, _, _ = train_config_from_args(args)
    assert cfg.opnorm.step == 0.5
    reg = build_objective(cfg, nn.Linear(2, 2), num_examples=4).reg
    assert reg.solver.step == 0.5 and "step=0.5" in repr(reg)
    assert OperatorNormRegularizer().solver.step == INF and PGASolver(step=None).step == INF


def test_finite_step_training_resumes_exactly(tmp_path):
    from opnorm import TrainConfig, train

    cfg = TrainConfig(
        method="opnorm",
        p="inf",
        eps=0.1,
        lam=0.05,
        opnorm={"output": "kl", "task": "perturbed", "step": 0.5, "dynamic": True},
        epochs=2,
        batch_size=64,
        limit_train=256,
        limit_test=64,
        eval_points=32,
        eval_steps=2,
        model="mlp",
        out=str(tmp_path / "a"),
        progress=False,
    )
    whole = train(cfg)
    train(cfg.replace(out=str(tmp_path / "b")), stop_after=1)
    resumed = train(cfg.replace(out=str(tmp_path / "b")), resume=True)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["objective"]
    bank = state["reg.store.directions"]
    assert bank.is_floating_point() and bool(state["reg.store.seen"].all())
    assert float(bank.abs().max()) <= 1 + 1e-6 and float((bank.abs() < 1 - 1e-6).float().mean()) > 0.05
