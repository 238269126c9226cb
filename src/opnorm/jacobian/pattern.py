"""The pattern route: J(x) of a piecewise-linear ``nn.Sequential`` replayed from its
activation pattern at x (see :mod:`opnorm.jacobian.steps`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from opnorm.jacobian.core import check_autograd, check_output, unwrap
from opnorm.jacobian.graph import graph_support
from opnorm.jacobian.steps import (
    AutogradStep,
    MaskStep,
    MaxPoolStep,
    Step,
    global_hooks,
    has_hooks,
    is_plain,
    recognize,
)


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
    if global_hooks():
        return False, ["<global>: global module hooks are set"]
    if not is_plain(model, nn.Sequential) or has_hooks(model):
        graph, reasons = graph_support(model)
        if graph is not None:
            return True, reasons
        return False, [f"<model>: {type(model).__name__} is not a plain nn.Sequential without hooks", *reasons]
    steps = _build_steps(model, "")
    return True, [f"{s.name}: {s.reason}" for s in steps if isinstance(s, AutogradStep)]


def _build_steps(seq: nn.Sequential, prefix: str) -> list[Step]:
    steps: list[Step] = []
    for key, m in seq._modules.items():
        if m is None:
            continue
        name = f"{prefix}{key}"
        if is_plain(m, nn.Sequential) and not has_hooks(m):
            steps.extend(_build_steps(m, name + "."))
            continue
        step = recognize(m, name)
        steps.append(step if isinstance(step, Step) else AutogradStep(m, name, step))
    return steps


def _fold(steps: list[Step]) -> list[Step]:
    """Fold each plain ReLU that feeds a max-pool into the pool (see :class:`MaskStep`)."""
    for a, b in zip(steps, steps[1:]):
        if isinstance(a, MaskStep) and is_plain(a.m, nn.ReLU) and isinstance(b, MaxPoolStep):
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
        if not is_plain(model, nn.Sequential):
            raise TypeError(
                f"PatternLinearization needs a plain nn.Sequential, got {type(model).__name__}; use linearize()"
            )
        self.steps = _fold(_build_steps(model, ""))
        self.fallbacks = [f"{s.name}: {s.reason}" for s in self.steps if isinstance(s, AutogradStep)]
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
