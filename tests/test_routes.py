"""The routes to J v: forward-mode AD, double backward, the automatic choice and its
fallback, the error for a model no route supports, and J v differentiable w.r.t. weights.

References: explicit Jacobians from torch.autograd.functional.jacobian, closed forms on a
two-layer model, and central finite differences in the weights.
"""

import pytest
import torch
from torch import nn

import opnorm
from opnorm.jacobian import (
    JV_ROUTES,
    Linearization,
    UnsupportedModelError,
    differentiable_jvp,
    jacobian,
    jvp,
    linearize,
)

DT = torch.float64


class NoDoubleBackward(torch.autograd.Function):
    """tanh whose backward is not differentiable and that has no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class Opaque(nn.Module):
    def forward(self, x):
        return NoDoubleBackward.apply(x)


class ForwardOnlyTanh(torch.autograd.Function):
    """tanh with a forward-mode rule but a backward that cannot be differentiated."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return g * (1 - ctx.saved_tensors[0] ** 2)

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return t * (1 - torch.tanh(x) ** 2)


class Net(nn.Module):
    """Linear - activation - Linear, not a Sequential (so the autograd routes are used)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.act, self.b = nn.Linear(5, 6), act, nn.Linear(6, 3)

    def forward(self, x):
        x = x.view(x.shape[0], -1)  # a view by sizes: not a graph the pattern route replays
        return self.b(self.act(self.a(x)))


class FwdAct(nn.Module):
    def forward(self, x):
        return ForwardOnlyTanh.apply(x)


def closed_form(net, x, v):
    """J v of b(tanh(a x)): W_b diag(1 - tanh^2(a x)) W_a v."""
    h = torch.tanh(net.a(x))
    return ((1 - h * h) * (v @ net.a.weight.T)) @ net.b.weight.T


@pytest.mark.parametrize("route", JV_ROUTES)
def test_routes_agree_with_closed_form(route):
    net = Net(nn.Tanh()).to(DT)
    x, v = torch.randn(4, 5, dtype=DT), torch.randn(4, 5, dtype=DT)
    lin = linearize(net, x, route)
    assert lin.route == route
    torch.testing.assert_close(lin.matvec(v), closed_form(net, x, v), rtol=1e-12, atol=1e-14)
    V = torch.randn(3, 4, 5, dtype=DT)
    torch.testing.assert_close(lin.matmat(V), torch.stack([closed_form(net, x, w) for w in V]), rtol=1e-12, atol=1e-14)
    J = jacobian(net, x, route=route)
    torch.testing.assert_close(lin.rmatvec(torch.ones(4, 3, dtype=DT)), J.sum(dim=1), rtol=1e-12, atol=1e-14)


def test_auto_falls_back_to_forward_mode_and_reports_it():
    net = Net(FwdAct()).to(DT)
    x, v = torch.randn(4, 5, dtype=DT), torch.randn(4, 5, dtype=DT)
    lin = linearize(net, x)
    torch.testing.assert_close(lin.matvec(v), closed_form(net, x, v), rtol=1e-12, atol=1e-14)
    assert lin.route == "forward" and any("J v by autograd failed" in f for f in lin.fallbacks)
    res = opnorm.operator_norm(net, x, method="power", iters=30)
    assert res.route == "forward"
    ref = torch.linalg.svdvals(jacobian(net, x))[:, 0]
    torch.testing.assert_close(res.sigma, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(jvp(net, x, v)[1], closed_form(net, x, v), rtol=1e-12, atol=1e-14)
    with pytest.raises(UnsupportedModelError):  # asked for explicitly, double backward is not replaced
        Linearization(net, x, "autograd").matvec(v)


def test_model_without_any_route_gets_one_clear_error():
    net = Net(Opaque()).to(DT)
    x = torch.randn(4, 5, dtype=DT)
    with pytest.raises(
        UnsupportedModelError, match=r"module 'act' \(Opaque\).*forward-mode AD fails.*double backward"
    ) as err:
        opnorm.operator_norm(net, x, method="power", iters=2)
    assert "jvp staticmethod" in str(err.value) and "\n" not in str(err.value)
    # J^T u alone still works: the exact route needs only backward passes
    ref = torch.linalg.svdvals(jacobian(net, x))[:, 0]
    torch.testing.assert_close(opnorm.operator_norm(net, x, method="exact").sigma, ref, rtol=1e-12, atol=0)
    with pytest.raises(UnsupportedModelError, match="Opaque"):
        differentiable_jvp(net, x, torch.randn_like(x))


@pytest.mark.parametrize("route", ["auto", "forward", "autograd"])
def test_differentiable_jvp_weight_gradient(route):
    """d/dW of sum(c * J v) against central finite differences in every weight entry."""
    net = Net(nn.Tanh()).to(DT)
    x, v = torch.randn(4, 5, dtype=DT), torch.randn(4, 5, dtype=DT)
    c = torch.randn(4, 3, dtype=DT)
    logits, jv = differentiable_jvp(net, x, v, route)
    torch.testing.assert_close(logits, net(x), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(jv, closed_form(net, x, v), rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad((c * jv).sum() + logits.sum(), list(net.parameters()))
    h = 1e-6
    for p, g in zip(net.parameters(), grads):
        fd = torch.zeros_like(p)
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += h
                plus = (c * closed_form(net, x, v)).sum() + net(x).sum()
                p.view(-1)[i] -= 2 * h
                minus = (c * closed_form(net, x, v)).sum() + net(x).sum()
                p.view(-1)[i] += h
            fd.view(-1)[i] = (plus - minus) / (2 * h)
        torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)


def test_differentiable_jvp_through_hardswish_and_batchnorm_in_train_mode():
    """Train mode: the batch's J v includes BatchNorm's batch statistics; the running
    statistics move exactly once, as in one plain forward."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Hardswish(), nn.Linear(6, 3)).to(DT).train()
    x, v = torch.randn(8, 5, dtype=DT), torch.randn(8, 5, dtype=DT)
    ref_net = nn.Sequential(*[m for m in net]).train()
    stats = net[1].running_mean.clone()
    _, jv_ref = torch.autograd.functional.jvp(lambda z: ref_net(z), x, v)
    net[1].running_mean.copy_(stats)
    net[1].num_batches_tracked.zero_()
    for route in ("auto", "forward"):  # "autograd"'s backward is third order: train-mode batch_norm has none
        net[1].running_mean.copy_(stats)
        logits, jv = differentiable_jvp(net, x, v, route)
        torch.testing.assert_close(jv, jv_ref, rtol=1e-10, atol=1e-12)
        expected = 0.9 * stats + 0.1 * x.detach().matmul(net[0].weight.T).add(net[0].bias).mean(dim=0)
        torch.testing.assert_close(net[1].running_mean, expected, rtol=1e-12, atol=1e-14)
        grads = torch.autograd.grad(jv.square().sum(), [net[0].weight, net[3].weight])
        assert all(bool(torch.isfinite(g).all()) and float(g.abs().max()) > 0 for g in grads)


def test_bad_route_and_shapes():
    net = Net(nn.Tanh()).to(DT)
    x = torch.randn(2, 5, dtype=DT)
    with pytest.raises(ValueError, match="route must be one of"):
        differentiable_jvp(net, x, x, "fast")
    with pytest.raises(ValueError, match="v must have the shape of x"):
        differentiable_jvp(net, x, x[:1])
    with pytest.raises(ValueError, match="route='pattern' needs a plain nn.Sequential"):
        linearize(lambda z: net(z), x, "pattern")


def test_pattern_route_names_the_module_no_route_supports():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), Opaque(), nn.Linear(6, 3)).to(DT)
    with pytest.raises(UnsupportedModelError, match=r"module '1' \(Opaque\)"):
        opnorm.operator_norm(net, torch.randn(4, 5, dtype=DT), method="power", iters=2)
