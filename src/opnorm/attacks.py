"""Projected gradient ascent (PGA / PGD) attacks in l_1, l_2 and l_inf, for any loss.

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

import torch
from torch import nn

from opnorm.jacobian import check_inputs, check_label_range, eval_mode, forward, unwrap
from opnorm.losses import LossFn, LossSpec, get_loss
from opnorm.norms import Order, clip_box, lp_norm, norm_order, pga_step, project_lp_ball
from opnorm.validation import box

__all__ = ["pgd", "PGD", "random_in_ball", "default_step_size", "SCHEDULES", "PGD_ORDERS"]

Clip = tuple[float, float] | None


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


def _check_labels(y, x: torch.Tensor, spec: LossSpec, targeted: bool) -> torch.Tensor | None:
    if y is None:
        if spec.needs_labels or targeted:
            what = "targets (targeted=True)" if targeted else f"labels for loss={spec.name!r}"
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


class _Attack:
    """The state shared by the steps of one pgd call (validated arguments, clean logits)."""

    def __init__(self, net, x, y, eps, p, spec, step_size, clip, targeted, l1_fraction, clean):
        self.net, self.x, self.y, self.p, self.spec = net, x, y, p, spec
        self.eps = eps  # (B,)
        self.eps_view = _view(eps, x)
        self.scalar_eps = float(eps[0]) if bool((eps == eps[0]).all()) else None
        self.step_size = step_size
        self.infinite_step = isinstance(step_size, float) and step_size == math.inf
        self.clip, self.targeted, self.l1_fraction, self.clean = clip, targeted, l1_fraction, clean
        self.checked = False
        self.last_score: tuple[torch.Tensor | None, torch.Tensor] | None = None  # of the point step() started from

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

    def step(self, delta: torch.Tensor, track: bool = False) -> torch.Tensor:
        """One projected steepest-ascent step (one forward, one backward). ``track``: keep the
        score of the starting point x + delta in ``last_score`` (from the same forward: free)."""
        with torch.enable_grad():
            delta = delta.detach().requires_grad_(True)
            x_adv = self.x + delta
            logits = self.net(x_adv) if self.checked else forward(self.net, x_adv)
            obj = self.loss(logits)
            (g,) = torch.autograd.grad(obj.sum(), delta, allow_unused=True)
        if track:
            self.last_score = self._score(logits.detach(), obj.detach())
        with torch.no_grad():
            delta = delta.detach()
            if g is None:  # the loss does not depend on the input
                g = torch.zeros_like(delta)
            if self.targeted:
                g = g.neg_()  # descend toward the targets
            return pga_step(
                delta, g, self.p, self.eps, self.step_size, x=self.x, clip=self.clip, l1_fraction=self.l1_fraction
            )

    def score(self, delta: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(fooled (B,) bool or None, loss (B,) oriented so that larger is stronger) at x + delta."""
        with torch.no_grad():
            logits = forward(self.net, self.x + delta)
            return self._score(logits, self.loss(logits))

    def _score(self, logits: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        value = -value if self.targeted else value
        fooled = None
        if self.spec.labelled_success and self.y is not None:
            pred = logits.argmax(dim=1)
            fooled = pred == self.y if self.targeted else pred != self.y
        return fooled, value


class _Best:
    """Per example, the strongest of the candidates offered so far: one that fools the model
    if any does (label losses), then the highest oriented loss. Used across restarts and,
    with ``best_iterate``, across the steps of one run."""

    def __init__(self) -> None:
        self.delta: torch.Tensor | None = None
        self.fooled: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.hist: list[torch.Tensor] = []

    def offer(
        self,
        delta: torch.Tensor,
        score: tuple[torch.Tensor | None, torch.Tensor],
        hist: list[torch.Tensor] | None = None,
    ) -> None:
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


def _start(x: torch.Tensor, p: float, eps_t: torch.Tensor, delta0, random_start: bool, generator) -> torch.Tensor:
    """The start perturbation of one run: delta0, a random point of the ball, or 0."""
    if delta0 is not None:
        return delta0.detach().to(x.dtype)
    if random_start:
        return random_in_ball(x, p, eps_t, generator)
    return torch.zeros_like(x)


def _run(
    attack: _Attack,
    start: torch.Tensor,
    steps: int,
    step_size,
    schedule: str,
    best_iterate: bool,
    return_history: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], _Best | None]:
    """One PGA run from start: (final or best delta, history, the path's best tracker or None)."""
    delta = attack.project(start)
    spec = attack.spec
    if spec.zero_gradient_at_start and (lp_norm(delta, math.inf) == 0).any():
        raise ValueError(
            f"loss={spec.name!r} needs a nonzero start: its gradient at delta = 0 is "
            f"{'undefined' if spec.name == 'logit' else 'zero'}; pass a delta0 that is nonzero for every "
            "example, or random_start=True with eps > 0"
        )
    hist: list[torch.Tensor] = []
    halving = schedule == "halving"
    path = _Best() if best_iterate or halving else None
    attack.step_size = step_size
    for k in range(steps):
        if halving and k > 0 and _phase(k, steps) != _phase(k - 1, steps):
            # halve, and go on from the strongest point so far
            path.offer(delta, attack.score(delta))
            delta = path.delta
            attack.step_size = step_size * 0.5 ** _phase(k, steps)
        new = attack.step(delta, track=path is not None)
        if path is not None:
            path.offer(delta, attack.last_score)
        delta = new
        if return_history:
            hist.append(delta)
    if best_iterate:
        path.offer(delta, attack.score(delta))
        delta = path.delta
    return delta, hist, path


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float | torch.Tensor,
    p: Order = math.inf,
    loss: str | LossFn = "ce",
    q: Order = 2,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    restarts: int = 1,
    delta0: torch.Tensor | None = None,
    clip: Clip = (0.0, 1.0),
    targeted: bool = False,
    return_history: bool = False,
    generator: torch.Generator | None = None,
    l1_fraction: float = 0.01,
    best_iterate: bool = False,
    schedule: str = "constant",
):
    """Projected gradient ascent on a per-example loss inside the l_p ball of radius eps.

    ``delta_k = Proj( delta_{k-1} + step_size * psi_{p*}(grad_delta sum_b loss_b) )``, where
    Proj is the projection onto the l_p ball followed by clipping x + delta into ``clip``.

    Args:
        model: classifier ``(B, *in) -> (B, d)`` logits; attacked in eval mode, mode restored.
        x: (B, *in) clean inputs, inside ``clip``.
        y: (B,) integer labels (required for "ce", "cw"), or the targets when targeted=True.
        eps: radius, a float or a (B,) tensor, >= 0 and not all 0 (eps 0 cannot attack: ValueError).
        p: 1, 2 or inf (any form accepted by :func:`opnorm.norms.norm_order`).
        loss: "ce", "cw", "logit", "kl" (see :mod:`opnorm.losses`) or a callable
            ``(logits_adv, logits_clean, y) -> (B,)``. "logit" and "kl" have no useful gradient
            at delta = 0 and need a nonzero start (random_start or delta0), else ValueError.
        q: norm order of the "logit" loss ``||f(x + delta) - f(x)||_q``.
        steps: number of steps; one forward and one backward each. 0 (only with a random start
            or delta0) returns the start points.
        step_size: step length in l_p, > 0; None gives :func:`default_step_size` = 2.5 eps / steps
            (``schedule="halving"``: eps);
            ``float("inf")`` lands every iterate on the boundary, ``delta = eps psi_{p*}(grad)``
            (then box-clipped if clip is not None).
        random_start: start at a random point of the ball (see the module docstring);
            otherwise at delta = 0. Ignored when delta0 is given.
        restarts: independent runs (>= 1); per example the strongest result is kept: for
            "ce"/"cw" a point that fools the model if any run found one, then the highest
            loss (lowest for targeted attacks). Needs random starts when > 1.
        delta0: (B, *in) start perturbation, projected into the ball and the box.
        clip: box (lo, hi) for x + delta, or None for unconstrained inputs.
        targeted: minimize the loss toward the targets y instead of maximizing it.
        return_history: also return the list ``deltas`` with ``deltas[k]`` the perturbation
            after step k + 1 (for restarts > 1, the run kept for each example).
        generator: torch.Generator for the random starts (reproducible attacks).
        l1_fraction: for p = 1 and a finite step, the fraction of coordinates moved per step.
        best_iterate: return, per example, the strongest point of the whole path (start and
            every iterate; fooling points first, then the highest loss, as for restarts)
            instead of the last iterate, as APGD does. For evaluating robustness: a step
            that overshoots can leave a point that already fooled the model. Costs one
            forward per run (the steps' own forwards score the other points). The history
            is unchanged.
        schedule: ``"constant"`` step size, or ``"halving"``: the step starts at
            ``step_size`` (default eps) and is halved at 1/4, 1/2 and 3/4 of the steps; each
            halving restarts from the strongest point of the run so far (one forward each),
            as APGD's step-size reductions do. Large early steps cross the ball, small late
            ones refine: it finds points that a small constant step misses (for
            evaluation; the constant step is the adversarial-training standard).

    Returns:
        x_adv (x's shape, detached), or ``(x_adv, deltas)`` with return_history=True.

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> x_adv = opnorm.pgd(model, x, y, eps=8 / 255, p="inf", steps=10)
        >>> x_adv.shape, bool(((x_adv - x).abs() <= 8 / 255 + 1e-6).all())
        (torch.Size([4, 8]), True)
        >>> x_adv, deltas = opnorm.pgd(model, x, eps=0.1, p=2, loss="logit", q=2, steps=3,
        ...                            step_size=float("inf"), clip=None, return_history=True)
        >>> len(deltas), deltas[-1].shape
        (3, torch.Size([4, 8]))
    """
    check_inputs(model, x)
    p = norm_order(p, "p", allowed=PGD_ORDERS)
    spec = get_loss(loss, q)
    eps_t = _check_eps(eps, x)
    if eps_t.numel() and not bool((eps_t > 0).any()):
        raise ValueError(
            "eps is 0: the ball is the point x itself, so no attack can move; pass a radius eps > 0 "
            "(the accuracy at eps 0 is the clean accuracy)"
        )
    for name, value, lo in (("steps", steps, 0), ("restarts", restarts, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if steps == 0 and not random_start and delta0 is None:
        raise ValueError(
            "steps 0 without a random start (or delta0) returns x itself, no attack; pass steps >= 1, "
            "or random_start=True for random points of the ball"
        )
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step_size is None:
        step_size = eps_t.clone() if schedule == "halving" or steps == 0 else default_step_size(eps_t, steps)
        step_size = step_size[0].item() if bool((step_size == step_size[0]).all()) else _view(step_size, x)
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
        step_size = float(step_size)
    if schedule == "halving" and isinstance(step_size, float) and step_size == math.inf:
        raise ValueError("schedule='halving' halves a finite step size; the infinite step has no schedule")
    if not 0 < l1_fraction <= 1:
        raise ValueError(f"l1_fraction must be in (0, 1], got {l1_fraction!r}")
    y = _check_labels(y, x, spec, targeted)
    if targeted and not spec.needs_labels and spec.name != "callable":
        raise ValueError(f"targeted=True needs a label loss ('ce', 'cw' or a callable), got loss={spec.name!r}")
    clip = _check_clip(clip, x)
    if delta0 is not None:
        if not isinstance(delta0, torch.Tensor) or delta0.shape != x.shape:
            raise ValueError(
                f"delta0 must be a tensor of x's shape {tuple(x.shape)}, got "
                f"{tuple(delta0.shape) if isinstance(delta0, torch.Tensor) else type(delta0).__name__}"
            )
        if not torch.isfinite(delta0).all():
            raise ValueError("delta0 contains NaN or inf values")

    if restarts > 1 and (delta0 is not None or not random_start):
        raise ValueError(
            "restarts > 1 would repeat the same run from a fixed start; "
            "use random_start=True without delta0, or restarts=1"
        )

    net = unwrap(model)
    modes = eval_mode(net) if isinstance(net, nn.Module) else contextlib.nullcontext(net)
    x = x.detach()
    with modes:
        clean = None
        if spec.needs_clean:
            with torch.no_grad():
                clean = forward(net, x)
        attack = _Attack(net, x, y, eps_t, p, spec, step_size, clip, targeted, l1_fraction, clean)
        best = _Best()
        for _ in range(restarts):
            start = _start(x, p, eps_t, delta0, random_start, generator)
            delta, hist, path = _run(attack, start, steps, step_size, schedule, best_iterate, return_history)
            if restarts == 1:
                best.delta, best.hist = delta, hist
                break
            best.offer(delta, (path.fooled, path.value) if best_iterate else attack.score(delta), hist)
        best_delta, best_hist = best.delta, best.hist

    x_adv = clip_box(x + best_delta, clip).detach()
    return (x_adv, best_hist) if return_history else x_adv


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
        >>> atk2 = opnorm.PGD(model, eps=0.5, p=2, loss="logit", q=2, clip=None)
        >>> atk2(x).shape  # the logit loss needs no labels
        torch.Size([4, 8])
    """

    def __init__(self, model: nn.Module, eps: float | torch.Tensor, **kwargs):
        self.model = model
        self.kwargs = dict(eps=eps, **kwargs)
        unknown = set(kwargs) - set(pgd.__kwdefaults__)
        if unknown:
            raise TypeError(f"unknown PGD arguments {sorted(unknown)}; valid: {sorted(pgd.__kwdefaults__)}")
        if "return_history" in kwargs:
            raise TypeError(
                "PGD returns adversarial inputs only; call opnorm.pgd(..., return_history=True) for the history"
            )

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return pgd(self.model, images, labels, **self.kwargs)

    forward = __call__

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if k != "generator")
        return f"PGD({args})"
