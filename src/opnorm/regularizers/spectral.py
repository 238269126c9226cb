"""Data-independent spectral norm regularization (Yoshida & Miyato 2017).

Example::

    >>> snr = GlobalSpectralNormRegularizer(model, lam=0.01)
    >>> loss = F.cross_entropy(model(x), y) + snr()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from opnorm.jacobian import check_autograd, unwrap
from opnorm.losses import full
from opnorm.validation import integer, number

__all__ = ["GlobalSpectralNormRegularizer"]


def _layer_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as a matrix: Linear as is (out x in), ConvNd as out x (in/groups * prod(k))."""
    w = module.weight
    return w.reshape(w.shape[0], -1)


class GlobalSpectralNormRegularizer(nn.Module):
    """Data-independent spectral norm regularization (Yoshida & Miyato 2017).

    Penalty ``lam * sum_l sigma(W_l)^2`` over every ``nn.Linear`` and ``nn.Conv1d/2d/3d``
    layer of the model, with conv kernels reshaped to ``out x (in/groups * k * k)``.
    Each layer keeps a persistent left vector ``u_l`` (a buffer, so it is saved in
    ``state_dict`` and moves with ``.to()``); every call runs ``iters`` power iterations
    without gradients, ``v = W^T u / ||W^T u||``, ``u = W v / ||W v||``, then differentiates
    ``sigma = u^T W v`` w.r.t. W with u, v held fixed. The estimate converges to the
    largest singular value ``torch.linalg.matrix_norm(W_l, 2)`` over calls.

    Args:
        model: the network (a DDP / compile wrapper is unwrapped); its layers are found once.
        iters: power iterations per call (>= 1).
        lam: weight (>= 0).
        seed: seeds the initial u vectors (identical on every DDP rank).

    Forward:
        ``reg()`` or ``reg(model)`` -> scalar ``lam * sum_l sigma_l^2``.

    Attributes:
        last_sigmas: dict layer name -> float, the estimates of the last call.

    Example:
        >>> snr = GlobalSpectralNormRegularizer(model, lam=0.01)
        >>> loss = F.cross_entropy(model(x), y) + snr()
    """

    def __init__(self, model: nn.Module, iters: int = 1, lam: float = 0.01, *, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.iters = integer(iters, "iters", lo=1)
        self.lam = number(lam, "lam")
        net = unwrap(model)
        self._net_id = id(net)
        self._layers: list[tuple[str, nn.Module]] = [
            (name, m)
            for name, m in net.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and getattr(m, "weight", None) is not None
        ]
        if not self._layers:
            raise ValueError("model has no nn.Linear or nn.Conv layers to regularize")
        gen = torch.Generator().manual_seed(seed)
        self._buffer_names: list[str] = []
        for i, (name, m) in enumerate(self._layers):
            mat = _layer_matrix(m)
            u = torch.randn(mat.shape[0], generator=gen, dtype=torch.float64)
            buf = f"u_{i}"
            self.register_buffer(buf, (u / u.norm()).to(dtype=mat.dtype, device=mat.device))
            self._buffer_names.append(buf)
        self.last_sigmas: dict[str, float] = {}

    def extra_repr(self) -> str:
        return f"layers={len(self._layers)}, iters={self.iters}, lam={self.lam:g}"

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self._layers]

    def sigmas(self) -> list[torch.Tensor]:
        """One power-iteration update per layer; returns the differentiable sigma_l (scalars)."""
        out = []
        for (name, m), buf in zip(self._layers, self._buffer_names):
            W = _layer_matrix(m)
            u = getattr(self, buf)
            if u.device != W.device or u.dtype != W.dtype:
                u = u.to(device=W.device, dtype=W.dtype)
            with torch.no_grad():
                Wd = W.detach()
                for _ in range(self.iters):
                    v = F.normalize(Wd.t() @ u, dim=0)
                    u = F.normalize(Wd @ v, dim=0)
                getattr(self, buf).copy_(u)
            sigma = u @ (W @ v)  # Danskin: u, v fixed
            self.last_sigmas[name] = float(sigma.detach())
            out.append(sigma)
        return out

    def forward(self, model: nn.Module | None = None) -> torch.Tensor:
        check_autograd(self)  # the penalty's gradient, and its power iteration's state
        if model is not None and id(unwrap(model)) != self._net_id:
            raise ValueError("this GlobalSpectralNormRegularizer was built for another model; build one per model")
        return self.lam * torch.stack([full(s) ** 2 for s in self.sigmas()]).sum()
