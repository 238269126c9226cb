"""Model registry: every model maps pixels in [0, 1] to logits and is piecewise linear.

Each model starts with a ``Normalize`` module, so inputs, attacks and Jacobians live in
pixel space while the network sees standardized inputs. Nonlinearities are ``nn.ReLU`` /
``nn.MaxPool2d`` *modules* (one instance per use), never functional calls, so forward hooks
can record activation patterns; BatchNorm is per-example in eval mode.

Example:
    >>> import torch
    >>> from opnorm.training.models import build_model
    >>> model = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, mean=(0.286,), std=(0.353,))
    >>> model(torch.rand(5, 1, 28, 28)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "MODELS",
    "build_model",
    "Normalize",
    "MLP",
    "SmallCNN",
    "VGG",
    "PaperCNN",
    "BasicBlock",
    "ResNet18",
    "WideBasicBlock",
    "WideResNet",
]

MODELS = ("mlp", "cnn", "cnn-bn", "vgg", "cnn7", "resnet18", "wrn-28-10")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with buffers (saved in state_dict, moved by ``.to``).

    Args:
        mean, std: sequences of length C (or None for 0 / 1), std > 0.
        num_channels: C, used when mean / std are None.

    Shape: ``(B, C, H, W) -> (B, C, H, W)``.

    Example:
        >>> import torch
        >>> from opnorm.training.models import Normalize
        >>> Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(torch.ones(1, 3, 2, 2))[0, 0, 0, 0]
        tensor(2.)
    """

    def __init__(
        self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None, num_channels: int | None = None
    ):
        super().__init__()
        c = (
            num_channels
            if num_channels is not None
            else len(mean if mean is not None else std if std is not None else [0.0])
        )
        # Validate as Python floats: works under any default device (including "meta").
        mean_l = [0.0] * c if mean is None else [float(v) for v in mean]
        std_l = [1.0] * c if std is None else [float(v) for v in std]
        if len(mean_l) != c or len(std_l) != c:
            raise ValueError(
                f"mean and std must have one value per input channel ({c}), got {len(mean_l)} and {len(std_l)}"
            )
        if not all(math.isfinite(v) for v in mean_l) or not all(math.isfinite(v) and v > 0 for v in std_l):
            raise ValueError(f"std must be positive and finite and mean finite, got mean={mean_l}, std={std_l}")
        mean_t = torch.tensor(mean_l, dtype=torch.float32)
        std_t = torch.tensor(std_l, dtype=torch.float32)
        self.register_buffer("mean", mean_t.view(1, c, 1, 1))
        self.register_buffer("std", std_t.view(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias)


class MLP(nn.Sequential):
    """Flatten, then ``Linear-ReLU`` per hidden layer, then a linear classifier.

    Args:
        input_shape: (C, H, W). num_classes: outputs. hidden: hidden widths (default two of 128).
        mean, std: Normalize statistics (length C).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        hidden: Sequence[int] = (128, 128),
        mean=None,
        std=None,
    ):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["normalize"] = Normalize(mean, std, num_channels=input_shape[0])
        layers["flatten"] = nn.Flatten()
        width = input_shape[0] * input_shape[1] * input_shape[2]
        for k, h in enumerate(hidden):
            layers[f"fc{k + 1}"] = nn.Linear(width, h)
            layers[f"relu{k + 1}"] = nn.ReLU()
            width = h
        layers["classifier"] = nn.Linear(width, num_classes)
        super().__init__(layers)


def _pool_or_skip(size: int) -> bool:
    """Pool only while the map is at least 2x2: a 2x2 pool never shrinks a side below 1."""
    return size >= 2


class SmallCNN(nn.Sequential):
    """conv3x3(c1)-ReLU-maxpool2, conv3x3(c2)-ReLU-maxpool2, flatten, linear(hidden)-ReLU, linear.

    Args:
        input_shape: (C, H, W), e.g. (1, 8, 8), (1, 28, 28), (3, 32, 32).
        num_classes: outputs. width: c1 (c2 = 2 * width), default 32. hidden: 128.
        mean, std: Normalize statistics.
        batchnorm: put ``BatchNorm2d(affine=False)`` after each conv (whose bias it would
            cancel, so the convs then have none), as the paper's cnn7 does.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int = 32,
        hidden: int = 128,
        mean=None,
        std=None,
        batchnorm: bool = False,
    ):
        c, h, w = input_shape
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["normalize"] = Normalize(mean, std, num_channels=c)
        for k, cout in enumerate((width, 2 * width), start=1):
            layers[f"conv{k}"] = _conv3x3(c, cout, bias=not batchnorm)
            if batchnorm:
                layers[f"bn{k}"] = nn.BatchNorm2d(cout, affine=False)
            layers[f"relu{k}"] = nn.ReLU()
            if _pool_or_skip(min(h, w)):
                layers[f"pool{k}"] = nn.MaxPool2d(2)
                h, w = h // 2, w // 2
            c = cout
        layers["flatten"] = nn.Flatten()
        layers["fc"] = nn.Linear(c * h * w, hidden)
        layers["relu_fc"] = nn.ReLU()
        layers["classifier"] = nn.Linear(hidden, num_classes)
        super().__init__(layers)


