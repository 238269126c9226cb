"""Independent references shared by the tests."""

from __future__ import annotations

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
