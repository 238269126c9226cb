"""Float64 affine models with a known weight matrix W, shared by the regularizer tests."""

from __future__ import annotations

import torch
from torch import nn

DT = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def affine_layer(d: int, n: int, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    """``nn.Linear(n, d)`` in float64 with Gaussian weight W (returned: J(x) = W everywhere) and bias."""
    g = gen(seed)
    W = torch.randn(d, n, generator=g, dtype=DT)
    lin = nn.Linear(n, d).double()
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(torch.randn(d, generator=g, dtype=DT))
    return lin, W
