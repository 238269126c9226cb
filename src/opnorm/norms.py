"""l_p algebra on batches: norms, Hoelder conjugates, duality maps, projections.

Every function acts per example: dimension 0 is the batch, all other dimensions are
flattened into one vector per example.

Convention for a norm order ``p``: a float or int >= 1, ``float("inf")`` / ``math.inf``,
or the string ``"inf"`` (any case). :func:`norm_order` turns each into a float, with
``math.inf`` for infinity; every public function of opnorm accepts all of these forms.
"""

from __future__ import annotations

import math

import torch

from opnorm.validation import box

Order = float | int | str

__all__ = [
    "Order",
    "norm_order",
    "order_text",
    "order_json",
    "conjugate",
    "lp_norm",
    "duality_map",
    "steepest_ascent",
    "project_lp_ball",
    "project_l1_ball",
    "clip_box",
    "sparse_l1_direction",
    "pga_step",
    "into_box",
]


def norm_order(p: Order, name: str = "p", *, allowed: tuple[float, ...] | None = None) -> float:
    """Validate a norm order and return it as a float (``math.inf`` for infinity).

    Args:
        p: 1 <= p <= inf, as int, float, ``math.inf`` or the string ``"inf"``.
        name: the argument's name, used in error messages.
        allowed: if given, the only orders accepted (e.g. ``(1, 2, inf)`` for projections).
    """
    if isinstance(p, bool):
        raise TypeError(f"{name} must be a number >= 1 or 'inf', got the bool {p!r}")
    if isinstance(p, str):
        if p.strip().lower() in ("inf", "infinity", "+inf"):
            value = math.inf
        else:
            try:
                value = float(p)
            except ValueError:
                raise ValueError(f"{name} must be a number >= 1 or 'inf', got the string {p!r}") from None
    elif isinstance(p, (int, float)):
        value = float(p)
    elif isinstance(p, torch.Tensor) and p.numel() == 1:
        value = float(p.item())
    else:
        raise TypeError(f"{name} must be a number >= 1 or 'inf', got {type(p).__name__}")
    if math.isnan(value) or value < 1:
        raise ValueError(f"{name} must satisfy 1 <= {name} <= inf, got {p!r}")
    if allowed is not None and value not in allowed:
        shown = ", ".join(order_text(a) for a in allowed)
        raise ValueError(f"{name} must be one of {{{shown}}}, got {p!r}")
    return value


def order_text(p: float) -> str:
    """A norm order as text for messages, names and tables: ``"inf"`` for infinity, else ``f"{p:g}"``.

    Example:
        >>> order_text(math.inf), order_text(2.0), order_text(1.5)
        ('inf', '2', '1.5')
    """
    return "inf" if p == math.inf else f"{p:g}"


def order_json(p: float) -> float | str:
    """A norm order for JSON, which has no infinity: ``"inf"`` for infinity, else p itself
    (:func:`norm_order` reads both back).

    Example:
        >>> order_json(math.inf), order_json(2.0)
        ('inf', 2.0)
    """
    return "inf" if p == math.inf else p


def conjugate(p: Order) -> float:
    """Hoelder conjugate p* with 1/p + 1/p* = 1 (1* = inf, inf* = 1)."""
    p = norm_order(p)
    if p == 1:
        return math.inf
    if p == math.inf:
        return 1.0
    return p / (p - 1.0)


def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.reshape(z.shape[0], -1)


def lp_norm(z: torch.Tensor, p: Order) -> torch.Tensor:
    """Per-example l_p norm: (B, *shape) -> (B,)."""
    p = norm_order(p)
    flat = _flat(z)
    if p in (1.0, math.inf):
        return torch.linalg.vector_norm(flat, ord=p, dim=1)
    # scale by the largest entry so tiny or huge vectors neither underflow nor overflow
    scale = flat.abs().amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.linalg.vector_norm(flat / scale, ord=p, dim=1) * scale.squeeze(1)


