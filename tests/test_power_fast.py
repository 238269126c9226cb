"""The fast routes to J(x): the pattern replay, Golub-Kahan-Lanczos, the Gram-matrix exact
route and the automatic choice, against explicit Jacobians.

References are independent of opnorm: torch.autograd.functional.jacobian one example at
a time (float64), torch.linalg.svdvals, and the plain power method's iterates (which lie
in the Lanczos Krylov spaces, so they can never beat it).
"""

import math

import pytest
import torch
from torch import nn

from opnorm.jacobian import (
    Linearization,
    PatternLinearization,
    jacobian,
    jacobian_of,
    linearize,
    pattern_support,
)
from opnorm.power import lanczos_iteration, operator_norm, power_iteration, singular_values
from opnorm.training.models import build_model
from tests.reference import reference_jacobian

DT = torch.float64


class Affine(nn.Module):
    """Per-channel (x - mean) / std, like a Normalize layer: not on the whitelist."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("mean", torch.linspace(0.1, 0.5, c).view(1, c, 1, 1))
        self.register_buffer("std", torch.linspace(0.2, 0.4, c).view(1, c, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class AbsReLU(nn.ReLU):
    """A ReLU subclass whose forward is |x|: recognizing it as a ReLU would be wrong."""

    def forward(self, x):
        return x.abs()


def cnn():
    return nn.Sequential(
        Affine(1),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=1, padding=1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(6 * 4 * 4, 7),
    )


def bn_net():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.LeakyReLU(0.1),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 9), nn.BatchNorm1d(9)),
        nn.ReLU(),
        nn.Identity(),
        nn.Linear(9, 5),
    )


def conv1d_net():
    return nn.Sequential(
        nn.Conv1d(4, 6, 3, dilation=2, groups=2),
        nn.ReLU(),
        nn.MaxPool1d(2, ceil_mode=True),
        nn.Conv1d(6, 5, 2, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 5, 4),
    )


def unflatten_net():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 32),
        nn.ReLU(),
        nn.Unflatten(1, (2, 4, 4)),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(2, 3, 2, stride=2, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(12, 6),
    )


def pool_first():
    """Max-pool straight on the input: integer pixels make many ties."""
    return nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3), nn.ReLU(), nn.Linear(3, 3))


def dilated():
    """Strided, dilated, grouped and bias-free convolutions whose transposes need an output
    padding (both transpose paths: fold for one input channel, conv_transpose2d)."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, dilation=2, padding=2),
        nn.ReLU(),  # 10 -> 5
        nn.Conv2d(4, 4, 2, stride=1, dilation=2, groups=2, bias=False),
        nn.LeakyReLU(0.2),  # 5 -> 3
        nn.Conv2d(4, 6, 2, stride=2),
        nn.ReLU(),  # 3 -> 1: its transpose needs output_padding 1
        nn.Flatten(),
        nn.Linear(6, 5),
    )


NETS = {
    "cnn": (cnn, (1, 8, 8)),
    "bn": (bn_net, (2, 8, 8)),
    "conv1d": (conv1d_net, (4, 20)),
    "unflatten": (unflatten_net, (12,)),
    "pool_first": (pool_first, (1, 8, 8)),
    "dilated": (dilated, (1, 10, 10)),
}


def build(name, batch=5, seed=0):
    torch.manual_seed(seed)
    make, shape = NETS[name]
    net = make().to(DT)
    net.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        for _ in range(3):
            net(torch.randn(16, *shape, dtype=DT) * 2 + 0.3)
    net.eval()
    x = torch.rand(batch, *shape, dtype=DT)
    if name == "pool_first":
        x = torch.randint(0, 3, x.shape).to(DT)
    return net, x


def close(a, b, tol=1e-10):
    scale = b.abs().max().clamp_min(1e-300)
    assert (a - b).abs().max() <= tol * scale, float((a - b).abs().max() / scale)


# ----------------------------------------------------------------------- pattern replay


