"""The fast configuration of OperatorNormRegularizer: the DirectionStore and the free power iteration.

References are independent of the code under test: explicit Jacobians
(torch.autograd.functional.jacobian) or an explicit W, the (p, q) power step written out
with the duality maps of tests/reference.py, and exact norms from an SVD.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from affine_models import DT, affine_layer, gen
from torch import nn
from torch.autograd.functional import jacobian as autograd_jacobian

from opnorm.norms import lp_norm
from opnorm.power import random_unit
from opnorm.regularizers import (
    DirectionStore,
    ExactPenalty,
    FDPenalty,
    FisherKL,
    LogitNorm,
    OperatorNormRegularizer,
    PGASolver,
    mixes_examples,
)
from tests.reference import dual, psi

INF = math.inf
N = 32  # the dataset length the stores are sized for


def fast(p, q, eps, lam, *, warm_iters=1, free_update=True, generator=None, num_examples=N, **parts):
    """OperatorNormRegularizer.fast with a seeded solver: 3 iterations cold, ``warm_iters`` warm."""
    solver = PGASolver(3, warm_iters, free_update=free_update, generator=generator)
    return OperatorNormRegularizer.fast(p, q, eps, lam, num_examples=num_examples, solver=solver, **parts)


def affine(d=5, n=12, seed=0):
    lin, W = affine_layer(d, n, seed)
    return nn.Sequential(nn.Flatten(), lin), W


def relu_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5)
    ).double()


def explicit_J(model, x):
    """(B, d, n) per-example Jacobians, one autograd.functional.jacobian call per example."""
    d = model(x[:1]).shape[1]
    return torch.stack(
        [
            autograd_jacobian(lambda inp: model(inp.unsqueeze(0)).squeeze(0), x[b]).reshape(d, -1)
            for b in range(x.shape[0])
        ]
    )


def power_step(J, v, p, q):
    """One (p, q) power iteration on explicit J (B, d, n): v (B, n) -> psi_{p*}(J^T psi_q(J v))."""
    u = psi(torch.einsum("bdn,bn->bd", J, v), q)
    return psi(torch.einsum("bdn,bd->bn", J, u), dual(p))


def visit(reg, model, x, y, index):
    """One training-style visit: joint forward, CE + penalty, backward (no optimizer step)."""
    model.zero_grad(set_to_none=True)
    logits, pen = reg.joint(model, x, index)
    (F.cross_entropy(logits, y) + pen).backward()
    return pen


X = (
    torch.rand(4, 3, 4, generator=gen(1), dtype=DT) * 0.6 + 0.2
)  # inside (0.2, 0.8): a clip box never binds at small eps
Y = torch.tensor([0, 1, 2, 3])
INDEX = torch.tensor([5, 2, 9, 0])
PAIRS = [(INF, 2), (2, 2), (INF, 1), (2, 3), (1, 2), (3, INF)]


# ----------------------------------------------------------------------------- the free update


@pytest.mark.parametrize("p,q", PAIRS)
def test_free_update_is_one_power_step_on_affine_model(p, q):
    model, W = affine()
    reg = fast(p, q, 0.3, 0.5, generator=gen(2))
    visit(reg, model, X, Y, INDEX)  # cold: 3 explicit iterations, then the free step
    v = reg.last_v.reshape(4, -1)
    expected = power_step(W.expand(4, -1, -1), v, p, q)
    torch.testing.assert_close(reg.store.directions[INDEX].to(DT).reshape(4, -1), expected, rtol=1e-10, atol=1e-12)
    assert bool(reg.store.seen[INDEX].all()) and int(reg.store.seen.sum()) == 4


@pytest.mark.parametrize("p,q", [(INF, 2), (2, 2), (2, 1)])
def test_free_update_is_one_power_step_on_relu_net_inside_linear_region(p, q):
    model = relu_net(1)
    eps = 1e-6  # x + eps v stays in x's linear region (checked below)
    reg = fast(p, q, eps, 0.5, generator=gen(3))
    visit(reg, model, X, Y, INDEX)
    v = reg.last_v
    x_p = X + eps * v
    pattern = lambda inp: [(h > 0) for h in _activations(model, inp)]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(pattern(X), pattern(x_p)))
    expected = power_step(explicit_J(model, X), v.reshape(4, -1), p, q)
    got = reg.store.directions[INDEX].to(DT).reshape(4, -1)
    if p == INF:
        torch.testing.assert_close(got, expected)  # signs: exact
    else:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)  # the fd difference costs digits


def _activations(model, x):
    outs, h = [], x
    for m in model:
        h = m(h)
        if isinstance(m, nn.ReLU):
            outs.append(h)
    return outs


def test_free_update_with_clip_is_the_projected_step():
    """With the box, the fd point is clip(x + eps v) and the update psi(W^T psi_q(W (x_p - x)))."""
    model, W = affine()
    x = torch.rand(4, 3, 4, generator=gen(4), dtype=DT)  # many coordinates near the box faces
    reg = fast(INF, 2, 0.3, 0.5, clip=(0.0, 1.0), generator=gen(2))
    for _ in range(2):  # a cold visit, then a warm one
        visit(reg, model, x, Y, INDEX)
        delta = ((x + 0.3 * reg.last_v).clamp(0, 1) - x).reshape(4, -1)
        assert bool((delta.abs() < 0.3 - 1e-12).any())  # the box did bind
        u = psi(delta @ W.T, 2)
        torch.testing.assert_close(reg.store.directions[INDEX].to(DT).reshape(4, -1), torch.sign(u @ W))
    # on a warm visit (no explicit iteration) last_sigma is the fd value of the clipped perturbation
    torch.testing.assert_close(reg.last_sigma, lp_norm(delta @ W.T, 2) / 0.3)


def test_free_update_leaves_the_weight_gradient_unchanged():
    model = relu_net(2)
    grads = []
    for free in (True, False):
        reg = fast(INF, 2, 0.05, 0.7, free_update=free, generator=gen(5))
        visit(reg, model, X, Y, INDEX)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("warm_iters", [0, 1])
def test_repeated_visits_follow_the_power_method(warm_iters):
    """Cold: 3 explicit iterations; each later visit: ``warm_iters`` explicit ones; after each
    penalty one free iteration. The store follows the explicit power method from the same
    start, iterate by iterate."""
    model, W = affine(seed=3)
    reg = fast(INF, 2, 0.3, 0.5, warm_iters=warm_iters, generator=gen(6))
    v0 = random_unit((4, 3, 4), INF, dtype=DT, generator=gen(6))
    iterates = [v0.reshape(4, -1)]
    for _ in range(4 + 5 * (1 + warm_iters)):
        iterates.append(power_step(W.expand(4, -1, -1), iterates[-1], INF, 2))
    for k in range(6):
        visit(reg, model, X, Y, INDEX)
        used = 3 + k * (1 + warm_iters)
        torch.testing.assert_close(reg.last_v.reshape(4, -1), iterates[used])  # the direction the penalty used
        torch.testing.assert_close(reg.store.directions[INDEX].to(DT).reshape(4, -1), iterates[used + 1])


def test_repeated_visits_converge_to_the_spectral_norm():
    model = relu_net(4)
    eps = 1e-7
    reg = fast(2, 2, eps, 1.0, generator=gen(7))
    exact = torch.linalg.matrix_norm(explicit_J(model, X), 2)  # the SVD of each explicit Jacobian
    first = None
    for _ in range(80):
        visit(reg, model, X, Y, INDEX)
        first = reg.last_sigma.clone() if first is None else first
    torch.testing.assert_close(reg.last_sigma, exact, rtol=1e-6, atol=0)
    assert bool((first < exact * (1 - 1e-4)).any())  # it did need the visits


# ----------------------------------------------------------------------------- the store


def test_store_fills_by_index_and_keeps_dtypes():
    model = relu_net()
    reg = fast(INF, 2, 0.1, 0.1, generator=gen(), num_examples=11)
    assert reg.store.directions.numel() == 0
    visit(reg, model, X[:2], Y[:2], torch.tensor([3, 1]))
    assert reg.store.directions.shape == (11, 3, 4) and reg.store.directions.dtype == torch.int8
    assert reg.store.seen.nonzero().squeeze(1).tolist() == [1, 3]
    old = reg.store.directions.clone()
    visit(reg, model, X[2:], Y[2:], torch.tensor([10, 0]))
    assert reg.store.directions.shape == (11, 3, 4) and reg.store.seen.nonzero().squeeze(1).tolist() == [0, 1, 3, 10]
    assert torch.equal(reg.store.directions[[1, 3]], old[[1, 3]])  # rows not visited are kept
    assert set(reg.store.directions[reg.store.seen].unique().tolist()) <= {-1, 0, 1}
    assert not bool(reg.store.directions[~reg.store.seen].any())
    reg2 = fast(2, 2, 0.1, 0.1, generator=gen(), num_examples=10)
    visit(reg2, model, X, Y, INDEX)
    assert reg2.store.directions.dtype == DT and reg2.store.directions.shape == (10, 3, 4)
    torch.testing.assert_close(lp_norm(reg2.store.directions[INDEX], 2), torch.ones(4, dtype=DT))


def test_store_state_dict_round_trip(tmp_path):
    from opnorm.training.checkpoint import load_checkpoint, save_checkpoint

    model = relu_net()
    reg = fast(INF, 2, 0.1, 0.1, generator=gen())
    visit(reg, model, X, Y, INDEX)
    save_checkpoint(tmp_path / "c.pt", {"reg": reg.state_dict()})
    fresh = fast(INF, 2, 0.1, 0.1)
    fresh.load_state_dict(load_checkpoint(tmp_path / "c.pt")["reg"])
    assert torch.equal(fresh.store.directions, reg.store.directions) and torch.equal(fresh.store.seen, reg.store.seen)
    assert fresh.store.directions.dtype == torch.int8
    torch.testing.assert_close(fresh.initial_vectors(X, INDEX), reg.store.directions[INDEX].to(DT))
    # a state of the previous format ("bank" / "seen" rows up to the largest index seen) loads into the store
    bank, seen = reg.store.directions[:10].clone(), reg.store.seen[:10].clone()
    older = fast(INF, 2, 0.1, 0.1)
    older.load_state_dict({"bank": bank, "seen": seen})
    assert torch.equal(older.store.directions, reg.store.directions) and torch.equal(older.store.seen, reg.store.seen)
    empty = fast(INF, 2, 0.1, 0.1)
    empty.load_state_dict({"bank": torch.zeros(0), "seen": torch.zeros(0, dtype=torch.bool)})
    assert empty.store.directions.numel() == 0 and not bool(empty.store.seen.any())
    with pytest.raises(ValueError, match="more than this store's 4"):
        fast(INF, 2, 0.1, 0.1, num_examples=4).load_state_dict({"bank": bank, "seen": seen})


def test_store_errors():
    model = relu_net()
    reg = fast(INF, 2, 0.1, 0.1)
    with pytest.raises(ValueError, match="index must be a 1-D integer tensor"):
        reg.joint(model, X, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="index must be a 1-D integer tensor"):
        reg.joint(model, X, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="index -1 is out of range"):
        reg.joint(model, X, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match=f"index {N} is out of range for a DirectionStore of {N} examples"):
        reg.joint(model, X, torch.tensor([0, N, 2, 3]))
    reg.joint(model, X, INDEX)
    # examples of another shape are refused when the stored directions are looked up
    with pytest.raises(ValueError, match="use one store per dataset"):
        reg.joint(nn.Sequential(nn.Flatten(), nn.Linear(6, 5)).double(), X[:, :, :2].contiguous(), INDEX)
    with pytest.raises(ValueError, match="use one store per dataset"):
        reg.initial_vectors(X.reshape(4, 4, 3), INDEX)


def test_non_finite_or_zero_gradients_keep_the_stored_direction():
    model = relu_net()
    reg = fast(INF, 2, 0.1, 0.5, generator=gen())
    visit(reg, model, X, Y, INDEX)
    logits, pen = reg.joint(model, X, INDEX)
    before = reg.store.directions.clone()
    (pen * math.inf).backward()  # e.g. an fp16 overflow under a GradScaler
    assert torch.equal(reg.store.directions, before)
    zero = fast(INF, 2, 0.1, 0.0, warm_iters=0, generator=gen())  # lam = 0: no gradient
    visit(zero, model, X, Y, INDEX)
    stored = zero.store.directions.clone()
    visit(zero, model, X, Y, INDEX)
    assert torch.equal(zero.store.directions, stored)


def test_trainer_checkpoint_holds_the_store_and_resume_is_bit_identical(tmp_path):
    from opnorm.training.checkpoint import load_checkpoint
    from opnorm.training.config import TrainConfig
    from opnorm.training.trainer import CHECKPOINT, train

    kw = dict(
        dataset="digits",
        model="cnn",
        method="opnorm",
        p="inf",
        eps=0.1,
        epochs=2,
        limit_train=96,
        limit_test=20,
        eval_points=10,
        eval_steps=2,
        batch_size=32,
        seed=5,
        progress=False,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = train(TrainConfig(out=str(tmp_path / "full"), **kw))
        train(TrainConfig(out=str(tmp_path / "split"), **kw), stop_after=1)
        first = load_checkpoint(tmp_path / "split" / CHECKPOINT)["objective"]
        resumed = train(TrainConfig(out=str(tmp_path / "split"), **kw), resume=True)
    finally:
        torch.set_num_threads(threads)
    assert first["reg.store.directions"].shape == (96, 1, 8, 8) and bool(first["reg.store.seen"].all())
    a = load_checkpoint(tmp_path / "full" / CHECKPOINT)["objective"]
    b = load_checkpoint(tmp_path / "split" / CHECKPOINT)["objective"]
    bank = "reg.store.directions"
    assert torch.equal(a[bank], b[bank]) and not torch.equal(a[bank], first[bank])
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


# ----------------------------------------------------------------------------- fallbacks and modes


def bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)).double()
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.rand(16, 3, 4, dtype=DT))
    return net


def test_batchnorm_in_training_mode_keeps_the_free_update():
    """Train-mode BatchNorm mixes examples, but the penalty normalizes x + eps v with the clean
    batch's statistics, so the input gradient at x + eps v is per example and the free step runs
    (its value against explicit Jacobians: tests/test_batchnorm.py)."""
    net = bn_net().train()
    assert mixes_examples(net) and not mixes_examples(bn_net().eval())
    reg = fast(2, 2, 0.05, 0.5, generator=gen(8))
    visit(reg, net, X, Y, INDEX)
    assert not torch.allclose(reg.store.directions[INDEX].to(DT), reg.last_v)


def test_exact_penalty_uses_one_explicit_iteration_on_warm_visits():
    model, W = affine()
    reg = fast(2, 2, 0.1, 0.5, penalty=ExactPenalty(), generator=gen(9))
    assert reg.solver.warm_iters == 1
    visit(reg, model, X, Y, INDEX)
    stored = reg.store.directions[INDEX].clone()
    visit(reg, model, X, Y, INDEX)
    torch.testing.assert_close(reg.last_v.reshape(4, -1), power_step(W.expand(4, -1, -1), stored.reshape(4, -1), 2, 2))


def test_direction_measures_warm_examples_without_iterating():
    model, W = affine()
    reg = fast(2, 2, 0.1, 0.5, warm_iters=0, generator=gen(10))
    visit(reg, model, X, Y, INDEX)
    v = reg.store.directions[INDEX].clone()
    res = reg.direction(model, X, INDEX)
    assert res.iterations == 0
    torch.testing.assert_close(res.v, v)
    torch.testing.assert_close(res.sigma, lp_norm(v.reshape(4, -1) @ W.T, 2))
    # a batch mixing warm and cold examples: the cold ones run `iters` iterations
    res = reg.direction(model, X, torch.tensor([5, 2, 30, 31]))
    assert res.iterations == 3 and bool(reg.store.seen[[30, 31]].all())
    torch.testing.assert_close(res.v[:2], v[:2])


@pytest.mark.parametrize("p,q,dynamic", [(2, 2, False), (INF, 2, False), (INF, 2, True)])
def test_paper_mode_is_ten_power_steps_on_explicit_jacobians(p, q, dynamic):
    """Paper mode: 10 iterations from random starts, nothing kept: the power step on the explicit
    Jacobian at x (at x + eps v_{k-1} when dynamic), with psi written out."""
    model = relu_net(5)
    x = torch.rand(5, 3, 4, generator=gen(11), dtype=DT)
    eps, lam = 0.05, 0.3
    default = OperatorNormRegularizer.paper(p, q, eps, lam)
    s = default.solver
    assert default.store is None and (s.iters, s.warm_iters, s.free_update, s.dynamic, s.step) == (
        10,
        10,
        False,
        False,
        INF,
    )
    assert isinstance(default.penalty, FDPenalty) and default.penalty.squared and default.clip is None
    reg = OperatorNormRegularizer.paper(p, q, eps, lam, solver=PGASolver(10, dynamic=dynamic, generator=gen(12)))
    logits, pen = reg.joint(model, x, torch.arange(5))
    assert reg.store is None  # nothing kept
    v = random_unit(tuple(x.shape), p, dtype=DT, generator=gen(12)).reshape(5, -1)  # the documented start
    J = explicit_J(model, x)
    for _ in range(10):
        v = power_step(explicit_J(model, x + eps * v.reshape(x.shape)) if dynamic else J, v, p, q)
    v = v.reshape(x.shape)
    torch.testing.assert_close(reg.last_v, v, rtol=1e-12, atol=1e-14)
    s = lp_norm(model(x + eps * v) - model(x), q) / eps
    torch.testing.assert_close(pen, lam * (s**2).mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(logits, model(x))


def test_factory_defaults_and_validation():
    fast_reg = OperatorNormRegularizer.fast(num_examples=8)
    s = fast_reg.solver
    assert (s.iters, s.warm_iters, s.free_update, s.dynamic, s.step) == (3, 1, True, False, INF)
    assert fast_reg.store.num_examples == 8 and fast_reg.clip is None and isinstance(fast_reg.metric, LogitNorm)
    robust = OperatorNormRegularizer.fast_robust(num_examples=8)
    s = robust.solver
    assert (s.iters, s.warm_iters, s.free_update, s.dynamic, s.step) == (1, 2, True, True, 0.25)
    assert (robust.clip, robust.store.num_examples) == ((0.0, 1.0), 8) and isinstance(robust.metric, FisherKL)
    # one signature and the constructor's defaults for all three factories
    paper = OperatorNormRegularizer.paper()
    for reg in (paper, fast_reg, robust, OperatorNormRegularizer()):
        assert (reg.p, reg.q, reg.eps, reg.lam) == (2.0, 2.0, 0.1, 1.0)
    for factory in (OperatorNormRegularizer.paper, OperatorNormRegularizer.fast, OperatorNormRegularizer.fast_robust):
        reg = factory("inf", 2, eps=0.2, lam=0.06, num_examples=10)
        assert (reg.p, reg.q, reg.eps, reg.lam) == (INF, 2.0, 0.2, 0.06)
        assert factory(2, 2, 0.1, 0.5, num_examples=10).lam == 0.5
    with pytest.raises(ValueError, match="q"):
        OperatorNormRegularizer.fast_robust("inf", 1, num_examples=8)  # the KL metric measures in l_2
    for factory in (OperatorNormRegularizer.fast, OperatorNormRegularizer.fast_robust):
        with pytest.raises(TypeError, match="num_examples"):
            factory()  # the store is sized from the dataset
        assert factory(store=None).store is None  # or explicitly none
    assert PGASolver(10).warm_iters == 10  # without warm_iters, stored directions get all iterations too
    for kwargs, match in [(dict(clip=(1, 0)), "clip"), (dict(clip="box"), "clip")]:
        with pytest.raises((ValueError, TypeError), match=match):
            OperatorNormRegularizer(**kwargs)
    for kwargs, match in [(dict(warm_iters=-1), "warm_iters"), (dict(route="fast"), "route")]:
        with pytest.raises((ValueError, TypeError), match=match):
            PGASolver(**kwargs)
    with pytest.raises(ValueError, match="num_examples"):
        DirectionStore(0)


def test_config_and_cli_expose_the_mode():
    from opnorm.cli import build_parser, train_config_from_args
    from opnorm.training.config import TrainConfig
    from opnorm.training.objectives import build_objective

    fast_cfg = TrainConfig(method="opnorm").resolved()
    o = fast_cfg.opnorm
    assert (o.mode, o.iters, o.warm_iters, o.clip, o.free_update) == ("fast", 3, 1, True, True)
    paper = TrainConfig(method="opnorm", opnorm={"mode": "paper"}).resolved()
    assert (paper.opnorm.iters, paper.opnorm.warm_iters, paper.opnorm.clip, paper.opnorm.free_update) == (
        10,
        10,
        False,
        False,
    )
    with pytest.raises(ValueError, match="unknown opnorm.mode 'slow'"):
        TrainConfig(method="opnorm", opnorm={"mode": "slow"}).resolved()
    reg = build_objective(paper, nn.Linear(2, 2)).reg
    assert reg.store is None and reg.clip is None and reg.solver.iters == 10 and not reg.solver.free_update
    with pytest.raises(ValueError, match="num_examples"):
        build_objective(fast_cfg, nn.Linear(2, 2))
    reg = build_objective(fast_cfg, nn.Linear(2, 2), num_examples=10).reg
    assert reg.store.num_examples == 10 and reg.clip == (0.0, 1.0) and reg.solver.warm_iters == 1
    assert reg.solver.free_update
    args = build_parser().parse_args(
        ["train", "--method", "opnorm", "--opnorm-mode", "paper", "--opnorm-iters", "7", "--no-opnorm-clip"]
    )
    cfg, _, _ = train_config_from_args(args)
    o = cfg.opnorm
    assert (o.mode, o.iters, o.warm_iters, o.clip) == ("paper", 7, 7, False)