def duality_map(z: torch.Tensor, r: Order) -> torch.Tensor:
    """psi_r(z): the unit l_{r*} vector with <psi_r(z), z> = ||z||_r, per example.

    ``psi_2(z) = z / ||z||_2``; ``psi_1(z) = sign(z)``; ``psi_inf(z)`` is the signed
    one-hot at argmax |z_i|, with ties split evenly between the maximizers;
    for 1 < r < inf, ``sign(z) |z|^(r-1) / ||z||_r^(r-1)``.
    An example with z = 0 maps to 0 (every unit vector attains 0; none is preferred).
    Shape is preserved.
    """
    r = norm_order(r, "r")
    flat = _flat(z)
    if r == 1:
        out = torch.sign(flat)
    elif r == math.inf:
        mag = flat.abs()
        top = mag.amax(dim=1, keepdim=True)
        hit = (mag == top) & (top > 0)
        out = torch.sign(flat) * hit / hit.sum(dim=1, keepdim=True).clamp_min(1)
    else:
        # scale first so that |z|^(r-1) neither overflows nor underflows
        scale = flat.abs().amax(dim=1, keepdim=True)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        w = flat / scale
        norm = torch.linalg.vector_norm(w, ord=r, dim=1, keepdim=True)
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))
        out = w / norm if r == 2 else torch.sign(w) * (w.abs() / norm) ** (r - 1)
    return out.reshape(z.shape)


def steepest_ascent(g: torch.Tensor, p: Order) -> torch.Tensor:
    """argmax over ||v||_p <= 1 of <v, g>, per example: psi_{p*}(g).

    p = 2 gives g / ||g||_2, p = inf gives sign(g), p = 1 a signed one-hot.
    """
    return duality_map(g, conjugate(p))


