"""The batched (p, q) power method and Golub-Kahan-Lanczos on any linear operator."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from opnorm.norms import Order, duality_map, lp_norm, norm_order, pga_step


class PowerRun(NamedTuple):
    """The result of :func:`power_iteration`."""

    sigma: torch.Tensor  # (B,) ||J v||_q, a lower bound on ||J||_{p->q}
    v: torch.Tensor  # (B, *in) the last iterate, unit l_p norm
    u: torch.Tensor  # (B, d) psi_q(J v)
    iterations: int  # iterations run
    stopped: torch.Tensor  # (B,) bool: the last change of sigma was <= rtol_change * sigma
    history: list[dict] | None  # {"v", "u", "sigma"} after each iteration, with history=True


class LanczosRun(NamedTuple):
    """The result of :func:`lanczos_iteration`."""

    sigma: torch.Tensor  # (B,) the top singular value of the Krylov bidiagonal (a lower bound)
    v: torch.Tensor  # (B, *in) its right vector, unit l_2 norm
    u: torch.Tensor  # (B, d) its left vector
    iterations: int  # the most iterations any example ran
    exact: torch.Tensor  # (B,) bool: the basis spanned the output space (sigma = ||J||_2 up to rounding)
    stopped: torch.Tensor  # (B,) bool: sigma changed by at most rtol_change * sigma in the last iteration


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
    rtol_change: float = 0.0,
    history: bool = False,
) -> PowerRun:
    """The batched (p, q) power method on any linear operator.

    Args:
        matvec: v (B, *in) -> J v (B, d).
        rmatvec: u (B, d) -> J^T u (B, *in).
        v0: (B, *in) start, normalized here to unit l_p norm.
        iters: maximum number of iterations (each one matvec and one rmatvec).
        rtol_change: stop when every example's sigma changed by at most rtol_change * sigma in
            one iteration (0: run all). A stopping rule, not an error bound: an iterate can
            stall far below the norm.
        history: record {"v", "u", "sigma"} after each iteration.

    Returns:
        :class:`PowerRun` (sigma, v, u, iterations, stopped, history) with sigma = ||J v||_q, a
        lower bound on ||J||_{p->q}, and u = psi_q(J v).
    """
    p, q = norm_order(p, "p"), norm_order(q, "q")
    v = _normalize(v0, p)
    jv = matvec(v)
    sigma = lp_norm(jv, q)
    stopped = torch.zeros_like(sigma, dtype=torch.bool)
    records: list[dict] | None = [] if history else None
    k = 0
    for k in range(1, iters + 1):  # noqa: B007 (k, the number of iterations run, is returned)
        u = duality_map(jv, q)
        v = pga_step(v, rmatvec(u), p, 1.0)  # the infinite step: psi_{p*}(J^T u)
        jv = matvec(v)
        new_sigma = lp_norm(jv, q)
        stopped = (new_sigma - sigma).abs() <= rtol_change * new_sigma.abs()
        sigma = new_sigma
        if records is not None:
            records.append({"v": v.detach().clone(), "u": u.detach().clone(), "sigma": sigma.detach().clone()})
        if rtol_change > 0 and bool(stopped.all()):
            break
    return PowerRun(sigma, v, duality_map(jv, q), k, stopped, records)


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


def _fresh_direction(basis: torch.Tensor) -> torch.Tensor:
    """A unit vector orthogonal to the orthonormal rows of basis (A, j, d), j < d: the
    coordinate vector least covered by the basis, orthogonalized (deterministic)."""
    A, _, d = basis.shape
    i = (basis**2).sum(dim=1).argmin(dim=1)  # (A,)
    e = torch.nn.functional.one_hot(i, d).to(basis.dtype)
    w = _orthogonalize(e, basis)
    return w / torch.linalg.vector_norm(w, dim=1, keepdim=True)


def lanczos_iteration(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rmatvec: Callable[[torch.Tensor], torch.Tensor],
    u0: torch.Tensor,
    *,
    iters: int,
    rtol_change: float = 0.0,
    select: Callable[[torch.Tensor], tuple[Callable, Callable]] | None = None,
) -> LanczosRun:
    """Top singular triplet of J (B examples, d x n each) by Golub-Kahan-Lanczos
    bidiagonalization, batched.

    Started in the d-dimensional output space at ``u0``, each iteration is one ``rmatvec``
    (J^T u) and one ``matvec`` (J v) with full reorthogonalization of both bases; the top
    singular value of the small lower-bidiagonal ``B_k`` ((k+1) x k, ``J V_k = U_{k+1} B_k``)
    is the estimate: a lower bound on ||J||_2, the best one in the Krylov spaces built (the
    power method's k-th iterate lies in the same spaces). When the output basis stops growing
    (the start lies in an invariant subspace of J J^T, which need not hold the top singular
    vector), it goes on from a new direction orthogonal to the basis, so after d iterations
    the basis spans the output space and J = U_d B_d V_d^T: sigma is the norm up to rounding.

    Error: before d iterations nothing bounds it. Any method that has applied J^T to fewer
    than d output vectors u_i cannot: adding ``c w z^T`` to J, with w orthogonal to every u_i
    and z to every input vector J was applied to, changes none of the products seen, and
    ||J + c w z^T||_2 >= |c| - ||J||_2 grows without bound. So ``exact`` is True only after d
    iterations; ``rtol_change`` only stops early (an estimate can stall at sigma_2 or below
    while sigma_1 is far above).

    Args:
        matvec: v (B, *in) -> J v (B, d). rmatvec: u (B, d) -> J^T u (B, *in).
        u0: (B, d) start (normalized here; a zero row starts at e_1).
        iters: maximum iterations (at most d are run: the d-th makes every example exact).
        rtol_change: an example stops once its estimate changes by at most ``rtol_change``
            (relative) in one iteration, and its result is frozen there (0: no early stop).
        select: optional ``rows -> (matvec, rmatvec)`` of the same J restricted to the
            examples ``rows`` (e.g. ``PatternLinearization.select``); later products then run
            on a batch of the examples still iterating only.

    Returns:
        :class:`LanczosRun`: sigma (B,), v (B, *in) unit, u (B, d) unit, iterations (the most
        any example ran), exact (B,) bool: the basis spanned the output space, so sigma =
        ||J||_2 up to rounding, stopped (B,) bool: stopped early by ``rtol_change``; ``J v =
        sigma u`` up to rounding, so v attains sigma.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from opnorm.jacobian import jacobian, linearize
        >>> from opnorm.power.iteration import lanczos_iteration
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 10)).double()
        >>> x = torch.rand(4, 8, dtype=torch.float64)
        >>> lin = linearize(model, x)
        >>> run = lanczos_iteration(lin.matvec, lin.rmatvec, lin.logits, iters=10)
        >>> bool(run.exact.all())  # a 10-logit model: 10 iterations span the output space
        True
        >>> bool(torch.allclose(run.sigma, torch.linalg.matrix_norm(jacobian(model, x), 2)))
        True
    """
    B, d = u0.shape
    dtype, device = u0.dtype, u0.device
    eps = torch.finfo(dtype).eps
    iters = min(iters, d)  # the d-th iteration makes the result exact: more cannot help
    e1 = torch.zeros_like(u0)
    e1[:, 0] = 1
    rows = torch.arange(B, device=device)  # the examples still iterating (global indices)
    # rows of Us / Vs are read only once written: no need to zero them
    Us = torch.empty(B, iters + 1, d, dtype=dtype, device=device)  # orthonormal rows: the output-space basis
    Us[:, 0], _ = _unit(
        torch.where((u0 != 0).any(dim=1, keepdim=True), u0, e1), torch.zeros(B, dtype=dtype, device=device)
    )
    Vs: torch.Tensor | None = None  # (A, iters, n), allocated once n is known
    Bk = torch.zeros(B, iters + 1, iters, dtype=dtype, device=device)  # alphas on the diagonal, betas below
    sigma = torch.zeros(B, dtype=dtype, device=device)
    scale = torch.zeros(B, dtype=dtype, device=device)  # the largest entry of B_k so far: <= ||J||
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    out_sigma, out_stopped = torch.zeros_like(sigma), torch.zeros_like(stopped)
    out_exact = torch.zeros_like(stopped)
    out_u = torch.zeros_like(u0)
    out_v: torch.Tensor | None = None
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
        out_sigma[ids], out_stopped[ids] = S[:, 0], stopped[done]
        out_exact[ids] = k >= d

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
        # below these floors the new direction is rounding noise: that Krylov space is exhausted
        Vs[:, j], alpha = _unit(p, 8 * d * eps * scale)
        q = matvec(Vs[:, j].reshape(len(rows), *shape)).reshape(len(rows), d) - alpha[:, None] * Us[:, j]
        Us[:, k], beta = _unit(_orthogonalize(q, Us[:, :k]), 8 * d * eps * torch.maximum(scale, alpha))
        scale = torch.maximum(scale, torch.maximum(alpha, beta))
        Bk[:, j, j], Bk[:, k, j] = alpha, beta
        if k < d and bool((beta == 0).any()):
            # an invariant subspace: go on orthogonally to it (beta stays 0, so J V_k = U_{k+1} B_k still holds)
            dead = beta == 0
            Us[dead, k] = _fresh_direction(Us[dead, :k])
        if rtol_change > 0 or k == iters:
            new = torch.linalg.svdvals(Bk[:, : k + 1, :k])[:, 0]
            stopped = (new - sigma).abs() <= rtol_change * new if rtol_change > 0 else stopped
            sigma = new
        keep = ~stopped
        if k == iters or not bool(keep.any()):
            break
        if not bool(keep.all()):  # freeze the stopped examples and go on with the rest
            finish(keep, k)
            rows, Us, Vs, Bk, sigma, stopped = rows[keep], Us[keep], Vs[keep], Bk[keep], sigma[keep], stopped[keep]
            scale = scale[keep]
            if select is not None and len(rows) <= 0.9 * len(op_rows):  # shrinking pays: a smaller batch
                ops, op_rows = select(rows), rows
            pos = torch.searchsorted(op_rows, rows)  # rows stay sorted
            matvec, rmatvec = ops if len(pos) == len(op_rows) else _restricted(ops, pos, len(op_rows))
    assert shape is not None and Vs is not None
    finish(torch.zeros(len(rows), dtype=torch.bool, device=device), k)
    assert out_v is not None
    return LanczosRun(out_sigma, out_v.reshape(B, *shape), out_u, k, out_exact, out_stopped)
