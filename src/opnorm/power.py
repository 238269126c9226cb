"""(p, q) operator norms of per-example Jacobians: the power method, exact forms, spectra.

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

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from opnorm.jacobian import ROUTES, LinearOperator, check_inputs, eval_mode, jacobian_of, linearize, pattern_support, unwrap
from opnorm.norms import Order, conjugate, duality_map, lp_norm, norm_order, pga_step
from opnorm.validation import integer

__all__ = [
    "OperatorNormResult",
    "SpectrumResult",
    "power_iteration",
    "lanczos_iteration",
    "operator_norm",
    "operator_norm_of_matrix",
    "singular_values",
    "random_unit",
]

METHODS = ("auto", "power", "lanczos", "exact")
DEFAULT_ITERS = 20
DEFAULT_TOL = 1e-6
DEFAULT_RESTARTS = 64


@dataclass
class OperatorNormResult:
    """Per-example (p, q) operator norms of J(x).

    Attributes:
        sigma: (B,) the norm (exact, or a lower bound attained by ``v``; see ``exact``).
        v: x's shape, unit l_p norm, with ``||J v||_q == sigma``.
        u: (B, d), ``psi_q(J v)``.
        iterations: power or Lanczos iterations run (0 for closed forms).
        converged: (B,) bool; True for exact results.
        method: "power", "lanczos" or "exact".
        exact: (B,) bool, True where sigma is the exact norm (not only a lower bound).
        history: with ``return_history=True`` and the power method, one dict per iteration
            k = 1..iterations: {"v": v_k, "u": u_k, "sigma": ||J v_k||_q}.
        route: how J was accessed: "pattern" (:class:`~opnorm.jacobian.PatternLinearization`)
            or "autograd"; ``fallbacks`` lists modules the pattern route left to autograd.
    """

    sigma: torch.Tensor
    v: torch.Tensor
    u: torch.Tensor
    iterations: int
    converged: torch.Tensor
    method: str
    exact: torch.Tensor
    history: Optional[list[dict]] = field(default=None, repr=False)
    route: str = "autograd"
    fallbacks: list[str] = field(default_factory=list, repr=False)


def _check_iters(iters: int, name: str = "iters") -> int:
    if isinstance(iters, bool) or not isinstance(iters, int):
        raise TypeError(f"{name} must be an int >= 1, got {iters!r}")
    if iters < 1:
        raise ValueError(f"{name} must be >= 1, got {iters}")
    return iters


# enumeration forms all 2^(n-1) sign vectors: 2^21 of them are the most it will hold in memory
MAX_ENUMERATE_LIMIT = 22


def _check_max_enumerate(value: int) -> int:
    # the limit keeps the sign vectors in memory (2^(n-1) of them)
    return integer(value, "max_enumerate", lo=0, hi=MAX_ENUMERATE_LIMIT)


def _check_tol(tol: float) -> float:
    tol = float(tol)
    if math.isnan(tol) or tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    return tol


def random_unit(shape: tuple[int, ...], p: Order, *, dtype=None, device=None, generator=None) -> torch.Tensor:
    """Random vectors of unit l_p norm per example (Gaussian direction; signs for p = inf)."""
    z = torch.randn(shape, dtype=dtype, device=device, generator=generator)
    if norm_order(p) == math.inf:
        return torch.sign(z)
    return z / lp_norm(z, p).reshape(-1, *([1] * (len(shape) - 1)))


def _normalize(v: torch.Tensor, p: float) -> torch.Tensor:
    n = lp_norm(v, p)
    if (n == 0).any():
        raise ValueError("v0 has an example with zero norm; every start vector must be nonzero")
    return v / n.reshape(-1, *([1] * (v.ndim - 1)))


def power_iteration(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rmatvec: Callable[[torch.Tensor], torch.Tensor],
    v0: torch.Tensor,
    p: Order,
    q: Order,
    *,
    iters: int,
    tol: float = 0.0,
    history: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor, Optional[list[dict]]]:
    """The batched (p, q) power method on any linear operator.

    Args:
        matvec: v (B, *in) -> J v (B, d).
        rmatvec: u (B, d) -> J^T u (B, *in).
        v0: (B, *in) start, normalized here to unit l_p norm.
        iters: maximum number of iterations (each one matvec and one rmatvec).
        tol: stop when every example's sigma changed by at most tol * sigma (0: run all).
        history: record {"v", "u", "sigma"} after each iteration.

    Returns:
        (sigma, v, u, iterations, converged, history) with sigma = ||J v||_q, u = psi_q(J v).
    """
    p, q = norm_order(p, "p"), norm_order(q, "q")
    v = _normalize(v0, p)
    jv = matvec(v)
    sigma = lp_norm(jv, q)
    converged = torch.zeros_like(sigma, dtype=torch.bool)
    records: Optional[list[dict]] = [] if history else None
    k = 0
    for k in range(1, iters + 1):
        u = duality_map(jv, q)
        v = pga_step(v, rmatvec(u), p, 1.0)  # the infinite step: psi_{p*}(J^T u)
        jv = matvec(v)
        new_sigma = lp_norm(jv, q)
        converged = (new_sigma - sigma).abs() <= tol * new_sigma.abs()
        sigma = new_sigma
        if records is not None:
            records.append({"v": v.detach().clone(), "u": u.detach().clone(), "sigma": sigma.detach().clone()})
        if tol > 0 and bool(converged.all()):
            break
    return sigma, v, duality_map(jv, q), k, converged, records


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """w (B, m) minus its projection on the orthonormal rows of basis (B, j, m), twice (CGS2)."""
    w = w.unsqueeze(2)
    for _ in range(2):
        w = torch.baddbmm(w, basis.transpose(1, 2), torch.bmm(basis, w), alpha=-1)
    return w.squeeze(2)


def _unit(w: torch.Tensor, floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w / ||w||, ||w||) per row; rows with norm <= floor (an exhausted Krylov space) give (0, 0)."""
    norm = torch.linalg.vector_norm(w, dim=1)
    live = norm > floor
    safe = torch.where(live, norm, torch.ones_like(norm))
    return w * (live / safe)[:, None], norm * live


