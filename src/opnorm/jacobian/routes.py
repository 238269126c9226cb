"""Choosing a route to J(x), and the explicit Jacobian."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from opnorm.jacobian.autograd import Linearization
from opnorm.jacobian.core import basis, batched_grad, check_inputs, eval_mode, forward, unbatched, unwrap
from opnorm.jacobian.graph import GraphLinearization
from opnorm.jacobian.pattern import PatternLinearization, pattern_support
from opnorm.jacobian.steps import has_hooks, is_plain

LinearOperator = Linearization | PatternLinearization | GraphLinearization
ROUTES = ("auto", "pattern", "forward", "autograd")


def linearize(model: Callable, x: torch.Tensor, route: str = "auto") -> LinearOperator:
    """J(x) as a linear operator (``matvec`` = J v, ``rmatvec`` = J^T u, ``matmat`` /
    ``rmatmat`` for stacks (k, B, ...), ``logits`` = f(x), ``route`` = how J v is computed).

    Args:
        model: the model, already in the mode to analyse (see :func:`eval_mode`).
        x: (B, *in) inputs.
        route: "pattern" (:class:`PatternLinearization` for a plain ``nn.Sequential``,
            :class:`~opnorm.jacobian.graph.GraphLinearization` for residual networks; see
            :func:`pattern_support`),
            "forward" (:class:`Linearization` with J v by forward-mode AD), "autograd"
            (:class:`Linearization` with J v by double backward), or "auto": pattern
            whenever :func:`pattern_support` says it applies (it is exact either way;
            modules it does not recognize are differentiated by autograd), else forward
            mode with double backward as the fallback for ops without a forward-mode
            derivative (``lin.route`` says which one ran, after the first ``matvec``).

    Raises:
        UnsupportedModelError: on the first ``matvec`` when no route supports an op of the
            model; the message names the module and op.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, v, u = torch.rand(4, 8), torch.randn(4, 8), torch.randn(4, 3)
        >>> from opnorm.jacobian import eval_mode, linearize
        >>> with eval_mode(model):
        ...     lin = linearize(model, x)
        ...     jv = lin.matvec(v)
        >>> jv.shape  # (B, d)
        torch.Size([4, 3])
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    check_inputs(model, x)
    if route == "pattern" and not isinstance(model, nn.Module):
        raise ValueError(f"route='pattern' needs a plain nn.Sequential, got {type(model).__name__}; use route='auto'")
    if route in ("forward", "autograd") or not isinstance(model, nn.Module):
        return Linearization(model, x, route)
    applies, reasons = pattern_support(model)
    if route == "pattern" and not applies:
        raise ValueError(
            f"route='pattern' does not apply: {'; '.join(reasons)}; use route='auto', 'forward' or 'autograd'"
        )
    if applies:
        return _pattern(unwrap(model), x)
    lin = Linearization(model, x, "auto")
    lin.fallbacks = reasons  # why the pattern route was not taken
    return lin


def jacobian(model: nn.Module, x: torch.Tensor, *, route: str = "auto", chunk: int | None = None) -> torch.Tensor:
    """The exact per-example Jacobian, shape (B, d, *in), from d VJPs batched over the basis.

    The model is evaluated in eval mode (see :mod:`opnorm.jacobian`) and its mode restored.

    Args:
        model: f: (B, *in) -> (B, d). x: (B, *in).
        route: how the VJPs are computed, as in :func:`linearize`: "auto" (the pattern
            route for plain ``nn.Sequential`` models, else autograd), "pattern", or
            "forward" / "autograd" (both a plain backward: only J v differs between them).
        chunk: basis vectors per stacked VJP (default: all of them for autograd, one for the
            pattern route). Only memory and speed depend on it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, v, u = torch.rand(4, 8), torch.randn(4, 8), torch.randn(4, 3)
        >>> from opnorm.jacobian import jacobian, jvp
        >>> J = jacobian(model, x)
        >>> J.shape  # (B, d, *x.shape[1:])
        torch.Size([4, 3, 8])
        >>> bool(torch.allclose(torch.einsum("bdn,bn->bd", J, v), jvp(model, x, v)[1], atol=1e-6))
        True
    """
    check_inputs(model, x)
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    net = unwrap(model)
    with eval_mode(net), torch.enable_grad():
        if route == "pattern" or (route == "auto" and pattern_support(net)[0]):
            return jacobian_of(_pattern(net, x), chunk=chunk)
        xg = x.detach().requires_grad_(True)
        out = forward(net, xg)
        rows = batched_grad(out, xg, basis(out))  # no double-backward graph needed here
    return rows.transpose(0, 1).contiguous()  # (B, d, *in)


def _pattern(net: nn.Module, x: torch.Tensor) -> PatternLinearization | GraphLinearization:
    """The pattern-route operator: the chain replay for a plain Sequential, else the graph replay."""
    try:
        if is_plain(net, nn.Sequential) and not has_hooks(net):
            return PatternLinearization(net, x)
        return GraphLinearization(net, x)
    except RuntimeError as err:  # the replay runs the model's modules on x, as forward() does
        hint = unbatched(net, x)
        if hint is None:
            raise
        raise ValueError(hint) from err


def jacobian_of(lin: LinearOperator, chunk: int | None = None) -> torch.Tensor:
    """The exact J (B, d, *in) of a linear operator from :func:`linearize`: rmatmat on the basis.

    Args:
        lin: a :class:`PatternLinearization` or :class:`Linearization`.
        chunk: basis vectors per rmatmat call (default: d for autograd, 1 for the pattern route).
    """
    e = basis(lin.logits)
    d = e.shape[0]
    if chunk is None:
        chunk = _default_chunk(lin)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    rows = torch.cat([lin.rmatmat(e[i : i + chunk]) for i in range(0, d, chunk)])
    return rows.transpose(0, 1).contiguous()


def _default_chunk(lin: LinearOperator) -> int:
    # autograd: one vmapped backward for the whole basis; pattern: one vector at a time, as
    # stacking only grows the temporaries past the caches (measured by benchmarks/operator_norm.py)
    return lin.logits.shape[1] if isinstance(lin, Linearization) else 1
