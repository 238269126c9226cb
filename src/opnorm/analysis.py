"""Tools that measure how closely adversarial attacks follow the operator-norm picture.

* :func:`alignment`: per-example |cos| between perturbations and vectors (e.g. the PGA
  perturbation and the top singular vector v_1 of J(x)).
* :func:`activation_agreement`: per-example fraction of ReLU activation patterns and
  max-pool choices that two inputs share; 1.0 means both lie in the same linear region
  as far as the hooked modules can tell.
* :func:`verify_equivalence`: runs infinite-step PGA with the logit loss and the (p, q)
  power method from the same start and reports, per iteration, how far apart they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opnorm.attacks import Ascent
from opnorm.jacobian import check_inputs, eval_mode, forward, unwrap
from opnorm.losses import logit_loss
from opnorm.norms import Order, lp_norm, norm_order
from opnorm.power import operator_norm

__all__ = [
    "alignment",
    "activation_agreement",
    "NoActivationsError",
    "EquivalenceResult",
    "verify_equivalence",
]


def alignment(delta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-example ``|<delta, v>| / (||delta||_2 ||v||_2)``, inputs flattened per example: (B,).

    An example where either vector is zero gets 0 (no direction to align with).

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> top = opnorm.singular_values(model, x, k=1, return_vectors=True).V[..., 0]  # (4, 8)
        >>> a = opnorm.alignment(-3 * top, top)  # a multiple of v_1: aligned
        >>> a.shape, bool(torch.allclose(a, torch.ones(4)))
        (torch.Size([4]), True)
    """
    if not isinstance(delta, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise TypeError("delta and v must be tensors of shape (B, ...)")
    if delta.shape[0] != v.shape[0] or delta[0].numel() != v[0].numel():
        raise ValueError(
            f"delta and v must hold the same number of examples and entries per example, "
            f"got shapes {tuple(delta.shape)} and {tuple(v.shape)}"
        )
    a = delta.reshape(delta.shape[0], -1)
    b = v.reshape(v.shape[0], -1).to(a.dtype)
    denom = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    dot = (a * b).sum(dim=1).abs()
    return torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(dot))


class NoActivationsError(ValueError):
    """The model has no nonlinearity that :func:`activation_agreement` can hook."""


_SIGN_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
_POOL_FNS = {
    nn.MaxPool1d: F.max_pool1d,
    nn.MaxPool2d: F.max_pool2d,
    nn.MaxPool3d: F.max_pool3d,
}
_ADAPTIVE_FNS = {
    nn.AdaptiveMaxPool1d: F.adaptive_max_pool1d,
    nn.AdaptiveMaxPool2d: F.adaptive_max_pool2d,
    nn.AdaptiveMaxPool3d: F.adaptive_max_pool3d,
}