class VGG(nn.Sequential):
    """The CIFAR VGG-style net: conv widths n, n, pool, 2n, 2n, pool, 4n, 4n, pool, 8n, pool, linear.

    Every conv is 3x3 (padding 1) followed by ``BatchNorm2d(affine=False)`` and ReLU. Pools
    that would shrink a side below 1 are skipped (8x8 inputs keep three of the four).

    Args:
        input_shape: (C, H, W). num_classes: outputs. width: n (default 16).
        mean, std: Normalize statistics.
    """

    PLAN = (1, 1, "M", 2, 2, "M", 4, 4, "M", 8, "M")

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 16, mean=None, std=None):
        # No conv bias: BatchNorm subtracts the mean right after, which cancels it.
        conv = lambda c, cout, last, h, w: (_conv3x3(c, cout), h, w)  # noqa: E731
        super().__init__(_plan_layers(self.PLAN, input_shape, num_classes, width, mean, std, conv))


def _plan_layers(plan, input_shape, num_classes, width, mean, std, conv) -> OrderedDict[str, nn.Module]:
    """Normalize, then per plan item a conv (``conv(c_in, c_out, last, h, w) -> (module, h, w)``)
    with ``BatchNorm2d(affine=False)`` and ReLU, or "M": a 2x2 max-pool (skipped where a side
    would fall below 1); then flatten and a linear classifier."""
    c, h, w = input_shape
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["normalize"] = Normalize(mean, std, num_channels=c)
    k = p = 0
    for i, item in enumerate(plan):
        if item == "M":
            p += 1
            if _pool_or_skip(min(h, w)):
                layers[f"pool{p}"] = nn.MaxPool2d(2)
                h, w = h // 2, w // 2
            continue
        k += 1
        cout = int(item) * width
        layers[f"conv{k}"], h, w = conv(c, cout, i == len(plan) - 2, h, w)
        layers[f"bn{k}"] = nn.BatchNorm2d(cout, affine=False)
        layers[f"relu{k}"] = nn.ReLU()
        c = cout
    layers["flatten"] = nn.Flatten()
    layers["classifier"] = nn.Linear(c * h * w, num_classes)
    return layers


