"""BatchNorm under the penalty: every row is normalized with the clean batch's statistics.

A BatchNorm that uses batch statistics (training mode, or ``track_running_stats=False``)
makes one example's output depend on the whole batch. The penalty compares f(x) with
f(x + eps v); in a single forward of ``[x; x + eps v]`` the perturbed half would shift the
statistics (and the running statistics) of the clean half. Two contexts fix the function
that the penalty measures to ``f_B``: the network with every such BatchNorm normalizing by
the mean and (biased) variance of the clean batch x, the statistics a plain training step
of x uses. ``f_B`` is per example, so its Jacobian is one matrix per example:

* :func:`clean_statistics`: the training forward. The clean rows go through BatchNorm as in
  a plain step (batch statistics; running statistics updated from them only, once); the
  other rows are normalized with the clean rows' statistics, differentiable w.r.t. the
  weights through them.
* :func:`frozen_statistics`: the direction solver. The clean batch's statistics (one
  forward without weight gradients) stand in for the running statistics, so that the
  solver's eval-mode iterations linearize ``f_B`` (also on a subset of the rows).

Models without such a BatchNorm are left untouched.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    >>> x = torch.rand(4, 8)
    >>> x_p = x + 0.1 * torch.randn_like(x)
    >>> from opnorm.jacobian import eval_mode, linearize
    >>> from opnorm.regularizers import clean_statistics, frozen_statistics
    >>> with clean_statistics(net, batch=4, total=8):
    ...     out = net(torch.cat([x, x_p]))  # x_p normalized with x's statistics
    >>> with frozen_statistics(net, x), eval_mode(net):
    ...     lin = linearize(net, x)  # J of f_B at x
    ...     bool(torch.allclose(lin.logits, out[:4], atol=1e-6))  # f_B(x): the clean rows of the training forward
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from opnorm.jacobian import eval_mode
from opnorm.training.distributed import group_size

__all__ = ["uses_batch_statistics", "batch_norms", "clean_statistics", "frozen_statistics"]


def uses_batch_statistics(m: nn.Module) -> bool:
    """A BatchNorm (1d/2d/3d, SyncBatchNorm) that normalizes with its batch's statistics:
    training mode, or no running statistics."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)


def batch_norms(net: nn.Module) -> list[nn.Module]:
    """The submodules of net for which :func:`uses_batch_statistics` holds."""
    mods = [m for m in net.modules() if uses_batch_statistics(m)]
    synced = group_size() > 1
    for m in mods:
        if synced and isinstance(m, nn.SyncBatchNorm):
            raise ValueError(
                "SyncBatchNorm across processes is not supported by the operator-norm penalty (it needs "
                "the clean half's global statistics); convert the model's SyncBatchNorm to BatchNorm"
            )
    return mods


def _moments(m: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance) of h (N, C, *), shaped to broadcast over h."""
    if h.ndim < 2 or h.shape[1] != m.num_features:
        raise ValueError(f"{type(m).__name__}({m.num_features}) got an input of shape {tuple(h.shape)}")
    dims = [0, *range(2, h.ndim)]
    var, mean = torch.var_mean(h, dim=dims, correction=0, keepdim=True)
    return mean, var


def _normalize(m: nn.Module, h: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    out = (h - mean) * torch.rsqrt(var + m.eps)
    if m.affine:
        shape = (1, -1, *([1] * (h.ndim - 2)))
        out = out * m.weight.reshape(shape) + m.bias.reshape(shape)
    return out


def _clean_forward(m: nn.Module, batch: int, total: int):
    module_forward = type(m).forward.__get__(m)

    def run(h: torch.Tensor) -> torch.Tensor:
        if not isinstance(h, torch.Tensor) or h.shape[0] != total:
            rows = getattr(h, "shape", (None,))[0]
            raise ValueError(
                f"{type(m).__name__} saw {rows} rows inside the penalty's forward of {total} (the first "
                f"{batch} clean): a model that changes the batch dimension is not supported"
            )
        clean = module_forward(h[:batch])  # batch statistics; running statistics from the clean rows only
        mean, var = _moments(m, h[:batch])
        return torch.cat([clean, _normalize(m, h[batch:], mean, var)])

    return run


@contextlib.contextmanager
def clean_statistics(net: nn.Module, batch: int, total: int) -> Iterator[None]:
    """Inside, every BatchNorm of net that uses batch statistics must see ``total`` rows, of
    which the first ``batch`` are the clean examples: those are normalized as in a plain
    forward of the clean batch (and update the running statistics, once); rows ``batch:``
    are normalized with the clean rows' mean and biased variance (differentiable).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
        >>> x = torch.rand(4, 8)
        >>> x_p = x + 0.1 * torch.randn_like(x)
        >>> from opnorm.regularizers import clean_statistics
        >>> with clean_statistics(net, 4, 8):
        ...     out = net(torch.cat([x, x_p]))
        >>> bool(torch.allclose(out[:4], net(x), atol=1e-6))  # the clean rows: as in a plain forward of x
        True
    """
    patched = batch_norms(net) if total > batch else []
    for m in patched:
        m.forward = _clean_forward(m, batch, total)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


@contextlib.contextmanager
def frozen_statistics(net: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """Inside, every BatchNorm of net that uses batch statistics holds the clean batch x's
    statistics in place of its running statistics (restored on exit, never updated), so
    that in eval mode it computes ``f_B`` row by row. The statistics come from one forward
    of x without gradients, in eval mode except for those BatchNorms (dropout off, as in
    the solver's iterations).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
        >>> x = torch.rand(4, 8)
        >>> x_p = x + 0.1 * torch.randn_like(x)
        >>> from opnorm.jacobian import eval_mode, linearize
        >>> from opnorm.regularizers import frozen_statistics
        >>> with frozen_statistics(net, x), eval_mode(net):
        ...     rows = linearize(net, x[:3]).logits  # rows of f_B: x's statistics, not x[:3]'s
        ...     whole = net(x)
        >>> bool(torch.allclose(rows, whole[:3]))
        True
    """
    mods = batch_norms(net)
    if not mods:
        yield
        return
    stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def measured(m: nn.Module):
        def run(h: torch.Tensor) -> torch.Tensor:
            if m in stats:
                raise ValueError(
                    f"{type(m).__name__} is called twice in one forward: its batch statistics are ambiguous"
                )
            mean, var = _moments(m, h)
            stats[m] = (mean.flatten(), var.flatten())
            return _normalize(m, h, mean, var)

        return run

    saved = [(m, m.running_mean, m.running_var) for m in mods]
    try:
        for m in mods:
            m.forward = measured(m)
        with torch.no_grad(), eval_mode(net):
            net(x.detach())
    finally:
        for m in mods:
            del m.forward
    missing = [m for m in mods if m not in stats]
    if missing:
        raise ValueError(
            f"{type(missing[0]).__name__} was not called in a forward of x: the penalty cannot take its "
            "batch statistics"
        )
    try:
        for m in mods:
            m.running_mean, m.running_var = stats[m]
        yield
    finally:
        for m, mean, var in saved:
            m.running_mean, m.running_var = mean, var
