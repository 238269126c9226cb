"""Operator norms, attacks and the regularizer on torchvision architectures (random init,
float64, small inputs and few classes so the whole zoo runs in seconds).

resnet18, mobilenet_v3_small (hardsigmoid / hardswish) and regnet_y_400mf are torchvision's
builders; efficientnet_b0, convnext_tiny and swin_t are represented by their own classes with
fewer and narrower stages (the same blocks: squeeze-excitation and SiLU, layer scale and
LayerNorm, shifted-window attention, all with stochastic depth), and a two-layer
VisionTransformer (SDPA attention) stands for the ViTs.

References are independent of opnorm's routes: torch.autograd.functional.jacobian on the
plain model (one example at a time) and torch.linalg.svdvals. Stochastic modules (dropout,
stochastic depth) and train-mode BatchNorm are exercised by running in train mode.
"""

import math

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import opnorm
from opnorm.jacobian import linearize
from opnorm.regularizers import OperatorNormRegularizer
from tests.reference import reference_jacobian

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

DT = torch.float64
CLASSES = 4


def _vit():
    m = tvm.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=CLASSES
    )
    nn.init.normal_(m.heads.head.weight, std=0.5)  # torchvision zero-initializes the head: J would be 0
    return m


def _convnext():  # convnext_tiny's blocks (layer scale, stochastic depth), two stages
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt(
        [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], stochastic_depth_prob=0.2, num_classes=CLASSES
    )


def _efficientnet():  # efficientnet_b0's MBConv blocks (squeeze-excitation, SiLU, stochastic depth), three stages
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    stages = [MBConvConfig(1, 3, 1, 16, 8, 1), MBConvConfig(6, 3, 2, 8, 12, 2), MBConvConfig(6, 5, 2, 12, 20, 1)]
    return EfficientNet(stages, dropout=0.2, stochastic_depth_prob=0.2, num_classes=CLASSES)


def _swin():  # swin_t's blocks (shifted windows, stochastic depth), two stages
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4], stochastic_depth_prob=0.2, num_classes=CLASSES)


ZOO = {
    "resnet18": (lambda: tvm.resnet18(num_classes=CLASSES), 32),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(num_classes=CLASSES), 32),
    "efficientnet": (_efficientnet, 32),
    "convnext": (_convnext, 32),
    "swin": (_swin, 32),
    "regnet_y_400mf": (lambda: tvm.regnet_y_400mf(num_classes=CLASSES), 32),
    "vit": (_vit, 16),
}


def build(name):
    torch.manual_seed(0)
    make, size = ZOO[name]
    model = make().to(DT)
    x = torch.rand(2, 3, size, size, dtype=DT, generator=torch.Generator().manual_seed(1))
    return model, x


def modes(model):
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo(name):
    model, x = build(name)
    J = reference_jacobian(model, x)
    S = torch.linalg.svdvals(J)
    # deep nets at random init can have a tiny J (1e-13 for efficientnet_b0 here); float64
    # keeps its relative accuracy at any scale, only a zero J would make the checks vacuous
    assert bool((S[:, 0] > 1e-20).all())

    res = opnorm.operator_norm(model, x)
    torch.testing.assert_close(res.sigma, S[:, 0], rtol=1e-8, atol=0)
    torch.testing.assert_close(opnorm.singular_values(model, x, 3), S[:, :3], rtol=1e-8, atol=0)
    with opnorm.eval_mode(model):
        lin = linearize(model, x)
        v = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(2))
        jv = lin.matvec(v)
    # residual ReLU nets replay their pattern; the others take J v by double backward, also
    # through hardswish (composite) and attention (math kernel)
    assert lin.route == ("pattern" if name == "resnet18" else "autograd")
    torch.testing.assert_close(
        jv, torch.einsum("bdn,bn->bd", J, v.reshape(2, -1)), rtol=1e-8, atol=1e-10 * float(S.max())
    )

    y = torch.tensor([0, 1])
    sigmas = []
    for train in (False, True):
        model.train(train)
        before, buffers = modes(model), [b.clone() for b in model.buffers()]
        power = opnorm.operator_norm(
            model, x, p="inf", q=2, method="power", iters=2, generator=torch.Generator().manual_seed(0)
        )
        assert bool(torch.isfinite(power.sigma).all()) and bool((power.sigma > 0).all())
        sigmas.append(power.sigma)
        adv = opnorm.pgd(model, x, y, eps=0.03, p="inf", steps=2)
        assert float((adv - x).abs().max()) <= 0.03 + 1e-12
        # norms and attacks run in eval mode: every module's mode restored, BatchNorm statistics untouched
        assert modes(model) == before
        assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
        reg = OperatorNormRegularizer(2, 2, eps=1e-3, lam=0.1)
        model.zero_grad()
        logits, pen = reg.joint(model, x, torch.arange(2))
        (nn.functional.cross_entropy(logits, y) + pen).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
        assert math.isfinite(float(pen.detach())) and modes(model) == before
    # the same (eval-mode) function in both modes: no dropout, stochastic depth or batch statistics
    torch.testing.assert_close(sigmas[0], sigmas[1], rtol=1e-12, atol=0)