def _restricted(ops: tuple[Callable, Callable], pos: torch.Tensor, size: int) -> tuple[Callable, Callable]:
    """(matvec, rmatvec) of a batch of ``size`` examples applied to the examples at ``pos`` only
    (the others get zeros): for operators that cannot shrink their batch."""
    matvec, rmatvec = ops

    def pad(z: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(size, *z.shape[1:], dtype=z.dtype, device=z.device)
        full[pos] = z
        return full

    return (lambda v: matvec(pad(v))[pos]), (lambda u: rmatvec(pad(u))[pos])


def lanczos_iteration(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rmatvec: Callable[[torch.Tensor], torch.Tensor],
    u0: torch.Tensor,
    *,
    iters: int,
    tol: float = 0.0,
    select: Optional[Callable[[torch.Tensor], tuple[Callable, Callable]]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Top singular triplet of J by Golub-Kahan-Lanczos bidiagonalization, batched.

    Started in the d-dimensional output space at ``u0``, each iteration is one ``rmatvec``
    (J^T u) and one ``matvec`` (J v) with full reorthogonalization of both bases; the top
    singular value of the small lower-bidiagonal ``B_k`` ((k+1) x k, ``J V_k = U_{k+1} B_k``)
    is the estimate: a lower bound on ||J||_2, the best one in the Krylov spaces built (the
    power method's k-th iterate lies in the same spaces). After d iterations the output
    space is exhausted and the result is exact up to rounding.

    Each example stops on its own once its estimate changes by at most ``tol`` (relative)
    in one iteration, and its result is frozen there; with ``select`` the later products
    run on a batch of the unconverged examples only, so a few slow examples cost little.

    Args:
        matvec: v (B, *in) -> J v (B, d). rmatvec: u (B, d) -> J^T u (B, *in).
        u0: (B, d) start (normalized here; a zero row starts at e_1).
        iters: maximum iterations. tol: per-example relative stopping tolerance (0: run all
            ``iters``, or until the space is exhausted).
        select: optional ``rows -> (matvec, rmatvec)`` of the same J restricted to the
            examples ``rows`` (e.g. ``PatternLinearization.select``).

    Returns:
        (sigma (B,), v (B, *in) unit, u (B, d) unit, iterations (the most any example ran),
        converged (B,)) with ``J v = sigma u`` up to rounding, so v attains sigma.

    Example:
        >>> lin = opnorm.jacobian.linearize(model, x)
        >>> sigma, v, u, k, conv = lanczos_iteration(lin.matvec, lin.rmatvec, lin.logits, iters=3)
    """
    B, d = u0.shape
    dtype, device = u0.dtype, u0.device
    eps = torch.finfo(dtype).eps
    e1 = torch.zeros_like(u0)
    e1[:, 0] = 1
    rows = torch.arange(B, device=device)  # the examples still iterating (global indices)
    # rows of Us / Vs are read only once written: no need to zero them
    Us = torch.empty(B, iters + 1, d, dtype=dtype, device=device)  # orthonormal rows: the output-space basis
    Us[:, 0], _ = _unit(torch.where((u0 != 0).any(dim=1, keepdim=True), u0, e1), torch.zeros(B, dtype=dtype, device=device))
    Vs: Optional[torch.Tensor] = None  # (A, iters, n), allocated once n is known
    Bk = torch.zeros(B, iters + 1, iters, dtype=dtype, device=device)  # alphas on the diagonal, betas below
    sigma = torch.zeros(B, dtype=dtype, device=device)
    converged = torch.zeros(B, dtype=torch.bool, device=device)
    out_sigma, out_conv = torch.zeros_like(sigma), torch.zeros_like(converged)
    out_u = torch.zeros_like(u0)
    out_v: Optional[torch.Tensor] = None
    shape = None

    def finish(keep: torch.Tensor, k: int) -> None:
        """Write the results of the active examples not in ``keep`` (a bool mask)."""
        nonlocal out_v
        done = ~keep
        P, S, Qh = torch.linalg.svd(Bk[done, : k + 1, :k], full_matrices=False)
        v = torch.bmm(Qh[:, :1, :], Vs[done, :k]).squeeze(1)  # V_k q_1
        if out_v is None:
            out_v = torch.zeros(B, v.shape[1], dtype=dtype, device=device)
        ids = rows[done]
        out_v[ids] = v
        out_u[ids] = torch.bmm(P[:, :, :1].transpose(1, 2), Us[done, : k + 1]).squeeze(1)  # U_{k+1} p_1
        out_sigma[ids], out_conv[ids] = S[:, 0], converged[done]

    ops, op_rows = (matvec, rmatvec), rows  # the operator and the examples it was built for
    k = 0
    for k in range(1, iters + 1):
        j = k - 1
        p = rmatvec(Us[:, j])
        shape = p.shape[1:]
        p = p.reshape(len(rows), -1)
        if Vs is None:
            Vs = torch.empty(B, iters, p.shape[1], dtype=dtype, device=device)
        else:
            p = _orthogonalize(p - Bk[:, j, j - 1, None] * Vs[:, j - 1], Vs[:, :j])
        # below these floors the new direction is rounding noise: that example's Krylov space is exhausted
        Vs[:, j], alpha = _unit(p, 8 * d * eps * sigma)
        q = matvec(Vs[:, j].reshape(len(rows), *shape)).reshape(len(rows), d) - alpha[:, None] * Us[:, j]
        Us[:, k], beta = _unit(_orthogonalize(q, Us[:, :k]), 8 * d * eps * torch.maximum(sigma, alpha))
        Bk[:, j, j], Bk[:, k, j] = alpha, beta
        exhausted = (alpha == 0) | (beta == 0)
        if tol > 0 or k == iters or bool(exhausted.all()):
            new = torch.linalg.svdvals(Bk[:, : k + 1, :k])[:, 0]
            converged = converged | exhausted | ((new - sigma).abs() <= tol * new)
            sigma = new
        keep = ~converged
        if k == iters or not bool(keep.any()):
            break
        if not bool(keep.all()):  # freeze the converged examples and go on with the rest
            finish(keep, k)
            rows, Us, Vs, Bk, sigma, converged = rows[keep], Us[keep], Vs[keep], Bk[keep], sigma[keep], converged[keep]
            if select is not None and len(rows) <= 0.9 * len(op_rows):  # shrinking pays: a smaller batch
                ops, op_rows = select(rows), rows
            pos = torch.searchsorted(op_rows, rows)  # rows stay sorted
            matvec, rmatvec = ops if len(pos) == len(op_rows) else _restricted(ops, pos, len(op_rows))
    assert shape is not None and Vs is not None
    finish(torch.zeros(len(rows), dtype=torch.bool, device=device), k)
    assert out_v is not None
    return out_sigma, out_v.reshape(B, *shape), out_u, k, out_conv


# ----------------------------------------------------------------------------- exact forms


def _sign_vectors(n: int, dtype, device) -> torch.Tensor:
    """All 2^(n-1) sign vectors with first entry +1 (s and -s give the same norm): (n, 2^(n-1))."""
    rows = torch.tensor(list(itertools.product((1.0, -1.0), repeat=n - 1)), dtype=dtype, device=device)
    rows = rows.reshape(-1, n - 1)
    return torch.cat([torch.ones(rows.shape[0], 1, dtype=dtype, device=device), rows], dim=1).T


def _max_over_signs(A: torch.Tensor, r: float, chunk: int = 1 << 14) -> tuple[torch.Tensor, torch.Tensor]:
    """max over s in {+-1}^m of ||A s||_r for A (B, k, m): (values (B,), maximizers (B, m))."""
    B, _, m = A.shape
    signs = _sign_vectors(m, A.dtype, A.device)
    best = torch.full((B,), -1.0, dtype=A.dtype, device=A.device)
    best_s = torch.ones(B, m, dtype=A.dtype, device=A.device)
    for start in range(0, signs.shape[1], chunk):
        S = signs[:, start : start + chunk]
        vals = torch.linalg.vector_norm(A @ S, ord=r, dim=1)  # (B, chunk)
        top, idx = vals.max(dim=1)
        better = top > best
        best = torch.where(better, top, best)
        best_s = torch.where(better[:, None], S.T[idx], best_s)
    return best, best_s


def operator_norm_of_matrix(
    J: torch.Tensor,
    p: Order = 2,
    q: Order = 2,
    *,
    max_enumerate: int = 20,
    restarts: int = DEFAULT_RESTARTS,
    iters: int = 100,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, q) norms of a batch of explicit matrices J (B, d, n).

    Returns (sigma (B,), v (B, n) unit l_p attaining ||J v||_q = sigma, exact (B,) bool).
    """
    p, q = norm_order(p, "p"), norm_order(q, "q")
    max_enumerate = _check_max_enumerate(max_enumerate)
    if J.ndim != 3:
        raise ValueError(f"J must have shape (B, d, n), got {tuple(J.shape)}")
    B, d, n = J.shape
    p_star = conjugate(p)
    every = torch.ones(B, dtype=torch.bool, device=J.device)
    if p == 2 and q == 2:
        _, S, Vh = torch.linalg.svd(J, full_matrices=False)
        return S[:, 0], Vh[:, 0, :], every
    if p == 1:  # max column q-norm, attained at a coordinate vector
        cols = torch.linalg.vector_norm(J, ord=q, dim=1)  # (B, n)
        sigma, j = cols.max(dim=1)
        return sigma, torch.nn.functional.one_hot(j, n).to(J.dtype), every
    if q == math.inf:  # max row p*-norm, attained by psi_{p*}(row)
        rows = torch.linalg.vector_norm(J, ord=p_star, dim=2)  # (B, d)
        sigma, i = rows.max(dim=1)
        row = J[torch.arange(B, device=J.device), i]
        return sigma, duality_map(row, p_star), every
    if q == 1 and d <= max_enumerate:  # ||J||_{p->1} = max_s ||J^T s||_{p*}
        sigma, s = _max_over_signs(J.transpose(1, 2), p_star)
        return sigma, duality_map(torch.einsum("bdn,bd->bn", J, s), p_star), every
    if p == math.inf and n <= max_enumerate:
        sigma, s = _max_over_signs(J, q)
        return sigma, s, every
    # NP-hard in general: best of many power-method restarts (a lower bound)
    restarts = max(1, restarts)
    Jr = J.repeat_interleave(restarts, dim=0)
    v0 = random_unit((B * restarts, n), p, dtype=J.dtype, device=J.device, generator=generator)
    v0[::restarts] = random_unit((B, n), p, dtype=J.dtype, device=J.device, generator=generator)
    sigma, v, _, _, _, _ = power_iteration(
        lambda v: torch.einsum("bdn,bn->bd", Jr, v),
        lambda u: torch.einsum("bdn,bd->bn", Jr, u),
        v0,
        p,
        q,
        iters=iters,
        tol=1e-12,
    )
    sigma = sigma.reshape(B, restarts)
    best, idx = sigma.max(dim=1)
    v = v.reshape(B, restarts, n)[torch.arange(B, device=J.device), idx]
    return best, v, torch.zeros(B, dtype=torch.bool, device=J.device)


def _has_exact_form(p: float, q: float, d: int, n: int, max_enumerate: int) -> bool:
    return (p == 2 and q == 2) or p == 1 or q == math.inf or (q == 1 and d <= max_enumerate) or (
        p == math.inf and n <= max_enumerate
    )


# ----------------------------------------------------------------------------- public API


def _check_v0(v0: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
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
    iters: Optional[int] = None,
    tol: Optional[float] = None,
    v0: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_history: bool = False,
    max_enumerate: int = 20,
    restarts: int = DEFAULT_RESTARTS,
    route: str = "auto",
) -> OperatorNormResult:
    """Per-example (p, q) operator norm of the input-output Jacobian J(x) of ``model``.

    The model is evaluated in eval mode (BatchNorm uses running statistics; see
    :mod:`opnorm.jacobian`) and its mode restored; parameter gradients are not touched.

    Args:
        model: f: (B, *in) -> (B, d), a module that does not mix examples in eval mode.
        x: (B, *in) inputs.
        p, q: norm orders, 1 <= p, q <= inf (float, int, or "inf").
        method: "power" (the (p, q) power method, matrix-free, batched), "lanczos"
            (p = q = 2 only: Golub-Kahan-Lanczos, see :func:`lanczos_iteration`; exact after
            d iterations), "exact" (form J with d VJPs; for (2, 2) the top eigenpair of the
            d x d Gram matrix J J^T; closed forms, enumeration, or a restart lower bound for
            NP-hard pairs), or "auto", which picks by cost:

            * (2, 2): "exact" when ``d <= ITERATION_COST * min(iters, d)`` (forming J costs d
              VJPs, batched; one Lanczos iteration costs a VJP and a JVP, about
              ``ITERATION_COST`` VJPs of the exact route), else "lanczos". With the default
              ``iters`` (20) and d <= 40 that is "exact"; ask for ``iters=3`` on a 10-class
              model and it is "lanczos" (on the benchmark's trained CNN: median relative
              error 2e-5 at 1.8x the time of a training step, against 2.9x for "exact"; see
              ``benchmarks/results/operator_norm.md``). ``method="lanczos"`` with
              ``tol=1e-3`` stops each example on its own (max error 5e-4 there, 2.2x).
            * other pairs with an exact form: "exact"; without one: "exact" (restarts on
              the formed J) when ``d <= 4 * iters``, else "power".
        iters: power / Lanczos iterations (default 20). tol: relative stopping tolerance on
            sigma (default 1e-6; 0 runs exactly ``iters``). v0: start vector, x's shape
            (Lanczos starts from J v0; by default from the centered logits plus a little noise).
        generator: seeds the random start / restarts.
        return_history: keep every power iterate (method "power" only).
        max_enumerate: largest n (for p = inf) or d (for q = 1) enumerated exactly.
        restarts: power-method restarts on the formed J for pairs without an exact form.
        route: how J is accessed (:func:`opnorm.jacobian.linearize`): "auto" (the exact
            pattern replay for plain ``nn.Sequential`` ReLU / max-pool / BatchNorm nets,
            several times cheaper than autograd; autograd otherwise), "pattern", "autograd".

    Returns:
        :class:`OperatorNormResult` with ``sigma`` (B,), ``v`` (x's shape), ``u`` (B, d).

    Example:
        >>> res = opnorm.operator_norm(model, x, p="inf", q=2)
        >>> res.sigma.shape, res.v.shape  # (B,), x.shape
        >>> fast = opnorm.operator_norm(model, x, iters=3)   # (2, 2) by 3 Lanczos steps
    """
    p, q = norm_order(p, "p"), norm_order(q, "q")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if method == "lanczos" and not (p == 2 and q == 2):
        raise ValueError(f"method='lanczos' computes (2, 2) norms only, got p={p:g}, q={q:g}; use 'power' or 'exact'")
    iters = DEFAULT_ITERS if iters is None else _check_iters(iters)
    tol = DEFAULT_TOL if tol is None else _check_tol(tol)
    max_enumerate = _check_max_enumerate(max_enumerate)
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
            sigma, v, u, k, converged = lanczos_iteration(lin.matvec, lin.rmatvec, u0, iters=iters, tol=tol, select=select)
            res = OperatorNormResult(sigma, v.detach(), u, k, converged, "lanczos", torch.zeros_like(converged))
        else:
            if v0 is None:
                v0 = random_unit(tuple(x.shape), p, dtype=x.dtype, device=x.device, generator=generator)
            sigma, v, u, k, converged, hist = power_iteration(
                lin.matvec, lin.rmatvec, v0, p, q, iters=iters, tol=tol, history=return_history
            )
            exact = torch.zeros_like(converged)  # a converged iterate is not a proof of the maximum
            res = OperatorNormResult(sigma.detach(), v.detach(), u.detach(), k, converged, "power", exact, hist)
    res.route, res.fallbacks = lin.route, list(lin.fallbacks)
    return res


# One Lanczos / power iteration (a VJP and a JVP) in units of one VJP of the exact route,
# measured on the benchmark CNN by benchmarks/operator_norm.py (see its results).
ITERATION_COST = 2.0


def _choose_method(p: float, q: float, d: int, n: int, iters: int, max_enumerate: int) -> str:
    if not _has_exact_form(p, q, d, n, max_enumerate):
        # restarts on a formed J beat one matrix-free run when forming J is cheap
        return "exact" if d <= 4 * iters else "power"
    if p == 2 and q == 2:
        # Lanczos is exact after d iterations, so never pay more than forming J
        return "exact" if d <= ITERATION_COST * min(iters, d) else "lanczos"
    return "exact"


def _logit_start(logits: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Lanczos start: the centered logits (close to the top left singular vector of a
    trained classifier's J) plus 10% noise, so no example starts orthogonal to it."""
    c = logits - logits.mean(dim=1, keepdim=True)
    norm = torch.linalg.vector_norm(c, dim=1, keepdim=True)
    c = c / torch.where(norm > 0, norm, torch.ones_like(norm))
    return c + 0.1 * random_unit(tuple(logits.shape), 2, dtype=logits.dtype, device=logits.device, generator=generator)


def _top_pair_gram(J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top right singular vector v (B, n) of J (B, d, n), d <= n, from the eigh of J J^T (d x d)."""
    J64 = J.to(torch.float64)
    _, E = torch.linalg.eigh(J64 @ J64.transpose(1, 2))
    v = torch.einsum("bdn,bd->bn", J64, E[:, :, -1])  # J^T u_1 = sigma_1 v_1
    norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    e1 = torch.zeros_like(v)
    e1[:, 0] = 1  # J = 0: every unit vector attains 0
    return torch.where(norm > 0, v / torch.where(norm > 0, norm, torch.ones_like(norm)), e1).to(J.dtype)


def _exact(lin: LinearOperator, x, p, q, max_enumerate, restarts, generator) -> OperatorNormResult:
    J = jacobian_of(lin)
    B, d = J.shape[:2]
    flat = J.reshape(B, d, -1)
    if p == 2 and q == 2 and d <= flat.shape[2]:
        v = _top_pair_gram(flat)
        sigma = torch.linalg.vector_norm(torch.einsum("bdn,bn->bd", flat, v), dim=1)
        exact = torch.ones(B, dtype=torch.bool, device=x.device)
    else:
        sigma, v, exact = operator_norm_of_matrix(flat, p, q, max_enumerate=max_enumerate, restarts=restarts, generator=generator)
    u = duality_map(torch.einsum("bdn,bn->bd", flat, v), q)
    return OperatorNormResult(sigma, v.reshape(x.shape), u, 0, exact.clone(), "exact", exact)


# ----------------------------------------------------------------------------- spectra


@dataclass
class SpectrumResult:
    """Top-k singular triplets of J(x): values (B, k) descending; U (B, d, k); V (B, *in, k)."""

    values: torch.Tensor
    U: Optional[torch.Tensor] = None
    V: Optional[torch.Tensor] = None


def singular_values(
    model: nn.Module,
    x: torch.Tensor,
    k: int,
    return_vectors: bool = False,
    *,
    method: str = "auto",
    iters: int = 50,
    tol: float = 1e-7,
    generator: Optional[torch.Generator] = None,
    route: str = "auto",
):
    """Top-k singular values of each J(x), descending: (B, k).

    ``method="exact"`` forms J (d VJPs, batched) and takes its SVD; ``"power"`` is
    matrix-free subspace iteration with k vectors (each iteration one stacked J and one
    stacked J^T product of k vectors) and a final Rayleigh-Ritz step (SVD of the d x k
    matrix J V); ``"auto"`` picks exact when forming J is the cheaper one
    (``d <= 20 k``). ``route`` as in :func:`operator_norm`.
    With ``return_vectors=True`` returns a :class:`SpectrumResult` (values, U, V).

    Example:
        >>> opnorm.singular_values(model, x, 3)   # (B, 3)
    """
    if method not in ("auto", "power", "exact"):
        raise ValueError(f"method must be one of ('auto', 'power', 'exact'), got {method!r}")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    check_inputs(model, x)
    k = _check_iters(k, "k")
    iters = _check_iters(iters)
    tol = _check_tol(tol)
    net = unwrap(model)
    B = x.shape[0]
    n = x[0].numel()
    with eval_mode(net), torch.enable_grad():
        lin = linearize(net, x, route)
        d = lin.logits.shape[1]
        if k > min(d, n):
            raise ValueError(f"k must be <= min(d, n) = {min(d, n)} (J is {d} x {n}), got {k}")
        if method == "auto":
            # forming J costs d backward passes; subspace iteration >= 2k per iteration
            method = "exact" if d <= 20 * k else "power"
        if method == "exact":
            J = jacobian_of(lin).reshape(B, d, n)
            U, S, Vh = torch.linalg.svd(J, full_matrices=False)
            res = SpectrumResult(S[:, :k], U[:, :, :k], Vh[:, :k, :].transpose(1, 2).reshape(B, *x.shape[1:], k))
        else:
            res = _subspace(lin, x, k, iters, tol, generator)
    return res if return_vectors else res.values


def _subspace(lin: LinearOperator, x, k, iters, tol, generator) -> SpectrumResult:
    """Block power (subspace) iteration on J^T J with k columns, all examples at once."""
    B = x.shape[0]
    shape = x.shape[1:]
    n = x[0].numel()

    def J(V):  # (B, n, k) -> (B, d, k)
        return lin.matmat(V.permute(2, 0, 1).reshape(k, B, *shape)).permute(1, 2, 0)

    def JT(U):  # (B, d, k) -> (B, n, k)
        return lin.rmatmat(U.permute(2, 0, 1)).reshape(k, B, n).permute(1, 2, 0)

    V = torch.linalg.qr(torch.randn(B, n, k, dtype=x.dtype, device=x.device, generator=generator))[0]
    W = J(V)
    prev = None
    for _ in range(iters):
        V = torch.linalg.qr(JT(W))[0]
        W = J(V)
        vals = torch.linalg.svdvals(W)  # Ritz values: V is orthonormal
        if prev is not None and bool(((vals - prev).abs() <= tol * vals.clamp_min(1e-30)).all()):
            break
        prev = vals
    # Rayleigh-Ritz: the SVD of the small (d, k) matrix J V rotates V onto singular vectors
    U, S, Wh = torch.linalg.svd(W, full_matrices=False)
    V = V @ Wh.transpose(1, 2)
    return SpectrumResult(S, U, V.reshape(B, *shape, k))
