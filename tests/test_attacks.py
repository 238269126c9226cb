"""opnorm.pgd: the theorem on affine models, torchattacks parity, properties, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import opnorm
from opnorm import losses
from opnorm.training.trainer import robust_accuracy

INF = math.inf


def _mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 5)).to(dtype).eval()


def _inputs(batch: int = 6, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, 4, 4, generator=g, dtype=dtype), torch.randint(0, 5, (batch,), generator=g)


def _norm(z: torch.Tensor, p: float) -> torch.Tensor:
    return torch.linalg.vector_norm(z.flatten(1), ord=p, dim=1)


# --------------------------------------------------------------------------- the theorem


def _psi(z: torch.Tensor, r: float) -> torch.Tensor:
    """Duality map written out for r in {1, 2, inf}, rows of z (no ties in random data)."""
    if r == 2:
        return z / z.norm(dim=1, keepdim=True)
    if r == 1:
        return torch.sign(z)
    return F.one_hot(z.abs().argmax(dim=1), z.shape[1]).to(z.dtype) * torch.sign(z)


@pytest.mark.parametrize("p,q", [(2, 2), (INF, 2), (INF, INF), (2, 1), (INF, 1), (1, 2)])
def test_infinite_step_pga_is_the_power_method_on_an_affine_model(p, q):
    """delta_k / eps == v_k of u = psi_q(W v), v = psi_{p*}(W^T u), with W the explicit matrix."""
    torch.manual_seed(3)
    lin = nn.Linear(48, 6).double()
    model = nn.Sequential(nn.Flatten(), lin)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    eps, steps = 0.7, 8
    start = torch.randn(5, 48, generator=g, dtype=torch.float64)
    delta0 = (eps * start / _norm(start, p)[:, None]).reshape(x.shape)
    ascent = opnorm.attacks.Ascent(
        model, x, eps=eps, p=p, loss=losses.logit_loss(q), steps=steps, step_size=INF, clip=None
    )
    deltas = ascent.run(delta0, history=True).history
    assert len(deltas) == steps
    W = lin.weight.detach()
    p_star = {1: INF, 2: 2, INF: 1}[p]
    v = delta0.reshape(5, -1) / eps
    for k in range(steps):
        u = _psi(v @ W.T, q)
        v = _psi(u @ W, p_star)
        got = deltas[k].reshape(5, -1)
        assert (got / eps - v).abs().max() < 1e-10, f"iterate {k + 1}"
        value = _norm(model(x + deltas[k]) - model(x), q)
        assert (value - eps * _norm(v @ W.T, q)).abs().max() < 1e-10
    torch.testing.assert_close(ascent.adversarial(deltas[-1]), x + deltas[-1], rtol=0, atol=0)


# --------------------------------------------------------------------------- torchattacks parity


def _robust_acc(model, x_adv, y) -> float:
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item() * 100


@pytest.mark.parametrize("p,eps,alpha", [(INF, 0.1, 0.025), (2, 0.5, 0.125)])
def test_cross_entropy_pgd_is_as_strong_as_torchattacks(trained_digits_model, p, eps, alpha):
    """Same eps, step size and steps; independent random starts; all 1797 digits to keep noise low."""
    torchattacks = pytest.importorskip("torchattacks")
    d = trained_digits_model
    assert d.clean_acc > 90
    x, y = d.x_all, d.y_all
    Ref = torchattacks.PGD if p == INF else torchattacks.PGDL2
    ours, theirs = [], []
    for seed in range(5):
        torch.manual_seed(seed)  # torchattacks draws its start from the global generator
        theirs.append(_robust_acc(d.model, Ref(d.model, eps=eps, alpha=alpha, steps=10)(x, y), y))
        gen = torch.Generator().manual_seed(1000 + seed)
        adv = opnorm.pgd(d.model, x, y, eps=eps, p=p, step_size=alpha, steps=10, random_start=gen)
        ours.append(_robust_acc(d.model, adv, y))
    mean_ours, mean_theirs = sum(ours) / 5, sum(theirs) / 5
    print(
        f"\nl_{p} eps={eps}: robust acc ours {[round(a, 2) for a in ours]} (mean {mean_ours:.2f}), "
        f"torchattacks {[round(a, 2) for a in theirs]} (mean {mean_theirs:.2f})"
    )
    assert 30 <= mean_theirs <= 70, "eps should give an intermediate robust accuracy"
    assert abs(ours[0] - theirs[0]) <= 2.0
    assert mean_ours <= mean_theirs + 0.5


def test_deterministic_pgd_matches_torchattacks_iterate_for_iterate(trained_digits_model):
    torchattacks = pytest.importorskip("torchattacks")
    d = trained_digits_model
    theirs = torchattacks.PGD(d.model, eps=0.08, alpha=0.02, steps=10, random_start=False)(d.x, d.y)
    ours = opnorm.pgd(d.model, d.x, d.y, eps=0.08, step_size=0.02, steps=10, random_start=False)
    assert (ours - theirs).abs().max() < 1e-6
    # PGDL2 adds 1e-10 to gradient norms; that matters where the mean-loss gradient is ~1e-9
    theirs = torchattacks.PGDL2(d.model, eps=0.5, alpha=0.125, steps=10, random_start=False, eps_for_division=1e-30)(
        d.x, d.y
    )
    ours = opnorm.pgd(d.model, d.x, d.y, eps=0.5, p=2, step_size=0.125, steps=10, random_start=False)
    assert (ours - theirs).abs().max() < 1e-5


# --------------------------------------------------------------------------- properties

MODEL = _mlp(0)


@settings(max_examples=40, deadline=None)
@given(
    p=st.sampled_from([1, 2, INF]),
    loss=st.sampled_from(["ce", "cw", "logit", "kl"]),
    eps=st.floats(0.01, 2.0),
    steps=st.integers(1, 4),
    step=st.sampled_from([None, INF, 0.05, 1.0]),
    clip=st.sampled_from([(0.0, 1.0), None]),
    seed=st.integers(0, 2**16),
)
def test_outputs_stay_in_the_ball_and_the_box(p, loss, eps, steps, step, clip, seed):
    x, y = _inputs(seed=seed)
    out = opnorm.pgd(
        MODEL,
        x,
        y,
        eps=eps,
        p=p,
        loss=loss,
        steps=steps,
        step_size=step,
        clip=clip,
        random_start=torch.Generator().manual_seed(seed),
    )
    assert out.shape == x.shape and not out.requires_grad
    assert (_norm(out - x, p) <= eps * (1 + 1e-6)).all()
    if clip is not None:
        assert out.min() >= 0.0 and out.max() <= 1.0


@settings(max_examples=25, deadline=None)
@given(p=st.sampled_from([1, 2, INF]), loss=st.sampled_from(["ce", "cw", "logit", "kl"]), seed=st.integers(0, 2**16))
def test_restarts_never_return_a_weaker_point_than_the_first_run(p, loss, seed):
    x, y = _inputs(batch=8, seed=seed)
    kw = dict(loss=loss, steps=3)
    single = opnorm.pgd(MODEL, x, y, eps=0.3, p=p, random_start=torch.Generator().manual_seed(seed), **kw)
    multi = opnorm.EvalPGD(restarts=3, best_iterate=False, **kw)(
        MODEL, x, y, eps=0.3, p=p, random_start=torch.Generator().manual_seed(seed)
    )
    fn = losses.get_loss(loss).fn
    with torch.no_grad():
        clean = MODEL(x)
        a, b = MODEL(single), MODEL(multi)
        la, lb = fn(a, clean, y), fn(b, clean, y)
    if loss in ("ce", "cw"):  # fooling first, then the loss
        fa, fb = a.argmax(1) != y, b.argmax(1) != y
        assert (fb >= fa).all()
        same = fa == fb
        assert (lb[same] >= la[same] - 1e-12).all()
    else:
        assert (lb >= la - 1e-12).all()


def test_restarts_prefer_a_fooling_point_over_a_higher_loss():
    """A loss whose maximum is not a fooling point: restarts keep the fooling run."""
    torch.manual_seed(0)
    model = _mlp(1)
    x, y = _inputs(batch=16, seed=5)
    kw = dict(eps=0.4, p=INF, loss="ce", steps=2, step_size=0.01)
    runs = [opnorm.pgd(model, x, y, random_start=torch.Generator().manual_seed(s), **kw) for s in range(4)]
    attack = opnorm.EvalPGD(loss="ce", steps=2, step_size=0.01, restarts=4, best_iterate=False)
    best = attack(model, x, y, eps=0.4, p=INF, random_start=torch.Generator().manual_seed(0))
    one_run = opnorm.EvalPGD(loss="ce", steps=2, step_size=0.01, best_iterate=False)
    # restart r of the multi run starts where the r-th draw of generator 0 lands: recompute them
    g = torch.Generator().manual_seed(0)
    seq = []
    for _ in range(4):
        start = opnorm.attacks.random_in_ball(x, INF, 0.4, g)
        seq.append(one_run(model, x, y, eps=0.4, p=INF, delta0=start))
    with torch.no_grad():
        fooled = torch.stack([model(r).argmax(1) != y for r in seq])  # (4, B)
        loss = torch.stack([F.cross_entropy(model(r), y, reduction="none") for r in seq])
        best_fooled = model(best).argmax(1) != y
        best_loss = F.cross_entropy(model(best), y, reduction="none")
    assert torch.equal(best_fooled, fooled.any(0))
    # where some run fools, the kept loss is the best among fooling runs
    masked = torch.where(fooled, loss, torch.full_like(loss, -INF)).amax(0)
    expect = torch.where(fooled.any(0), masked, loss.amax(0))
    torch.testing.assert_close(best_loss, expect)
    assert len(runs) == 4


@pytest.mark.parametrize("p", [1, 2, INF])
def test_random_start_moves_the_start_point_and_is_reproducible(p):
    x, y = _inputs(batch=32)
    eps = 0.2
    moved = opnorm.pgd(MODEL, x, y, eps=eps, p=p, steps=0, clip=None, random_start=torch.Generator().manual_seed(1))
    assert (_norm(moved - x, p) > 0).all() and (_norm(moved - x, p) <= eps * (1 + 1e-9)).all()
    again = opnorm.pgd(MODEL, x, y, eps=eps, p=p, steps=0, clip=None, random_start=torch.Generator().manual_seed(1))
    other = opnorm.pgd(MODEL, x, y, eps=eps, p=p, steps=0, clip=None, random_start=torch.Generator().manual_seed(2))
    assert torch.equal(moved, again) and not torch.equal(moved, other)
    with pytest.raises(ValueError, match="steps 0 without a random start"):
        opnorm.pgd(MODEL, x, y, eps=eps, p=p, steps=0, random_start=False)


@pytest.mark.parametrize("p", [1, 2, INF])
def test_random_start_distribution(p):
    """l_inf: uniform coordinates; l_2 / l_1: radius eps * U(0, 1), direction symmetric."""
    x = torch.zeros(4000, 16, dtype=torch.float64)
    d = opnorm.attacks.random_in_ball(x, p, 0.5, torch.Generator().manual_seed(0))
    if p == INF:
        assert d.abs().max() <= 0.5
        assert abs(d.mean().item()) < 0.01 and abs(d.var().item() - 0.25 / 3) < 0.002
    else:
        r = _norm(d, p) / 0.5
        assert r.max() <= 1 + 1e-12 and abs(r.mean().item() - 0.5) < 0.02 and abs(r.var().item() - 1 / 12) < 0.01
        unit = d / _norm(d, p)[:, None]
        assert unit.mean(0).abs().max() < 0.02  # 5 standard errors


def test_targeted_attack_lowers_the_target_loss(trained_digits_model):
    d = trained_digits_model
    t = (d.y + 1) % 10
    for p, eps in ((INF, 0.05), (2, 0.3), (1, 2.0)):
        adv = opnorm.pgd(
            d.model,
            d.x,
            t,
            eps=eps,
            p=p,
            loss=losses.targeted("ce"),
            steps=5,
            random_start=torch.Generator().manual_seed(0),
        )
        with torch.no_grad():
            before = F.cross_entropy(d.model(d.x), t, reduction="none")
            after = F.cross_entropy(d.model(adv), t, reduction="none")
        assert (after < before).all(), p
        hit = (d.model(adv).argmax(1) == t).float().mean()
        untargeted = opnorm.pgd(d.model, d.x, d.y, eps=eps, p=p, steps=5, random_start=torch.Generator().manual_seed(0))
        assert (d.model(untargeted).argmax(1) == t).float().mean() <= hit + 0.05


@pytest.mark.parametrize("p", [1, 2, INF])
def test_per_example_eps(p):
    x, y = _inputs(batch=6)
    eps = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.4, 0.8], dtype=torch.float64)
    for step in (None, INF):
        out = opnorm.pgd(
            MODEL, x, y, eps=eps, p=p, steps=3, step_size=step, clip=None, random_start=torch.Generator().manual_seed(0)
        )
        n = _norm(out - x, p)
        assert (n <= eps * (1 + 1e-9)).all() and n[0] == 0
        if step == INF:
            torch.testing.assert_close(n, eps)


def test_batch_equals_examples_attacked_one_by_one():
    x, y = _inputs(batch=5)
    for p in (1, 2, INF):
        whole = opnorm.pgd(MODEL, x, y, eps=0.3, p=p, random_start=False, steps=4)
        parts = torch.cat(
            [opnorm.pgd(MODEL, x[i : i + 1], y[i : i + 1], eps=0.3, p=p, random_start=False, steps=4) for i in range(5)]
        )
        torch.testing.assert_close(whole, parts, rtol=0, atol=1e-12)


def test_sparse_l1_step_moves_the_top_gradient_coordinates_the_box_allows():
    W = torch.zeros(2, 16, dtype=torch.float64)
    W[0] = torch.arange(16, 0, -1, dtype=torch.float64)  # gradient of logit 0: 16, 15, ..., 1
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False).double())
    model[1].weight.data = W
    x = torch.full((1, 1, 4, 4), 0.5, dtype=torch.float64)
    x[0, 0, 0, 0] = 1.0  # the top coordinate sits at the box edge: it cannot increase
    first_logit = lambda adv, clean, y: adv[:, 0]  # noqa: E731
    sparse = opnorm.EvalPGD(loss=first_logit, steps=1, step_size=0.2, best_iterate=False, l1_fraction=2 / 16)
    out = sparse(model, x, eps=0.3, p=1, random_start=False)
    delta = (out - x).flatten()
    assert torch.allclose(delta[1:3], torch.tensor([0.1, 0.1], dtype=torch.float64))
    assert delta[0] == 0 and delta[3:].abs().sum() == 0
    # infinite step: the exact l_1 steepest ascent, a signed one-hot at the top |gradient|
    out = opnorm.pgd(model, x, eps=0.3, p=1, loss=first_logit, steps=1, step_size=INF, random_start=False, clip=None)
    expect = torch.zeros(16, dtype=torch.float64)
    expect[0] = 0.3
    torch.testing.assert_close((out - x).flatten(), expect)


def test_history_and_one_forward_per_step():
    x, y = _inputs()
    calls = []
    handle = MODEL.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        adv, hist = opnorm.EvalPGD(loss="logit", steps=5, best_iterate=False, clip=None)(
            MODEL, x, y, eps=0.3, p=2, return_history=True, random_start=torch.Generator().manual_seed(0)
        )
        assert len(calls) == 6  # clean logits once, then one forward per step
        assert len(hist) == 5 and torch.equal(adv, x + hist[-1])
        calls.clear()
        opnorm.pgd(MODEL, x, y, eps=0.3, p=INF, loss="ce", steps=5)
        assert len(calls) == 5  # cross-entropy needs no clean logits
        calls.clear()
        adv, hist = opnorm.EvalPGD(loss="cw", steps=5, restarts=3, best_iterate=False, clip=None)(
            MODEL, x, y, eps=0.3, p=INF, return_history=True, random_start=torch.Generator().manual_seed(0)
        )
        assert len(calls) == 3 * 6  # each restart scores its final point once
        assert torch.equal(adv, x + hist[-1])
    finally:
        handle.remove()


def test_a_plain_callable_model_works():
    x, y = _inputs()
    ref = opnorm.pgd(MODEL, x, y, eps=0.2, steps=3, random_start=torch.Generator().manual_seed(3))
    got = opnorm.pgd(lambda z: MODEL(z), x, y, eps=0.2, steps=3, random_start=torch.Generator().manual_seed(3))
    assert torch.equal(got, ref)


def test_pgd_class_wrapper_matches_the_function():
    x, y = _inputs()
    atk = opnorm.PGD(MODEL, eps=0.2, p=2, steps=3, random_start=torch.Generator().manual_seed(7))
    ref = opnorm.pgd(MODEL, x, y, eps=0.2, p=2, steps=3, random_start=torch.Generator().manual_seed(7))
    assert torch.equal(atk(x, y), ref)
    assert "eps=0.2" in repr(atk)
    with pytest.raises(TypeError, match="unknown PGD arguments"):
        opnorm.PGD(MODEL, eps=0.1, alpha=0.01)


# --------------------------------------------------------------------------- modes, gradients, DDP


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, z):
        self.seen.append(self.training)
        return z


def test_model_mode_restored_and_parameter_grads_untouched():
    torch.manual_seed(0)
    rec = _Recorder()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Dropout(0.5), rec, nn.ReLU(), nn.Linear(8, 5)).double()
    model.train()
    model[2].eval()  # a mixed configuration must come back as it was
    marker = torch.full_like(model[5].weight, 3.0)
    model[5].weight.grad = marker.clone()
    x, y = _inputs()
    for loss in ("ce", "logit"):
        attack = opnorm.EvalPGD(loss=loss, steps=2, restarts=2)
        attack(model, x, y, eps=0.2, random_start=torch.Generator().manual_seed(0))
    assert rec.seen and not any(rec.seen)
    assert model.training and model[1].training and not model[2].training and model[3].training
    assert model[1].weight.grad is None and model[1].bias.grad is None and model[5].bias.grad is None
    assert torch.equal(model[5].weight.grad, marker)


def test_works_on_a_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist

    started = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        started = True
    try:
        model = _mlp(2)
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = _inputs()
        ref = opnorm.pgd(model, x, y, eps=0.2, steps=3, random_start=torch.Generator().manual_seed(0))
        got = opnorm.pgd(ddp, x, y, eps=0.2, steps=3, random_start=torch.Generator().manual_seed(0))
        assert torch.equal(got, ref)
        assert all(prm.grad is None for prm in model.parameters())
    finally:
        if started:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
    x, y = _inputs()
    with pytest.raises(ValueError, match="eps"):
        opnorm.pgd(MODEL, x, y, eps=-0.1)
    for p in (3, 0.5, "two"):
        with pytest.raises(ValueError, match="p must"):
            opnorm.pgd(MODEL, x, y, eps=0.1, p=p)
    with pytest.raises(ValueError, match="nonzero start"):
        opnorm.pgd(MODEL, x, eps=0.1, loss="logit", random_start=False)
    with pytest.raises(ValueError, match="nonzero start"):
        opnorm.EvalPGD(loss="logit")(MODEL, x, eps=0.1, delta0=torch.zeros_like(x))
    with pytest.raises(ValueError, match="y is required"):
        opnorm.pgd(MODEL, x, eps=0.1, loss="ce")
    with pytest.raises(ValueError, match="y is required"):
        opnorm.pgd(MODEL, x, eps=0.1, loss=losses.targeted(lambda a, c, t: a.sum(1)))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        opnorm.pgd(MODEL, bad, y, eps=0.1)
    with pytest.raises(ValueError, match="shape"):
        opnorm.pgd(MODEL, x, y[:3], eps=0.1)
    with pytest.raises(TypeError, match="integer"):
        opnorm.pgd(MODEL, x, y.double(), eps=0.1)
    with pytest.raises(ValueError, match="steps"):
        opnorm.pgd(MODEL, x, y, eps=0.1, steps=-1)
    with pytest.raises(ValueError, match="restarts"):
        opnorm.EvalPGD(restarts=0)
    with pytest.raises(ValueError, match="restarts > 1"):
        opnorm.EvalPGD(restarts=2)(MODEL, x, y, eps=0.1, random_start=False)
    with pytest.raises(ValueError, match="restarts > 1"):
        opnorm.EvalPGD(restarts=2)(MODEL, x, y, eps=0.1, delta0=torch.zeros_like(x))
    with pytest.raises(ValueError, match="shape"):
        opnorm.EvalPGD()(MODEL, x, y, eps=0.1, delta0=torch.zeros(2, 16))
    with pytest.raises(TypeError, match="random_start must be"):
        opnorm.pgd(MODEL, x, y, eps=0.1, random_start=0)
    with pytest.raises(ValueError, match="'ce', 'cw', 'logit', 'kl'"):
        opnorm.pgd(MODEL, x, y, eps=0.1, loss="hinge")
    with pytest.raises(ValueError, match="outside clip"):
        opnorm.pgd(MODEL, x + 2, y, eps=0.1)
    with pytest.raises(ValueError, match="step_size"):
        opnorm.pgd(MODEL, x, y, eps=0.1, step_size=-1.0)
    with pytest.raises(ValueError, match="targeted"):
        losses.targeted("logit")
    with pytest.raises(ValueError, match="one value per example"):
        opnorm.pgd(MODEL, x, y, eps=0.1, loss=lambda a, c, t: a.sum())


# --------------------------------------------------------------------------- best iterate


@pytest.mark.parametrize("loss", ["ce", "cw", "logit"])
@pytest.mark.parametrize("p", [2, INF])
def test_best_iterate_is_the_strongest_point_of_the_path(p, loss):
    """Brute force over the path: the known start and every iterate of the history."""
    model = _mlp(2)
    x, y = _inputs(batch=24, seed=3)
    start = 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    # a large step overshoots, so later iterates are sometimes weaker than earlier ones
    kw = dict(loss=loss, steps=6, step_size=0.6)
    last, hist = opnorm.EvalPGD(best_iterate=False, **kw)(model, x, y, eps=0.5, p=p, delta0=start, return_history=True)
    best = opnorm.EvalPGD(best_iterate=True, **kw)(model, x, y, eps=0.5, p=p, delta0=start)
    start_proj = (x + start.clamp(-0.5, 0.5) if p == INF else x + start).clamp(0, 1) - x
    path = [start_proj] + hist
    fn = losses.get_loss(loss).fn
    with torch.no_grad():
        clean = model(x)
        logits = [model(x + d) for d in path]
        value = torch.stack([fn(z, clean, y) for z in logits])  # (K, B)
        fooled = torch.stack([z.argmax(1) != y for z in logits])
        if loss == "logit":  # no notion of fooling: the highest loss wins
            fooled = torch.zeros_like(fooled)
        key = fooled.to(value.dtype) * 1e6 + value  # fooling first, then the loss (losses here are << 1e6)
        pick = key.argmax(0)  # first maximum, as strict ">" keeps the earliest
        expect = torch.stack([path[k][b] for b, k in enumerate(pick.tolist())])
    torch.testing.assert_close(best, (x + expect).clamp(0, 1))
    with torch.no_grad():
        assert (value.amax(0) >= fn(model(last), clean, y) - 1e-12).all()
    assert not torch.equal(best, last)  # the overshooting path makes the choice matter


def test_best_iterate_never_weaker_and_costs_one_forward_per_run():
    model = _mlp(1)
    x, y = _inputs(batch=32, seed=7)
    kw = dict(loss="ce", steps=5, step_size=0.4, restarts=2)
    calls = []
    handle = model.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        best = opnorm.EvalPGD(best_iterate=True, **kw)(
            model, x, y, eps=0.3, p=INF, random_start=torch.Generator().manual_seed(0)
        )
        assert len(calls) == 2 * 6  # steps' forwards + one score of the final point per run
    finally:
        handle.remove()
    last = opnorm.EvalPGD(best_iterate=False, **kw)(
        model, x, y, eps=0.3, p=INF, random_start=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        f_best, f_last = model(best).argmax(1) != y, model(last).argmax(1) != y
    assert (f_best >= f_last).all()


# --------------------------------------------------------------------------- step-size schedule


@pytest.mark.parametrize("step_size", [0.6, None])
@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("p", [2, INF])
def test_halving_schedule_halves_the_step_and_restarts_from_the_best_point(p, loss, step_size):
    """Each iterate is one constant-step PGD step (tested above against torchattacks) of the
    phase's length, taken from the previous iterate or, at a halving, from the strongest point
    of the path so far (brute force over the path)."""
    from opnorm.attacks import HALVING_PHASES

    model = _mlp(2)
    x, y = _inputs(batch=24, seed=3)
    eps, steps = 0.5, 8
    start = 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    kw = dict(loss=loss, best_iterate=False)
    halving = opnorm.EvalPGD(steps=steps, step_size=step_size, schedule="halving", **kw)
    _, hist = halving(model, x, y, eps=eps, p=p, delta0=start, return_history=True)
    first = opnorm.EvalPGD(steps=0, **kw)(model, x, y, eps=eps, p=p, delta0=start) - x  # the projected start
    path = [first] + hist
    fn = losses.get_loss(loss).fn
    with torch.no_grad():
        logits = [model(x + d) for d in path]
        key = torch.stack([fn(z, None, y) + 1e6 * (z.argmax(1) != y) for z in logits])  # fooling first
    s0 = eps if step_size is None else step_size
    restarted = 0
    for k in range(steps):
        phase = HALVING_PHASES * k // steps
        origin = path[k]
        if k > 0 and phase != HALVING_PHASES * (k - 1) // steps:
            pick = key[: k + 1].argmax(0)  # the first maximum, as the tracker keeps the earliest
            origin = torch.stack([path[j][b] for b, j in enumerate(pick.tolist())])
            restarted += int((pick != k).sum())
        one_step = opnorm.EvalPGD(steps=1, step_size=s0 * 0.5**phase, **kw)
        expect = one_step(model, x, y, eps=eps, p=p, delta0=origin)
        torch.testing.assert_close(x + hist[k], expect, msg=f"iterate {k + 1}")
    assert restarted > 0, "the overshooting steps should make some halvings go back to an earlier point"


def test_halving_schedule_costs_one_forward_per_halving_and_is_at_least_as_strong(trained_digits_model):
    model = _mlp(1)
    x, y = _inputs(batch=8, seed=7)
    calls = []
    handle = model.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        opnorm.EvalPGD(steps=8, best_iterate=False, schedule="halving")(model, x, y, eps=0.3, p=INF)
        assert len(calls) == 8 + 3  # the steps' forwards + one score before each of the 3 halvings
    finally:
        handle.remove()
    # against the constant 2.5 eps / steps on a trained model: same steps, restarts and seeds
    d = trained_digits_model
    accs = {}
    for schedule in ("constant", "halving"):
        accs[schedule] = robust_accuracy(
            d.model,
            d.x_all,
            d.y_all,
            eps=0.1,
            p=INF,
            steps=20,
            schedule=schedule,
            generator=torch.Generator().manual_seed(0),
        )
    print(f"\nrobust accuracy at l_inf 0.1: {accs}")
    assert 0.2 <= accs["constant"] <= 0.8
    assert accs["halving"] <= accs["constant"] + 0.005


def test_bad_schedule_raises_clear_errors():
    x, y = _inputs()
    with pytest.raises(ValueError, match="schedule must be one of constant, halving"):
        opnorm.EvalPGD(schedule="cosine")
    with pytest.raises(ValueError, match="infinite step has no schedule"):
        opnorm.EvalPGD(step_size=INF, schedule="halving")


def test_pgd_reads_like_torchattacks_pgd():
    """At most 10 parameters: model, x, y, the ball, the loss, steps, step size, random start,
    the box; restarts, best iterate, schedule, start and history live on EvalPGD / Ascent."""
    import inspect

    params = inspect.signature(opnorm.pgd).parameters
    assert len(params) <= 10, list(params)
    assert list(params)[:3] == ["model", "x", "y"]


def test_targeted_loss_is_the_negated_loss_and_judges_success_by_the_target():
    """A targeted loss object gives the attack of the negated gradient, and restarts keep
    points classified as the target."""
    x, y = _inputs(batch=12, seed=4)
    t = (y + 1) % 5
    spec = losses.targeted("ce")
    assert spec.targeted and spec.needs_labels
    with torch.no_grad():
        z = MODEL(x)
    torch.testing.assert_close(spec.fn(z, None, t), -F.cross_entropy(z, t, reduction="none"))
    kw = dict(eps=0.3, p=INF, random_start=torch.Generator().manual_seed(0))
    adv = opnorm.EvalPGD(loss=spec, steps=5, restarts=3)(MODEL, x, t, **kw)
    with torch.no_grad():
        hit = MODEL(adv).argmax(1) == t
        one = MODEL(opnorm.EvalPGD(loss=spec, steps=5)(MODEL, x, t, **kw)).argmax(1) == t
    assert (hit >= one).all()
    with pytest.raises(ValueError, match="already targeted"):
        losses.targeted(spec)
