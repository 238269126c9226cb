"""Training objectives: data-dependent operator norm regularization, global spectral norm
regularization, and adversarial training (PGD-AT, l_q-logit AT, TRADES).

Every term is an ``nn.Module`` added to the task loss, e.g.::

    >>> reg = OperatorNormRegularizer(p=2, q=2, eps=0.1, lam=0.01)
    >>> logits, pen = reg.joint(model, x, index)     # index: the batch's dataset indices
    >>> (F.cross_entropy(logits, y) + pen).backward()

How the (p, q) operator norm penalty is computed (PAPER.md section 4):

1. **The direction v, no weight gradients.** Explicit steps of the (p, q) power method
   on J(x) in eval mode (BatchNorm uses running statistics; every example has its own J),
   on the unwrapped model, with autocast disabled. It gives the direction ``v`` (unit
   l_p), ``u = psi_q(J v)`` and ``sigma = ||J v||_q``, a lower bound on ``||J(x)||_{p->q}``
   (:attr:`OperatorNormRegularizer.last_sigma`). The paper's configuration
   (``mode="paper"``) runs 10 of them per batch from random starts. The default
   (``mode="fast"``) keeps every example's v in a bank indexed by dataset index: 3 steps
   from a random start on an example's first visit, then 1 step per visit from the stored
   v, and one more step for free after the penalty: the input gradient of the fd penalty,
   which the training backward computes along with the weight gradients, is
   ``J^T psi_q(J v)`` up to a positive factor (see :class:`OperatorNormRegularizer`). A
   training step costs about 3 clean steps instead of about 9 for PGD-10 adversarial training
   (``benchmarks/fast_regularizer.py``).
2. **Differentiable penalty with u, v held fixed** (Danskin), through the model as passed
   (a DDP wrapper included, so that its gradients are all-reduced) in its current mode:

   * ``penalty="fd"`` (the paper's code): ``s = ||f(x + eps v) - f(x)||_q / eps``.
     Inside the linear region of x this equals ``||J v||_q = sigma`` exactly, and its
     weight gradient equals the exact one; beyond it, it is the secant version.
   * ``penalty="exact"``: ``s = <u, J(x) v>``, differentiated w.r.t. the weights by the
     double-backward trick (``J v = d/dw <J^T w, v>``). At the power method's fixed point
     ``<u, J v> = ||J v||_q = sigma``; its weight gradient is Danskin's gradient of sigma.

   The per-example value is ``s`` (``squared=False``) or ``s**2`` (``squared=True``, the
   paper's d.d. SNR, ``= sigma^2``). With ``scale_by_eps=True`` ``s`` is multiplied by
   eps, i.e. the fd penalty becomes the adversarial logit loss
   ``||f(x + eps v) - f(x)||_q`` (``= eps * sigma`` in the linear region) of the theorem.
   The returned penalty is ``lam * mean_b(value_b)``.

Under a caller's autocast the power method still runs in full precision; the fd
difference ``f(x + eps v) - f(x)`` of half-precision logits loses digits for small eps
(fp16 more than bf16), so keep eps well above the logits' rounding error there.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from opnorm.jacobian import ROUTES, check_inputs, eval_mode, forward, linearize, unwrap
from opnorm.norms import Order, clip_box, conjugate, duality_map, lp_norm, norm_order, project_lp_ball
from opnorm.power import OperatorNormResult, power_iteration, random_unit

__all__ = [
    "PENALTIES",
    "MODES",
    "OUTPUTS",
    "AT_KINDS",
    "mixes_examples",
    "OperatorNormRegularizer",
    "GlobalSpectralNormRegularizer",
    "AdversarialTrainingLoss",
]

PENALTIES = ("fd", "exact")
OUTPUTS = ("logits", "kl")
ITERATIONS = ("linear", "fd")
AT_KINDS = ("ce", "logit", "trades")


def _no_autocast(device: torch.device):
    """Full precision for the inner loops (power method, attacks) under a caller's autocast."""
    return torch.autocast(device_type=device.type, enabled=False)


def _check_nonneg(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}")
    value = float(value)
    if math.isnan(value) or value < 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _check_pos_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _full(t: torch.Tensor) -> torch.Tensor:
    """Half-precision values (autocast) in float32 for the reduction; others unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _fisher(logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``H w`` with ``H = diag(s) - s s^T``, s = softmax(logits): the Fisher information of the
    softmax in logit space, i.e. the Hessian of ``KL(softmax(z) || softmax(z + w))`` at w = 0."""
    prob = torch.softmax(_full(logits.detach()), dim=1).to(w.dtype)
    return prob * w - prob * (prob * w).sum(dim=1, keepdim=True)


