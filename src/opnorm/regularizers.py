"""Training objectives: data-dependent operator norm regularization, global spectral norm
regularization, and adversarial training (PGD-AT, l_q-logit AT, TRADES).

Every term is an ``nn.Module`` added to the task loss, e.g.::

    >>> reg = OperatorNormRegularizer(p=2, q=2, eps=0.1, lam=0.01)
    >>> loss = F.cross_entropy(model(x), y) + reg(model, x)

How the (p, q) operator norm penalty is computed (PAPER.md section 4):

1. **Power method, no weight gradients.** ``iters`` steps of the (p, q) power method on
   J(x) in eval mode (BatchNorm uses running statistics; every example has its own J),
   on the unwrapped model, with autocast disabled. It gives the direction ``v`` (unit
   l_p), ``u = psi_q(J v)`` and ``sigma = ||J v||_q``, a lower bound on ``||J(x)||_{p->q}``
   (:attr:`OperatorNormRegularizer.last_sigma`).
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

from opnorm.jacobian import Linearization, check_inputs, eval_mode, forward, unwrap
from opnorm.norms import Order, conjugate, duality_map, lp_norm, norm_order
from opnorm.power import OperatorNormResult, power_iteration, random_unit

__all__ = [
    "PENALTIES",
    "AT_KINDS",
    "OperatorNormRegularizer",
    "GlobalSpectralNormRegularizer",
    "AdversarialTrainingLoss",
]

PENALTIES = ("fd", "exact")
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


# ----------------------------------------------------------------------------- d.d. operator norm


class OperatorNormRegularizer(nn.Module):
    """Data-dependent (p, q) operator norm penalty ``lam * mean_b ||J(x_b)||_{p->q}^(1|2)``.

    Args:
        p, q: norm orders (1 <= p, q <= inf; float, int or "inf"). (2, 2) is the spectral norm.
        eps: the radius of the finite difference / the dynamic power method (>= 0;
            ``penalty="fd"`` needs eps > 0).
        iters: power iterations per batch (>= 1).
        penalty: ``"fd"`` (finite difference, the paper's code) or ``"exact"`` (``<u, J v>``
            by double backward). See the module docstring for what equals what.
        squared: penalize ``sigma^2`` (the paper's d.d. SNR) instead of ``sigma``.
        lam: weight (>= 0).
        dynamic: the paper code's variant in which power iteration k linearizes at
            ``x + eps * v_{k-1}`` instead of at x (the point moves inside the eps-ball, as
            PGA iterates do beyond the linear region). u, sigma are then taken at x.
        scale_by_eps: multiply the per-example ``s`` by eps (the adversarial logit-loss scale).
        warm_start: start each example's power method from its last ``v`` (needs the
            ``index`` argument; vectors kept in memory on the CPU, not in ``state_dict``).
        generator: seeds the random start vectors (default: the global RNG).

    Forward:
        ``reg(model, x, index=None, logits=None) -> scalar``. ``x``: (B, *in) inputs;
        ``index``: (B,) dataset indices (for per-example state such as warm starts);
        ``logits``: the clean logits f(x) the caller already computed (fd then needs only
        one more forward, of ``x + eps v``; ignored by ``penalty="exact"``, which needs a
        forward of x with x requiring grad). Under DDP use :meth:`joint`, which does a
        single forward through the wrapper.

    Attributes:
        last_sigma: (B,) power-method estimates of ``||J(x_b)||_{p->q}`` from the last call.
        last_v: (B, *in) their directions.

    Example:
        >>> reg = OperatorNormRegularizer(p=2, q=2, eps=0.1, lam=0.01)
        >>> logits, pen = reg.joint(model, x)          # one forward for loss and penalty
        >>> loss = F.cross_entropy(logits, y) + pen
        >>> reg.last_sigma.mean()
    """

    def __init__(
        self,
        p: Order = 2,
        q: Order = 2,
        eps: float = 0.1,
        *,
        iters: int = 10,
        penalty: str = "fd",
        squared: bool = True,
        lam: float = 1.0,
        dynamic: bool = False,
        scale_by_eps: bool = False,
        warm_start: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        self.p = norm_order(p, "p")
        self.q = norm_order(q, "q")
        self.eps = _check_nonneg(eps, "eps")
        self.iters = _check_pos_int(iters, "iters")
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {', '.join(PENALTIES)}, got {penalty!r}")
        self.penalty = penalty
        if penalty == "fd" and self.eps == 0:
            raise ValueError("penalty='fd' divides by eps; use eps > 0 or penalty='exact'")
        self.lam = _check_nonneg(lam, "lam")
        self.squared = bool(squared)
        self.dynamic = bool(dynamic)
        self.scale_by_eps = bool(scale_by_eps)
        self.warm_start = bool(warm_start)
        self.generator = generator
        self._bank: dict[int, torch.Tensor] = {}
        self.last_sigma: Optional[torch.Tensor] = None
        self.last_v: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        fmt = lambda r: "inf" if r == math.inf else f"{r:g}"  # noqa: E731
        return (
            f"p={fmt(self.p)}, q={fmt(self.q)}, eps={self.eps:g}, iters={self.iters}, penalty={self.penalty!r}, "
            f"squared={self.squared}, lam={self.lam:g}, dynamic={self.dynamic}"
        )

    # -- power method -------------------------------------------------------------------

    def initial_vectors(self, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Start vectors (x's shape, unit l_p): random, or the stored ones with ``warm_start``."""
        v0 = random_unit(tuple(x.shape), self.p, dtype=x.dtype, device=x.device, generator=self.generator)
        if self.warm_start and index is not None:
            for row, i in enumerate(index.tolist()):
                stored = self._bank.get(int(i))
                if stored is not None:
                    v0[row] = stored.to(device=x.device, dtype=x.dtype)
        return v0

    def remember(self, v: torch.Tensor, index: Optional[torch.Tensor]) -> None:
        """Keep each example's direction for the next visit (``warm_start`` only)."""
        if self.warm_start and index is not None:
            cpu = v.detach().cpu()
            for row, i in enumerate(index.tolist()):
                self._bank[int(i)] = cpu[row].clone()

    def direction(self, model: nn.Module, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> OperatorNormResult:
        """Run the power method (eval mode, unwrapped model, no weight gradients).

        Returns an :class:`~opnorm.power.OperatorNormResult` with ``sigma`` (B,), ``v``
        (x's shape, unit l_p) and ``u`` (B, d) = psi_q(J(x) v); sets ``last_sigma``/``last_v``.
        """
        net = unwrap(model)
        check_inputs(net, x)
        x = x.detach()
        v0 = self.initial_vectors(x, index)
        with eval_mode(net), torch.enable_grad(), _no_autocast(x.device):
            if not self.dynamic:
                lin = Linearization(net, x)
                sigma, v, u, k, converged, _ = power_iteration(lin.matvec, lin.rmatvec, v0, self.p, self.q, iters=self.iters)
            else:
                p_star = conjugate(self.p)
                v = v0
                for _ in range(self.iters):
                    moved = Linearization(net, x + self.eps * v)  # linearize inside the eps-ball
                    u = duality_map(moved.matvec(v), self.q)
                    v = duality_map(moved.rmatvec(u), p_star)
                    del moved
                jv = Linearization(net, x).matvec(v)  # u and sigma at x itself
                sigma, u, k = lp_norm(jv, self.q), duality_map(jv, self.q), self.iters
                converged = torch.zeros_like(sigma, dtype=torch.bool)
        v, u, sigma = v.detach(), u.detach(), sigma.detach()
        self.last_sigma, self.last_v = sigma, v
        self.remember(v, index)
        exact = torch.zeros_like(converged)
        return OperatorNormResult(sigma, v, u, k, converged, "power", exact)

    # -- differentiable penalty ---------------------------------------------------------

    def _reduce(self, s: torch.Tensor) -> torch.Tensor:
        """Per-example s (B,) -> lam * mean(s or s^2), with the optional eps scale."""
        if self.scale_by_eps:
            s = s * self.eps
        if self.squared:
            s = s * s
        return self.lam * s.mean()

    def fd_value(self, logits_clean: torch.Tensor, logits_pert: torch.Tensor) -> torch.Tensor:
        """The fd penalty from f(x) and f(x + eps v): ``lam * mean(||diff||_q / eps)^(1|2)``."""
        diff = _full(logits_pert - logits_clean)
        return self._reduce(lp_norm(diff, self.q) / self.eps)

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
        self, model: nn.Module, x: torch.Tensor, index: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean logits f(x), penalty) from a single forward of ``model``.

        fd: one forward of the batch ``[x; x + eps v]`` (2B examples); exact: one forward
        of x with x requiring grad. The caller computes its task loss on the returned
        logits, so a DDP-wrapped model sees exactly one forward per backward.
        """
        res = self.direction(model, x, index)
        if self.penalty == "exact":
            return self.exact_value(model, x, res)
        B = x.shape[0]
        out = model(torch.cat([x, x + self.eps * res.v.to(x.dtype)]))
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2 * B:
            raise ValueError(f"model output must be 2-D (B, d); got {getattr(out, 'shape', type(out).__name__)}")
        return out[:B], self.fd_value(out[:B], out[B:])

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
        res = self.direction(model, x, index)
        pert = forward(model, x + self.eps * res.v.to(x.dtype))
        return self.fd_value(logits, pert)


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
