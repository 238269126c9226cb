"""Per-example (p, q) operator norms of J(x): :func:`operator_norm` and its choice of method.

``||J||_{p->q} = max_{||v||_p <= 1} ||J v||_q``. The (p, q) power method (Boyd 1974)
iterates ``u_k = psi_q(J v_{k-1})``, ``v_k = psi_{p*}(J^T u_k)``; each iterate is a
lower bound attained by ``v_k``, exact at convergence for p = q = 2.

Exact routes form J with d VJPs (d = number of logits) and use:
  * (2, 2): the top singular value (SVD);
  * (1, q): the largest column q-norm;  (p, inf): the largest row p*-norm;
  * (inf, q) with n <= ``max_enumerate``: all 2^(n-1) sign vectors (the maximum of a
    convex function over the cube sits at a vertex);
  * (p, 1) with d <= ``max_enumerate``: ``||J||_{p->1} = max_{s in {+-1}^d} ||J^T s||_{p*}``;
  * any other pair (NP-hard in general): the best of many power-method restarts on the
    formed J, a documented lower bound (``result.exact`` is False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from opnorm.jacobian import ROUTES, LinearOperator, check_inputs, eval_mode, jacobian_of, linearize, unwrap
from opnorm.norms import Order, duality_map, norm_order
from opnorm.power.exact import (
    DEFAULT_RESTARTS,
    check_max_enumerate,
    has_exact_form,
    operator_norm_of_matrix,
    top_pair_gram,
)
from opnorm.power.iteration import lanczos_iteration, power_iteration, random_unit
from opnorm.validation import integer, number

METHODS = ("auto", "power", "lanczos", "exact")
DEFAULT_ITERS = 20
DEFAULT_RTOL_CHANGE = 1e-6
REMOVED_TOL = (
    "tol was renamed rtol_change: it is the relative change of sigma between iterations, not an error "
    "bound; use method='exact' (or result.exact) for a sigma whose error is bounded"
)


@dataclass
class OperatorNormResult:
    """Per-example (p, q) operator norms of J(x).

    Attributes:
        sigma: (B,) the norm (exact, or a lower bound attained by ``v``; see ``exact``); with
            method "exact", inf where the formed J(x) overflows and NaN where it holds NaN.
        v: x's shape, unit l_p norm, with ``||J v||_q == sigma``.
        u: (B, d), ``psi_q(J v)``.
        iterations: power or Lanczos iterations run (0 for closed forms).
        stopped: (B,) bool, the iteration stopped because sigma changed by at most
            ``rtol_change`` (a stopping rule, not an error bound; False for closed forms).
        method: "power", "lanczos" or "exact".
        exact: (B,) bool, True where sigma is proven to be the norm up to rounding (a closed
            form, enumeration, or Lanczos whose basis spanned the output space); elsewhere
            sigma is a lower bound with no bound on its error. ``converged`` is the same.
        history: with ``return_history=True`` and the power method, one dict per iteration
            k = 1..iterations: {"v": v_k, "u": u_k, "sigma": ||J v_k||_q}.
        route: how J was accessed: "pattern" (:class:`~opnorm.jacobian.PatternLinearization`),
            or :class:`~opnorm.jacobian.Linearization` with J v by "autograd" (double
            backward) or "forward" (forward-mode AD); ``fallbacks`` lists modules the pattern
            route left to autograd and J v routes that failed before the one used.
    """

    sigma: torch.Tensor
    v: torch.Tensor
    u: torch.Tensor
    iterations: int
    stopped: torch.Tensor
    method: str
    exact: torch.Tensor
    history: list[dict] | None = field(default=None, repr=False)
    route: str = "autograd"
    fallbacks: list[str] = field(default_factory=list, repr=False)

    @property
    def converged(self) -> torch.Tensor:
        """(B,) bool: sigma proven to be the norm up to rounding (``exact``); not the stopping rule."""
        return self.exact


def _check_v0(v0: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    if v0 is None:
        return None
    if not isinstance(v0, torch.Tensor):
        raise TypeError(f"v0 must be a tensor with the shape of x, got {type(v0).__name__}")
    if v0.shape != x.shape:
        raise ValueError(f"v0 must have the shape of x {tuple(x.shape)}, got {tuple(v0.shape)}")
    if not torch.isfinite(v0).all():
        raise ValueError("v0 contains NaN or inf values")
    return v0.detach().to(dtype=x.dtype, device=x.device)


def operator_norm(
    model: nn.Module,
    x: torch.Tensor,
    p: Order = 2,
    q: Order = 2,
    *,
    method: str = "auto",
    iters: int | None = None,
    rtol_change: float | None = None,
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_history: bool = False,
    max_enumerate: int = 20,
    restarts: int = DEFAULT_RESTARTS,
    route: str = "auto",
    tol: None = None,
) -> OperatorNormResult:
    """Per-example (p, q) operator norm of the input-output Jacobian J(x) of ``model``.

    The model is evaluated in eval mode (BatchNorm uses running statistics; see
    :mod:`opnorm.jacobian`) and its mode restored; parameter gradients are not touched.

    Args:
        model: f: (B, *in) -> (B, d), a module that does not mix examples in eval mode.
        x: (B, *in) inputs.
        p, q: norm orders, 1 <= p, q <= inf (float, int, or "inf").
        method: "power" (the (p, q) power method, matrix-free, batched), "lanczos"
            (p = q = 2 only: Golub-Kahan-Lanczos, see :func:`lanczos_iteration`; a lower bound,
            exact after d iterations), "exact" (form J with d VJPs; for (2, 2) the top
            eigenpair of the d x d Gram matrix J J^T; closed forms, enumeration, or a restart
            lower bound for NP-hard pairs), or "auto":

            * (2, 2): "exact". No method bounds the error of sigma with fewer than d VJPs
              (see :func:`lanczos_iteration`), and Lanczos needs d iterations (d VJPs and d
              JVPs) to be exact, so forming J is the cheapest certified route. Fewer Lanczos
              iterations are cheaper and can be far off on trained weights (measured in
              ``benchmarks/results/operator_norm_trained.md``): ask for ``method="lanczos"``
              to get that lower bound, ``exact`` False.
            * other pairs with an exact form: "exact"; without one: "exact" (restarts on
              the formed J) when ``d <= 4 * iters``, else "power" (both lower bounds).
        iters: power / Lanczos iterations (default 20; Lanczos runs at most d).
        rtol_change: stop an example once sigma changes by at most this (relative) in one
            iteration (default 1e-6; 0 runs exactly ``iters``). A stopping rule, not an
            error bound: it sets ``stopped``, never ``exact``.
        v0: start vector, x's shape (Lanczos starts from J v0; by default from the centered
            logits plus a little noise).
        generator: seeds the random start / restarts.
        return_history: keep every power iterate (method "power" only).
        max_enumerate: largest n (for p = inf) or d (for q = 1) enumerated exactly.
        restarts: power-method restarts on the formed J for pairs without an exact form.
        route: how J is accessed (:func:`opnorm.jacobian.linearize`): "auto" (the exact
            pattern replay for plain ``nn.Sequential`` ReLU / max-pool / BatchNorm nets,
            several times cheaper than autograd; otherwise autograd, with J v by double
            backward or, for ops without one, forward-mode AD), "pattern", "autograd",
            "forward". A model whose ops support no route raises
            :class:`~opnorm.jacobian.UnsupportedModelError` naming the module and op.
        tol: removed (it read as an error bound and was not one); passing it raises a
            TypeError that names ``rtol_change``.

    Returns:
        :class:`OperatorNormResult` with ``sigma`` (B,), ``v`` (x's shape), ``u`` (B, d), and
        ``exact`` (B,): where True, |sigma - ||J||| is rounding only; elsewhere sigma is a lower
        bound of unknown error.

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x = torch.rand(4, 8)
        >>> res = opnorm.operator_norm(model, x, p="inf", q=2)
        >>> res.sigma.shape, res.v.shape  # (B,), x.shape
        (torch.Size([4]), torch.Size([4, 8]))
        >>> low = opnorm.operator_norm(model, x, method="lanczos", iters=2)  # fewer than d = 3 iterations
        >>> low.exact  # a lower bound of unknown error
        tensor([False, False, False, False])
    """
    if tol is not None:
        raise TypeError(REMOVED_TOL)
    p, q = norm_order(p, "p"), norm_order(q, "q")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if method == "lanczos" and not (p == 2 and q == 2):
        raise ValueError(f"method='lanczos' computes (2, 2) norms only, got p={p:g}, q={q:g}; use 'power' or 'exact'")
    max_enumerate = check_max_enumerate(max_enumerate)
    iters = DEFAULT_ITERS if iters is None else integer(iters, "iters", lo=1)
    rtol_change = DEFAULT_RTOL_CHANGE if rtol_change is None else number(rtol_change, "rtol_change", finite=False)
    check_inputs(model, x)
    v0 = _check_v0(v0, x)
    if return_history and method != "power":
        raise ValueError("return_history=True needs method='power' (closed forms have no iterates)")

    net = unwrap(model)
    with eval_mode(net), torch.enable_grad():
        lin = linearize(net, x, route)  # the one forward pass every method shares
        d, n = lin.logits.shape[1], x[0].numel()
        if method == "auto":
            method = _choose_method(p, q, d, n, iters, max_enumerate)
        if method == "exact":
            res = _exact(lin, x, p, q, max_enumerate, restarts, generator)
        elif method == "lanczos":
            u0 = lin.matvec(v0) if v0 is not None else _logit_start(lin.logits, generator)
            select = None
            if hasattr(lin, "select"):
                select = lambda rows: (lambda sub: (sub.matvec, sub.rmatvec))(lin.select(rows))  # noqa: E731
            run = lanczos_iteration(lin.matvec, lin.rmatvec, u0, iters=iters, rtol_change=rtol_change, select=select)
            res = OperatorNormResult(
                run.sigma, run.v.detach(), run.u, run.iterations, run.stopped, "lanczos", run.exact
            )
        else:
            if v0 is None:
                v0 = random_unit(tuple(x.shape), p, dtype=x.dtype, device=x.device, generator=generator)
            run = power_iteration(
                lin.matvec, lin.rmatvec, v0, p, q, iters=iters, rtol_change=rtol_change, history=return_history
            )
            exact = torch.zeros_like(run.stopped)  # a fixed point of the iteration is not a proof of the maximum
            res = OperatorNormResult(
                run.sigma.detach(),
                run.v.detach(),
                run.u.detach(),
                run.iterations,
                run.stopped,
                "power",
                exact,
                run.history,
            )
    res.route, res.fallbacks = lin.route, list(lin.fallbacks)
    return res


def _choose_method(p: float, q: float, d: int, n: int, iters: int, max_enumerate: int) -> str:
    if not has_exact_form(p, q, d, n, max_enumerate):
        # restarts on a formed J beat one matrix-free run when forming J is cheap
        return "exact" if d <= 4 * iters else "power"
    return "exact"  # (2, 2) included: the cheapest route whose error is bounded


def _logit_start(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Lanczos start: the centered logits (close to the top left singular vector of a
    trained classifier's J) plus 10% noise, so no example starts orthogonal to it."""
    c = logits - logits.mean(dim=1, keepdim=True)
    norm = torch.linalg.vector_norm(c, dim=1, keepdim=True)
    c = c / torch.where(norm > 0, norm, torch.ones_like(norm))
    return c + 0.1 * random_unit(tuple(logits.shape), 2, dtype=logits.dtype, device=logits.device, generator=generator)


def _exact(lin: LinearOperator, x, p, q, max_enumerate, restarts, generator) -> OperatorNormResult:
    J = jacobian_of(lin)
    B, d = J.shape[:2]
    flat = J.reshape(B, d, -1)
    bad = ~torch.isfinite(flat).all(dim=2).all(dim=1)
    if bool(bad.any()):  # an overflowing J (e.g. a diverging network): sigma inf / NaN, not a linalg error
        res = _exact_of(flat.masked_fill(bad[:, None, None], 0.0), x, p, q, max_enumerate, restarts, generator)
        over = torch.where(torch.isnan(flat).flatten(1).any(dim=1), math.nan, math.inf).to(res.sigma.dtype)
        res.sigma = torch.where(bad, over, res.sigma)
        res.exact = res.exact & ~bad  # converged is exact
        res.stopped = res.stopped & ~bad
        return res
    return _exact_of(flat, x, p, q, max_enumerate, restarts, generator)


def _exact_of(flat: torch.Tensor, x, p, q, max_enumerate, restarts, generator) -> OperatorNormResult:
    B, d = flat.shape[:2]
    if p == 2 and q == 2 and d <= flat.shape[2]:
        v = top_pair_gram(flat)
        sigma = torch.linalg.vector_norm(torch.einsum("bdn,bn->bd", flat, v), dim=1)
        exact = torch.ones(B, dtype=torch.bool, device=x.device)
    else:
        sigma, v, exact = operator_norm_of_matrix(
            flat, p, q, max_enumerate=max_enumerate, restarts=restarts, generator=generator
        )
    u = duality_map(torch.einsum("bdn,bn->bd", flat, v), q)
    return OperatorNormResult(sigma, v.reshape(x.shape), u, 0, torch.zeros_like(exact), "exact", exact)
