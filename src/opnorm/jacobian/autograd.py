"""J(x) of any model by autograd: J^T u by one backward on a retained graph, J v by
forward-mode AD or by differentiating the backward graph (double backward), whichever
the model's ops support."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import forward_ad as fwAD

from opnorm.jacobian.core import batched_grad, check_autograd, check_inputs, forward, linearizable, usable
from opnorm.jacobian.support import unsupported

# how J v is computed, in the order "auto" tries them: "autograd" = the double-backward trick
# on the retained graph (cheaper on the benchmark's convolutional and attention models, see
# benchmarks/results/operator_norm.json); "forward" = forward-mode AD (dual tensors, one
# forward pass with tangents per product), for ops without a double backward
JV_ROUTES = ("autograd", "forward")
# differentiable_jvp's order: one forward pass with tangents, whose backward is second
# order, against the double backward, whose backward is third order
DIFFERENTIABLE_ORDER = ("forward", "autograd")
_JV_ERRORS = (RuntimeError, NotImplementedError)
# relative tolerance of the dot-product test (a wrong J v is off by O(1))
_ADJOINT_TOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.05}


def _forward_jvp(model: Callable, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), J v) by forward-mode AD, differentiable w.r.t. the parameters where grad is on.

    Dual tensors (``torch.autograd.forward_ad``) rather than ``torch.func.jvp``: they allow
    train-mode BatchNorm's in-place running-statistics update.
    """
    with linearizable(), fwAD.dual_level():
        out = forward(model, fwAD.make_dual(x, v.to(x.dtype)))
        primal, tangent = fwAD.unpack_dual(out)
    if tangent is None:  # the output does not depend on x
        tangent = torch.zeros_like(primal)
    return primal, tangent


