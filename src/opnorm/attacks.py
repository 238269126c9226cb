"""Projected gradient ascent (PGA / PGD) attacks in l_1, l_2 and l_inf, for any loss.

Three layers:

* :func:`pgd` (and its torchattacks-style wrapper :class:`PGD`): model, inputs, labels, the
  ball (eps, p), the loss, steps, step size, random start and the input box; one run.
* :class:`EvalPGD`: the evaluation attack, :func:`pgd` plus restarts, the best iterate of the
  path and the halving step-size schedule (and a given start or the history).
* :class:`Ascent`: one attack problem (model, x, y, ball, loss, step) with its projected
  steps; :meth:`Ascent.run` runs it from any start and can keep every iterate.

Losses are names, callables or loss objects (:func:`opnorm.losses.logit_loss` for the q of the
logit loss, :func:`opnorm.losses.targeted` for targeted attacks).

One loop serves every variant: the norm p picks the steepest-ascent direction
``psi_{p*}(grad)`` (:func:`opnorm.norms.steepest_ascent`) and the projection
(:func:`opnorm.norms.project_lp_ball`); the loss (:mod:`opnorm.losses`) picks what is
maximized. With ``step_size=float("inf")`` the projection of the infinite step lands on
the boundary, ``delta_k = eps * psi_{p*}(grad L(delta_{k-1}))``: with the logit loss this
is the (p, q) power method of :mod:`opnorm.power` (the theorem of Roth et al. 2020).

Conventions:

* the model is attacked in eval mode (:func:`opnorm.jacobian.eval_mode`), its mode restored;
  DataParallel / DDP wrappers are unwrapped;
* gradients are taken with ``torch.autograd.grad`` with respect to the perturbation only:
  the ``.grad`` of the model's parameters is never touched;
* one forward and one backward pass per step; the clean logits (needed by the logit and KL
  losses and by callables) are computed once per call;
* random starts: l_inf draws delta uniformly from the cube ``[-eps, eps]^n``; l_2 and l_1
  draw a direction uniformly on the unit l_2 sphere (normalized Gaussian) or unit l_1
  sphere (normalized Laplace vector) and a radius ``eps * U``, U ~ Uniform(0, 1) (as in
  torchattacks / the robustness library; not uniform in volume, which for large n would
  put every start on the boundary). The start is then clipped into the box.
* l_1 steps are sparse (SLIDE, Tramer & Boneh 2019): the step moves, with equal weight
  ``1/k``, the k = ceil(l1_fraction * n) coordinates of largest |grad| (ties included),
  skipping coordinates that the box blocks; ``l1_fraction -> 1/n`` is the exact l_1
  steepest ascent (a signed one-hot), which the infinite step uses.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import nn

from opnorm.jacobian import check_inputs, check_label_range, eval_mode, forward, unwrap
from opnorm.losses import LossFn, LossSpec, get_loss
from opnorm.norms import Order, clip_box, lp_norm, norm_order, pga_step, project_lp_ball
from opnorm.validation import box

__all__ = [
    "pgd",
    "PGD",
    "EvalPGD",
    "Ascent",
    "Loss",
    "Start",
    "Run",
    "Score",
    "Step",
    "random_in_ball",
    "default_step_size",
    "SCHEDULES",
    "PGD_ORDERS",
]

Clip = tuple[float, float] | None
Loss = str | LossFn | LossSpec
# random_start: True draws from torch's global generator, a torch.Generator draws from it, False starts at 0
Start = bool | torch.Generator


SCHEDULES = ("constant", "halving")
PGD_ORDERS = (1.0, 2.0, math.inf)  # the l_p balls pgd projects onto
HALVING_PHASES = 4  # "halving": the step size is halved 3 times, at 1/4, 1/2 and 3/4 of the steps


def _phase(k: int, steps: int) -> int:
    """The phase of step k (0-based) of a "halving" run: 0 .. HALVING_PHASES - 1."""
    return min(HALVING_PHASES - 1, HALVING_PHASES * k // steps)


def default_step_size(eps: float | torch.Tensor, steps: int) -> float | torch.Tensor:
    """The default step size ``2.5 * eps / steps`` (Madry et al. 2018; the robustness library)."""
    return 2.5 * eps / steps


def _view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against like."""
    return t.reshape((-1,) + (1,) * (like.ndim - 1))


