"""Shared pieces of the Jacobian routes: model unwrapping, eval mode, input and output
checks, batched gradients, and the context in which every route runs the model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
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


def check_autograd(model: Callable) -> None:
    """Raise one line where autograd cannot differentiate the model: under ``torch.inference_mode()``
    (every input gradient, J v and J^T u would be missing or zero) or with parameters that are
    inference tensors (made under it)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "opnorm needs autograd, which torch.inference_mode() turns off (the results would be zeros): "
            "call it outside inference_mode; torch.no_grad() is fine"
        )
    if isinstance(model, nn.Module) and any(p.is_inference() for p in model.parameters()):
        raise RuntimeError(
            "the model's parameters are inference tensors (made under torch.inference_mode()), which "
            "autograd cannot use: build or load the model outside inference_mode"
        )


def usable(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it that autograd can record when t is an inference tensor (made under
    ``torch.inference_mode()``, used outside it)."""
    return t.clone() if t.is_inference() else t


def unbatched(model: Callable, x: torch.Tensor, name: str = "x") -> str | None:
    """The one-line fix when ``x`` looks like a single example without its batch dimension: the
    model's first convolution ``ConvNd`` would take x, of rank N + 1, as one unbatched example."""
    conv = (
        next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
        if isinstance(model, nn.Module)
        else None
    )
    if conv is None or x.ndim != len(conv.kernel_size) + 1:
        return None
    return (
        f"{name} of shape {tuple(x.shape)} looks like one example without its batch dimension "
        f"({type(conv).__name__} takes (B, C, ...)): pass a batch, e.g. {name}[None] for a single example"
    )


def check_inputs(model: nn.Module, x: torch.Tensor, name: str = "x") -> None:
    """Raise a clear error if x cannot be fed to model for per-example analysis (including under
    ``torch.inference_mode()``, see :func:`check_autograd`)."""
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model must be a torch.nn.Module or a callable, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, ...), got {type(x).__name__}")
    check_autograd(model)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty batch of shape (B, ...) with B >= 1 and at least one dimension per "
            f"example, got shape {tuple(x.shape)}" + (f"; for a single example use {name}[None]" if x.ndim == 1 else "")
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert with x.float()")
    if isinstance(model, nn.Module):
        param = next(iter(model.parameters()), None)
        if param is not None:
            if param.device != x.device:
                raise ValueError(
                    f"{name} is on device {x.device} but the model is on device {param.device}; "
                    f"move one of them, e.g. x.to({str(param.device)!r})"
                )
            if param.is_floating_point() and param.dtype != x.dtype:
                raise TypeError(
                    f"{name} has dtype {x.dtype} but the model's parameters have dtype {param.dtype}; "
                    f"use x.to({param.dtype}) or model.to({x.dtype})"
                )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values; clean the inputs before computing norms or attacks")


