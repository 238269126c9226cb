"""How linear a network is around a point, and how perturbations align with J(x)'s singular vectors.

* :func:`linearity_deviation`: per example ``||f(x + z) - f(x) - J(x) z||_2``, absolute and
  relative to ``||f(x + z) - f(x)||_2``: 0 for an affine model, and 0 inside x's linear region
  of a ReLU network. f is any map to (B, d): the logits, or the penultimate layer phi of
  :class:`Penultimate` (the paper's Sec. 5.3 measures the absolute deviation of phi).
* :class:`Penultimate`: phi(x), the input of the model's last linear layer, flattened.
* :func:`top_singular_value`: ``sigma_1(J(x))`` per example (exact: J formed, then its SVD);
  evaluated at ``x + z`` it shows how the local operator changes along a direction.
* :func:`alignment_by_rank`: ``|cos(delta, v_k)|`` for each of the top-k right singular vectors.
* :func:`pearson_alignment`: ``|corr(delta, v)|``, the Pearson correlation of the entries of
  two vectors (the cosine of the mean-centred vectors).

Example:
    >>> import torch, opnorm
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> x = torch.rand(4, 8)
    >>> from opnorm.linearity import alignment_by_rank, linearity_deviation
    >>> dev = linearity_deviation(model, x, 1e-4 * torch.randn_like(x))
    >>> dev.relative.shape  # (B,), 0 inside the linear region
    torch.Size([4])
    >>> from opnorm.linearity import Penultimate
    >>> phi = Penultimate(model, layer=model[2])  # the features the last layer reads
    >>> linearity_deviation(phi, x, 0.1 * torch.randn_like(x)).absolute.shape  # the paper's metric
    torch.Size([4])
    >>> V = opnorm.singular_values(model, x, 3, return_vectors=True).V  # (B, *in, 3)
    >>> x_adv = opnorm.pgd(model, x, eps=0.1, p=2, loss="logit", step_size=float("inf"), clip=None)
    >>> alignment_by_rank(x_adv - x, V).shape  # (B, 3)
    torch.Size([4, 3])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opnorm.jacobian import check_inputs, eval_mode, forward, jvp, unwrap
from opnorm.power import singular_values

__all__ = [
    "LinearityDeviation",
    "Penultimate",
    "linearity_deviation",
    "top_singular_value",
    "alignment_by_rank",
    "pearson_alignment",
]


@dataclass
class LinearityDeviation:
    """Per-example deviation from linearity, each (B,).

    Attributes:
        absolute: ``||f(x + z) - f(x) - J(x) z||_2``.
        relative: ``absolute / ||f(x + z) - f(x)||_2`` (0 where both are 0, inf where only
            the change is 0).
        change: ``||f(x + z) - f(x)||_2``.
    """

    absolute: torch.Tensor
    relative: torch.Tensor
    change: torch.Tensor


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


class Penultimate(nn.Module):
    """phi(x): the features the model's classifier reads, flattened to (B, m).

    The classifier is ``layer`` when given, else the model's submodule named ``classifier``
    (every model of :func:`opnorm.training.models.build_model` has one, an ``nn.Linear``).
    Each call checks that the model's output *is* the classifier's output, so a model that
    does anything after its classifier raises instead of giving the wrong features.

    Args:
        model: a classifier ``(B, *in) -> (B, d)`` (DataParallel / compile wrappers unwrapped).
        layer: the module whose input is phi (default: ``model.classifier``).

    Raises:
        ValueError: no ``layer`` given and the model has no ``nn.Linear`` named ``classifier``;
            or, when called, the model's output is not ``layer``'s output.

    Example:
        >>> import torch
        >>> from opnorm.linearity import Penultimate
        >>> from opnorm.training.models import build_model
        >>> phi = Penultimate(build_model("cnn", input_shape=(1, 8, 8), num_classes=10))
        >>> phi(torch.rand(4, 1, 8, 8)).shape            # the 128 hidden units before the classifier
        torch.Size([4, 128])
    """

    def __init__(self, model: nn.Module, layer: nn.Module | None = None) -> None:
        super().__init__()
        net = unwrap(model)
        if layer is None:
            layer = getattr(net, "classifier", None)
            if not isinstance(layer, nn.Linear):
                raise ValueError(
                    f"cannot find the penultimate layer of {type(net).__name__}: it has no nn.Linear named "
                    "'classifier'; pass the last layer as Penultimate(model, layer=...) or use your own feature map"
                )
        if not any(m is layer for m in net.modules()):
            raise ValueError(f"layer {type(layer).__name__} is not a submodule of {type(net).__name__}")
        self.model, self.layer = net, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen: dict = {}

        def record(module, inputs, output):
            seen["phi"], seen["out"] = inputs[0], output

        handle = self.layer.register_forward_hook(record)
        try:
            out = self.model(x)
        finally:
            handle.remove()
        if "phi" not in seen or out is not seen["out"]:
            raise ValueError(
                f"{type(self.model).__name__}'s output is not its {type(self.layer).__name__}'s output (the layer "
                "is not the last one, or is not called): pass the last layer as Penultimate(model, layer=...)"
            )
        return _flat(seen["phi"])


def linearity_deviation(model: nn.Module, x: torch.Tensor, z: torch.Tensor) -> LinearityDeviation:
    """How far f is from its linearization at x, at the point x + z (eval mode, mode restored).

    Args:
        model: classifier ``(B, *in) -> (B, d)``.
        x: (B, *in) points. z: (B, *in) displacements (not box-clipped: the measurement is
            about f, not about valid images).

    Returns:
        :class:`LinearityDeviation` with (B,) tensors.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from opnorm.linearity import linearity_deviation
        >>> x, z = torch.rand(4, 8), torch.randn(4, 8)
        >>> dev = linearity_deviation(nn.Linear(8, 3), x, z)  # an affine model: no deviation
        >>> dev.relative.shape, bool((dev.relative < 1e-5).all())
        (torch.Size([4]), True)
    """
    check_inputs(model, x)
    if not isinstance(z, torch.Tensor) or z.shape != x.shape:
        raise ValueError(
            f"z must be a tensor of x's shape {tuple(x.shape)}, got {getattr(z, 'shape', type(z).__name__)}"
        )
    net = unwrap(model)
    with eval_mode(net):
        fx, jz = jvp(net, x, z)
        with torch.no_grad():
            change = forward(net, x + z.to(x.dtype)) - fx
    absolute = torch.linalg.vector_norm(_flat(change - jz), dim=1)
    size = torch.linalg.vector_norm(_flat(change), dim=1)
    ratio = absolute / torch.where(size > 0, size, torch.ones_like(size))
    relative = torch.where(
        size > 0, ratio, torch.where(absolute > 0, torch.full_like(ratio, float("inf")), torch.zeros_like(ratio))
    )
    return LinearityDeviation(absolute, relative, size)


def top_singular_value(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``sigma_1(J(x))`` per example, (B,), from the exact J (d VJPs) and its SVD.

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x = torch.rand(4, 8)
        >>> from opnorm.linearity import top_singular_value
        >>> z = 0.1 * torch.randn_like(x)
        >>> top_singular_value(model, x + z).shape  # the local operator norm after a step z
        torch.Size([4])
    """
    return singular_values(model, x, 1, method="exact")[:, 0]


