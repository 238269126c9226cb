"""The pattern route on residual networks (torch.fx graphs of modules joined by sums)
against torch.autograd.functional.jacobian, one example at a time, in float64."""

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import opnorm
from opnorm.jacobian import GraphLinearization, graph_support, jacobian, linearize, pattern_support
from opnorm.training.models import WideResNet, build_model
from tests.reference import reference_jacobian

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def models():
    torch.manual_seed(0)
    return {
        "resnet18": (build_model("resnet18", input_shape=(3, 8, 8), num_classes=5, width=4), (3, 8, 8)),
        "wrn": (WideResNet((3, 8, 8), 5, depth=10, widen_factor=1), (3, 8, 8)),
        "torchvision-resnet18": (tvm.resnet18(num_classes=5), (3, 32, 32)),
    }


@pytest.mark.parametrize("name", ["resnet18", "wrn", "torchvision-resnet18"])
def test_graph_route_is_exact(name):
    model, shape = models()[name]
    model = model.to(DT).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    x = torch.rand(3, *shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    applies, fallbacks = pattern_support(model)
    assert applies and all("Sequential" not in f for f in fallbacks)
    lin = linearize(model, x)
    assert isinstance(lin, GraphLinearization) and lin.route == "pattern"
    J = reference_jacobian(model, x)
    torch.testing.assert_close(lin.logits, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jacobian(model, x).reshape(J.shape), J, rtol=1e-10, atol=1e-12 * float(J.abs().max()))
    V = torch.randn(2, *x.shape, dtype=DT)
    torch.testing.assert_close(
        lin.matmat(V),
        torch.einsum("bdn,kbn->kbd", J, V.reshape(2, 3, -1)),
        rtol=1e-10,
        atol=1e-12 * float(J.abs().max()),
    )
    rows = torch.tensor([0, 2])
    sub = lin.select(rows)
    torch.testing.assert_close(sub.matvec(V[0, rows]), lin.matvec(V[0])[rows], rtol=1e-12, atol=1e-15)
    res = opnorm.operator_norm(model, x, method="lanczos", iters=5, rtol_change=0)
    torch.testing.assert_close(res.sigma, torch.linalg.svdvals(J)[:, 0], rtol=1e-8, atol=0)
    assert res.route == "pattern"


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) * 2


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = -x
        return self.b(torch.relu(self.a(x)) + x)


def test_graph_route_declines_what_it_does_not_cover():
    gm, reasons = graph_support(Scaled())
    assert gm is None and "mul" in reasons[0]
    gm, reasons = graph_support(Branchy())
    assert gm is None and "torch.fx cannot trace" in reasons[0]
    model = Scaled().to(DT)
    model.a.register_forward_hook(lambda m, i, o: o * 3)
    assert graph_support(model)[0] is None
    x = torch.randn(2, 4, dtype=DT)
    lin = linearize(model, x)
    assert lin.route == "autograd"
    torch.testing.assert_close(
        lin.matvec(torch.ones_like(x)), 6 * torch.ones_like(x) @ model.a.weight.T, rtol=1e-12, atol=1e-14
    )