def _pattern(module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """The discrete choice a piecewise-linear module makes at its input, (B, units)."""
    if isinstance(module, _SIGN_MODULES):
        return (inp > 0).reshape(inp.shape[0], -1)
    if isinstance(module, nn.ReLU6):  # three linear pieces: below 0, between, above 6
        return ((inp > 0).to(torch.int8) + (inp > 6).to(torch.int8)).reshape(inp.shape[0], -1)
    for cls, fn in _ADAPTIVE_FNS.items():
        if isinstance(module, cls):
            _, idx = fn(inp, module.output_size, return_indices=True)
            return idx.reshape(inp.shape[0], -1)
    for cls, fn in _POOL_FNS.items():
        if isinstance(module, cls):
            _, idx = fn(
                inp,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                ceil_mode=module.ceil_mode,
                return_indices=True,
            )
            return idx.reshape(inp.shape[0], -1)
    raise TypeError(f"no activation pattern for {type(module).__name__}")


_HOOKED = _SIGN_MODULES + (nn.ReLU6,) + tuple(_POOL_FNS) + tuple(_ADAPTIVE_FNS)


def _patterns(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Patterns of every hooked module call during one forward pass, in call order."""
    found: list[torch.Tensor] = []

    def hook(module, args):
        # a pre-hook sees the input before an in-place ReLU overwrites it
        found.append(_pattern(module, args[0]))

    handles = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, _HOOKED)]
    try:
        if not handles:
            raise NoActivationsError(
                "the model has no nn.ReLU / nn.LeakyReLU / nn.PReLU / nn.ReLU6 / max-pool modules to hook; "
                "activation agreement cannot see functional calls (F.relu, torch.relu, x.clamp) or smooth "
                "nonlinearities, so it would be meaningless here"
            )
        forward(net, x)
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise NoActivationsError("the model's ReLU / max-pool modules were never called in its forward pass")
    return found


def activation_agreement(model: nn.Module, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Per-example fraction of activation patterns shared by x and x2: (B,) in [0, 1].

    Every unit of every hooked module call counts once: the sign of the input of
    ``nn.ReLU`` / ``nn.LeakyReLU`` / ``nn.PReLU`` (the three pieces of ``nn.ReLU6``), and the
    argmax index of every output of ``nn.MaxPool1d/2d/3d`` and ``nn.AdaptiveMaxPool1d/2d/3d``.
    1.0 means the two inputs choose the same linear piece everywhere the hooks can see.
    The model runs in eval mode (mode restored) under no_grad; hooks are removed afterwards.

    Blind spots: functional calls in ``forward`` (``F.relu``, ``torch.relu``, ``F.max_pool2d``),
    in-place tricks such as ``x.clamp_(min=0)``, ``torch.maximum``, and every other
    nonlinearity (GELU, sigmoid, tanh, softmax attention, ...), which has no linear regions.
    A model with none of the hooked modules raises :class:`NoActivationsError` (a ValueError)
    rather than returning a meaningless 1.0.

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> opnorm.activation_agreement(model, x, x)  # the same point: every ReLU agrees
        tensor([1., 1., 1., 1.])
        >>> x_adv = opnorm.pgd(model, x, y, eps=0.5, p=2, steps=5)
        >>> agree = opnorm.activation_agreement(model, x, x_adv)  # (B,) fractions in [0, 1]
        >>> agree.shape, bool(((agree >= 0) & (agree <= 1)).all())
        (torch.Size([4]), True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (its activation modules are hooked), got {type(model).__name__}"
        )
    check_inputs(model, x)
    check_inputs(model, x2, "x2")
    if x.shape != x2.shape:
        raise ValueError(f"x and x2 must have the same shape, got {tuple(x.shape)} and {tuple(x2.shape)}")
    net = unwrap(model)
    with eval_mode(net), torch.no_grad():
        a = _patterns(net, x)
        b = _patterns(net, x2)
    if len(a) != len(b) or any(pa.shape != pb.shape for pa, pb in zip(a, b)):
        raise ValueError(
            "the model called its activation modules differently for x and x2 (data-dependent control flow)"
        )
    same = sum((pa == pb).sum(dim=1) for pa, pb in zip(a, b))
    total = sum(pa.shape[1] for pa in a)
    return same.to(x.dtype) / total


@dataclass
class EquivalenceResult:
    """Per-iteration comparison of infinite-step PGA (logit loss) and the power method.

    All tensors have shape (steps, B); row k is iteration k + 1.

    Attributes:
        direction_gap: ``max_i |delta_k / eps - v_k|_i``, the largest coordinate difference.
        value_gap: ``|L(delta_k) - eps * sigma_k|`` with ``L(delta) = ||f(x + delta) - f(x)||_q``.
        pga_value: ``L(delta_k)``.
        sigma: the power method's ``sigma_k = ||J(x) v_k||_q``.
        agreement: activation agreement between x and x + delta_k, or None when the model
            has no hookable ReLU / max-pool modules (e.g. an affine model).
        start_agreement: (B,) the same between x and the start x + delta_0 (PGA's first
            gradient is taken there), or None like ``agreement``.
    """

    direction_gap: torch.Tensor
    value_gap: torch.Tensor
    pga_value: torch.Tensor
    sigma: torch.Tensor
    agreement: torch.Tensor | None
    start_agreement: torch.Tensor | None = None

    def inside(self) -> torch.Tensor:
        """(B,) bool: every point PGA visited (start and iterates) has x's activation pattern,
        where the theorem says the iterates are equal. All True without hookable activations."""
        if self.agreement is None:
            return torch.ones(self.direction_gap.shape[1], dtype=torch.bool, device=self.direction_gap.device)
        inside = self.agreement.amin(dim=0) == 1.0
        if self.start_agreement is not None:
            inside &= self.start_agreement == 1.0
        return inside

    def max_direction_gap(self) -> torch.Tensor:
        """(steps,) worst example per iteration."""
        return self.direction_gap.amax(dim=1)

    def max_value_gap(self) -> torch.Tensor:
        """(steps,) worst example per iteration."""
        return self.value_gap.amax(dim=1)


def _sphere_point(x: torch.Tensor, p: float, eps: float, generator: torch.Generator) -> torch.Tensor:
    """eps * g / ||g||_p for Gaussian g: a random point with ||delta||_p = eps per example."""
    g = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return eps * g / lp_norm(g, p).reshape((-1,) + (1,) * (x.ndim - 1))


def verify_equivalence(
    model: nn.Module,
    x: torch.Tensor,
    *,
    p: Order,
    q: Order,
    eps: float,
    steps: int,
    delta0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> EquivalenceResult:
    """Check the theorem numerically: infinite-step PGA on ``||f(x+delta) - f(x)||_q``
    equals the (p, q) power method on J(x) while x + delta stays in x's linear region.

    Runs :class:`opnorm.attacks.Ascent` ``(model, x, eps=eps, p=p, loss=logit_loss(q), steps=steps,
    step_size=inf, clip=None).run(delta0, history=True)``
    and ``opnorm.power.operator_norm(model, x, p, q, method="power", iters=steps, rtol_change=0,
    v0=delta0 / eps, return_history=True)``, and compares iterate k of both.

    Args:
        model: classifier (B, *in) -> (B, d).
        x: (B, *in) inputs (float64 recommended: the gaps are then float error, ~1e-15).
        p: 1, 2 or inf (the attack's ball). q: the logit loss norm, >= 1.
        eps: radius > 0. steps: iterations >= 1.
        delta0: the common start, x's shape, nonzero per example; default a random point on
            the eps-sphere, ``eps g / ||g||_p`` with g Gaussian, drawn from ``generator``
            (a generator seeded with 0 when None).

    Returns:
        :class:`EquivalenceResult` with (steps, B) tensors.

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> res = opnorm.verify_equivalence(model.double(), x.double(), p="inf", q=2, eps=1e-3, steps=10)
        >>> res.max_direction_gap().shape  # (steps,): the worst example per iteration
        torch.Size([10])
        >>> bool((res.max_direction_gap() < 1e-10).all())  # float error inside the linear region
        True
    """
    check_inputs(model, x)
    p = norm_order(p, "p", allowed=(1.0, 2.0, math.inf))
    q = norm_order(q, "q")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    eps = float(eps)
    if delta0 is None:
        gen = generator if generator is not None else torch.Generator(device=x.device).manual_seed(0)
        delta0 = _sphere_point(x, p, eps, gen)

    ascent = Ascent(model, x, eps=eps, p=p, loss=logit_loss(q), steps=steps, step_size=math.inf, clip=None)
    deltas = ascent.run(delta0, history=True).history
    power = operator_norm(
        model,
        x,
        p,
        q,
        method="power",
        iters=steps,
        rtol_change=0.0,
        v0=delta0 / eps,
        generator=generator,
        return_history=True,
    )
    history = power.history
    if history is None or len(history) != steps:
        raise RuntimeError(
            f"the power method returned {0 if history is None else len(history)} iterates, expected {steps}"
        )

    net = unwrap(model)
    with eval_mode(net), torch.no_grad():
        clean = forward(net, x)
        values = torch.stack([lp_norm(forward(net, x + d) - clean, q) for d in deltas])
    direction_gap = torch.stack(
        [(d / eps - h["v"]).reshape(x.shape[0], -1).abs().amax(dim=1) for d, h in zip(deltas, history)]
    )
    sigma = torch.stack([h["sigma"] for h in history])
    try:
        agreement = torch.stack([activation_agreement(model, x, x + d) for d in deltas])
        start_agreement = activation_agreement(model, x, x + delta0.to(x.dtype))
    except NoActivationsError:
        agreement = start_agreement = None
    return EquivalenceResult(direction_gap, (values - eps * sigma).abs(), values, sigma, agreement, start_agreement)