class Linearization:
    """J(x) as a linear operator at fixed x by autograd (any model).

    One forward pass with x requiring grad is kept: ``rmatvec(u) = J^T u`` is one backward on
    that graph. ``matvec(v) = J v`` by forward-mode AD (``"forward"``: a forward pass with dual tensors
    per product) or by the double-backward trick (``"autograd"``:
    ``J v = d/du <J^T u, v>`` on the retained graph). The model runs under
    :func:`~opnorm.jacobian.core.linearizable`. With ``route="auto"`` double backward is
    tried first and forward mode is the fallback when an op lacks a double backward;
    ``route`` then names the one used (after the first ``matvec``). If neither works,
    :class:`~opnorm.jacobian.support.UnsupportedModelError` names the module and op.

    Args:
        model: f: (B, *in) -> (B, d), already in the mode to analyse.
        x: (B, *in). route: "auto", "forward" or "autograd".

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, v, u = torch.rand(4, 8), torch.randn(4, 8), torch.randn(4, 3)
        >>> from opnorm.jacobian import Linearization
        >>> lin = Linearization(model.eval(), x)
        >>> lin.matvec(v).shape, lin.rmatvec(u).shape, lin.route  # (B, d), x.shape, the route of J v
        (torch.Size([4, 3]), torch.Size([4, 8]), 'autograd')
    """

    def __init__(self, model: Callable, x: torch.Tensor, route: str = "auto"):
        if route not in ("auto",) + JV_ROUTES:
            raise ValueError(f"route must be one of ('auto', 'forward', 'autograd'), got {route!r}")
        check_autograd(model)
        self.model = model
        with torch.enable_grad(), linearizable():
            self.x = x.detach().requires_grad_(True)
            self.out = forward(model, self.x)
        self.logits = self.out.detach()
        self.fallbacks: list[str] = []
        self._candidates = JV_ROUTES if route == "auto" else (route,)
        self.route = self._candidates[0]
        self._settled = False
        self._jt_graph: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- J v --------------------------------------------------------------------------------

    def _double_backward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, J^T u) with J^T u a differentiable (linear) function of the dummy u."""
        if self._jt_graph is None:
            with torch.enable_grad():
                u = torch.zeros_like(self.out, requires_grad=True)
                (jt,) = torch.autograd.grad(self.out, self.x, grad_outputs=u, create_graph=True)
            self._jt_graph = (u, jt)
        return self._jt_graph

    def _matmat_by(self, route: str, V: torch.Tensor) -> torch.Tensor:
        V = V.to(self.out.dtype)
        if route == "forward":
            x = self.x.detach()
            with torch.no_grad():
                return torch.stack([_forward_jvp(self.model, x, v)[1] for v in V])
        if not self.out.requires_grad:  # the model is constant in x
            return torch.zeros(V.shape[0], *self.out.shape, dtype=self.out.dtype, device=self.out.device)
        u, jt = self._double_backward()
        if not jt.requires_grad:  # J^T u does not depend on u: J = 0 (an identity map gives jt = u itself)
            return torch.zeros(V.shape[0], *self.out.shape, dtype=self.out.dtype, device=self.out.device)
        return batched_grad(jt, u, V, strict=True).detach()

    def _adjoint_check(self, route: str, v: torch.Tensor, jv: torch.Tensor) -> None:
        """The dot-product test ``<J v, u> = <v, J^T u>`` for a random u, once per route: an op
        whose backward is silently not differentiable (a custom Function's backward that
        detaches) or whose forward-mode rule is wrong must not pass for a result."""
        gen = torch.Generator(device=jv.device).manual_seed(0)
        u = torch.randn(jv.shape, dtype=jv.dtype, device=jv.device, generator=gen)
        lhs, rhs = (jv * u).sum(), (v.to(jv.dtype) * self.rmatvec(u)).sum()
        scale = torch.linalg.vector_norm(jv) * torch.linalg.vector_norm(u) + torch.linalg.vector_norm(
            v
        ) * torch.linalg.vector_norm(self.rmatvec(u))
        if not bool((lhs - rhs).abs() <= _ADJOINT_TOL[jv.dtype] * scale):
            raise RuntimeError(
                f"J v by {route} fails the dot-product test <J v, u> = <v, J^T u> "
                f"({float(lhs):.6g} vs {float(rhs):.6g}): an op's derivative is not what its backward says"
            )

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """J v_i for a stack V (k, B, *in) -> (k, B, d)."""
        if self._settled:
            return self._matmat_by(self.route, V)
        errors: dict[str, BaseException] = {}
        for route in self._candidates:
            try:
                res = self._matmat_by(route, V)
                self._adjoint_check(route, V[0], res[0])
            except _JV_ERRORS as e:
                errors[route] = e
                self._jt_graph = None
                continue
            self.route, self._settled = route, True
            self.fallbacks += [f"J v by {r} failed: {err}".splitlines()[0] for r, err in errors.items()]
            return res
        raise unsupported(self.model, self.x.detach(), errors) from next(iter(errors.values()))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """J v: (B, *in) -> (B, d)."""
        return self.matmat(v.unsqueeze(0))[0]

    # -- J^T u ------------------------------------------------------------------------------

    def rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        """J^T u_i for a stack U (k, B, d) -> (k, B, *in): one vmapped backward."""
        return batched_grad(self.out, self.x, U.to(self.out.dtype))

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """J^T u: (B, d) -> (B, *in)."""
        if not self.out.requires_grad:
            return torch.zeros_like(self.x)
        (g,) = torch.autograd.grad(
            self.out, self.x, grad_outputs=u.to(self.out.dtype), retain_graph=True, allow_unused=True
        )
        return torch.zeros_like(self.x) if g is None else g


def vjp(model: Callable, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), J(x)^T u) for every example: u is (B, d), the result has x's shape."""
    check_inputs(model, x)
    with torch.enable_grad():
        xg = usable(x).detach().requires_grad_(True)
        out = forward(model, xg)
        (g,) = torch.autograd.grad(out, xg, grad_outputs=u.to(out.dtype))
    return out.detach(), g


