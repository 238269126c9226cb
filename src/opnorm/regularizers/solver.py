"""The direction solver: projected gradient ascent on the penalty's direction v (docs/theory.md).

The penalty measures ``||f(x + eps v) - f(x)||`` over the unit l_p ball of directions; its
maximizer is found by PGA on v. With an infinite step every iterate is the steepest-ascent
direction ``psi_{p*}(J^T u)`` of the linearization, ``u`` the metric's dual of ``J v``: the
(p, q) power method. A finite step (a fraction of eps) is ordinary PGA whose iterate stays in
the ball. The gradient comes from the linearization at x (``dynamic=False``, the power method
on J(x)) or at the current point ``x + eps v`` (``dynamic=True``, a gradient step of the
nonlinear penalty, as PGA's). Every step is :func:`opnorm.norms.pga_step`.

All iterations run without weight gradients, in eval mode, on the unwrapped model, with
autocast disabled.

Example:
    >>> from opnorm.regularizers import PGASolver
    >>> solver = PGASolver(iters=10)                       # the paper: 10 power iterations
    >>> fast = PGASolver(iters=3, warm_iters=1, free_update=True)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from opnorm.jacobian import ROUTES, eval_mode, linearize
from opnorm.norms import clip_box, into_box, pga_step
from opnorm.power import power_iteration, random_unit
from opnorm.regularizers.metrics import LogitNorm, OutputMetric
from opnorm.validation import integer, number

__all__ = ["PGASolver", "no_autocast"]


def no_autocast(device: torch.device):
    """Full precision for the inner loops (power method, attacks) under a caller's autocast."""
    return torch.autocast(device_type=device.type, enabled=False)


class PGASolver:
    """How the penalty's direction is found, and how many iterations each visit gets.

    Args:
        iters: iterations for an example without a stored direction (>= 1).
        warm_iters: iterations for an example with a stored direction (>= 0; None: iters).
            With ``free_update`` a warm example also gets the free step of the training
            backward; without it at least one explicit iteration runs.
        step: the step of every direction update as a fraction of eps; inf (default) is the
            power method, whose iterates are unit vectors. Finite steps need p in {1, 2, inf}.
        dynamic: linearize iteration k at ``x + eps v_{k-1}`` instead of at x (u and sigma
            are still taken at x).
        free_update: advance each stored direction by one more step from the input gradient
            of the training backward at the penalty's point (needs a store, the fd penalty,
            and a model whose examples do not interact).
        route: how J is accessed (:func:`opnorm.jacobian.linearize`).
        generator: seeds the random start vectors (default: the global RNG).
    """

    def __init__(
        self,
        iters: int = 10,
        warm_iters: int | None = None,
        *,
        step: float = math.inf,
        dynamic: bool = False,
        free_update: bool = False,
        route: str = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        self.iters = integer(iters, "iters", lo=1)
        self.warm_iters = self.iters if warm_iters is None else integer(warm_iters, "warm_iters", lo=0)
        self.step = math.inf if step is None else number(step, "step", lo=0.0, strict=True, finite=False)
        self.dynamic, self.free_update = bool(dynamic), bool(free_update)
        if route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
        self.route, self.generator = route, generator

    def __repr__(self) -> str:
        return (
            f"PGASolver(iters={self.iters}, warm_iters={self.warm_iters}, step={self.step:g}, "
            f"dynamic={self.dynamic}, free_update={self.free_update})"
        )

    def random_start(self, n: int, like: torch.Tensor, p: float) -> torch.Tensor:
        """n random unit l_p directions of like's example shape (on the generator's device first)."""
        device = self.generator.device if self.generator is not None else like.device
        return random_unit((n, *like.shape[1:]), p, dtype=like.dtype, device=device, generator=self.generator).to(
            like.device
        )

    def ascend(
        self,
        v: torch.Tensor,
        g: torch.Tensor,
        x: torch.Tensor,
        p: float,
        eps: float,
        clip: tuple[float, float] | None,
    ) -> torch.Tensor:
        """One PGA step of the direction along g: the power method's ``psi_{p*}(g)``, or a finite
        step in the unit ball, after which (with ``clip``) ``x + eps v`` is kept in the box."""
        v = pga_step(v.to(g.dtype), g, p, 1.0, self.step)
        if self.step == math.inf or clip is None:
            return v
        return into_box(eps * v, x, clip) / eps

    def run(
        self,
        net: nn.Module,
        x: torch.Tensor,
        v0: torch.Tensor,
        iters: int,
        p: float,
        eps: float,
        metric: OutputMetric,
        clip,
        measure: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``iters`` iterations from v0 on the unwrapped net: (sigma, v, u), detached. Without
        ``measure`` the last J v (only needed for sigma and u) is skipped: sigma NaN, u None."""
        with eval_mode(net), torch.enable_grad(), no_autocast(x.device):
            lin = None if self.dynamic else linearize(net, x, self.route)
            if lin is not None and measure and isinstance(metric, LogitNorm) and self.step == math.inf:
                run = power_iteration(lin.matvec, lin.rmatvec, v0, p, metric.q, iters=iters)
                return run.sigma.detach(), run.v.detach(), run.u.detach()
            v = v0
            for _ in range(iters):
                at = lin if lin is not None else linearize(net, x + eps * v, self.route)
                v = self.ascend(v, at.rmatvec(metric.dual(at.matvec(v), at.logits)[1]), x, p, eps, clip)
                del at
            if not measure:
                return torch.full((x.shape[0],), math.nan, dtype=x.dtype, device=x.device), v.detach(), None
            if lin is None:
                lin = linearize(net, x, self.route)
            sigma, u = metric.dual(lin.matvec(v), lin.logits)
        return sigma.detach(), v.detach(), u.detach()

    def measure(self, net: nn.Module, x: torch.Tensor, v: torch.Tensor, metric: OutputMetric):
        """(sigma, u) = (||J v||, its dual direction) at x, with no iteration."""
        with eval_mode(net), torch.enable_grad(), no_autocast(x.device):
            lin = linearize(net, x, self.route)
            return metric.dual(lin.matvec(v).detach(), lin.logits)


def fd_point(x: torch.Tensor, v: torch.Tensor, eps: float, clip) -> torch.Tensor:
    """The penalty's point ``clip(x + eps v)`` (x detached)."""
    return clip_box(x.detach() + eps * v.to(x.dtype), clip)