def _kl_rows(logits_clean: torch.Tensor, logits_pert: torch.Tensor) -> torch.Tensor:
    """Per-example ``KL(softmax(clean) || softmax(pert))`` (B,), differentiable in both."""
    log_p = F.log_softmax(_full(logits_clean), dim=1)
    log_q = F.log_softmax(_full(logits_pert), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


# ----------------------------------------------------------------------------- d.d. operator norm

MODES = ("fast", "paper")
PAPER_ITERS = 10  # the paper: 10 power iterations per batch, from a random start
FAST_COLD_ITERS = 3  # fast mode: explicit iterations on an example's first visit
FAST_WARM_ITERS = 1  # fast mode: explicit iterations on later visits (for the power method, more did not pay off)


def _usable_rows(g: torch.Tensor) -> torch.Tensor:
    """(B,) rows of an input gradient that give a direction: finite and not all zero."""
    flat = g.reshape(g.shape[0], -1)
    return torch.isfinite(flat).all(dim=1) & (flat != 0).any(dim=1)


def _check_step(step: Optional[float], p: float) -> float:
    """The PGA step as a fraction of eps: inf (None) for the power method, else > 0 with p in {1, 2, inf}."""
    if step is None:
        return math.inf
    if isinstance(step, bool) or not isinstance(step, (int, float)) or math.isnan(step) or step <= 0:
        raise ValueError(f"step must be a number > 0 (a fraction of eps) or None for the power method, got {step!r}")
    step = float(step)
    if step != math.inf and p not in (1.0, 2.0, math.inf):
        raise ValueError(f"a finite step projects onto the l_p ball, which is implemented for p in 1, 2, inf; got p={p:g} "
                         "(use step=None for the power method)")
    return step


def _check_nonneg_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_box(clip) -> Optional[tuple[float, float]]:
    if clip is None:
        return None
    try:
        lo, hi = (float(c) for c in clip)
    except (TypeError, ValueError):
        raise TypeError(f"clip must be None or a pair (lo, hi) of floats, got {clip!r}") from None
    if not lo < hi:
        raise ValueError(f"clip must be (lo, hi) with lo < hi, got {clip!r}")
    return lo, hi


def mixes_examples(model: nn.Module) -> bool:
    """True when one example's output depends on the others': BatchNorm using batch statistics
    (training mode, or no running statistics). Then input gradients of a batch loss are not
    per-example J^T u, and the free power iteration is not used."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
        for m in unwrap(model).modules()
    )


class OperatorNormRegularizer(nn.Module):
    """Data-dependent (p, q) operator norm penalty ``lam * mean_b ||J(x_b)||_{p->q}^(1|2)``.

    Two configurations (``mode``), computing the same penalty with different direction solvers:

    * ``"fast"`` (default): each example's direction v is kept between visits in a bank
      indexed by dataset index (``index=``). On its first visit an example gets ``iters``
      (default 3) explicit power iterations from a random start, on later visits
      ``warm_iters`` (default 1) from its stored v, so that v follows the current weights.
      Then the **free update**: the fd penalty's forward point ``x_p = x + eps v`` is a leaf
      requiring grad, and the training backward, which computes the weight gradients
      anyway, also gives ``grad_{x_p} penalty = c * J(x_p)^T psi_q(f(x_p) - f(x))`` with
      c > 0. Its duality map ``psi_{p*}`` is the next direction, stored for the next visit
      (a hook on x_p). Inside the linear region ``f(x_p) - f(x) = eps J v``, so this is
      exactly one (p, q) power iteration ``v' = psi_{p*}(J^T psi_q(J v))`` (in general: one
      PGA step with infinite step size, PAPER.md section 4), for the price of propagating
      the gradient to the input. ``warm_iters=0`` leaves only the free update (a step then
      costs one forward of ``[x; x_p]`` and one backward, the floor of about 2 clean
      steps), but its directions are one epoch old when used, and on Fashion-MNIST that lost
      robustness (docs/results/fast-regularizer).
    * ``"paper"``: ``iters`` (default 10) power iterations per batch from a random start,
      nothing kept between batches (the paper's d.d. SNR). :meth:`paper` builds it.

    The free update needs: the fd penalty, warm starts with ``index``, and a model whose
    examples do not interact. With BatchNorm using batch statistics (:func:`mixes_examples`,
    e.g. in training mode) the input gradient mixes examples, so it is skipped and warm
    examples get ``max(warm_iters, 1)`` explicit eval-mode iterations; so does the exact
    penalty (its input gradient is not J^T u). Dropout in training mode is kept: the free
    step then uses the dropped-out network's J. Under autocast the free step sees the
    half-precision backward. Without ``index`` every example is cold.

    Args:
        p, q: norm orders (1 <= p, q <= inf; float, int or "inf"). (2, 2) is the spectral norm.
        eps: the radius of the finite difference / the dynamic power method (>= 0;
            ``penalty="fd"`` needs eps > 0).
        mode: ``"fast"`` or ``"paper"``; sets the defaults of iters, warm_iters, warm_start
            and free_update.
        iters: power iterations for an example without a stored direction (>= 1; fast: 3,
            paper: 10).
        warm_iters: explicit iterations for an example with a stored direction (>= 0; fast:
            1; paper: ``iters``; at least 1 where the free update does not apply). With finite
            PGA steps and the cross-entropy at the PGA point, ``iters=1, warm_iters=2`` (the
            same 5 iterations per example over 3 epochs as 3 + 1 + 1, spent late) was 0.7-1.1
            points more robust on Fashion-MNIST, six seeds (configs/fashion-mnist-fast-robust.json).
        penalty: ``"fd"`` (finite difference, the paper's code) or ``"exact"`` (``<u, J v>``
            by double backward). See the module docstring for what equals what.
        output: how a change of the logits is measured. ``"logits"`` (default): its l_q norm,
            the paper's (p, q) operator norm. ``"kl"``: the softmax's KL divergence, locally
            the Fisher metric ``||w||_H = sqrt(w^T H w)``, ``H = diag(s) - s s^T``,
            s = softmax(f(x)); the norm is then the (p, 2) operator norm of ``H^(1/2) J(x)``
            (power step ``v' = psi_{p*}(J^T H J v)``), and the fd value is
            ``s = sqrt(2 KL(softmax f(x) || softmax f(x + eps v))) / eps`` (squared: ``2 KL /
            eps^2``, no square root; with scale_by_eps: ``2 KL``, the TRADES term at the power
            method's point). It weighs the logit directions the prediction depends on, as the
            cross-entropy of adversarial training does. Needs q = 2 and the fd penalty.
        squared: penalize ``sigma^2`` (the paper's d.d. SNR) instead of ``sigma``.
        lam: weight (>= 0).
        dynamic: the paper code's variant in which explicit power iteration k linearizes at
            ``x + eps * v_{k-1}`` instead of at x. u, sigma are then taken at x. Same cost per
            iteration; in fast mode the warm iteration becomes a gradient step of the penalty
            at its own point, which on Fashion-MNIST (KL output) came 2.2-3.3 points closer to
            PGD-10 AT's robust accuracy (two runs on different machines: docs/results/fast-regularizer).
        scale_by_eps: multiply the per-example ``s`` by eps (the adversarial logit-loss scale).
        warm_start: keep each example's direction in the bank (fast: True, paper: False).
        free_update: update the bank from the training backward (fast: True, paper: False).
        clip: ``(lo, hi)``: clamp the fd point ``x + eps v`` into the input box, as attacks
            do, so the penalty measures a feasible perturbation (None: no clamp). The fd value
            keeps dividing by eps.
        route: how J is accessed by explicit iterations (:func:`opnorm.jacobian.linearize`):
            "auto" (the exact pattern replay for plain ReLU Sequentials, else autograd),
            "pattern", "autograd".
        iteration: how an explicit power iteration gets ``J v``. ``"linear"`` (default): from
            the linearization (at x; at ``x + eps v`` with ``dynamic``), a J v and a J^T u.
            ``"fd"``: from the finite difference ``f(clip(x + eps v)) - f(x)``: the next
            direction is ``psi_{p*}`` of the input gradient of the fd penalty at its own
            point, i.e. one PGA step with infinite step size (PAPER.md section 4), the free
            update made explicitly. Inside the linear region it is the linear iteration
            (exactly for the l_q output; to first order in eps for KL). Costs one forward and
            one backward of the network per iteration (plus one gradient-free forward of x per
            call); on the small CNN that is more than a pattern-replay linear iteration (a fast
            step 0.37 vs 0.33 of a PGD-10 AT step, benchmarks/results/fast_regularizer.json).
            Needs eps > 0; ``dynamic`` does not apply.
        step: the step size of every direction update (explicit iterations and the free
            update) as a fraction of eps, ``alpha / eps`` in PAPER.md section 4 (> 0). None or
            inf (default): the power method, PGA with infinite step size, whose every iterate
            is a unit vector. Finite: PGA with a finite step, ``v <- Proj(v + step *
            psi_{p*}(g))`` onto the unit l_p ball (then, with ``clip``, onto the box: ``x + eps
            v`` stays feasible), so the banked v is the PGA iterate ``delta / eps`` carried over
            from visit to visit (adversarial training with transferable perturbations); the fd
            value is then PGA's logit loss at its iterate over eps, at most ``sigma`` in the
            linear region. Needs p in {1, 2, inf}; the bank then holds x's dtype for p = inf too.
        generator: seeds the random start vectors (default: the global RNG).

    Forward:
        ``reg(model, x, index=None, logits=None) -> scalar``. ``x``: (B, *in) inputs;
        ``index``: (B,) integer dataset indices (the bank's rows); ``logits``: the clean
        logits f(x) the caller already computed (fd then needs only one more forward, of
        ``x + eps v``; ignored by ``penalty="exact"``). Under DDP use :meth:`joint`, which
        does a single forward through the wrapper. The free update happens during the
        caller's ``backward()`` of a loss containing the penalty.

    Attributes:
        last_sigma: (B,) estimates of ``||J(x_b)||_{p->q}`` from the last call: paper mode
            and :meth:`direction`: the power method's ``||J v||_q``; fast mode's penalty: the
            fd value ``||f(x_p) - f(x)||_q / eps`` of its forward (no extra J v).
        last_v: (B, *in) the directions the penalty used.
        bank, seen: buffers (saved in ``state_dict``, so checkpoints resume exactly): the
            stored directions (N, *in) (int8 signs for p = inf, else x's dtype) and a (N,)
            flag per example; grown on demand to the largest index seen.

    Example:
        >>> reg = OperatorNormRegularizer("inf", 2, eps=0.1, lam=0.02, clip=(0, 1))  # fast
        >>> logits, pen = reg.joint(model, x, index)   # one forward for loss and penalty
        >>> (F.cross_entropy(logits, y) + pen).backward()   # also stores the next directions
        >>> paper = OperatorNormRegularizer.paper("inf", 2, eps=0.1, lam=0.02)
    """

    def __init__(
        self,
        p: Order = 2,
        q: Order = 2,
        eps: float = 0.1,
        *,
        mode: str = "fast",
        iters: Optional[int] = None,
        warm_iters: Optional[int] = None,
        penalty: str = "fd",
        output: str = "logits",
        squared: bool = True,
        lam: float = 1.0,
        dynamic: bool = False,
        scale_by_eps: bool = False,
        warm_start: Optional[bool] = None,
        free_update: Optional[bool] = None,
        clip: Optional[tuple[float, float]] = None,
        route: str = "auto",
        iteration: str = "linear",
        step: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        fast = mode == "fast"
        self.p = norm_order(p, "p")
        self.q = norm_order(q, "q")
        self.eps = _check_nonneg(eps, "eps")
        self.iters = _check_pos_int(iters if iters is not None else (FAST_COLD_ITERS if fast else PAPER_ITERS), "iters")
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {', '.join(PENALTIES)}, got {penalty!r}")
        self.penalty = penalty
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if output == "kl" and (self.q != 2 or penalty != "fd"):
            raise ValueError(
                f"output='kl' measures logit changes in the softmax's Fisher metric, a 2-norm: it needs q=2 and "
                f"penalty='fd', got q={q!r}, penalty={penalty!r}"
            )
        self.output = output
        if penalty == "fd" and self.eps == 0:
            raise ValueError("penalty='fd' divides by eps; use eps > 0 or penalty='exact'")
        self.lam = _check_nonneg(lam, "lam")
        self.squared = bool(squared)
        self.dynamic = bool(dynamic)
        self.scale_by_eps = bool(scale_by_eps)
        self.warm_start = bool(fast if warm_start is None else warm_start)
        self.free_update = bool(fast if free_update is None else free_update)
        if warm_iters is None:
            warm_iters = FAST_WARM_ITERS if fast else self.iters
        self.warm_iters = _check_nonneg_int(warm_iters, "warm_iters")
        self.clip = _check_box(clip)
        if route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
        self.route = route
        if iteration not in ITERATIONS:
            raise ValueError(f"iteration must be one of {', '.join(ITERATIONS)}, got {iteration!r}")
        if iteration == "fd" and self.eps == 0:
            raise ValueError("iteration='fd' takes finite differences of radius eps; use eps > 0 or iteration='linear'")
        self.iteration = iteration
        self.step = _check_step(step, self.p)
        self.generator = generator
        self.register_buffer("bank", torch.zeros(0))
        self.register_buffer("seen", torch.zeros(0, dtype=torch.bool))
        self.last_sigma: Optional[torch.Tensor] = None
        self.last_v: Optional[torch.Tensor] = None

    @classmethod
    def paper(cls, p: Order = 2, q: Order = 2, eps: float = 0.1, **kwargs) -> "OperatorNormRegularizer":
        """The paper's configuration: ``iters=10`` power iterations per batch from a random
        start, no bank, no free update (``mode="paper"``; other arguments as the constructor)."""
        return cls(p, q, eps, mode="paper", **kwargs)

    def extra_repr(self) -> str:
        fmt = lambda r: "inf" if r == math.inf else f"{r:g}"  # noqa: E731
        return (
            f"mode={self.mode!r}, p={fmt(self.p)}, q={fmt(self.q)}, eps={self.eps:g}, iters={self.iters}, "
            f"warm_iters={self.warm_iters}, penalty={self.penalty!r}, output={self.output!r}, squared={self.squared}, lam={self.lam:g}, "
            f"dynamic={self.dynamic}, iteration={self.iteration!r}, step={self.step:g}, warm_start={self.warm_start}, free_update={self.free_update}, clip={self.clip}"
        )

    # -- the bank -------------------------------------------------------------------------

    def _rows(self, index: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
        """index as int64 on x's device (None without warm starts), with the bank grown to hold it."""
        if not self.warm_start or index is None:
            return None
        if not isinstance(index, torch.Tensor):
            index = torch.as_tensor(index)
        if index.shape != (x.shape[0],) or index.is_floating_point() or index.dtype == torch.bool:
            raise ValueError(
                f"index must be a 1-D integer tensor of dataset indices with one entry per example "
                f"(shape ({x.shape[0]},)), got dtype {index.dtype} and shape {tuple(index.shape)}"
            )
        idx = index.to(device=x.device, dtype=torch.long)
        if bool((idx < 0).any()):
            raise ValueError("index must hold dataset indices >= 0")
        self._grow(x, int(idx.max()) + 1)
        return idx

    def _grow(self, x: torch.Tensor, needed: int) -> None:
        shape = tuple(x.shape[1:])
        if self.bank.shape[0] == 0:  # first use: the example shape and dtype are known now
            # p = inf power-method directions are signs: exact in int8 (finite PGA steps are not)
            dtype = torch.int8 if self.p == math.inf and self.step == math.inf else x.dtype
            self.bank = torch.zeros(0, *shape, dtype=dtype, device=x.device)
            self.seen = torch.zeros(0, dtype=torch.bool, device=x.device)
        if tuple(self.bank.shape[1:]) != shape:
            raise ValueError(
                f"x has examples of shape {shape} but this regularizer's bank holds {tuple(self.bank.shape[1:])}; "
                "use one regularizer per dataset"
            )
        if self.bank.device != x.device:
            self.bank, self.seen = self.bank.to(x.device), self.seen.to(x.device)
        n = self.bank.shape[0]
        if needed > n:
            bank = torch.zeros(needed, *shape, dtype=self.bank.dtype, device=x.device)
            seen = torch.zeros(needed, dtype=torch.bool, device=x.device)
            bank[:n], seen[:n] = self.bank, self.seen
            self.bank, self.seen = bank, seen

    def _store(self, idx: torch.Tensor, v: torch.Tensor) -> None:
        with torch.no_grad():
            self.bank[idx] = v.detach().to(self.bank.dtype)
            self.seen[idx] = True

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # the bank's size is data-dependent: take the saved shape before copying into it
        for name in ("bank", "seen"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor):
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for name in ("bank", "seen"):  # a state saved before the bank existed: start with an empty one
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
                setattr(self, name, torch.zeros(0, dtype=getattr(self, name).dtype, device=getattr(self, name).device))

    def initial_vectors(self, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Start vectors (x's shape, unit l_p): the stored ones for examples seen before (warm
        starts), random ones for the others (all random without ``index``)."""
        return self._start(x, self._rows(index, x))

    def _start(self, x: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
        if idx is None:
            return random_unit(tuple(x.shape), self.p, dtype=x.dtype, device=x.device, generator=self.generator)
        warm = self.seen[idx]
        if bool(warm.all()):
            return self.bank[idx].to(x.dtype)
        v0 = torch.empty_like(x)
        v0[warm] = self.bank[idx[warm]].to(x.dtype)
        cold = ~warm
        gen_device = self.generator.device if self.generator is not None else x.device
        v0[cold] = random_unit((int(cold.sum()), *x.shape[1:]), self.p, dtype=x.dtype, device=gen_device,
                               generator=self.generator).to(x.device)
        return v0

    def remember(self, v: torch.Tensor, index: Optional[torch.Tensor]) -> None:
        """Store each example's direction for its next visit (``warm_start`` only)."""
        idx = self._rows(index, v)
        if idx is not None:
            self._store(idx, v)

    # -- explicit power iterations -----------------------------------------------------------

    def _ascend(self, v: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One ascent step of the direction along the gradient g: ``psi_{p*}(g)`` (infinite step:
        the power method), or PGA's ``Proj(v + step * psi_{p*}(g))`` onto the unit l_p ball and
        (with ``clip``) the box, so that ``x + eps v`` is the feasible PGA point."""
        ascent = duality_map(g, conjugate(self.p))
        if self.step == math.inf:
            return ascent
        v = project_lp_ball(v.to(ascent.dtype) + self.step * ascent, self.p, 1.0)
        if self.clip is None:
            return v
        return (clip_box(x + self.eps * v, self.clip) - x) / self.eps

    def _dual(self, jv: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(||J v||, u): the output norm of J v and its dual direction (``<u, J v> = ||J v||``):
        ``psi_q(J v)`` for the l_q output, ``H J v / ||J v||_H`` for the KL output."""
        if self.output == "logits":
            return lp_norm(jv, self.q), duality_map(jv, self.q)
        hjv = _fisher(logits, jv)
        norm = (jv * hjv).sum(dim=1).clamp_min(0).sqrt()
        return norm, hjv / norm.clamp_min(torch.finfo(jv.dtype).tiny).unsqueeze(1)

    def _iterate(self, net: nn.Module, x: torch.Tensor, v0: torch.Tensor, iters: int, measure: bool = True):
        """``iters`` (p, q) power iterations from v0 (eval mode, unwrapped model): (sigma, v, u).
        Without ``measure`` the last J v (only needed for sigma and u) is skipped: NaN sigma, u None."""
        if self.iteration == "fd":
            v = self._fd_iterate(net, x, v0, iters)
            if not measure:
                return torch.full((x.shape[0],), math.nan, dtype=x.dtype, device=x.device), v, None
            sigma, u = self._measure(net, x, v)
            return sigma.detach(), v, u.detach()
        with eval_mode(net), torch.enable_grad(), _no_autocast(x.device):
            lin = None if self.dynamic else linearize(net, x, self.route)
            if lin is not None and measure and self.output == "logits" and self.step == math.inf:
                sigma, v, u, _, _, _ = power_iteration(lin.matvec, lin.rmatvec, v0, self.p, self.q, iters=iters)
                return sigma.detach(), v.detach(), u.detach()
            v = v0
            for _ in range(iters):
                # dynamic: linearize inside the eps-ball, at the current direction's point
                at = lin if lin is not None else linearize(net, x + self.eps * v, self.route)
                v = self._ascend(v, at.rmatvec(self._dual(at.matvec(v), at.logits)[1]), x)
                del at
            if not measure:
                return torch.full((x.shape[0],), math.nan, dtype=x.dtype, device=x.device), v.detach(), None
            # u and sigma at x itself
            sigma, u = self._dual(lin.matvec(v), lin.logits) if lin is not None else self._measure(net, x, v)
        return sigma.detach(), v.detach(), u.detach()

    def _fd_iterate(self, net: nn.Module, x: torch.Tensor, v: torch.Tensor, iters: int) -> torch.Tensor:
        """``iters`` fd iterations from v: ``v <- psi_{p*}(grad_{x_p} fd(f(x), f(x_p)))`` at
        ``x_p = clip(x + eps v)`` (eval mode; with a finite ``step``, PGA's step). A row whose
        gradient is zero or not finite keeps its v."""
        with eval_mode(net), _no_autocast(x.device):
            with torch.no_grad():
                clean = net(x)
            with torch.enable_grad():
                for _ in range(iters):
                    x_p = clip_box(x + self.eps * v, self.clip).requires_grad_(True)
                    s, s_sq = self._fd_terms(clean, net(x_p))
                    # rows are independent (eval mode): the sum's gradient is each row's own
                    (g,) = torch.autograd.grad((s_sq if s_sq is not None else s).sum(), x_p)
                    ok = _usable_rows(g).view(-1, *[1] * (x.ndim - 1))
                    v = torch.where(ok, self._ascend(v, torch.nan_to_num(g), x), v)
        return v.detach()

    def _measure(self, net: nn.Module, x: torch.Tensor, v: torch.Tensor):
        """(sigma, u) = (||J v||, its dual direction) with no iteration."""
        with eval_mode(net), torch.enable_grad(), _no_autocast(x.device):
            lin = linearize(net, x, self.route)
            jv = lin.matvec(v).detach()
        return self._dual(jv, lin.logits)

    def _solve(self, net: nn.Module, x: torch.Tensor, index, free: bool, complete: bool):
        """Directions for the batch: (v, sigma, u, idx, iterations). Cold rows run ``iters``
        iterations, warm rows ``warm_iters`` (at least 1 without the free update). Unless
        ``complete`` (or in paper mode), sigma / u are left NaN / None where they would cost
        one more J v: the fd penalty's forward measures sigma anyway."""
        check_inputs(net, x)
        x = x.detach()
        idx = self._rows(index, x)
        v0 = self._start(x, idx)
        B = x.shape[0]
        iters = torch.full((B,), self.iters, dtype=torch.long, device=x.device)
        if idx is not None:
            iters[self.seen[idx]] = self.warm_iters if free else max(self.warm_iters, 1)
        v, u = v0, None
        sigma = torch.full((B,), math.nan, dtype=x.dtype, device=x.device)
        for k in torch.unique(iters).tolist():
            if k == 0 and not complete:
                continue
            rows = (iters == k).nonzero().squeeze(1)
            whole = rows.numel() == B  # one group: no gathers
            xs, vs = (x, v0) if whole else (x[rows], v0[rows])
            if k > 0:
                s, vk, uk = self._iterate(net, xs, vs, k, measure=complete or self.mode == "paper")
            else:
                vk, (s, uk) = vs, self._measure(net, xs, vs)
            if whole:
                v, sigma, u = vk, s, uk
                break
            if v is v0:
                v = v0.clone()
            v[rows], sigma[rows] = vk.to(v.dtype), s.to(sigma.dtype)
            if uk is not None:
                if u is None:
                    u = torch.full((B, uk.shape[1]), math.nan, dtype=uk.dtype, device=uk.device)
                u[rows] = uk
        if idx is not None:  # store what the explicit iterations found
            ran = iters > 0
            if bool(ran.all()):
                self._store(idx, v)
            elif bool(ran.any()):
                self._store(idx[ran], v[ran])
        return v.detach(), sigma, u, idx, int(iters.max())

    def direction(self, model: nn.Module, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> OperatorNormResult:
        """The explicit part of the direction solver (eval mode, unwrapped model, no weight
        gradients): ``iters`` iterations from a random start for examples without a stored
        direction, ``warm_iters`` from the stored one for the others (the free update needs
        the penalty's backward: use :meth:`joint` or ``forward`` for that).

        Returns an :class:`~opnorm.power.OperatorNormResult` with ``sigma`` (B,), ``v``
        (x's shape, unit l_p; in the unit ball with a finite ``step``), ``u`` (B, d) =
        psi_q(J(x) v) and ``iterations`` (the most any example ran); sets
        ``last_sigma``/``last_v``.
        """
        net = unwrap(model)
        v, sigma, u, _, k = self._solve(net, x, index, self._free_ok(net, index), complete=True)
        self.last_sigma, self.last_v = sigma, v
        flags = torch.zeros_like(sigma, dtype=torch.bool)
        return OperatorNormResult(sigma, v, u, k, flags, "power", flags.clone())

    # -- the free update ------------------------------------------------------------------

    def _free_ok(self, net: nn.Module, index) -> bool:
        return (self.free_update and self.warm_start and index is not None and self.penalty == "fd"
                and not mixes_examples(net))

    def _point(self, x: torch.Tensor, v: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
        """The fd point ``clip(x + eps v)``; with ``idx`` a leaf requiring grad whose gradient
        (from the caller's backward) becomes the next stored direction."""
        x = x.detach()
        x_p = clip_box(x + self.eps * v.to(x.dtype), self.clip)
        if idx is not None and torch.is_grad_enabled():
            x_p = x_p.detach().requires_grad_(True)
            x_p.register_hook(lambda g: self._absorb(idx, g, v, x))
        return x_p

    def _absorb(self, idx: torch.Tensor, g: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
        """Hook on the fd point: the ascent step of v along the penalty's input gradient is the
        next direction (one power iteration, or PGA's finite step); examples with a zero or
        non-finite gradient keep theirs."""
        with torch.no_grad():
            ok = _usable_rows(g)
            v = self._ascend(v, g, x)
            if bool(ok.all()):
                self._store(idx, v)
            elif bool(ok.any()):
                self._store(idx[ok], v[ok])

    # -- differentiable penalty ---------------------------------------------------------

    def _reduce(self, s: torch.Tensor, s_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-example s (B,) -> lam * mean(s or s^2), with the optional eps scale; ``s_sq``, when
        given, is s^2 computed without the square root (whose gradient is infinite at 0)."""
        if self.squared:
            value = s_sq if s_sq is not None else s * s
            return self.lam * (value * self.eps**2 if self.scale_by_eps else value).mean()
        return self.lam * (s * self.eps if self.scale_by_eps else s).mean()

    def _fd_terms(self, logits_clean: torch.Tensor, logits_pert: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(s, s^2 or None): the fd value per example, ``||f(x_p) - f(x)|| / eps`` in the output norm."""
        if self.output == "logits":
            return lp_norm(_full(logits_pert - logits_clean), self.q) / self.eps, None
        s_sq = 2 * _kl_rows(logits_clean, logits_pert).clamp_min(0) / self.eps**2
        if self.squared:  # the square root only for reporting sigma
            return s_sq.detach().sqrt(), s_sq
        return s_sq.clamp_min(torch.finfo(s_sq.dtype).tiny).sqrt(), None

    def fd_value(self, logits_clean: torch.Tensor, logits_pert: torch.Tensor) -> torch.Tensor:
        """The fd penalty from f(x) and f(x + eps v): ``lam * mean(||diff|| / eps)^(1|2)``."""
        return self._reduce(*self._fd_terms(logits_clean, logits_pert))

    def _finish(self, sigma: torch.Tensor, v: torch.Tensor, s: Optional[torch.Tensor]) -> None:
        if s is not None:  # rows without iterations: the fd value of this forward
            sigma = torch.where(torch.isnan(sigma), s.detach().to(sigma.dtype), sigma)
        self.last_sigma, self.last_v = sigma, v

    def exact_value(self, model: nn.Module, x: torch.Tensor, res: OperatorNormResult) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x), the exact penalty ``lam * mean <u, J v>^(1|2)``), one forward of model.

        ``J v`` is differentiable w.r.t. the weights: with a dummy w, ``g = J^T w`` is built
        with ``create_graph=True`` and ``J v = d<g, v>/dw`` (the double-backward trick).
        """
        xg = x.detach().requires_grad_(True)
        out = forward(model, xg)
        w = torch.zeros_like(out, requires_grad=True)
        (g,) = torch.autograd.grad(out, xg, grad_outputs=w, create_graph=True)
        (jv,) = torch.autograd.grad(g, w, grad_outputs=res.v.to(g.dtype), create_graph=True, allow_unused=True)
        if jv is None:  # the model is constant in x
            jv = torch.zeros_like(out) * out
        s = _full((res.u.to(jv.dtype) * jv).sum(dim=1))
        return out, self._reduce(s)

    def joint(
        self, model: nn.Module, x: torch.Tensor, index: Optional[torch.Tensor] = None, *, perturbed: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """(clean logits f(x), penalty) from a single forward of ``model``.

        fd: one forward of the batch ``[x; clip(x + eps v)]`` (2B examples); exact: one
        forward of x with x requiring grad. The caller computes its task loss on the returned
        logits, so a DDP-wrapped model sees exactly one forward per backward.

        ``perturbed=True`` (fd only) also returns the logits at the fd point,
        ``(f(x), penalty, f(clip(x + eps v)))``, for a task loss taken there (adversarial
        training with the power method's direction, at no extra forward). In fast mode the
        free update then follows the input gradient of the whole loss at that point.
        """
        net = unwrap(model)
        free = self._free_ok(net, index)
        exact = self.penalty == "exact"
        if perturbed and exact:
            raise ValueError("perturbed=True returns f(x + eps v) of the fd penalty's forward; penalty='exact' has none: use penalty='fd'")
        v, sigma, u, idx, k = self._solve(net, x, index, free, complete=exact)
        if exact:
            self._finish(sigma, v, None)
            flags = torch.zeros_like(sigma, dtype=torch.bool)
            return self.exact_value(model, x, OperatorNormResult(sigma, v, u, k, flags, "power", flags.clone()))
        B = x.shape[0]
        x_p = self._point(x, v, idx if free else None)
        out = model(torch.cat([x, x_p]))
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2 * B:
            raise ValueError(f"model output must be 2-D (B, d); got {getattr(out, 'shape', type(out).__name__)}")
        s, s_sq = self._fd_terms(out[:B], out[B:])
        self._finish(sigma, v, s)
        if perturbed:
            return out[:B], self._reduce(s, s_sq), out[B:]
        return out[:B], self._reduce(s, s_sq)

    def forward(
        self,
        model: nn.Module,
        x: torch.Tensor,
        index: Optional[torch.Tensor] = None,
        logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if logits is None or self.penalty == "exact":
            return self.joint(model, x, index)[1]
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"logits must be f(x) of shape (B, d) with B = {x.shape[0]}, got {tuple(logits.shape)}")
        net = unwrap(model)
        free = self._free_ok(net, index)
        v, sigma, _, idx, _ = self._solve(net, x, index, free, complete=False)
        pert = forward(model, self._point(x, v, idx if free else None))
        s, s_sq = self._fd_terms(logits, pert)
        self._finish(sigma, v, s)
        return self._reduce(s, s_sq)


# ----------------------------------------------------------------------------- global spectral norm


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
        self.iters = _check_pos_int(iters, "iters")
        self.lam = _check_nonneg(lam, "lam")
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

    def forward(self, model: Optional[nn.Module] = None) -> torch.Tensor:
        if model is not None and id(unwrap(model)) != self._net_id:
            raise ValueError("this GlobalSpectralNormRegularizer was built for another model; build one per model")
        return self.lam * torch.stack([_full(s) ** 2 for s in self.sigmas()]).sum()


# ----------------------------------------------------------------------------- adversarial training


class AdversarialTrainingLoss(nn.Module):
    """Batch loss of adversarial training, with clean and adversarial examples mixed.

    Kinds:
        * ``"ce"``: Madry et al. PGD-AT: PGD with the cross-entropy loss, then
          cross-entropy on the batch in which the first ``round(adv_fraction * B)``
          examples are replaced by their adversarial versions (batches are shuffled).
        * ``"logit"``: l_q-logit adversarial training, the left side of the theorem of
          PAPER.md section 4: ``CE(f(x), y) + lam * mean ||f(x + delta) - f(x)||_q^(1|2)``
          over the attacked examples, delta from PGD on that same logit loss. With matched
          eps and lam it equals ``OperatorNormRegularizer(..., scale_by_eps=True)`` inside
          the linear region (``lam * (eps sigma)^(1|2)``).
        * ``"trades"``: ``CE(f(x), y) + beta * mean KL(softmax f(x) || softmax f(x_adv))``
          over the attacked examples, x_adv from PGD on the KL loss.

    The attack (:func:`opnorm.attacks.pgd`) runs in eval mode on the unwrapped model
    without autocast; the training loss is one forward of the (possibly DDP-wrapped) model
    on the mixed batch (TRADES: ``[x; x_adv]``).

    Args:
        kind: one of ``"ce"``, ``"logit"``, ``"trades"``.
        eps: radius of the l_p ball (>= 0). p: its norm order.
        steps: PGD steps. step_size: per step (None: the attack's default, relative to eps).
        q: order of the logit loss (kind ``"logit"``).
        beta: TRADES weight (>= 0).
        lam: weight of the logit penalty (kind ``"logit"``, >= 0). squared: penalize the
            squared logit distance (the paper's d.d. SNR pairing) instead of the distance.
        adv_fraction: share of the batch that is attacked, in [0, 1] (1: Madry, 0.5: the
            paper's mix).
        random_start: start PGD at a random point of the ball. clip: the input box.

    Forward:
        ``loss_fn(model, x, y, index=None) -> scalar``.

    Example:
        >>> at = AdversarialTrainingLoss("ce", eps=0.1, p="inf", steps=10)
        >>> at(model, x, y).backward()
    """

    def __init__(
        self,
        kind: str = "ce",
        eps: float = 0.1,
        p: Order = math.inf,
        *,
        steps: int = 10,
        step_size: Optional[float] = None,
        q: Order = 2,
        beta: float = 6.0,
        lam: float = 1.0,
        squared: bool = True,
        adv_fraction: float = 1.0,
        random_start: bool = True,
        clip: Optional[tuple[float, float]] = (0.0, 1.0),
    ) -> None:
        super().__init__()
        if kind not in AT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(AT_KINDS)}, got {kind!r}")
        self.kind = kind
        self.eps = _check_nonneg(eps, "eps")
        self.p = norm_order(p, "p")
        self.q = norm_order(q, "q")
        self.steps = _check_pos_int(steps, "steps")
        self.step_size = None if step_size is None else _check_nonneg(step_size, "step_size")
        self.beta = _check_nonneg(beta, "beta")
        self.lam = _check_nonneg(lam, "lam")
        self.squared = bool(squared)
        frac = _check_nonneg(adv_fraction, "adv_fraction")
        if frac > 1:
            raise ValueError(f"adv_fraction must be in [0, 1], got {adv_fraction!r}")
        self.adv_fraction = frac
        self.random_start = bool(random_start)
        self.clip = clip

    def extra_repr(self) -> str:
        fmt = lambda r: "inf" if r == math.inf else f"{r:g}"  # noqa: E731
        return f"kind={self.kind!r}, eps={self.eps:g}, p={fmt(self.p)}, steps={self.steps}, adv_fraction={self.adv_fraction:g}"

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial versions of x (eval mode, no parameter gradients), detached."""
        from opnorm.attacks import pgd  # the attack layer sits beside this one

        loss = {"ce": "ce", "logit": "logit", "trades": "kl"}[self.kind]
        with _no_autocast(x.device):
            x_adv = pgd(
                model, x, y, eps=self.eps, p=self.p, loss=loss, q=self.q, steps=self.steps,
                step_size=self.step_size, random_start=self.random_start, clip=self.clip,
            )
        return x_adv.detach()

    def n_adversarial(self, batch: int) -> int:
        return int(math.floor(self.adv_fraction * batch + 0.5))

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        B = x.shape[0]
        m = self.n_adversarial(B)
        if m == 0 or self.eps == 0:
            return F.cross_entropy(forward(model, x), y)
        x_adv = self.attack(model, x[:m], y[:m])
        if self.kind in ("trades", "logit"):  # clean loss plus a term on the attacked examples
            out = forward(model, torch.cat([x, x_adv]))
            clean, adv = out[:B], out[B:]
            if self.kind == "logit":
                dist = lp_norm(_full(adv) - _full(clean[:m]), self.q)
                return F.cross_entropy(_full(clean), y) + self.lam * (dist**2 if self.squared else dist).mean()
            log_p = F.log_softmax(_full(clean[:m]), dim=1)
            log_q = F.log_softmax(_full(adv), dim=1)
            kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
            return F.cross_entropy(_full(clean), y) + self.beta * kl
        out = forward(model, torch.cat([x_adv, x[m:]]))
        return F.cross_entropy(_full(out), y)