def random_in_ball(
    x: torch.Tensor, p: Order, eps: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random perturbation in the l_p ball of radius eps (p in {1, 2, inf}), x's shape.

    l_inf: uniform in the cube. l_2 / l_1: uniform direction on the unit l_p sphere
    (normalized Gaussian / normalized Laplace vector) times a radius eps * U, U ~ U(0, 1).
    eps is a float or a (B,) tensor. Box clipping is left to the caller.

    Example:
        >>> import torch
        >>> from opnorm.attacks import random_in_ball
        >>> from opnorm.norms import lp_norm
        >>> x = torch.rand(4, 3, 5)
        >>> delta = random_in_ball(x, 2, 0.5, torch.Generator().manual_seed(0))
        >>> delta.shape, bool((lp_norm(delta, 2) <= 0.5).all())
        (torch.Size([4, 3, 5]), True)
    """
    p = norm_order(p, "p", allowed=PGD_ORDERS)
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(x.shape[0])
    kw = dict(generator=generator, dtype=x.dtype, device=x.device)
    if p == math.inf:
        return (2 * torch.rand(x.shape, **kw) - 1) * _view(eps_t, x)
    if p == 2:
        d = torch.randn(x.shape, **kw)
    else:  # Laplace coordinates normalized in l_1 are uniform on the l_1 sphere
        mag = -torch.log1p(-torch.rand(x.shape, **kw))  # Exp(1)
        d = torch.where(torch.rand(x.shape, **kw) < 0.5, -mag, mag)
    norm = lp_norm(d, p).clamp_min(torch.finfo(x.dtype).tiny)
    radius = torch.rand(x.shape[0], **kw) * eps_t
    return d * _view(radius / norm, x)


def _check_eps(eps, x: torch.Tensor) -> torch.Tensor:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, torch.Tensor)):
        raise TypeError(f"eps must be a float or a (B,) tensor, got {type(eps).__name__}")
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps_t.ndim == 0:
        eps_t = eps_t.expand(x.shape[0])
    if eps_t.shape != (x.shape[0],):
        raise ValueError(f"eps must be a scalar or have shape ({x.shape[0]},), got {tuple(eps_t.shape)}")
    if not torch.isfinite(eps_t).all() or (eps_t < 0).any():
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return eps_t


def _check_labels(y, x: torch.Tensor, spec: LossSpec) -> torch.Tensor | None:
    if y is None:
        if spec.needs_labels:
            what = "targets of the targeted loss" if spec.targeted else f"labels for loss={spec.name!r}"
            raise ValueError(f"y is required: pass the {what} as a (B,) integer tensor")
        return None
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a (B,) integer tensor, got {type(y).__name__}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x's batch, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class indices, got dtype {y.dtype}; use y.long()")
    return y.to(device=x.device, dtype=torch.long)


def _check_clip(clip: Clip, x: torch.Tensor) -> Clip:
    if clip is None:
        return None
    lo, hi = box(clip)
    if x.min() < lo or x.max() > hi:
        raise ValueError(
            f"x lies outside clip=({lo:g}, {hi:g}) (min {x.min().item():g}, max {x.max().item():g}); "
            "pass the box your inputs live in, or clip=None for unconstrained inputs"
        )
    return lo, hi


def _check_count(value, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _random_start(random_start: Start) -> tuple[bool, torch.Generator | None]:
    """(draw a random start?, the generator to draw from or None for torch's global one)."""
    if isinstance(random_start, torch.Generator):
        return True, random_start
    if isinstance(random_start, bool):
        return random_start, None
    raise TypeError(
        "random_start must be True (torch's global generator), a torch.Generator (reproducible starts) "
        f"or False (start at delta = 0), got {type(random_start).__name__}"
    )


class Score(NamedTuple):
    """How strong the points x + delta are, per example."""

    fooled: torch.Tensor | None  # (B,) bool for label losses (classified wrongly / as the target), else None
    value: torch.Tensor  # (B,) loss, oriented so that larger is stronger


class Run(NamedTuple):
    """The result of :meth:`Ascent.run`."""

    delta: torch.Tensor  # the last perturbation, x's shape
    history: list[torch.Tensor]  # history[k]: the perturbation after step k + 1 (empty unless asked)


class Step(NamedTuple):
    """The result of :meth:`Ascent.step`."""

    delta: torch.Tensor  # the next iterate
    logits: torch.Tensor  # at the point the step started from (detached)
    value: torch.Tensor  # the loss there (detached)


class Ascent:
    """One projected-gradient-ascent problem: maximize a per-example loss of ``model(x + delta)``
    over the l_p ball of radius eps (and the box ``clip``) with a fixed step.

    ``delta_k = Proj( delta_{k-1} + step_size * psi_{p*}(grad_delta sum_b loss_b) )``, where
    Proj is the projection onto the l_p ball followed by clipping x + delta into ``clip``.
    The constructor validates everything and computes the clean logits once (one forward)
    when the loss needs them; :meth:`run` runs ``steps`` steps from a start.

    Args:
        model: classifier ``(B, *in) -> (B, d)`` logits (or a callable); attacked in eval mode,
            its mode restored; DataParallel / DDP wrappers are unwrapped.
        x: (B, *in) clean inputs, inside ``clip``.
        y: (B,) integer labels (required by "ce", "cw"), or the targets of a targeted loss.
        eps: radius, a float or a (B,) tensor, >= 0 and not all 0.
        p: 1, 2 or inf (any form accepted by :func:`opnorm.norms.norm_order`).
        loss: "ce", "cw", "logit" (q = 2), "kl" (see :mod:`opnorm.losses`), a callable
            ``(logits_adv, logits_clean, y) -> (B,)`` or a loss object
            (:func:`~opnorm.losses.logit_loss`, :func:`~opnorm.losses.targeted`). "logit" and
            "kl" have no useful gradient at delta = 0 and need a nonzero start, else ValueError.
        steps: number of steps, >= 0; one forward and one backward each.
        step_size: step length in l_p, > 0; None gives :func:`default_step_size` = 2.5 eps / steps;
            ``float("inf")`` lands every iterate on the boundary, ``delta = eps psi_{p*}(grad)``
            (then box-clipped if clip is not None): with the logit loss, the power method.
        clip: box (lo, hi) for x + delta, or None for unconstrained inputs.
        l1_fraction: for p = 1 and a finite step, the fraction of coordinates moved per step.

    Example (the theorem: infinite-step PGA with the logit loss is the (p, q) power method):
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> from opnorm.attacks import Ascent
        >>> ascent = Ascent(model, x, eps=0.1, p=2, loss=opnorm.losses.logit_loss(2), steps=5,
        ...                 step_size=float("inf"), clip=None)
        >>> run = ascent.run(ascent.start(), history=True)  # run.delta, run.history[k]: after step k + 1
        >>> len(run.history), run.delta.shape
        (5, torch.Size([4, 8]))
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        eps: float | torch.Tensor,
        p: Order = math.inf,
        loss: Loss = "ce",
        steps: int = 10,
        step_size: float | None = None,
        clip: Clip = (0.0, 1.0),
        l1_fraction: float = 0.01,
    ) -> None:
        check_inputs(model, x)
        self.p = norm_order(p, "p", allowed=PGD_ORDERS)
        self.spec = get_loss(loss)
        self.eps = _check_eps(eps, x)  # (B,)
        if self.eps.numel() and not bool((self.eps > 0).any()):
            raise ValueError(
                "eps is 0: the ball is the point x itself, so no attack can move; pass a radius eps > 0 "
                "(the accuracy at eps 0 is the clean accuracy)"
            )
        self.steps = _check_count(steps, "steps", 0)
        if step_size is None:
            self.step_size = self.per_example(self.eps.clone() if steps == 0 else default_step_size(self.eps, steps), x)
        elif (
            isinstance(step_size, bool)
            or not isinstance(step_size, (int, float))
            or math.isnan(step_size)
            or step_size <= 0
        ):
            # a step of 0 never leaves the start: the "attack" would report the start's accuracy as robust
            raise ValueError(
                f"step_size must be a float > 0 (float('inf') for the infinite step) or None (the default), "
                f"got {step_size!r}"
            )
        else:
            self.step_size = float(step_size)
        if not 0 < l1_fraction <= 1:
            raise ValueError(f"l1_fraction must be in (0, 1], got {l1_fraction!r}")
        self.l1_fraction = l1_fraction
        self.y = _check_labels(y, x, self.spec)
        self.clip = _check_clip(clip, x)
        self.net = unwrap(model)
        self.x = x.detach()
        self.eps_view = _view(self.eps, x)
        self.scalar_eps = float(self.eps[0]) if bool((self.eps == self.eps[0]).all()) else None
        self.checked = False  # the loss's output shape and the labels' range, checked on the first step
        self.clean = None
        if self.spec.needs_clean:
            with self.attacking(), torch.no_grad():
                self.clean = forward(self.net, self.x)

    @staticmethod
    def per_example(step: torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
        """A (B,) step size as a float when all equal, else viewed (B, 1, ..., 1) against x."""
        return step[0].item() if bool((step == step[0]).all()) else _view(step, x)

    def attacking(self) -> contextlib.AbstractContextManager:
        """The context the steps run in: the model in eval mode, its modes restored on exit."""
        return eval_mode(self.net) if isinstance(self.net, nn.Module) else contextlib.nullcontext(self.net)

    def start(self, random_start: Start = True) -> torch.Tensor:
        """A start perturbation: a random point of the ball (see the module docstring; from the
        given torch.Generator, or torch's global one for True), or 0 for False."""
        draw, generator = _random_start(random_start)
        return random_in_ball(self.x, self.p, self.eps, generator) if draw else torch.zeros_like(self.x)

    def initial(self, start: torch.Tensor) -> torch.Tensor:
        """The first iterate: start (x's shape, finite) projected into the ball and the box."""
        if not isinstance(start, torch.Tensor) or start.shape != self.x.shape:
            raise ValueError(
                f"the start must be a tensor of x's shape {tuple(self.x.shape)}, got "
                f"{tuple(start.shape) if isinstance(start, torch.Tensor) else type(start).__name__}"
            )
        if not torch.isfinite(start).all():
            raise ValueError("the start perturbation contains NaN or inf values")
        delta = self.project(start.detach().to(self.x.dtype))
        spec = self.spec
        if spec.zero_gradient_at_start and (lp_norm(delta, math.inf) == 0).any():
            raise ValueError(
                f"loss={spec.name!r} needs a nonzero start: its gradient at delta = 0 is "
                f"{'undefined' if spec.name == 'logit' else 'zero'}; pass random_start=True with eps > 0, "
                "or a start that is nonzero for every example"
            )
        return delta

    def run(self, start: torch.Tensor, *, history: bool = False) -> Run:
        """``steps`` steps from ``start`` (x's shape; projected first), in eval mode.

        ``history``: keep every iterate (``Run.history[k]`` after step k + 1).
        """
        delta = self.initial(start)
        hist: list[torch.Tensor] = []
        with self.attacking():
            for _ in range(self.steps):
                delta = self.step(delta).delta
                if history:
                    hist.append(delta)
        return Run(delta, hist)

    def adversarial(self, delta: torch.Tensor) -> torch.Tensor:
        """x + delta clipped into the box, detached: the adversarial inputs."""
        return clip_box(self.x + delta, self.clip).detach()

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.checked and self.y is not None and self.spec.needs_labels:
            check_label_range(self.y, logits.shape[1])
        out = self.spec.fn(logits, self.clean, self.y)
        if not self.checked:
            if not isinstance(out, torch.Tensor) or out.shape != (self.x.shape[0],):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"the loss must return one value per example, shape ({self.x.shape[0]},), got {shape}")
            self.checked = True
        return out

    def project(self, delta: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """Onto the eps-ball, then into the box. ``fresh``: delta is ours to modify in place."""
        if self.p == math.inf and self.scalar_eps is not None:  # the common case, without per-example tensors
            delta = (
                delta.clamp_(-self.scalar_eps, self.scalar_eps)
                if fresh
                else delta.clamp(-self.scalar_eps, self.scalar_eps)
            )
        elif self.p == 2 and self.scalar_eps is not None and fresh:
            # = project_lp_ball(delta, 2, eps), in place: rescale the examples outside the ball
            norm = torch.linalg.vector_norm(delta.reshape(delta.shape[0], -1), dim=1)
            factor = (self.scalar_eps / norm.clamp_min_(torch.finfo(delta.dtype).tiny)).clamp_(max=1.0)
            delta = delta.mul_(_view(factor, delta))
        else:
            delta = project_lp_ball(delta, self.p, self.eps)
        if self.clip is not None:
            # the ball step above returned a new tensor: work in place (fewer allocations per step)
            delta = delta.add_(self.x).clamp_(self.clip[0], self.clip[1]).sub_(self.x)
        return delta

    def step(self, delta: torch.Tensor) -> Step:
        """One projected steepest-ascent step from delta (one forward, one backward); run it inside
        :meth:`attacking`. Also returns the score of x + delta (from the same forward: free)."""
        with torch.enable_grad():
            delta = delta.detach().requires_grad_(True)
            x_adv = self.x + delta
            logits = self.net(x_adv) if self.checked else forward(self.net, x_adv)
            obj = self.loss(logits)
            (g,) = torch.autograd.grad(obj.sum(), delta, allow_unused=True)
        with torch.no_grad():
            delta = delta.detach()
            if g is None:  # the loss does not depend on the input
                g = torch.zeros_like(delta)
            new = pga_step(
                delta, g, self.p, self.eps, self.step_size, x=self.x, clip=self.clip, l1_fraction=self.l1_fraction
            )
        return Step(new, logits.detach(), obj.detach())

    def score(self, delta: torch.Tensor) -> Score:
        """The score of x + delta (one forward, in eval mode)."""
        with torch.no_grad(), self.attacking():
            logits = forward(self.net, self.x + delta)
            return self.scored(logits, self.loss(logits))

    def scored(self, logits: torch.Tensor, value: torch.Tensor) -> Score:
        """The score of points with these logits and loss values."""
        fooled = None
        if self.spec.labelled_success and self.y is not None:
            pred = logits.argmax(dim=1)
            fooled = pred == self.y if self.spec.targeted else pred != self.y
        return Score(fooled, value)


class _Best:
    """Per example, the strongest of the candidates offered so far: one that fools the model
    if any does (label losses), then the highest oriented loss. Used across restarts and,
    with ``best_iterate``, across the steps of one run."""

    def __init__(self) -> None:
        self.delta: torch.Tensor | None = None
        self.fooled: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.hist: list[torch.Tensor] = []

    def offer(self, delta: torch.Tensor, score: Score, hist: list[torch.Tensor] | None = None) -> None:
        fooled, value = score
        if self.delta is None:
            self.delta, self.fooled, self.value, self.hist = delta, fooled, value, list(hist or [])
            return
        better = value > self.value
        if fooled is not None:
            better = (fooled & ~self.fooled) | ((fooled == self.fooled) & better)
            self.fooled = torch.where(better, fooled, self.fooled)
        self.value = torch.where(better, value, self.value)
        mask = _view(better, delta)
        self.delta = torch.where(mask, delta, self.delta)
        if hist:
            self.hist = [torch.where(mask, h, b) for h, b in zip(hist, self.hist)]


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float | torch.Tensor,
    p: Order = math.inf,
    loss: Loss = "ce",
    steps: int = 10,
    step_size: float | None = None,
    random_start: Start = True,
    clip: Clip = (0.0, 1.0),
) -> torch.Tensor:
    """Projected gradient ascent (PGD) on a per-example loss inside the l_p ball of radius eps.

    ``delta_k = Proj( delta_{k-1} + step_size * psi_{p*}(grad_delta sum_b loss_b) )``, where
    Proj is the projection onto the l_p ball followed by clipping x + delta into ``clip``.
    Restarts, the best iterate, the halving schedule, a given start and the history:
    :class:`EvalPGD` and :class:`Ascent`.

    Args:
        model: classifier ``(B, *in) -> (B, d)`` logits; attacked in eval mode, mode restored.
        x: (B, *in) clean inputs, inside ``clip``.
        y: (B,) integer labels (required for "ce", "cw"), or the targets of a targeted loss.
        eps: radius, a float or a (B,) tensor, >= 0 and not all 0 (eps 0 cannot attack: ValueError).
        p: 1, 2 or inf (any form accepted by :func:`opnorm.norms.norm_order`).
        loss: "ce", "cw", "logit" (q = 2), "kl" (see :mod:`opnorm.losses`), a callable
            ``(logits_adv, logits_clean, y) -> (B,)``, or a loss object:
            :func:`opnorm.losses.logit_loss` (another q), :func:`opnorm.losses.targeted`
            (minimize toward the targets y). "logit" and "kl" have no useful gradient at
            delta = 0 and need a random start, else ValueError.
        steps: number of steps; one forward and one backward each. 0 (only with a random
            start) returns the start points.
        step_size: step length in l_p, > 0; None gives :func:`default_step_size` = 2.5 eps / steps;
            ``float("inf")`` lands every iterate on the boundary, ``delta = eps psi_{p*}(grad)``
            (then box-clipped if clip is not None).
        random_start: start at a random point of the ball (see the module docstring) drawn
            from torch's global generator (True) or from the given ``torch.Generator``
            (reproducible attacks); False starts at delta = 0.
        clip: box (lo, hi) for x + delta, or None for unconstrained inputs.

    Returns:
        x_adv, x's shape, detached.

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> x_adv = opnorm.pgd(model, x, y, eps=8 / 255, p="inf", steps=10)
        >>> x_adv.shape, bool(((x_adv - x).abs() <= 8 / 255 + 1e-6).all())
        (torch.Size([4, 8]), True)
        >>> x_adv = opnorm.pgd(model, x, eps=0.1, p=2, loss="logit", steps=3, step_size=float("inf"),
        ...                    clip=None, random_start=torch.Generator().manual_seed(0))
        >>> bool(torch.allclose((x_adv - x).norm(dim=1), torch.full((4,), 0.1)))  # the infinite step: on the sphere
        True
    """
    ascent = Ascent(model, x, y, eps=eps, p=p, loss=loss, steps=steps, step_size=step_size, clip=clip)
    if steps == 0 and not _random_start(random_start)[0]:
        raise ValueError(
            "steps 0 without a random start returns x itself, no attack; pass steps >= 1, "
            "or random_start=True for random points of the ball"
        )
    return ascent.adversarial(ascent.run(ascent.start(random_start)).delta)


class EvalPGD:
    """The evaluation attack: :func:`pgd` with restarts, the best iterate of each path and the
    halving step-size schedule. Configure once, call on batches.

    Args:
        loss, steps, clip, l1_fraction: as in :class:`Ascent`.
        step_size: as in :func:`pgd`; None gives 2.5 eps / steps, or eps with ``schedule="halving"``.
        restarts: independent runs (>= 1); per example the strongest result is kept: for
            "ce"/"cw" a point that fools the model if any run found one, then the highest
            loss (lowest for targeted losses). Needs random starts when > 1.
        best_iterate: return, per example, the strongest point of the whole path (start and
            every iterate; fooling points first, then the highest loss, as for restarts)
            instead of the last iterate, as APGD does: a step that overshoots can leave a
            point that already fooled the model. Costs one forward per run (the steps' own
            forwards score the other points). The history is unchanged.
        schedule: ``"constant"`` step size, or ``"halving"``: the step starts at ``step_size``
            (default eps) and is halved at 1/4, 1/2 and 3/4 of the steps; each halving restarts
            from the strongest point of the run so far (one forward each), as APGD's step-size
            reductions do. Large early steps cross the ball, small late ones refine: it finds
            points that a small constant step misses (the constant step is the
            adversarial-training standard).

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> from opnorm.attacks import EvalPGD
        >>> atk = EvalPGD(steps=20, restarts=2, schedule="halving")
        >>> x_adv = atk(model, x, y, eps=8 / 255, p="inf", random_start=torch.Generator().manual_seed(0))
        >>> bool(((x_adv - x).abs() <= 8 / 255 + 1e-6).all())
        True
        >>> x_adv, deltas = EvalPGD(steps=5, best_iterate=False)(model, x, y, eps=0.1, return_history=True)
        >>> len(deltas)
        5
    """

    def __init__(
        self,
        *,
        loss: Loss = "ce",
        steps: int = 20,
        step_size: float | None = None,
        restarts: int = 1,
        best_iterate: bool = True,
        schedule: str = "constant",
        clip: Clip = (0.0, 1.0),
        l1_fraction: float = 0.01,
    ) -> None:
        self.restarts = _check_count(restarts, "restarts", 1)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if schedule == "halving" and isinstance(step_size, float) and step_size == math.inf:
            raise ValueError("schedule='halving' halves a finite step size; the infinite step has no schedule")
        self.loss, self.steps, self.step_size, self.clip, self.l1_fraction = loss, steps, step_size, clip, l1_fraction
        self.best_iterate, self.schedule = bool(best_iterate), schedule

    def __repr__(self) -> str:
        return (
            f"EvalPGD(loss={self.loss!r}, steps={self.steps}, step_size={self.step_size!r}, restarts={self.restarts}, "
            f"best_iterate={self.best_iterate}, schedule={self.schedule!r}, clip={self.clip!r})"
        )

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        eps: float | torch.Tensor,
        p: Order = math.inf,
        random_start: Start = True,
        delta0: torch.Tensor | None = None,
        return_history: bool = False,
    ):
        """Attack x (as :func:`pgd`).

        Args:
            model, x, y, eps, p, random_start: as in :func:`pgd`.
            delta0: (B, *in) start perturbation (projected into the ball and the box) instead
                of ``random_start``; only with restarts = 1.
            return_history: also return the list ``deltas`` with ``deltas[k]`` the perturbation
                after step k + 1 (for restarts > 1, the run kept for each example).

        Returns:
            x_adv (x's shape, detached), or ``(x_adv, deltas)`` with return_history=True.
        """
        halving = self.schedule == "halving"
        step_size = self.step_size
        ascent = Ascent(
            model,
            x,
            y,
            eps=eps,
            p=p,
            loss=self.loss,
            steps=self.steps,
            step_size=step_size,
            clip=self.clip,
            l1_fraction=self.l1_fraction,
        )
        if halving and step_size is None and self.steps > 0:
            ascent.step_size = ascent.per_example(ascent.eps.clone(), ascent.x)
        draw = delta0 is None and _random_start(random_start)[0]
        if self.steps == 0 and delta0 is None and not draw:
            raise ValueError(
                "steps 0 without a random start (or delta0) returns x itself, no attack; pass steps >= 1, "
                "or random_start=True for random points of the ball"
            )
        if self.restarts > 1 and not draw:
            raise ValueError(
                "restarts > 1 would repeat the same run from a fixed start; "
                "use random_start=True without delta0, or restarts=1"
            )
        base = ascent.step_size
        with ascent.attacking():
            best = _Best()
            for _ in range(self.restarts):
                start = delta0 if delta0 is not None else ascent.start(random_start)
                ascent.step_size = base
                delta, hist, path = self.path(ascent, start, return_history, halving)
                if self.restarts == 1:
                    best.delta, best.hist = delta, hist
                    break
                best.offer(delta, Score(path.fooled, path.value) if self.best_iterate else ascent.score(delta), hist)
        x_adv = ascent.adversarial(best.delta)
        return (x_adv, best.hist) if return_history else x_adv

    def path(
        self, ascent: Ascent, start: torch.Tensor, history: bool, halving: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor], _Best | None]:
        """One run from start: (final or best delta, history, the path's best tracker or None)."""
        if not (self.best_iterate or halving):
            run = ascent.run(start, history=history)
            return run.delta, run.history, None
        delta = ascent.initial(start)
        steps, base = ascent.steps, ascent.step_size
        hist: list[torch.Tensor] = []
        path = _Best()
        for k in range(steps):
            if halving and k > 0 and _phase(k, steps) != _phase(k - 1, steps):
                # halve, and go on from the strongest point so far
                path.offer(delta, ascent.score(delta))
                delta = path.delta
                ascent.step_size = base * 0.5 ** _phase(k, steps)
            step = ascent.step(delta)
            path.offer(delta, ascent.scored(step.logits, step.value))
            delta = step.delta
            if history:
                hist.append(delta)
        if self.best_iterate:
            path.offer(delta, ascent.score(delta))
            delta = path.delta
        return delta, hist, path


class PGD:
    """torchattacks-style wrapper around :func:`pgd`: configure once, call on batches.

    Arguments are those of :func:`pgd` (everything but x, y).

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> atk = opnorm.PGD(model, eps=8 / 255, p="inf", steps=10)
        >>> atk(x, y).shape
        torch.Size([4, 8])
        >>> atk2 = opnorm.PGD(model, eps=0.5, p=2, loss="logit", clip=None)
        >>> atk2(x).shape  # the logit loss needs no labels
        torch.Size([4, 8])
    """

    def __init__(self, model: nn.Module, eps: float | torch.Tensor, **kwargs):
        self.model = model
        self.kwargs = dict(eps=eps, **kwargs)
        unknown = set(kwargs) - set(pgd.__kwdefaults__)
        if unknown:
            raise TypeError(
                f"unknown PGD arguments {sorted(unknown)}; valid: {sorted(pgd.__kwdefaults__)} "
                "(restarts, best iterate, schedule: opnorm.EvalPGD)"
            )

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return pgd(self.model, images, labels, **self.kwargs)

    forward = __call__

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if not isinstance(v, torch.Generator))
        return f"PGD({args})"
