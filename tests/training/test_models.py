"""Model registry: shapes, normalization, architecture facts, per-example behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from opnorm.training.models import MODELS, VGG, Normalize, ResNet18, WideResNet, build_model

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
# Small widths keep every forward cheap; wrn-28-10's width is its widen factor.
SMALL = {"mlp": 16, "cnn": 4, "cnn-bn": 4, "vgg": 4, "cnn7": 2, "resnet18": 4, "wrn-28-10": 1}


def small(name, shape, num_classes=7, **kw):
    return build_model(name, input_shape=shape, num_classes=num_classes, width=SMALL[name], **kw)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MODELS)
def test_output_shape(name, shape):
    torch.manual_seed(0)
    model = small(name, shape)
    out = model(torch.rand(2, *shape))
    assert out.shape == (2, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert isinstance(model.normalize, Normalize)
    assert next(m for m in model.modules() if m is not model) is model.normalize  # the first layer


def test_parameter_counts_match_the_reference_architectures():
    # Published counts for CIFAR-10: ResNet-18 (3x3 stem) 11,173,962; WRN-28-10 36,479,194.
    with torch.device("meta"):  # no memory, no init cost
        r18 = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10)
        wrn = build_model("wrn-28-10", input_shape=(3, 32, 32), num_classes=10)
    assert sum(p.numel() for p in r18.parameters()) == 11_173_962
    assert sum(p.numel() for p in wrn.parameters()) == 36_479_194
    assert sum(isinstance(m, nn.Conv2d) for m in wrn.modules()) == 25 + 3  # 1 + 2 per block (12) + 3 shortcuts
    assert isinstance(WideResNet((3, 8, 8), 10, depth=16, widen_factor=2).block1[0], nn.Module)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet((3, 8, 8), 10, depth=27)


@pytest.mark.parametrize("shape,side", [((1, 8, 8), 2), ((1, 28, 28), 7), ((3, 32, 32), 8)])
def test_cnn_layout(shape, side):
    model = build_model("cnn", input_shape=shape, num_classes=10, width=8)
    assert model.conv1.out_channels == 8 and model.conv2.out_channels == 16
    assert model.conv1.kernel_size == (3, 3) and model.conv1.padding == (1, 1)
    assert model.fc.in_features == 16 * side * side and model.fc.out_features == 128
    default = build_model("cnn", input_shape=shape, num_classes=10)
    assert default.conv1.out_channels == 32 and default.conv2.out_channels == 64


def test_mlp_layout():
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 128), (128, 128), (128, 10)]


@pytest.mark.parametrize("shape,pools,side", [((1, 8, 8), 3, 1), ((1, 28, 28), 4, 1), ((3, 32, 32), 4, 2)])
def test_vgg_layout_and_batchnorm_without_affine(shape, pools, side):
    model = build_model("vgg", input_shape=shape, num_classes=10, width=4)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [4, 4, 8, 8, 16, 16, 32]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 7 and all(not bn.affine and bn.weight is None and bn.bias is None for bn in bns)
    assert not any("bn" in name for name, _ in model.named_parameters())
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools
    assert model.classifier.in_features == 32 * side * side
    assert build_model("vgg", input_shape=shape, num_classes=10).conv1.out_channels == 16


def test_cnn7_is_the_papers_cifar_network():
    """Widths 128..1024, biased 3x3 convs, BatchNorm without affine, unpadded last conv:
    32x32 inputs reach the classifier as 1024 x 1 x 1 (the parameter count follows by hand)."""
    with torch.device("meta"):
        model = build_model("cnn7", input_shape=(3, 32, 32), num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [128, 128, 256, 256, 512, 512, 1024]
    assert [m.padding for m in convs] == [(1, 1)] * 6 + [(0, 0)] and all(m.bias is not None for m in convs)
    assert all(not bn.affine for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4 and model.classifier.in_features == 1024
    widths = [3, 128, 128, 256, 256, 512, 512, 1024]
    expected = sum(9 * a * b + b for a, b in zip(widths, widths[1:])) + 1024 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == expected
    small_side = build_model("cnn7", input_shape=(1, 8, 8), num_classes=10, width=2)
    assert small_side(torch.rand(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", MODELS)
def test_nonlinearities_are_modules_used_once(name):
    """Hooks on nn.ReLU / nn.MaxPool2d see every activation: no functional relu, no reuse."""
    model = small(name, (3, 32, 32))
    graph = fx.symbolic_trace(model).graph
    functional = [n for n in graph.nodes if n.op in ("call_function", "call_method") and "relu" in str(n.target)]
    assert functional == []
    modules = dict(model.named_modules())
    called = [
        n.target
        for n in graph.nodes
        if n.op == "call_module" and isinstance(modules[n.target], (nn.ReLU, nn.MaxPool2d))
    ]
    declared = [k for k, m in modules.items() if isinstance(m, (nn.ReLU, nn.MaxPool2d))]
    assert sorted(called) == sorted(declared) and len(set(called)) == len(called)


def test_normalize_matches_per_channel_formula():
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 4.0)
    norm = Normalize(mean, std).double()
    x = torch.rand(4, 3, 5, 6, dtype=torch.float64)
    out = norm(x)
    for c in range(3):
        torch.testing.assert_close(out[:, c], (x[:, c] - mean[c]) / std[c], rtol=1e-6, atol=1e-7)
    assert set(norm.state_dict()) == {"mean", "std"} and list(norm.parameters()) == []
    assert torch.equal(Normalize(num_channels=2)(x[:, :2]), x[:, :2])
    with pytest.raises(ValueError, match="one value per input channel"):
        Normalize((0.5,), (0.2, 0.2))
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize((0.5,), (0.0,))


@pytest.mark.parametrize("name", MODELS)
def test_model_normalizes_inside(name):
    """model(x) with (mean, std) equals the same weights with identity normalization on standardized x."""
    torch.manual_seed(1)
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.3, 0.25)
    model = small(name, (3, 8, 8), mean=mean, std=std).double().eval()
    plain = copy.deepcopy(model)
    plain.normalize.mean.zero_()
    plain.normalize.std.fill_(1.0)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    m, s = (
        torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1),
        torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1),
    )
    torch.testing.assert_close(model(x), plain((x - m) / s), rtol=1e-6, atol=1e-6)
    assert torch.allclose(model.state_dict()["normalize.std"].flatten(), s.flatten())


@pytest.mark.parametrize("name", MODELS)
def test_eval_mode_is_per_example(name):
    torch.manual_seed(2)
    model = small(name, (1, 8, 8)).double()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    model.train()
    model(torch.rand(16, 1, 8, 8, dtype=torch.float64))  # move BatchNorm's running statistics
    model.eval()
    batch = model(x)
    singles = torch.cat([model(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batch, singles, rtol=1e-10, atol=1e-10)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        model.train()  # the check above can fail: training-mode BatchNorm mixes examples
        assert not torch.allclose(model(x)[:2], model(x[:2]))


def test_models_are_differentiable_in_the_input():
    model = small("resnet18", (3, 8, 8)).eval()
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_classes_and_registry_agree():
    torch.manual_seed(3)
    a = build_model("resnet18", input_shape=(3, 8, 8), num_classes=10, width=4)
    b = ResNet18((3, 8, 8), 10, width=4)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert isinstance(build_model("VGG", input_shape=(1, 8, 8), num_classes=3), VGG)


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid names: " + ", ".join(MODELS)):
        build_model("alexnet", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("cnn", input_shape=(8, 8), num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("cnn", input_shape=(1, 8, 8), num_classes=1)
    with pytest.raises(ValueError, match="width"):
        build_model("cnn", input_shape=(1, 8, 8), num_classes=10, width=0)
    with pytest.raises(ValueError, match="one value per input channel"):
        build_model("mlp", input_shape=(3, 8, 8), num_classes=10, mean=(0.5,), std=(0.2,))
