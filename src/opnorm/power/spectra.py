"""Top-k singular values of per-example Jacobians: SVD of the formed J, or subspace iteration."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opnorm.jacobian import ROUTES, LinearOperator, check_inputs, eval_mode, jacobian_of, linearize, unwrap
from opnorm.power.norm import REMOVED_TOL
from opnorm.validation import integer, number


@dataclass
class SpectrumResult:
    """Top-k singular triplets of J(x): values (B, k) descending; U (B, d, k); V (B, *in, k)."""

    values: torch.Tensor
    U: torch.Tensor | None = None
    V: torch.Tensor | None = None


def singular_values(
    model: nn.Module,
    x: torch.Tensor,
    k: int,
    return_vectors: bool = False,
    *,
    method: str = "auto",
    iters: int = 50,
    rtol_change: float = 1e-7,
    generator: torch.Generator | None = None,
    route: str = "auto",
    tol: None = None,
):
    """Top-k singular values of each J(x), descending: (B, k).

    ``method="exact"`` forms J (d VJPs, batched) and takes its SVD; ``"power"`` is
    matrix-free subspace iteration with k vectors (each iteration one stacked J and one
    stacked J^T product of k vectors) and a final Rayleigh-Ritz step (SVD of the d x k
    matrix J V); ``"auto"`` picks exact when forming J is the cheaper one
    (``d <= 20 k``). ``route`` as in :func:`operator_norm`. ``"power"`` stops when no value
    changed by more than ``rtol_change`` (relative) in one iteration: a stopping rule, not an
    error bound (``tol``, its old name, raises a TypeError).
    With ``return_vectors=True`` returns a :class:`SpectrumResult` (values, U, V).

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x = torch.rand(4, 8)
        >>> s = opnorm.singular_values(model, x, 3)
        >>> s.shape, bool((s[:, :-1] >= s[:, 1:]).all())  # (B, k), in decreasing order
        (torch.Size([4, 3]), True)
    """
    if tol is not None:
        raise TypeError(REMOVED_TOL)
    if method not in ("auto", "power", "exact"):
        raise ValueError(f"method must be one of ('auto', 'power', 'exact'), got {method!r}")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    check_inputs(model, x)
    k = integer(k, "k", lo=1)
    iters = integer(iters, "iters", lo=1)
    rtol_change = number(rtol_change, "rtol_change", finite=False)
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
            res = _subspace(lin, x, k, iters, rtol_change, generator)
    return res if return_vectors else res.values


def _subspace(lin: LinearOperator, x, k, iters, rtol_change, generator) -> SpectrumResult:
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
        if prev is not None and bool(((vals - prev).abs() <= rtol_change * vals.clamp_min(1e-30)).all()):
            break
        prev = vals
    # Rayleigh-Ritz: the SVD of the small (d, k) matrix J V rotates V onto singular vectors
    U, S, Wh = torch.linalg.svd(W, full_matrices=False)
    V = V @ Wh.transpose(1, 2)
    return SpectrumResult(S, U, V.reshape(B, *shape, k))
