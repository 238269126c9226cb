"""Independent references shared by the tests."""

from __future__ import annotations

import math

import torch


def reference_jacobian(model, x: torch.Tensor) -> torch.Tensor:
    """(B, d, n) from torch.autograd.functional.jacobian, one example at a time, in eval mode
    (the model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        rows = [torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0)).squeeze(0), xb) for xb in x]
    finally:
        model.train(was)
    return torch.stack([J.reshape(J.shape[0], -1) for J in rows])


def dual(p: float) -> float:
    """The conjugate exponent p* with 1/p + 1/p* = 1 (1 <-> inf)."""
    return 1.0 if p == math.inf else (math.inf if p == 1 else p / (p - 1))


def psi(z: torch.Tensor, r: float) -> torch.Tensor:
    """The duality map written out per row of z (B, n): the unit l_{r*} vector v with <v, z> = ||z||_r.

    r = 1: sign(z); r = 2: z / ||z||_2; r = inf: sign(z_i) at the first argmax |z_i|, 0 elsewhere
    (the tests' data have no ties); 1 < r < inf: sign(z) |z|^(r-1) / ||z||_r^(r-1).
    """
    if r == 1:
        return torch.sign(z)
    if r == math.inf:
        top = z.abs().argmax(dim=1, keepdim=True)
        return torch.zeros_like(z).scatter(1, top, torch.sign(z.gather(1, top)))
    norm = z.abs().pow(r).sum(dim=1, keepdim=True).pow(1 / r)
    return torch.sign(z) * (z.abs() / norm).pow(r - 1)