class PaperCNN(nn.Sequential):
    """The 7-layer CIFAR-10 network of Roth, Kilcher & Hofmann (NeurIPS 2020):
    conv widths n, n, pool, 2n, 2n, pool, 4n, 4n, pool, 8n (no padding), pool, linear.

    Every conv is 3x3 with a bias, followed by ``BatchNorm2d(affine=False)`` and ReLU; the
    first six convs are padded by 1, the last is not. At the paper's width n = 128 the widths
    run from 128 to 1024 and a 32x32 input reaches the classifier as 1024 x 1 x 1. For small
    test images (a map under 3x3 before the last conv) the last conv is padded too, and pools
    that would shrink a side below 1 are skipped, as in :class:`VGG`.

    Args:
        input_shape: (C, H, W). num_classes: outputs. width: n (default 128).
        mean, std: Normalize statistics.
    """

    PLAN = (1, 1, "M", 2, 2, "M", 4, 4, "M", 8, "M")

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 128, mean=None, std=None):
        def conv(c: int, cout: int, last: bool, h: int, w: int):
            unpadded = last and min(h, w) >= 3
            module = nn.Conv2d(c, cout, kernel_size=3, padding=0 if unpadded else 1)
            return (module, h - 2, w - 2) if unpadded else (module, h, w)

        super().__init__(_plan_layers(self.PLAN, input_shape, num_classes, width, mean, std, conv))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN, plus identity or 1x1 conv-BN shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem (no max-pool), four stages of two basic blocks with
    widths w, 2w, 4w, 8w (strides 1, 2, 2, 2), global average pool, linear.

    Args:
        input_shape: (C, H, W). num_classes: outputs. width: w (default 64; 11.17M parameters
            for 3x32x32 and 10 classes). mean, std: Normalize statistics.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 64, mean=None, std=None):
        super().__init__()
        self.normalize = Normalize(mean, std, num_channels=input_shape[0])
        self.conv1 = _conv3x3(input_shape[0], width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        blocks, cin = [], width
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            cout = mult * width
            blocks.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.classifier(self.flatten(self.pool(out)))


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus identity or 1x1 conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        # As in the reference WRN: a projection shortcut takes the pre-activated input.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """Wide ResNet WRN-depth-k (Zagoruyko & Komodakis 2016), CIFAR variant.

    ``(depth - 4) / 6`` pre-activation blocks per group, group widths 16k, 32k, 64k (strides
    1, 2, 2), then BN-ReLU, global average pool, linear. WRN-28-10 has 36.48M parameters.

    Args:
        input_shape: (C, H, W). num_classes: outputs.
        depth: 6n + 4 (default 28). widen_factor: k (default 10).
        mean, std: Normalize statistics.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        depth: int = 28,
        widen_factor: int = 10,
        mean=None,
        std=None,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.normalize = Normalize(mean, std, num_channels=input_shape[0])
        self.conv1 = _conv3x3(input_shape[0], widths[0])
        groups, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            groups.append(
                nn.Sequential(
                    *[WideBasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
                )
            )
            cin = cout
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        return self.classifier(self.flatten(self.pool(self.relu(self.bn(out)))))


def _init_weights(model: nn.Module) -> None:
    # He initialization for ReLU nets; BatchNorm starts as identity.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    width: int | None = None,
) -> nn.Module:
    """Build a classifier by name.

    Args:
        name: one of ``MODELS``: "mlp" (width = hidden size, default 128), "cnn" (width =
            first conv channels, default 32), "cnn-bn" (the same with ``BatchNorm2d(affine=False)``
            after each conv), "vgg" (n, default 16), "cnn7" (the paper's CIFAR-10
            network, n, default 128), "resnet18" (stem width,
            default 64), "wrn-28-10" (widen factor, default 10).
        input_shape: (C, H, W) of the pixel inputs, e.g. ``DatasetSplits.input_shape``.
        num_classes: number of logits (>= 2).
        mean, std: per-channel statistics for the leading ``Normalize`` (None: identity).
        width: model-specific width, see above.

    Returns:
        An ``nn.Module`` mapping ``(B, C, H, W)`` in [0, 1] to ``(B, num_classes)`` logits,
        in training mode, float32, on the CPU.

    Example:
        >>> import torch
        >>> from opnorm.training.models import build_model
        >>> build_model("vgg", input_shape=(3, 32, 32), num_classes=10, width=8)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if not isinstance(name, str) or name.strip().lower() not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    key = name.strip().lower()
    if (
        not isinstance(input_shape, (tuple, list))
        or len(input_shape) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape)
    ):
        raise ValueError(f"input_shape must be (C, H, W) with positive ints, got {input_shape!r}")
    input_shape = tuple(input_shape)  # type: ignore[assignment]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be a positive int or None, got {width!r}")
    kw = dict(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std)
    model: nn.Module
    if key == "mlp":
        w = width or 128
        model = MLP(hidden=(w, w), **kw)
    elif key in ("cnn", "cnn-bn"):
        model = SmallCNN(width=width or 32, batchnorm=key == "cnn-bn", **kw)
    elif key == "vgg":
        model = VGG(width=width or 16, **kw)
    elif key == "cnn7":
        model = PaperCNN(width=width or 128, **kw)
    elif key == "resnet18":
        model = ResNet18(width=width or 64, **kw)
    else:
        model = WideResNet(depth=28, widen_factor=width or 10, **kw)
    if key in ("vgg", "resnet18", "wrn-28-10"):
        _init_weights(model)
    return model
