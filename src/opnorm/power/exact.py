"""(p, q) norms of explicit matrices: closed forms, enumeration over sign vectors, and a
restart lower bound for the NP-hard pairs."""

from __future__ import annotations

import itertools
import math

import torch

from opnorm.norms import Order, conjugate, duality_map, norm_order
from opnorm.power.iteration import power_iteration, random_unit
from opnorm.validation import integer

DEFAULT_RESTARTS = 64


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


# enumeration forms all 2^(n-1) sign vectors: 2^21 of them are the most it will hold in memory
MAX_ENUMERATE_LIMIT = 22


def check_max_enumerate(value: int) -> int:
    """max_enumerate as an int in [0, MAX_ENUMERATE_LIMIT] (the sign vectors must fit in memory)."""
    return integer(value, "max_enumerate", lo=0, hi=MAX_ENUMERATE_LIMIT)


def operator_norm_of_matrix(
    J: torch.Tensor,
    p: Order = 2,
    q: Order = 2,
    *,
    max_enumerate: int = 20,
    restarts: int = DEFAULT_RESTARTS,
    iters: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, q) norms of a batch of explicit matrices J (B, d, n).

    Returns (sigma (B,), v (B, n) unit l_p attaining ||J v||_q = sigma, exact (B,) bool).
    """
    p, q = norm_order(p, "p"), norm_order(q, "q")
    max_enumerate = check_max_enumerate(max_enumerate)
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
    run = power_iteration(
        lambda v: torch.einsum("bdn,bn->bd", Jr, v),
        lambda u: torch.einsum("bdn,bd->bn", Jr, u),
        v0,
        p,
        q,
        iters=iters,
        rtol_change=1e-12,
    )
    sigma = run.sigma.reshape(B, restarts)
    best, idx = sigma.max(dim=1)
    v = run.v.reshape(B, restarts, n)[torch.arange(B, device=J.device), idx]
    return best, v, torch.zeros(B, dtype=torch.bool, device=J.device)


def has_exact_form(p: float, q: float, d: int, n: int, max_enumerate: int) -> bool:
    """Whether the (p, q) norm of a d x n matrix has an exact form :func:`operator_norm_of_matrix` computes
    (enumerating at most ``max_enumerate`` sign vectors for q = 1 or p = inf)."""
    return (
        (p == 2 and q == 2)
        or p == 1
        or q == math.inf
        or (q == 1 and d <= max_enumerate)
        or (p == math.inf and n <= max_enumerate)
    )


def top_pair_gram(J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top right singular vector v (B, n) of J (B, d, n), d <= n, from the eigh of J J^T (d x d)."""
    J64 = J.to(torch.float64)
    _, E = torch.linalg.eigh(J64 @ J64.transpose(1, 2))
    v = torch.einsum("bdn,bd->bn", J64, E[:, :, -1])  # J^T u_1 = sigma_1 v_1
    norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    e1 = torch.zeros_like(v)
    e1[:, 0] = 1  # J = 0: every unit vector attains 0
    return torch.where(norm > 0, v / torch.where(norm > 0, norm, torch.ones_like(norm)), e1).to(J.dtype)