def jvp(model: Callable, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), J(x) v) for every example: v has x's shape, J v is (B, d).

    Forward-mode AD (one pass, no graph kept), or double backward where an op lacks a
    forward-mode derivative (see :class:`Linearization`).
    """
    check_inputs(model, x)
    if v.shape != x.shape:
        raise ValueError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    x, v = usable(x), usable(v)
    with torch.no_grad():
        try:
            out, tangent = _forward_jvp(model, x.detach(), v.detach())
            return out.detach(), tangent.detach()
        except _JV_ERRORS:
            pass
    lin = Linearization(model, x, "auto")
    return lin.logits, lin.matvec(v.detach())


def differentiable_jvp(
    model: Callable, x: torch.Tensor, v: torch.Tensor, route: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), J(x) v), both differentiable w.r.t. the model's parameters (x and v are constants).

    For penalties on J v trained by backpropagation. One forward pass of the model in its
    current mode (train-mode BatchNorm updates its running statistics once, as in a plain
    forward): ``"forward"`` runs it with tangents (forward-mode AD; the backward of the
    result is reverse-over-forward), ``"autograd"`` builds ``g = J^T w`` with
    ``create_graph=True`` and takes ``J v = d<g, v>/dw`` (double backward; the backward of
    the result is third order, which train-mode ``batch_norm`` lacks). ``"auto"`` tries
    forward mode, then double backward; on a fallback the failed attempt's buffer updates
    (train-mode BatchNorm statistics) are undone, so the statistics move once.

    Args:
        model: f: (B, *in) -> (B, d). x: (B, *in). v: x's shape.
        route: "auto", "forward" or "autograd".

    Returns:
        (logits (B, d), jv (B, d)).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, v, u = torch.rand(4, 8), torch.randn(4, 8), torch.randn(4, 3)
        >>> import torch.nn.functional as F
        >>> from opnorm.jacobian import differentiable_jvp
        >>> logits, jv = differentiable_jvp(model, x, v)
        >>> jv.shape, jv.requires_grad
        (torch.Size([4, 3]), True)
        >>> (F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])) + jv.norm(dim=1).mean()).backward()
        >>> model[0].weight.grad.shape
        torch.Size([6, 8])
    """
    if route not in ("auto",) + JV_ROUTES:
        raise ValueError(f"route must be one of ('auto', 'forward', 'autograd'), got {route!r}")
    if v.shape != x.shape:
        raise ValueError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    check_inputs(model, x)
    x, v = usable(x).detach(), usable(v).detach().to(x.dtype)
    errors: dict[str, BaseException] = {}
    buffers = [b for b in model.buffers()] if isinstance(model, torch.nn.Module) else []
    for r in DIFFERENTIABLE_ORDER if route == "auto" else (route,):
        saved = [b.detach().clone() for b in buffers] if route == "auto" else []
        try:
            with torch.enable_grad():
                return _forward_jvp(model, x, v) if r == "forward" else _double_backward_jvp(model, x, v)
        except _JV_ERRORS as e:
            errors[r] = e
            with torch.no_grad():  # undo the failed pass's running-statistics updates
                for b, old in zip(buffers, saved):
                    b.copy_(old)
    raise unsupported(model, x, errors) from next(iter(errors.values()))


def _double_backward_jvp(model: Callable, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with linearizable():
        xg = x.requires_grad_(True)
        out = forward(model, xg)
    w = torch.zeros_like(out, requires_grad=True)
    (g,) = torch.autograd.grad(out, xg, grad_outputs=w, create_graph=True, allow_unused=True)
    if g is None:  # the model is constant in x
        return out, torch.zeros_like(out)
    (jv,) = torch.autograd.grad(g, w, grad_outputs=v, create_graph=True, allow_unused=True)
    if jv is None and g.grad_fn is not None:  # the graph from J^T w back to w was cut
        raise RuntimeError("double backward lost the dependence of J^T w on w (a backward that is not differentiable)")
    return out, (torch.zeros_like(out) if jv is None else jv)