def check_label_range(y: torch.Tensor, num_logits: int, name: str = "y") -> None:
    """Raise a clear error unless every label indexes one of ``num_logits`` logits."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_logits):
        raise ValueError(
            f"{name} holds labels in [{int(y.min())}, {int(y.max())}] but the model has {num_logits} logits; "
            f"labels must be in [0, {num_logits - 1}]"
        )


class Logits(nn.Module):
    """The logits of a model that returns a tuple or dict: ``Logits(model, key)(x) = model(x)[key]``.

    Args:
        model: f: (B, *in) -> a tuple, list or dict holding the logits (B, d).
        key: the logits' position or key in it.

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> from opnorm.jacobian import Logits
        >>> class TwoHeads(nn.Module):  # returns a dict
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body, self.head = nn.Linear(8, 6), nn.Linear(6, 3)
        ...     def forward(self, x):
        ...         h = self.body(x).relu()
        ...         return {"features": h, "logits": self.head(h)}
        >>> opnorm.operator_norm(Logits(TwoHeads(), "logits"), torch.rand(4, 8), 2, 2).sigma.shape
        torch.Size([4])
    """

    def __init__(self, model: nn.Module, key: Any = 0) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[self.key]


def check_output(out: Any, batch: int) -> torch.Tensor:
    """``out`` if it is logits of shape (B, d) with B = ``batch``; else one line saying what to pass."""
    if isinstance(out, (tuple, list)):
        raise TypeError(
            f"model returned a {type(out).__name__} of {len(out)}; opnorm needs the logits alone, a tensor "
            "(B, d): pass opnorm.jacobian.Logits(model, 0), with the logits' position for 0"
        )
    if isinstance(out, dict):
        key = "logits" if "logits" in out else next(iter(out), "logits")
        raise TypeError(
            f"model returned a dict with keys {list(out)}; opnorm needs the logits alone, a tensor (B, d): "
            f"pass opnorm.jacobian.Logits(model, {key!r})"
        )
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model must return a tensor of logits of shape (B, d), got {type(out).__name__}")
    if out.ndim != 2 or out.shape[0] != batch:
        raise ValueError(
            f"model output must be 2-D (B, d) with B = {batch} (one logit vector per example), "
            f"got shape {tuple(out.shape)}; if x is one example, pass x[None]"
        )
    return out


def forward(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """model(x) with the output shape checked to be (B, d), and one line for an unbatched x."""
    try:
        out = model(x)
    except RuntimeError as err:
        hint = unbatched(model, x)
        if hint is None:
            raise
        raise ValueError(hint) from err
    return check_output(out, x.shape[0])


def batched_grad(out: torch.Tensor, inp: torch.Tensor, grads: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """d<out, g_i>/d inp for every g_i in grads (k, *out.shape), keeping the graph.

    With ``strict``, an ``out`` that requires grad but whose graph does not reach ``inp``
    raises instead of giving zeros: for a graph built by differentiation (J^T u as a
    function of u), that means a backward that is not differentiable, not J = 0.
    """
    zeros = torch.zeros(grads.shape[0], *inp.shape, dtype=grads.dtype, device=grads.device)
    if not out.requires_grad:  # out does not depend on inp
        return zeros
    try:
        (res,) = torch.autograd.grad(
            out, inp, grad_outputs=grads, is_grads_batched=True, retain_graph=True, allow_unused=True
        )
        rows = [res]
    except RuntimeError:  # an op without a batching rule: one backward per vector
        rows = [torch.autograd.grad(out, inp, grad_outputs=g, retain_graph=True, allow_unused=True)[0] for g in grads]
        res = None if any(r is None for r in rows) else torch.stack(rows)
    if res is None and strict:
        raise RuntimeError("the differentiated graph does not reach its input: a backward in it is not differentiable")
    return zeros if res is None else res


def basis(out: torch.Tensor) -> torch.Tensor:
    """(d, B, d) stack: entry i is e_i for every example."""
    B, d = out.shape
    return torch.eye(d, dtype=out.dtype, device=out.device).unsqueeze(1).expand(d, B, d)


def _hardsigmoid(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return torch.clamp(x + 3, 0, 6) / 6


def _hardswish(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return x * (torch.clamp(x + 3, 0, 6) / 6)


# Functions whose backward has no derivative in torch (so neither double backward nor
# reverse-over-forward works through them), replaced by equal compositions of ops that are
# differentiable to any order.
_COMPOSITES: dict[Callable, Callable] = {F.hardsigmoid: _hardsigmoid, F.hardswish: _hardswish}


class _Composites(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _COMPOSITES.get(func, func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def linearizable() -> Iterator[None]:
    """Run a model so that its graph supports J v by every route.

    Inside the context, ``F.hardsigmoid`` / ``F.hardswish`` (whose backward has no
    derivative in torch) run as equal compositions of clamp, add and multiply, and
    ``scaled_dot_product_attention`` uses the math kernel (the fused kernels have neither a
    forward-mode derivative nor a double backward). Values agree with the plain model up
    to float rounding; the gradients are the same almost everywhere.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from opnorm.jacobian.core import linearizable
        >>> model, x = nn.Sequential(nn.Linear(8, 6), nn.Hardswish(), nn.Linear(6, 3)), torch.rand(4, 8)
        >>> with linearizable():
        ...     out = model(x)  # now twice differentiable and forward-mode differentiable
        >>> bool(torch.allclose(out, model(x)))
        True
    """
    with _Composites(), sdpa_kernel(SDPBackend.MATH):
        yield