def alignment_by_rank(delta: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``|cos(delta, v_k)|`` per example and rank: (B, k).

    Args:
        delta: (B, *in) perturbations. V: (B, *in, k) vectors by rank, e.g.
            ``singular_values(model, x, k, return_vectors=True).V``.

    An example whose delta or v_k is zero gets 0.

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x = torch.rand(4, 8)
        >>> from opnorm.linearity import alignment_by_rank
        >>> V = opnorm.singular_values(model, x, 3, return_vectors=True).V
        >>> a = alignment_by_rank(V[..., 0], V)
        >>> a.shape, bool(torch.allclose(a[:, 0], torch.ones(4)))  # v_1 is aligned with itself
        (torch.Size([4, 3]), True)
    """
    if not isinstance(delta, torch.Tensor) or not isinstance(V, torch.Tensor):
        raise TypeError("delta and V must be tensors of shapes (B, *in) and (B, *in, k)")
    if V.ndim != delta.ndim + 1 or V.shape[:-1] != delta.shape:
        raise ValueError(
            f"V must have delta's shape plus a rank axis, got {tuple(V.shape)} for delta {tuple(delta.shape)}"
        )
    a = _flat(delta)
    M = V.reshape(V.shape[0], -1, V.shape[-1]).to(a.dtype)
    dots = torch.einsum("bn,bnk->bk", a, M).abs()
    denom = torch.linalg.vector_norm(a, dim=1, keepdim=True) * torch.linalg.vector_norm(M, dim=1)
    return torch.where(denom > 0, dots / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(dots))


def pearson_alignment(delta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``|Pearson correlation|`` between the entries of delta and v, per example: (B,).

    The cosine of the mean-centred vectors; 0 where either is constant. (Alignment
    measured this way treats a constant shift of every pixel as no signal.)

    Example:
        >>> import torch
        >>> from opnorm.linearity import pearson_alignment
        >>> v = torch.randn(4, 8)
        >>> a = pearson_alignment(2 * v + 1, v)  # a constant shift is no signal: still aligned
        >>> bool(torch.allclose(a, torch.ones(4)))
        True
    """
    if not isinstance(delta, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise TypeError("delta and v must be tensors of shape (B, ...)")
    if delta.shape[0] != v.shape[0] or delta[0].numel() != v[0].numel():
        raise ValueError(
            f"delta and v must hold the same number of examples and entries per example, "
            f"got shapes {tuple(delta.shape)} and {tuple(v.shape)}"
        )
    a = _flat(delta)
    b = _flat(v).to(a.dtype)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denom = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    dot = (a * b).sum(dim=1).abs()
    return torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(dot))
