"""Output metrics: how the regularizer measures a change of the logits (docs/theory.md).

A metric gives two things:

* ``fd(clean, pert, eps) -> (s, s_sq)``: the finite-difference value ``||f(x_p) - f(x)|| / eps``
  per example (B,), and, where it is cheaper and smoother, its square computed without a
  square root (else None);
* ``dual(jv, logits) -> (norm, u)``: the metric's norm of a logit direction J v (B,) and its
  dual direction u (B, d) with ``<u, J v> = ||J v||``, so that ``J^T u`` is the gradient the
  power method ascends.

:class:`LogitNorm` is the paper's l_q norm; :class:`FisherKL` is the softmax's KL divergence,
locally the Fisher metric ``||w||_H = sqrt(w^T H w)`` with ``H = diag(s) - s s^T``.

Example:
    >>> import torch
    >>> from opnorm.regularizers import LogitNorm
    >>> clean, pert, eps = torch.zeros(2, 3), torch.tensor([[0.3, 0.4, 0.0], [0.0, 0.0, 0.1]]), 0.1
    >>> s, _ = LogitNorm(2).fd(clean, pert, eps)  # ||f(x + eps v) - f(x)||_2 / eps
    >>> [round(float(t), 4) for t in s]
    [5.0, 1.0]
"""

from __future__ import annotations

import torch

from opnorm.losses import full, kl_rows
from opnorm.norms import Order, duality_map, lp_norm, norm_order, order_text

__all__ = ["OutputMetric", "LogitNorm", "FisherKL"]


class OutputMetric:
    """Base class: see the module docstring. ``q`` is the order of the metric's norm."""

    q: float = 2.0
    name: str = ""

    def fd(self, clean: torch.Tensor, pert: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def dual(self, jv: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LogitNorm(OutputMetric):
    """``||w||_q`` of a logit change w: with it the regularizer penalizes ``||J(x)||_{p->q}``.

    Args:
        q: the norm order, 1 <= q <= inf.
    """

    name = "logits"

    def __init__(self, q: Order = 2) -> None:
        self.q = norm_order(q, "q")

    def fd(self, clean, pert, eps):
        return lp_norm(full(pert - clean), self.q) / eps, None

    def dual(self, jv, logits):
        return lp_norm(jv, self.q), duality_map(jv, self.q)

    def __repr__(self) -> str:
        return f"LogitNorm(q={order_text(self.q)})"


def fisher(logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``H w`` with ``H = diag(s) - s s^T``, s = softmax(logits): the Fisher information of the
    softmax in logit space, i.e. the Hessian of ``KL(softmax(z) || softmax(z + w))`` at w = 0."""
    prob = torch.softmax(full(logits.detach()), dim=1).to(w.dtype)
    return prob * w - prob * (prob * w).sum(dim=1, keepdim=True)


class FisherKL(OutputMetric):
    """The softmax's KL divergence: ``fd = sqrt(2 KL(softmax f(x) || softmax f(x_p))) / eps``.

    Locally this is the Fisher metric, a 2-norm: the regularizer then penalizes the (p, 2)
    operator norm of ``H^(1/2) J(x)``. It weighs the logit directions the prediction depends
    on, as the cross-entropy does. ``s_sq = 2 KL / eps^2`` is returned without the square
    root (whose gradient is infinite at 0).
    """

    name = "kl"
    q = 2.0

    def fd(self, clean, pert, eps):
        s_sq = 2 * kl_rows(clean, pert).clamp_min(0) / eps**2
        return s_sq.clamp_min(torch.finfo(s_sq.dtype).tiny).sqrt(), s_sq

    def dual(self, jv, logits):
        hjv = fisher(logits, jv)
        norm = (jv * hjv).sum(dim=1).clamp_min(0).sqrt()
        return norm, hjv / norm.clamp_min(torch.finfo(jv.dtype).tiny).unsqueeze(1)
