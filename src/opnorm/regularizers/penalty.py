"""The differentiable penalty, with the direction v (and u) held fixed (Danskin).

* :class:`FDPenalty` (the paper's code): ``s = ||f(x + eps v) - f(x)|| / eps`` in the output
  metric, from one forward of ``[x; x + eps v]`` through the model as passed (a DDP wrapper
  included). Inside the linear region of x it equals ``||J v|| = sigma`` and its weight
  gradient is the exact one; beyond it, it is the secant version. Stochastic modules in
  training mode (Dropout, stochastic depth) draw one noise sample for both halves
  (:func:`paired_noise`), so that s measures J, not the difference of two random networks;
  BatchNorm normalizes both halves with the clean half's batch statistics
  (:func:`~opnorm.regularizers.batchnorm.clean_statistics`). Noise drawn elsewhere
  (``F.dropout`` inside a custom ``forward``) cannot be paired: the first training-mode call
  checks that two forwards of the same points agree and raises a one-line ValueError when
  they do not.
* :class:`ExactPenalty`: ``s = <u, J(x) v>``, differentiable w.r.t. the weights (forward-mode
  AD, or double backward where an op lacks a forward derivative). At the power method's fixed
  point ``<u, J v> = ||J v|| = sigma``.

Both reduce the per-example s to ``lam * mean_b(s_b)`` or ``lam * mean_b(s_b^2)``
(``squared``, the paper's d.d. SNR), optionally scaled by eps (``scale_by_eps``: the fd
penalty becomes the theorem's adversarial logit loss ``||f(x + eps v) - f(x)||``).

Example (``evaluate`` takes the model as called, e.g. a DDP wrapper, then the module it wraps; the
fd penalty does not use u):
    >>> import torch
    >>> from torch import nn
    >>> from opnorm.regularizers import FDPenalty, LogitNorm
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> x, v, eps = torch.rand(4, 8), torch.randn(4, 8), 0.1
    >>> pen = FDPenalty(squared=True)
    >>> terms = pen.evaluate(model, x, x + eps * v, v, None, LogitNorm(2), eps)
    >>> terms.s.shape, terms.clean.shape, terms.pert.shape  # s: ||f(x + eps v) - f(x)||_2 / eps per example
    (torch.Size([4]), torch.Size([4, 3]), torch.Size([4, 3]))
    >>> value = pen.reduce(terms.s, terms.s_sq, lam=0.02, eps=eps)  # 0.02 * mean(s^2)
    >>> bool(torch.allclose(value, 0.02 * (terms.s**2).mean()))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from opnorm.jacobian import differentiable_jvp, unwrap
from opnorm.jacobian.steps import DROPOUTS
from opnorm.losses import full
from opnorm.regularizers.batchnorm import batch_norms, clean_statistics
from opnorm.regularizers.metrics import OutputMetric

__all__ = ["Penalty", "PenaltyTerms", "FDPenalty", "ExactPenalty", "paired_noise", "check_paired_noise"]


def _stochastic(m: nn.Module) -> bool:
    """A module that draws noise in training mode: dropout, or torchvision's stochastic depth
    (recognized by name, so that torchvision need not be imported)."""
    kind = type(m)
    return isinstance(m, DROPOUTS) or (kind.__name__ == "StochasticDepth" and kind.__module__.startswith("torchvision"))


def _rng(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device), lambda s: torch.cuda.set_rng_state(s, device)
    return torch.get_rng_state(), torch.set_rng_state


def _paired(module_forward, batch: int):
    """A forward that runs the module on the two halves with the same random state."""

    def run(h: torch.Tensor, *args, **kwargs):
        if not isinstance(h, torch.Tensor) or h.shape[0] != 2 * batch:
            return module_forward(h, *args, **kwargs)
        state, restore = _rng(h.device)
        first = module_forward(h[:batch], *args, **kwargs)
        restore(state)
        return torch.cat([first, module_forward(h[batch:], *args, **kwargs)])

    return run


@contextlib.contextmanager
def paired_noise(net: nn.Module, batch: int) -> Iterator[None]:
    """Inside, every stochastic module (:func:`_stochastic`) in training mode that sees a batch
    of 2 * ``batch`` rows applies the same noise to rows i and batch + i. Functional dropout
    inside a custom forward is not covered: put it in an ``nn.Dropout`` module."""
    patched = [m for m in net.modules() if _stochastic(m) and m.training]
    for m in patched:
        m.forward = _paired(type(m).forward.__get__(m), batch)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


class PenaltyTerms(NamedTuple):
    """The result of :meth:`Penalty.evaluate`."""

    clean: torch.Tensor  # (B, d) f(x), differentiable w.r.t. the weights
    s: torch.Tensor  # (B,) the per-example penalty term, differentiable w.r.t. the weights
    s_sq: torch.Tensor | None  # (B,) s^2 computed without a square root, or None
    pert: torch.Tensor | None  # (B, d) f(x_p) (the fd penalty), or None


class Penalty:
    """Base: the reduction shared by both penalties. ``uses_point``: needs ``x + eps v``."""

    uses_point = True

    def __init__(self, squared: bool = True, scale_by_eps: bool = False) -> None:
        self.squared, self.scale_by_eps = bool(squared), bool(scale_by_eps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(squared={self.squared}, scale_by_eps={self.scale_by_eps})"

    def reduce(self, s: torch.Tensor, s_sq: torch.Tensor | None, lam: float, eps: float) -> torch.Tensor:
        """Per-example s (B,) -> ``lam * mean(s or s^2)`` with the optional eps scale; ``s_sq``,
        when given, is s^2 computed without a square root."""
        if self.squared:
            value = s_sq if s_sq is not None else s * s
            return lam * (value * eps**2 if self.scale_by_eps else value).mean()
        return lam * (s * eps if self.scale_by_eps else s).mean()

    def evaluate(
        self,
        model: nn.Module,
        x: torch.Tensor,
        x_p: torch.Tensor | None,
        v: torch.Tensor,
        u: torch.Tensor | None,
        metric: OutputMetric,
        eps: float,
    ) -> PenaltyTerms:
        """The penalty terms at the fixed direction v, differentiable w.r.t. the weights.

        Args:
            model: the model as trained, a DDP / DataParallel wrapper included: the forward runs
                through it, so that DDP synchronizes the weight gradients of the penalty. What
                needs the plain network (pairing the Dropout noise, BatchNorm statistics) finds
                it inside with :func:`opnorm.jacobian.unwrap`.
            x: (B, *in) inputs. x_p: (B, *in) the point ``clip(x + eps v)`` (fd), or None.
            v: (B, *in) the direction. u: (B, d) the dual direction (exact), or None.
            metric: the output metric. eps: the fd radius.
        """
        raise NotImplementedError


def check_paired_noise(net: nn.Module, x: torch.Tensor, rows: int = 4) -> None:
    """ValueError if two forwards of the same points differ under :func:`paired_noise` (randomness
    outside the modules it pairs, e.g. ``F.dropout`` in a custom forward). Draws from no RNG
    and leaves buffers (batch-norm statistics) as they were.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from opnorm.regularizers.penalty import check_paired_noise
        >>> x = torch.rand(4, 8)
        >>> check_paired_noise(nn.Sequential(nn.Linear(8, 3), nn.Dropout(0.5)).train(), x)  # nn.Dropout is paired
        >>> class Custom(nn.Linear):
        ...     def forward(self, x):
        ...         return F.dropout(super().forward(x), 0.5, self.training)
        >>> check_paired_noise(Custom(8, 3).train(), x)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: ...
    """
    xs = x[:rows].detach()
    k = xs.shape[0]
    buffers = [(b, b.detach().clone()) for b in net.buffers()]
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices), paired_noise(net, k):
        out = net(torch.cat([xs, xs]))
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    if (
        isinstance(out, torch.Tensor)
        and out.shape[:1] == (2 * k,)
        and not torch.allclose(out[:k].float(), out[k:].float(), rtol=1e-4, atol=1e-6, equal_nan=True)
    ):
        raise ValueError(
            f"the model's forward is random in training mode outside nn.Dropout modules (two forwards of the same "
            f"points differ, e.g. F.dropout in a custom forward): the fd penalty would measure the difference of two "
            f"random networks, not J(x); use an nn.Dropout module ({type(net).__name__})"
        )


class FDPenalty(Penalty):
    """The finite-difference penalty (see the module docstring)."""

    _noise_checked = False  # the first training-mode call checks the forward (check_paired_noise)

    def evaluate(
        self,
        model: nn.Module,
        x: torch.Tensor,
        x_p: torch.Tensor,
        v,
        u,
        metric: OutputMetric,
        eps: float,
    ) -> PenaltyTerms:
        """(f(x), s, s_sq, f(x_p)) from one forward of ``[x; x_p]`` through ``model`` (see
        :meth:`Penalty.evaluate`)."""
        B = x.shape[0]
        net = unwrap(model)
        if not self._noise_checked and isinstance(net, nn.Module) and net.training and torch.is_grad_enabled():
            check_paired_noise(net, x)
            self._noise_checked = True
        with paired_noise(net, B), clean_statistics(net, B, 2 * B):
            out = model(torch.cat([x, x_p]))
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2 * B:
            raise ValueError(f"model output must be 2-D (B, d); got {getattr(out, 'shape', type(out).__name__)}")
        s, s_sq = metric.fd(out[:B], out[B:], eps)
        return PenaltyTerms(out[:B], s, s_sq, out[B:])


class ExactPenalty(Penalty):
    """The exact penalty ``<u, J(x) v>`` (see the module docstring)."""

    uses_point = False

    def evaluate(
        self,
        model: nn.Module,
        x: torch.Tensor,
        x_p,
        v: torch.Tensor,
        u: torch.Tensor,
        metric: OutputMetric,
        eps: float,
    ) -> PenaltyTerms:
        """(f(x), s, None, None) from one forward of ``model``: J v differentiable w.r.t. the
        weights by forward-mode AD or double backward (:func:`opnorm.jacobian.differentiable_jvp`)."""
        if batch_norms(unwrap(model)):  # its J v would differentiate the batch statistics w.r.t. the input
            raise ValueError(
                "ExactPenalty does not support BatchNorm using batch statistics (training mode); use "
                "FDPenalty() (the default), which normalizes x + eps v with the clean batch's statistics"
            )
        out, jv = differentiable_jvp(model, x, v)
        return PenaltyTerms(out, full((u.to(jv.dtype) * jv).sum(dim=1)), None, None)