@pytest.mark.parametrize("name", list(NETS))
def test_pattern_route_is_exact(name):
    net, x = build(name)
    ref = reference_jacobian(net, x)
    B, d, n = ref.shape
    applies, _ = pattern_support(net)
    assert applies
    lin = PatternLinearization(net, x)
    torch.testing.assert_close(lin.logits, net(x), rtol=1e-12, atol=1e-14)  # the recording pass is the model's forward
    close(jacobian(net, x, route="pattern").reshape(B, d, n), ref)
    close(jacobian_of(lin, chunk=2).reshape(B, d, n), ref)
    g = torch.Generator().manual_seed(1)
    V = torch.randn(3, *x.shape, dtype=DT, generator=g)
    U = torch.randn(3, B, d, dtype=DT, generator=g)
    close(lin.matmat(V), torch.einsum("bdn,kbn->kbd", ref, V.reshape(3, B, n)))
    close(lin.rmatmat(U).reshape(3, B, n), torch.einsum("bdn,kbd->kbn", ref, U))
    close(lin.matvec(V[0]), torch.einsum("bdn,bn->bd", ref, V[0].reshape(B, n)))
    close(lin.rmatvec(U[0]).reshape(B, n), torch.einsum("bdn,bd->bn", ref, U[0]))
    # the caller's tensors are never overwritten (steps work in place on their own temporaries)
    V0, U0 = V.clone(), U.clone()
    lin.matmat(V), lin.rmatmat(U)
    assert torch.equal(V, V0) and torch.equal(U, U0)


def test_autograd_route_stacks_are_exact():
    net, x = build("bn")
    ref = reference_jacobian(net, x)
    B, d, n = ref.shape
    lin = linearize(net, x, "autograd")
    assert isinstance(lin, Linearization)
    V = torch.randn(4, *x.shape, dtype=DT)
    U = torch.randn(4, B, d, dtype=DT)
    close(lin.matmat(V), torch.einsum("bdn,kbn->kbd", ref, V.reshape(4, B, n)))
    close(lin.rmatmat(U).reshape(4, B, n), torch.einsum("bdn,kbd->kbn", ref, U))
    close(jacobian(net, x, route="autograd").reshape(B, d, n), ref)


def test_registry_model_uses_pattern_route():
    """The registry's CNN: Normalize is left to autograd, everything else is replayed."""
    torch.manual_seed(0)
    net = build_model("cnn", input_shape=(1, 8, 8), num_classes=10, mean=(0.3,), std=(0.35,)).to(DT).eval()
    x = torch.rand(4, 1, 8, 8, dtype=DT)
    applies, fallbacks = pattern_support(net)
    assert applies and len(fallbacks) == 1 and fallbacks[0].startswith("normalize:")
    close(jacobian(net, x).reshape(4, 10, -1), reference_jacobian(net, x))


# ----------------------------------------------------------------------- fallbacks


class Scaled(nn.Module):
    """A custom block: its forward is arbitrary code (a functional relu and a residual)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 1.5 + x


@pytest.mark.parametrize(
    "module,reason",
    [
        (nn.Tanh(), "Tanh is not a recognized"),
        (AbsReLU(), "AbsReLU is not a recognized"),
        (Scaled(), "Scaled is not a recognized"),
        (nn.BatchNorm1d(6, track_running_stats=False), "batch statistics"),
        (nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular"), "padding_mode"),
    ],
)
def test_unrecognized_modules_fall_back_to_autograd(module, reason):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 6),
        nn.ReLU(),
        nn.Unflatten(1, (1, 6)) if isinstance(module, nn.Conv1d) else nn.Identity(),
        module,
        nn.Flatten(),
        nn.Linear(6, 4),
    ).to(DT)
    x = torch.randn(5, 6, dtype=DT)
    applies, fallbacks = pattern_support(net)
    assert applies and len(fallbacks) == 1
    assert fallbacks[0].startswith("3:") and reason in fallbacks[0]
    with torch.no_grad():
        net.eval()
        net(x)
    res = operator_norm(net, x, method="exact")
    assert res.route == "pattern" and res.fallbacks == fallbacks
    if not isinstance(module, nn.BatchNorm1d):  # batch statistics: J(x) of one example is not per example
        ref = reference_jacobian(net, x)
        close(jacobian(net, x).reshape(ref.shape), ref)
        torch.testing.assert_close(res.sigma, torch.linalg.svdvals(ref)[:, 0], rtol=1e-10, atol=0)


def test_hooks_force_autograd():
    """A forward hook that rescales a ReLU's output must be honoured (autograd sees it)."""
    net, x = build("cnn")
    handle = net[2].register_forward_hook(lambda m, inp, out: out * 3.0)
    try:
        _, fallbacks = pattern_support(net)
        assert any(f.startswith("2:") and "hooks" in f for f in fallbacks)
        ref = reference_jacobian(net, x)
        close(jacobian(net, x).reshape(ref.shape), ref)
    finally:
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, inp, out: None)
    try:
        applies, reasons = pattern_support(net)
        assert not applies and "global" in reasons[0]
        assert isinstance(linearize(net, x), Linearization)
    finally:
        handle.remove()


