"""Which modules of a model block J v, and the one error that says so."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd import forward_ad as fwAD

from opnorm.jacobian.core import linearizable


class UnsupportedModelError(RuntimeError):
    """J v is unavailable: an op has neither a forward-mode derivative nor a twice
    differentiable backward. The message names the module(s) and op(s) and what to do."""


def _op(err: BaseException) -> str:
    """The op named in an autograd error (``aten::...``), else the error's first line."""
    text = str(err)
    found = re.search(r"aten::[\w.]+", text)
    return found.group(0) if found else (text.strip().splitlines() or [type(err).__name__])[0][:200]


def _leaf_calls(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, module, input) for every leaf module called with one tensor during model(x)."""
    calls: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = []
    for name, m in model.named_modules():
        if next(m.children(), None) is None:

            def hook(mod, args, name=name):
                if len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                    calls.append((name or "<model>", mod, args[0].detach()))

            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), linearizable():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def _blocked(m: nn.Module, h: torch.Tensor) -> tuple[str, str] | None:
    """(forward-mode error, double-backward error) of module m at input h; None if either works."""
    errors = []
    with linearizable():
        try:
            with fwAD.dual_level():
                m(fwAD.make_dual(h, torch.ones_like(h)))
            return None
        except (RuntimeError, NotImplementedError) as e:
            errors.append(_op(e))
        with torch.enable_grad():
            hg = h.clone().requires_grad_(True)
            out = m(hg)
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                return None
            u = torch.zeros_like(out, requires_grad=True)
            (g,) = torch.autograd.grad(out, hg, u, create_graph=True, allow_unused=True)
            try:
                if (
                    g is None
                    or g.grad_fn is None
                    or torch.autograd.grad(g, u, torch.ones_like(g), allow_unused=True)[0] is not None
                ):
                    return None
                errors.append(f"{out.grad_fn.name()} (its backward is not differentiable)")
            except (RuntimeError, NotImplementedError) as e:
                errors.append(_op(e))
    return errors[0], errors[1]


def unsupported(
    model: Callable, x: torch.Tensor, errors: dict[str, BaseException], name: str = ""
) -> UnsupportedModelError:
    """The error to raise when every J v route failed on model at x.

    Args:
        model: the model (or the submodule that failed). x: the inputs it failed on.
        errors: route name -> the exception that route raised.
        name: the submodule's name in the whole model ("" for the model itself).
    """
    found = []
    if isinstance(model, nn.Module):
        try:
            for leaf, m, h in _leaf_calls(model, x):
                blocked = _blocked(m, h)
                if blocked is not None:
                    full = ".".join(p for p in (name, "" if leaf == "<model>" else leaf) if p) or leaf
                    found.append(
                        f"module {full!r} ({type(m).__name__}): forward-mode AD fails at {blocked[0]}, "
                        f"double backward at {blocked[1]}"
                    )
        except Exception as e:  # the diagnosis itself failed: report the routes' errors alone
            found.append(f"(could not test modules one by one: {_op(e)})")
    where = "; ".join(found) if found else "no single module fails on its own (an op inside a module's forward)"
    routes = "; ".join(f"{route}: {_op(err)}" for route, err in errors.items())
    return UnsupportedModelError(
        f"J v is unavailable for this model: {where} [route errors: {routes}]. Give the op a forward-mode "
        "derivative (a jvp staticmethod on a custom autograd.Function) or a differentiable backward, "
        "or replace the module by one built from differentiable torch ops"
    )