def _per_example(eps: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """eps as a (B, 1) tensor on like's device and dtype."""
    eps_t = torch.as_tensor(eps, dtype=like.dtype, device=like.device)
    if eps_t.ndim == 0:
        eps_t = eps_t.expand(like.shape[0])
    if eps_t.shape != (like.shape[0],):
        raise ValueError(f"eps must be a scalar or have shape ({like.shape[0]},), got {tuple(eps_t.shape)}")
    if torch.isnan(eps_t).any() or (eps_t < 0).any():
        raise ValueError("eps must be >= 0 (and not NaN)")
    return eps_t.reshape(-1, 1)


def project_l1_ball(delta: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto {||delta||_1 <= eps}, per example.

    Sort-based simplex projection (Duchi, Shalev-Shwartz, Singer, Chandra 2008):
    soft-threshold |delta| at the theta that makes the l_1 norm exactly eps.
    """
    flat = _flat(delta)
    eps_t = _per_example(eps, flat)
    mag = flat.abs()
    inside = mag.sum(dim=1, keepdim=True) <= eps_t
    srt, _ = torch.sort(mag, dim=1, descending=True)
    cums = srt.cumsum(dim=1) - eps_t
    ks = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    # rho = the largest k with srt_k > (cumsum_k - eps) / k
    cond = srt * ks > cums
    rho = (cond * ks).argmax(dim=1, keepdim=True)  # index of the last True (cond is monotone)
    theta = cums.gather(1, rho) / (rho + 1).to(flat.dtype)
    projected = torch.sign(flat) * (mag - theta).clamp_min(0)
    out = torch.where(inside, flat, projected)
    return out.reshape(delta.shape)


def project_lp_ball(delta: torch.Tensor, p: Order, eps: float | torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the l_p ball of radius eps, per example; p in {1, 2, inf}.

    l_inf clips coordinates, l_2 rescales, l_1 uses :func:`project_l1_ball`.
    eps is a scalar or a (B,) tensor of radii.
    """
    p = norm_order(p, allowed=(1.0, 2.0, math.inf))
    flat = _flat(delta)
    eps_t = _per_example(eps, flat)
    if p == math.inf:
        out = torch.maximum(torch.minimum(flat, eps_t), -eps_t)
    elif p == 2:
        norm = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
        factor = torch.where(norm > eps_t, eps_t / norm.clamp_min(torch.finfo(flat.dtype).tiny), torch.ones_like(norm))
        out = flat * factor
    else:
        return project_l1_ball(delta, eps_t.reshape(-1))
    return out.reshape(delta.shape)


def clip_box(x: torch.Tensor, clip: tuple[float, float] | None) -> torch.Tensor:
    """Clamp into the box [lo, hi]; ``clip=None`` leaves x unconstrained."""
    if clip is None:
        return x
    lo, hi = box(clip)
    return x.clamp(lo, hi)


def sparse_l1_direction(
    g: torch.Tensor,
    x_adv: torch.Tensor | None = None,
    clip: tuple[float, float] | None = None,
    fraction: float = 0.01,
) -> torch.Tensor:
    """The sparse l_1 ascent direction (SLIDE, Tramer & Boneh 2019), per example.

    Equal weight ``1/k`` and the sign of g on the k = ceil(fraction * n) coordinates of largest
    |g| (ties included), unit l_1 norm. With ``x_adv`` and ``clip``, a coordinate at the box edge
    whose gradient points outwards is skipped (no l_1 budget is spent on it).
    ``fraction -> 1/n`` gives the exact l_1 steepest ascent, a signed one-hot.
    """
    flat = _flat(g)
    if clip is not None and x_adv is not None:
        xa = x_adv.reshape(flat.shape)
        blocked = ((xa <= clip[0]) & (flat < 0)) | ((xa >= clip[1]) & (flat > 0))
        flat = flat.masked_fill(blocked, 0.0)
    mag = flat.abs()
    k = max(1, min(flat.shape[1], math.ceil(fraction * flat.shape[1])))
    kth = mag.topk(k, dim=1).values[:, -1:]
    mask = (mag >= kth) & (mag > 0)
    out = torch.sign(flat) * mask / mask.sum(dim=1, keepdim=True).clamp_min(1)
    return out.reshape(g.shape)


def pga_step(
    delta: torch.Tensor,
    g: torch.Tensor,
    p: Order,
    eps: float | torch.Tensor,
    step: float | torch.Tensor = math.inf,
    *,
    x: torch.Tensor | None = None,
    clip: tuple[float, float] | None = None,
    l1_fraction: float = 0.01,
) -> torch.Tensor:
    """One projected gradient ascent step on a perturbation, per example (docs/theory.md).

    ``delta' = Proj_box(Proj_{||.||_p <= eps}(delta + step * d))`` with the ascent direction
    ``d = psi_{p*}(g)`` (:func:`steepest_ascent`; for p = 1 and a finite step the sparse
    :func:`sparse_l1_direction`). ``step = inf`` is the theorem's limit: the iterate lands on
    the sphere, ``delta' = eps * psi_{p*}(g)`` (any p), i.e. a (p, q) power-method step when
    g = J^T psi_q(J delta). A zero gradient row gives d = 0 (finite step: delta stays;
    infinite step: delta' = 0).

    Args:
        delta: (B, *in) current perturbation (ignored for an infinite step).
        g: (B, *in) gradient of the objective at ``x + delta``; may be overwritten.
        p: the threat model's norm; a finite step needs p in {1, 2, inf}.
        eps: radius, a float or a (B,) tensor.
        step: step length in l_p (a float, a (B,) tensor, or inf).
        x, clip: the clean input and the box (lo, hi) that ``x + delta'`` must stay in
            (clip=None: no box).
        l1_fraction: the share of coordinates a finite l_1 step moves.

    Returns:
        (B, *in) the next perturbation.

    Example:
        >>> import torch
        >>> from opnorm.norms import pga_step
        >>> x, delta, grad = torch.rand(2, 5), torch.zeros(2, 5), torch.randn(2, 5)
        >>> delta = pga_step(delta, grad, "inf", eps=0.1, step=0.025, x=x, clip=(0, 1))
        >>> bool(torch.allclose(delta, (0.025 * grad.sign()).clamp(-x, 1 - x)))  # a signed step, in the box
        True
    """
    p = norm_order(p, "p")
    if clip is not None and x is None:
        raise ValueError("clip keeps x + delta in a box: pass the clean input x with it")
    infinite = isinstance(step, (int, float)) and step == math.inf
    if infinite:
        new = steepest_ascent(g, p) * _per_example(eps, g).reshape((-1,) + (1,) * (g.ndim - 1))
    else:
        if p == 1:
            x_adv = None if x is None else x + delta
            d = sparse_l1_direction(g, x_adv, clip, l1_fraction)
        else:
            d = steepest_ascent(g, p)
        if isinstance(step, torch.Tensor) and step.ndim == 1:
            step = step.reshape((-1,) + (1,) * (g.ndim - 1))
        new = project_lp_ball(delta + step * d, p, eps)
    return into_box(new, x, clip)


def into_box(delta: torch.Tensor, x: torch.Tensor | None, clip: tuple[float, float] | None) -> torch.Tensor:
    """``clip_box(x + delta) - x``: the part of delta that keeps x + delta in the box (clip=None: delta)."""
    if clip is None:
        return delta
    return clip_box(x + delta, clip) - x
