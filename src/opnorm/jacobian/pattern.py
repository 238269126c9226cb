"""The pattern route: J(x) of a piecewise-linear ``nn.Sequential`` replayed from its
activation pattern at x (see :mod:`opnorm.jacobian.steps`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from opnorm.jacobian.core import check_autograd, check_output, unwrap
from opnorm.jacobian.steps import (
    _CONV,
    _Autograd,
    _Conv,
    _global_hooks,
    _has_hooks,
    _Linear,
    _Mask,
    _MaxPool,
    _plain,
    _Reshape,
    _Scale,
    _Step,
)

_MASKS = (nn.ReLU, nn.LeakyReLU)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _recognize(m: nn.Module, name: str) -> _Step | str:
    """The fast step for m, or the reason why m needs local autograd."""
    if _has_hooks(m):
        return "has hooks (they could change its output or gradient)"
    if _plain(m, nn.Linear):
        return _Linear(m, name)
    if any(_plain(m, c) for c in _CONV):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return (
                f"convolution with padding_mode={m.padding_mode!r}, padding={m.padding!r} "
                "(only numeric zero padding is replayed)"
            )
        return _Conv(m, name)
    if any(_plain(m, c) for c in _MASKS):
        return _Mask(m, name)
    if any(_plain(m, c) for c in _POOLS):
        if m.return_indices:
            return "max-pool with return_indices=True returns a tuple"
        return _MaxPool(m, name)
    if any(_plain(m, c) for c in _NORMS):
        if m.training or m.running_var is None:
            return "BatchNorm that uses batch statistics (training mode or track_running_stats=False) mixes examples"
        return _Scale(m, name)
    if any(_plain(m, c) for c in _RESHAPES):
        return _Reshape(m, name)
    if any(_plain(m, c) for c in _DROPOUTS):
        if m.training:
            return "dropout in training mode is random"
        return _Reshape(m, name)
    if _plain(m, nn.Sequential):
        return "nested Sequential"  # expanded by the caller
    return f"{type(m).__name__} is not a recognized piecewise-linear module"


def pattern_support(model: nn.Module) -> tuple[bool, list[str]]:
    """Whether the pattern route applies to model, and the modules it hands to autograd.

    Returns ``(applies, fallbacks)``: ``applies`` is True when the unwrapped model is a plain
    ``nn.Sequential`` (forward not overridden; :class:`PatternLinearization`) or a graph of
    modules joined by sums, relu and flatten calls that ``torch.fx`` traces
    (:class:`~opnorm.jacobian.graph.GraphLinearization`: ResNet / WRN), and no module
    hooks are set; ``fallbacks`` lists ``"name: reason"`` for every module differentiated by
    autograd (exact, but without the speed-up), or why the route does not apply.

    Example:
        >>> from torch import nn
        >>> from opnorm.jacobian import pattern_support
        >>> pattern_support(nn.Sequential(nn.Linear(4, 3), nn.Tanh()))
        (True, ['1: Tanh is not a recognized piecewise-linear module'])
    """
    model = unwrap(model)
    if _global_hooks():
        return False, ["<global>: global module hooks are set"]
    if not _plain(model, nn.Sequential) or _has_hooks(model):
        from opnorm.jacobian.graph import graph_support

        graph, reasons = graph_support(model)
        if graph is not None:
            return True, reasons
        return False, [f"<model>: {type(model).__name__} is not a plain nn.Sequential without hooks", *reasons]
    steps = _build_steps(model, "")
    return True, [f"{s.name}: {s.reason}" for s in steps if isinstance(s, _Autograd)]


def _build_steps(seq: nn.Sequential, prefix: str) -> list[_Step]:
    steps: list[_Step] = []
    for key, m in seq._modules.items():
        if m is None:
            continue
        name = f"{prefix}{key}"
        if _plain(m, nn.Sequential) and not _has_hooks(m):
            steps.extend(_build_steps(m, name + "."))
            continue
        step = _recognize(m, name)
        steps.append(step if isinstance(step, _Step) else _Autograd(m, name, step))
    return steps


def _fold(steps: list[_Step]) -> list[_Step]:
    """Fold each plain ReLU that feeds a max-pool into the pool (see :class:`_Mask`)."""
    for a, b in zip(steps, steps[1:]):
        if isinstance(a, _Mask) and _plain(a.m, nn.ReLU) and isinstance(b, _MaxPool):
            a.folded, a.fresh = True, False  # now the identity: its output is its input
            b.relu_mask = torch.empty(0)  # a placeholder: forward fills it in
    return steps


class PatternLinearization:
    """J(x) of a piecewise-linear ``nn.Sequential`` with the activation pattern of x fixed.

    One forward pass through the modules records what makes each one linear at x (ReLU
    masks, max-pool argmax indices, eval-BatchNorm scales); ``matvec`` then replays the
    linear parts forward (Linear / Conv without bias, mask multiplies, gathers) and
    ``rmatvec`` replays their transposes backward. Both are exact for ReLU / LeakyReLU /
    max-pool / eval-BatchNorm / Linear / Conv1d / Conv2d / Flatten / Dropout (eval) nets;
    any other module (e.g. a ``Normalize`` preprocessing layer, or a block with a custom
    forward) is differentiated by autograd on its own, so the result is always exact;
    ``fallbacks`` lists those modules and why. Use :func:`linearize` to get this class when
    it applies and :class:`Linearization` otherwise. Evaluate in eval mode
    (:func:`eval_mode`); BatchNorm in training mode falls back to autograd.

    Args:
        model: a plain ``nn.Sequential`` (nested Sequentials are expanded).
        x: (B, *in) inputs.

    Attributes:
        logits: f(x), (B, d). fallbacks: ``"name: reason"`` strings.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, v, u = torch.rand(4, 8), torch.randn(4, 8), torch.randn(4, 3)
        >>> from opnorm.jacobian import PatternLinearization
        >>> lin = PatternLinearization(model.eval(), x)
        >>> lin.matvec(v).shape, lin.rmatvec(u).shape  # (B, d), x.shape
        (torch.Size([4, 3]), torch.Size([4, 8]))
        >>> bool(torch.allclose((lin.matvec(v) * u).sum(), (v * lin.rmatvec(u)).sum()))  # J and J^T agree
        True
    """

    route = "pattern"

    def __init__(self, model: nn.Module, x: torch.Tensor):
        model = unwrap(model)
        check_autograd(model)  # modules the replay does not know are differentiated by autograd
        if not _plain(model, nn.Sequential):
            raise TypeError(
                f"PatternLinearization needs a plain nn.Sequential, got {type(model).__name__}; use linearize()"
            )
        self.steps = _fold(_build_steps(model, ""))
        self.fallbacks = [f"{s.name}: {s.reason}" for s in self.steps if isinstance(s, _Autograd)]
        self.x_shape = x.shape
        with torch.no_grad():
            h = x.detach()
            for step in self.steps:
                h = step.forward(h)
        self.logits = check_output(h, x.shape[0])
        self.out = self.logits

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """J v_i for a stack V (k, B, *in) -> (k, B, d)."""
        t = V.to(self.logits.dtype)
        owned = t is not V  # a conversion is ours to overwrite; the caller's V is not
        with torch.no_grad():
            for step in self.steps:
                t = step.jvp(t, owned)
                owned = step.fresh or owned
        return t

    def rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        """J^T u_i for a stack U (k, B, d) -> (k, B, *in)."""
        g = U.to(self.logits.dtype)
        owned = g is not U
        with torch.no_grad():
            for step in reversed(self.steps):
                g = step.vjp(g, owned)
                owned = step.fresh or owned
        return g.contiguous()  # inner steps may leave a channels-last layout

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """J v: (B, *in) -> (B, d)."""
        return self.matmat(v.unsqueeze(0))[0]

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """J^T u: (B, d) -> (B, *in)."""
        return self.rmatmat(u.unsqueeze(0))[0]

    def select(self, rows: torch.Tensor) -> PatternLinearization:
        """The operator for the examples ``rows`` only (a 1-D index tensor), without a new forward
        pass: iterative methods shrink their batch as examples converge."""
        sub = copy.copy(self)
        sub.steps = [step.select(rows) for step in self.steps]
        sub.logits = sub.out = self.logits[rows]
        sub.x_shape = torch.Size((len(rows), *self.x_shape[1:]))
        return sub