def test_non_sequential_model_uses_autograd():
    torch.manual_seed(0)
    net = nn.Sequential(Scaled(), nn.Linear(6, 3)).to(DT)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x) * 2

    model = Wrapper()
    x = torch.randn(4, 6, dtype=DT)
    applies, reasons = pattern_support(model)
    assert not applies and "Wrapper is not a plain nn.Sequential" in reasons[0]
    lin = linearize(model, x)
    assert isinstance(lin, Linearization) and lin.fallbacks == reasons
    with pytest.raises(ValueError, match="route='pattern' does not apply"):
        linearize(model, x, "pattern")
    with pytest.raises(TypeError, match="plain nn.Sequential"):
        PatternLinearization(model, x)
    with pytest.raises(ValueError, match="route"):
        operator_norm(model, x, route="fast")
    res = operator_norm(model, x)
    assert res.route == "autograd"
    torch.testing.assert_close(res.sigma, torch.linalg.svdvals(reference_jacobian(model, x))[:, 0], rtol=1e-10, atol=0)


# ----------------------------------------------------------------------- Lanczos


@pytest.mark.parametrize("route", ["pattern", "autograd"])
def test_lanczos_converges_and_attains(route):
    net, x = build("cnn", batch=6)
    J = reference_jacobian(net, x)
    top = torch.linalg.svdvals(J)[:, 0]
    d = J.shape[1]
    errors = []
    for k in range(1, d + 1):
        res = operator_norm(
            net, x, method="lanczos", iters=k, rtol_change=0, route=route, generator=torch.Generator().manual_seed(0)
        )
        assert res.method == "lanczos" and res.iterations == k and res.route == route
        assert bool(res.exact.all()) == (k == d)  # proven only once the output space is spanned
        assert torch.all(res.sigma <= top * (1 + 1e-12))  # a lower bound
        Jv = torch.einsum("bdn,bn->bd", J, res.v.reshape(x.shape[0], -1))
        torch.testing.assert_close(Jv.norm(dim=1), res.sigma, rtol=1e-10, atol=1e-14)  # v attains sigma
        torch.testing.assert_close(res.u, Jv / res.sigma[:, None], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(res.v.reshape(x.shape[0], -1).norm(dim=1), torch.ones(x.shape[0], dtype=DT))
        errors.append((top - res.sigma) / top)
    assert all(torch.all(b <= a + 1e-12) for a, b in zip(errors, errors[1:]))  # monotone in k
    assert errors[-1].max() < 1e-10  # d iterations exhaust the output space: exact
    # with a tolerance it stops by itself, at the latest when the space is exhausted
    res = operator_norm(net, x, method="lanczos", iters=50, rtol_change=1e-12, route=route)
    assert res.iterations <= d
    torch.testing.assert_close(res.sigma, top, rtol=1e-10, atol=0)


def test_lanczos_beats_power_method_from_the_same_start():
    """After k steps the Krylov space holds the power method's k-th iterate."""
    net, x = build("bn", batch=8)
    J = reference_jacobian(net, x)
    lin = linearize(net, x)
    u0 = torch.randn(x.shape[0], J.shape[1], dtype=DT, generator=torch.Generator().manual_seed(2))
    v1 = torch.einsum("bdn,bd->bn", J, u0)
    first = torch.einsum("bdn,bn->bd", J, v1).norm(dim=1) / v1.norm(dim=1)
    for k in (1, 2, 3):
        sigma = lanczos_iteration(lin.matvec, lin.rmatvec, u0, iters=k).sigma
        # the power method started at v_1 = J^T u0: k - 1 more iterations stay in span(V_k)
        if k == 1:
            ps = first
        else:
            ps = power_iteration(lin.matvec, lin.rmatvec, v1.reshape(x.shape), 2, 2, iters=k - 1).sigma
        assert torch.all(ps <= sigma * (1 + 1e-10))
        assert k == 1 or torch.any(ps < sigma * (1 - 1e-6))  # and Lanczos does strictly better somewhere


def test_lanczos_on_matrices_with_known_spectrum():
    """A linear model with prescribed singular values, a rank-one one and a zero one."""
    torch.manual_seed(0)
    d, n = 6, 15
    Q1, _ = torch.linalg.qr(torch.randn(d, d, dtype=DT))
    Q2, _ = torch.linalg.qr(torch.randn(n, d, dtype=DT))
    s = torch.tensor([5.0, 4.9, 1.0, 0.5, 0.1, 0.0], dtype=DT)
    for W in (Q1 @ torch.diag(s) @ Q2.T, torch.outer(Q1[:, 0], Q2[:, 0]) * 2.0, torch.zeros(d, n, dtype=DT)):
        lin = nn.Linear(n, d, bias=True).to(DT)
        with torch.no_grad():
            lin.weight.copy_(W)
        x = torch.randn(3, n, dtype=DT)
        top = torch.linalg.svdvals(W)[0]
        res = operator_norm(lin, x, method="lanczos", iters=d, rtol_change=0)
        torch.testing.assert_close(res.sigma, top.expand(3), rtol=1e-10, atol=1e-12)
        assert torch.isfinite(res.v).all() and torch.isfinite(res.u).all()
        ex = operator_norm(lin, x, method="exact")
        torch.testing.assert_close(ex.sigma, top.expand(3), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ex.v.norm(dim=1), torch.ones(3, dtype=DT))


def test_lanczos_start_from_v0_and_bad_pairs():
    net, x = build("cnn")
    v0 = torch.randn_like(x)
    res = operator_norm(net, x, method="lanczos", iters=1, rtol_change=0, v0=v0)
    # one step from u1 = J v0 is at least ||J v0|| / ||v0|| (the first Krylov space holds v0's image)
    J = reference_jacobian(net, x)
    first = torch.einsum("bdn,bn->bd", J, v0.reshape(x.shape[0], -1)).norm(dim=1) / v0.flatten(1).norm(dim=1)
    assert torch.all(res.sigma >= first * (1 - 1e-12))
    with pytest.raises(ValueError, match="lanczos"):
        operator_norm(net, x, math.inf, 2, method="lanczos")
    with pytest.raises(ValueError, match="return_history"):
        operator_norm(net, x, method="lanczos", return_history=True)


# ----------------------------------------------------------------------- exact route and auto


@pytest.mark.parametrize("name", ["cnn", "bn", "conv1d"])
def test_gram_exact_route(name):
    net, x = build(name)
    J = reference_jacobian(net, x)
    res = operator_norm(net, x, method="exact")
    assert res.exact.all() and res.method == "exact"
    torch.testing.assert_close(res.sigma, torch.linalg.svdvals(J)[:, 0], rtol=1e-10, atol=0)
    Jv = torch.einsum("bdn,bn->bd", J, res.v.reshape(x.shape[0], -1))
    torch.testing.assert_close(Jv.norm(dim=1), res.sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.u, Jv / Jv.norm(dim=1, keepdim=True))


def test_auto_choice():
    net, x = build("cnn")  # d = 7
    assert operator_norm(net, x).method == "exact"
    assert operator_norm(net, x, iters=2).method == "exact"  # (2, 2): never an uncertified route
    assert operator_norm(net, x, 2, math.inf).method == "exact"
    assert operator_norm(net, x, 1.5, 3.0, iters=1).method == "power"  # no exact form, d > 4 iters
    assert operator_norm(net, x).route == "pattern"


def test_power_method_on_pattern_route_matches_autograd_route():
    """Same start, same iterates: the route changes the speed, not the numbers."""
    net, x = build("bn")
    kw = dict(method="power", iters=6, rtol_change=0, return_history=True)
    a = operator_norm(net, x, math.inf, 2, route="pattern", generator=torch.Generator().manual_seed(4), **kw)
    b = operator_norm(net, x, math.inf, 2, route="autograd", generator=torch.Generator().manual_seed(4), **kw)
    torch.testing.assert_close(a.sigma, b.sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.v, b.v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("route", ["pattern", "autograd"])
def test_subspace_iteration_on_stacks(route):
    net, x = build("conv1d", batch=3)
    ref = torch.linalg.svdvals(reference_jacobian(net, x))[:, :3]
    got = singular_values(
        net, x, 3, method="power", iters=300, rtol_change=1e-12, route=route, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(singular_values(net, x, 3, method="exact", route=route), ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------- per-example stopping


def test_select_restricts_to_rows():
    """lin.select(rows) is J of those examples, with no new forward pass."""
    for name in ("cnn", "bn"):  # cnn: a fallback module (Affine) needs its own local graph
        net, x = build(name, batch=6)
        ref = reference_jacobian(net, x)
        rows = torch.tensor([4, 1, 3])
        sub = PatternLinearization(net, x).select(rows)
        close(jacobian_of(sub).reshape(3, *ref.shape[1:]), ref[rows])
        torch.testing.assert_close(sub.logits, net(x)[rows])


@pytest.mark.parametrize("route", ["pattern", "autograd"])
def test_lanczos_stops_per_example(route):
    """With a tolerance each example stops when its estimate settles; the batch shrinks on
    the pattern route. Results must match running every example to the end."""
    net, x = build("cnn", batch=8)
    top = torch.linalg.svdvals(reference_jacobian(net, x))[:, 0]
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    res = operator_norm(net, x, method="lanczos", iters=7, rtol_change=1e-3, route=route, generator=g())
    assert res.stopped.any()
    assert torch.all(res.sigma <= top * (1 + 1e-12))
    assert torch.all((top - res.sigma) / top < 1e-2)
    J = reference_jacobian(net, x)
    Jv = torch.einsum("bdn,bn->bd", J, res.v.reshape(x.shape[0], -1))
    torch.testing.assert_close(Jv.norm(dim=1), res.sigma, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(res.u, Jv / res.sigma[:, None], rtol=1e-8, atol=1e-12)
    # each example stops at the first k whose estimate moved by <= tol: the fixed-k run's value
    est = torch.stack(
        [
            operator_norm(net, x, method="lanczos", iters=k, rtol_change=0, route=route, generator=g()).sigma
            for k in range(1, 8)
        ]
    )
    moved = (est - torch.cat([torch.zeros_like(est[:1]), est[:-1]])).abs() <= 1e-3 * est
    moved[-1] = True  # d = 7 iterations exhaust the output space
    stop = moved.int().argmax(dim=0)
    torch.testing.assert_close(res.sigma, est[stop, torch.arange(x.shape[0])], rtol=1e-10, atol=0)
    assert res.iterations == int(stop.max()) + 1 and stop.min() < stop.max()  # examples did stop at different steps
    assert torch.equal(res.exact, stop == 6)  # only the examples that ran all d = 7 iterations are proven
    tight = operator_norm(net, x, method="lanczos", iters=7, rtol_change=1e-12, route=route, generator=g())
    torch.testing.assert_close(tight.sigma, top, rtol=1e-10, atol=0)


def test_lanczos_shrinks_the_batch_through_select():
    net, x = build("bn", batch=10)
    lin = PatternLinearization(net, x)
    sizes = []

    def select(rows):
        sizes.append(len(rows))
        sub = lin.select(rows)
        return sub.matvec, sub.rmatvec

    u0 = torch.randn(10, 5, dtype=DT, generator=torch.Generator().manual_seed(0))
    run = lanczos_iteration(lin.matvec, lin.rmatvec, u0, iters=5, rtol_change=1e-4, select=select)
    plain = lanczos_iteration(lin.matvec, lin.rmatvec, u0, iters=5, rtol_change=1e-4)  # no select: padded products
    assert sizes and all(a > b for a, b in zip([10] + sizes, sizes))  # strictly smaller batches
    torch.testing.assert_close(run.sigma, plain.sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(run.v, plain.v, rtol=1e-9, atol=1e-12)
    assert (run.exact | run.stopped).all() and run.iterations <= 5
