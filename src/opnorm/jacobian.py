"""Per-example access to the input-output Jacobian J(x) of any classifier.

A model ``f: (B, *in) -> (B, d)`` has one Jacobian ``J(x_b)`` of shape ``(d, *in)`` per
example as long as it does not mix examples. BatchNorm in training mode does (its
statistics come from the batch), and dropout makes f random. **opnorm's documented choice:
every per-example quantity (Jacobians, operator norms, attacks) is evaluated with the
model in eval mode**; the mode of every submodule is restored afterwards, also on errors.
Wrappers such as ``DistributedDataParallel`` are unwrapped to their ``.module``.

All functions are batched over examples: one JVP or VJP call serves the whole batch,
because with a per-example model ``sum_b f(x_b)`` has gradient ``J(x_b)^T u_b`` in row b.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

__all__ = [
    "eval_mode",
    "unwrap",
    "check_inputs",
    "forward",
    "jvp",
    "vjp",
    "linearize",
    "jacobian",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own flag on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def check_inputs(model: nn.Module, x: torch.Tensor, name: str = "x") -> None:
    """Raise a clear error if x cannot be fed to model for per-example analysis."""
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model must be a torch.nn.Module or a callable, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, ...), got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch of shape (B, ...) with B >= 1, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert with x.float()")
    if isinstance(model, nn.Module):
        param = next(iter(model.parameters()), None)
        if param is not None:
            if param.device != x.device:
                raise ValueError(
                    f"{name} is on device {x.device} but the model is on device {param.device}; move one of them, e.g. x.to({str(param.device)!r})"
                )
            if param.is_floating_point() and param.dtype != x.dtype:
                raise TypeError(
                    f"{name} has dtype {x.dtype} but the model's parameters have dtype {param.dtype}; "
                    f"use x.to({param.dtype}) or model.to({x.dtype})"
                )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values; clean the inputs before computing norms or attacks")


def _check_output(out: torch.Tensor, batch: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model must return a tensor of logits of shape (B, d), got {type(out).__name__}")
    if out.ndim != 2 or out.shape[0] != batch:
        raise ValueError(
            f"model output must be 2-D (B, d) with B = {batch} (one logit vector per example), got shape {tuple(out.shape)}"
        )
    return out


def forward(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """model(x) with the output shape checked to be (B, d)."""
    return _check_output(model(x), x.shape[0])


def vjp(model: Callable, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), J(x)^T u) for every example: u is (B, d), the result has x's shape."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = forward(model, xg)
        (g,) = torch.autograd.grad(out, xg, grad_outputs=u.to(out.dtype))
    return out.detach(), g


def jvp(model: Callable, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), J(x) v) for every example by forward-mode AD: v has x's shape, J v is (B, d)."""
    if v.shape != x.shape:
        raise ValueError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    out, tangent = torch.func.jvp(lambda inp: forward(model, inp), (x.detach(),), (v.detach().to(x.dtype),))
    return out.detach(), tangent.detach()


class Linearization:
    """J(x) as a linear operator at fixed x, built from one forward pass.

    ``rmatvec(u) = J^T u`` reuses the retained graph (one backward each);
    ``matvec(v) = J v`` differentiates the VJP graph once more ("double-backward trick":
    ``J v = d/du <J^T u, v>``), so neither needs another forward pass.
    """

    def __init__(self, model: Callable, x: torch.Tensor):
        with torch.enable_grad():
            self.x = x.detach().requires_grad_(True)
            self.out = forward(model, self.x)
            self._u = torch.zeros_like(self.out, requires_grad=True)
            # J^T u as a differentiable function of u (linear in u)
            (self._jt,) = torch.autograd.grad(self.out, self.x, grad_outputs=self._u, create_graph=True)
        self.logits = self.out.detach()

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(self.out, self.x, grad_outputs=u.to(self.out.dtype), retain_graph=True)
        return g

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if self._jt.grad_fn is None:  # the model is constant in x
            return torch.zeros_like(self.out)
        (jv,) = torch.autograd.grad(self._jt, self._u, grad_outputs=v.to(self.out.dtype), retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.out) if jv is None else jv.detach()


def linearize(model: Callable, x: torch.Tensor) -> Linearization:
    """A :class:`Linearization` of model at x (matvec = J v, rmatvec = J^T u, logits = f(x))."""
    return Linearization(model, x)


def jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The exact per-example Jacobian, shape (B, d, *in), from d batched VJPs.

    The model is evaluated in eval mode (see the module docstring) and its mode restored.
    """
    check_inputs(model, x)
    with eval_mode(unwrap(model)) as m, torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = forward(m, xg)
        d = out.shape[1]
        eye = torch.eye(d, dtype=out.dtype, device=out.device)
        # grad_outputs[i] = e_i for every example; is_grads_batched vmaps the backward over i
        basis = eye.unsqueeze(1).expand(d, out.shape[0], d)
        try:
            (rows,) = torch.autograd.grad(out, xg, grad_outputs=basis, is_grads_batched=True)
        except RuntimeError:  # an op without a batching rule: fall back to d plain VJPs
            rows = torch.stack(
                [torch.autograd.grad(out, xg, grad_outputs=basis[i], retain_graph=i < d - 1)[0] for i in range(d)]
            )
    return rows.transpose(0, 1).contiguous()  # (B, d, *in)
