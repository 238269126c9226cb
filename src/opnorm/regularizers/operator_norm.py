"""Data-dependent (p, q) operator norm regularization, composed from parts (docs/theory.md).

``OperatorNormRegularizer`` = an output metric (:mod:`~opnorm.regularizers.metrics`) + a
direction solver (:class:`~opnorm.regularizers.solver.PGASolver`) + an optional per-example
:class:`~opnorm.regularizers.store.DirectionStore` + a penalty
(:mod:`~opnorm.regularizers.penalty`). Three ready configurations:

* :meth:`OperatorNormRegularizer.paper`: 10 power iterations per batch from random starts,
  nothing kept, the fd penalty of ``sigma^2``: the paper's d.d. SNR;
* :meth:`OperatorNormRegularizer.fast`: a store of directions; 3 iterations on an example's
  first visit, 1 on later ones, plus the free step of the training backward;
* :meth:`OperatorNormRegularizer.fast_robust`: the fast configuration with the KL metric,
  the dynamic solver and finite PGA steps of eps/4 (1 iteration cold, 2 warm).

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
    >>> from opnorm.regularizers import OperatorNormRegularizer
    >>> reg = OperatorNormRegularizer.paper(2, 2, eps=0.1, lam=0.02)
    >>> logits, pen = reg.joint(model, x)  # one forward of [x; x + eps v]
    >>> (F.cross_entropy(logits, y) + pen).backward()
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import nn

from opnorm.jacobian import check_inputs, forward, unwrap
from opnorm.norms import Order, norm_order, order_text
from opnorm.power import OperatorNormResult
from opnorm.regularizers.batchnorm import batch_norms, frozen_statistics, uses_batch_statistics
from opnorm.regularizers.metrics import FisherKL, LogitNorm, OutputMetric
from opnorm.regularizers.penalty import FDPenalty, Penalty
from opnorm.regularizers.solver import PGASolver, fd_point
from opnorm.regularizers.store import DirectionStore
from opnorm.validation import box, integer, number

__all__ = ["OperatorNormRegularizer", "mixes_examples", "BATCHNORM_WARMUP", "GROWTH_WARNING"]

# warmup=None: the ramp on a model with BatchNorm using batch statistics, in training calls
# (one epoch of the digits loop of docs/theory.md section 7, where it is measured).
BATCHNORM_WARMUP = 24
# sigma^2 this many times its first training call's: the optimizer's step is past the penalty's
# stability limit (SGD diverges along the penalty's curvature, docs/theory.md section 7).
GROWTH_WARNING = 1e3


def mixes_examples(model: nn.Module) -> bool:
    """True when one example's output depends on the others': BatchNorm using batch statistics
    (training mode, or no running statistics). The regularizer then measures the network with
    the clean batch's statistics (:mod:`~opnorm.regularizers.batchnorm`)."""
    return any(uses_batch_statistics(m) for m in unwrap(model).modules())


def _usable_rows(g: torch.Tensor) -> torch.Tensor:
    """(B,) rows of an input gradient that give a direction: finite and not all zero."""
    flat = g.reshape(g.shape[0], -1)
    return torch.isfinite(flat).all(dim=1) & (flat != 0).any(dim=1)


def _store(num_examples: int | None, parts: dict, factory: str) -> DirectionStore | None:
    """The factory's store of num_examples rows; None where ``parts`` replaces it (e.g. ``store=None``)."""
    if "store" in parts:
        return None
    if num_examples is None:
        raise TypeError(
            f"{factory}() keeps one direction per training example: pass num_examples=len(train_set), "
            "or store=None to run without a store"
        )
    return DirectionStore(num_examples)


def _check_part(part, kind: type, name: str, example: str) -> None:
    if part is not None and not isinstance(part, kind):
        raise TypeError(f"{name} must be an instance of {kind.__name__} (e.g. {example}), got {part!r}")


class Directions(NamedTuple):
    """The solver's result for one batch (:meth:`OperatorNormRegularizer.direction` and the penalty)."""

    v: torch.Tensor  # (B, *in) the directions, detached
    sigma: torch.Tensor  # (B,) ||J v||; NaN where it was not measured (see _solve)
    u: torch.Tensor | None  # (B, d) the dual directions, or None where not measured
    idx: torch.Tensor | None  # (B,) the store rows of the examples, or None without a store
    iterations: int  # the most iterations any example ran


class OperatorNormRegularizer(nn.Module):
    """Penalty ``lam * mean_b ||J(x_b)||_{p->q}^(1|2)`` from a direction solver and a penalty.

    Args:
        p, q: norm orders (1 <= p, q <= inf). q is the order of the default metric
            ``LogitNorm(q)``; with another ``metric`` it must equal ``metric.q``.
        eps: radius of the finite difference and of the dynamic solver (> 0 for the fd penalty).
        lam: weight (>= 0).
        metric: the output metric (default ``LogitNorm(q)``; ``FisherKL()`` needs q = 2).
        solver: the direction solver (default ``PGASolver(iters=10)``, the paper's).
        store: per-example directions between visits; every call then needs ``index`` (one
            without it is refused: it would store nothing and skip the free step).
        penalty: ``FDPenalty()`` (default) or ``ExactPenalty()``.
        clip: ``(lo, hi)``: keep the penalty's point ``x + eps v`` in the input box.
        warmup: W >= 0 training calls over which the weight ramps up: the k-th call with
            the model in training mode and gradients on uses ``lam * min(1, k / W)`` (0: lam
            from the first call). ``None`` (the default): ``BATCHNORM_WARMUP`` (24) calls on a
            model with BatchNorm using batch statistics, whose penalty at initialization can
            exceed the task loss many times over (:mod:`opnorm.regularizers.batchnorm`), and
            0 on any other. The count is in ``state_dict`` (key ``calls``, absent only with
            ``warmup=0``), so a resumed run continues the ramp.

    Warns (``RuntimeWarning``, once) when the mean sigma^2 of a training call exceeds
    ``GROWTH_WARNING`` (1e3) times the first training call's: the optimizer's step is then
    past the penalty's stability limit, and the run diverges; lower the learning rate or lam.

    Forward:
        ``reg(model, x, index=None, logits=None) -> scalar``; ``x``: (B, *in); ``index``: (B,)
        dataset indices (the store's rows); ``logits``: f(x) if the caller has it. Under DDP use
        :meth:`joint`: a single forward through the wrapper. With ``solver.free_update`` the
        next directions are stored during the caller's ``backward()``.

    Attributes:
        last_sigma: (B,) estimates of ``||J(x_b)||_{p->q}`` from the last call.
        last_v: (B, *in) the directions the penalty used.
    """

    def __init__(
        self,
        p: Order = 2,
        q: Order = 2,
        eps: float = 0.1,
        lam: float = 1.0,
        *,
        metric: OutputMetric | None = None,
        solver: PGASolver | None = None,
        store: DirectionStore | None = None,
        penalty: Penalty | None = None,
        clip: tuple[float, float] | None = None,
        warmup: int | None = None,
    ) -> None:
        super().__init__()
        _check_part(metric, OutputMetric, "metric", "LogitNorm(q) or FisherKL()")
        _check_part(solver, PGASolver, "solver", "PGASolver(iters=10)")
        _check_part(store, DirectionStore, "store", "DirectionStore(len(train_set))")
        _check_part(penalty, Penalty, "penalty", "FDPenalty() or ExactPenalty()")
        self.p, self.q = norm_order(p, "p"), norm_order(q, "q")
        self.metric = LogitNorm(self.q) if metric is None else metric
        if self.metric.q != self.q:
            raise ValueError(
                f"{self.metric!r} measures logit changes in an l_{self.metric.q:g} norm, but q={q!r}: "
                "pass q equal to the metric's"
            )
        self.eps, self.lam = number(eps, "eps"), number(lam, "lam")
        self.solver = PGASolver() if solver is None else solver
        self.penalty = FDPenalty() if penalty is None else penalty
        self.clip = box(clip)
        self.warmup = None if warmup is None else integer(warmup, "warmup")
        if self.warmup != 0:
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self._ramp = self.warmup or 0  # the warm-up of the last call's model (warmup=None: by its BatchNorm)
        self._first_level: float | None = None  # mean sigma^2 of the first training call (GROWTH_WARNING)
        self._check_parts()
        self.store = store
        if store is not None:
            store.configure(self.p, signs=self.p == math.inf and self.solver.step == math.inf)
        self.last_sigma: torch.Tensor | None = None
        self.last_v: torch.Tensor | None = None

    def _check_parts(self) -> None:
        if self.penalty.uses_point and self.eps == 0:
            raise ValueError("the fd penalty divides by eps; use eps > 0 or penalty=ExactPenalty()")
        if isinstance(self.metric, FisherKL) and not self.penalty.uses_point:
            raise ValueError("the KL metric is evaluated by finite differences: use penalty=FDPenalty()")
        if self.solver.step != math.inf and self.p not in (1.0, 2.0, math.inf):
            raise ValueError(
                f"a finite step projects onto the l_p ball, implemented for p in 1, 2, inf; got p={self.p:g}"
            )

    # The three configurations share one signature and the constructor's defaults
    # (p = q = 2, eps 0.1, lam 1.0); ``parts`` replace any part (metric, solver, store, penalty, clip).

    @classmethod
    def paper(
        cls,
        p: Order = 2,
        q: Order = 2,
        eps: float = 0.1,
        lam: float = 1.0,
        *,
        num_examples: int | None = None,
        **parts,
    ) -> OperatorNormRegularizer:
        """The paper's configuration: 10 power iterations per batch from random starts, no store
        (``num_examples`` is accepted for the shared signature and unused).

        Example:
            >>> from opnorm.regularizers import OperatorNormRegularizer
            >>> reg = OperatorNormRegularizer.paper("inf", 2, eps=0.1, lam=0.02)
            >>> reg.solver.iters, reg.store is None
            (10, True)
        """
        return cls(p, q, eps, lam, **{"solver": PGASolver(iters=10), **parts})

    @classmethod
    def fast(
        cls,
        p: Order = 2,
        q: Order = 2,
        eps: float = 0.1,
        lam: float = 1.0,
        *,
        num_examples: int | None = None,
        **parts,
    ) -> OperatorNormRegularizer:
        """Stored directions: 3 iterations on an example's first visit, 1 later, plus the free step.

        ``num_examples``: the training set's length (the store's rows; every call then needs
        ``index``); not needed with ``store=None``, which runs without a store.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from opnorm.regularizers import OperatorNormRegularizer
            >>> model, x = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), torch.rand(4, 8)
            >>> reg = OperatorNormRegularizer.fast("inf", 2, eps=0.1, lam=0.02, num_examples=100)
            >>> pen = reg(model, x, index=torch.tensor([0, 1, 2, 3]))  # rows 0-3 of the store
            >>> reg.store.seen[:5]
            tensor([ True,  True,  True,  True, False])
        """
        solver = PGASolver(3, 1, free_update=True)
        return cls(p, q, eps, lam, **{"solver": solver, "store": _store(num_examples, parts, "fast"), **parts})

    @classmethod
    def fast_robust(
        cls,
        p: Order = 2,
        q: Order = 2,
        eps: float = 0.1,
        lam: float = 1.0,
        *,
        num_examples: int | None = None,
        **parts,
    ) -> OperatorNormRegularizer:
        """The fast configuration with the KL metric (so q = 2), the dynamic solver, PGA steps of
        eps/4 (1 iteration cold, 2 warm) and the box [0, 1]; pair it with the task loss at
        ``x + eps v`` (``joint(..., perturbed=True)``). ``num_examples`` as in :meth:`fast`.
        The setting studied in docs/results/fast-at: ``p="inf", eps=0.1, lam=0.06``.

        Example:
            >>> from opnorm.regularizers import OperatorNormRegularizer
            >>> reg = OperatorNormRegularizer.fast_robust("inf", 2, eps=0.1, lam=0.06, num_examples=100)
            >>> reg.store.num_examples
            100
        """
        solver = PGASolver(1, 2, step=0.25, dynamic=True, free_update=True)
        return cls(
            p,
            q,
            eps,
            lam,
            **{
                "metric": FisherKL(),
                "solver": solver,
                "store": _store(num_examples, parts, "fast_robust"),
                "clip": (0.0, 1.0),
                **parts,
            },
        )

    def extra_repr(self) -> str:
        return (
            f"p={order_text(self.p)}, q={order_text(self.q)}, eps={self.eps:g}, lam={self.lam:g}, "
            f"metric={self.metric!r}, solver={self.solver!r}, penalty={self.penalty!r}, clip={self.clip}"
            + (", warmup=auto" if self.warmup is None else f", warmup={self.warmup}" if self.warmup else "")
        )

    # -- directions -----------------------------------------------------------------------

    def _rows(self, index, x: torch.Tensor) -> torch.Tensor | None:
        if self.store is None:
            return None
        if index is None:  # without it nothing would be stored and the free step would be skipped, silently
            raise ValueError(
                "this regularizer keeps one direction per training example (its DirectionStore) and needs "
                "index, the (B,) dataset indices of x: iterate an opnorm.IndexedTensorDataset (batches "
                "(x, y, index)); to run without the store, build the regularizer with store=None"
            )
        self.store.sync()
        return self.store.rows(index, x.shape[0], x.device)

    def _start(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(start vectors, warm mask): stored directions where seen, random unit ones elsewhere."""
        stored, warm = self.store.lookup(idx, x)
        if bool(warm.all()):
            return stored, warm
        cold = ~warm
        v0 = stored.clone()
        v0[cold] = self.solver.random_start(int(cold.sum()), x, self.p)
        return v0, warm

    def initial_vectors(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Start vectors (x's shape): stored ones where seen, random unit l_p ones elsewhere."""
        idx = self._rows(index, x)
        return self.solver.random_start(x.shape[0], x, self.p) if idx is None else self._start(x, idx)[0]

    def _iterations(self, warm: torch.Tensor, free: bool) -> torch.Tensor:
        iters = torch.full(warm.shape, self.solver.iters, dtype=torch.long, device=warm.device)
        iters[warm] = self.solver.warm_iters if free else max(self.solver.warm_iters, 1)
        return iters

    def _solve(self, net: nn.Module, x: torch.Tensor, index, free: bool, complete: bool) -> Directions:
        """The directions of x (:class:`Directions`). With a store, rows are grouped by their iteration
        count (cold / warm). Unless ``complete``, or without the free step, sigma / u stay NaN /
        None where they would cost one more J v (the fd forward measures sigma anyway)."""
        check_inputs(net, x)
        x = x.detach()
        with frozen_statistics(net, x):  # BatchNorm: the clean batch's statistics, as in the penalty's forward
            return self._solve_rows(net, x, index, free, complete)

    def _solve_rows(self, net: nn.Module, x: torch.Tensor, index, free: bool, complete: bool) -> Directions:
        idx = self._rows(index, x)
        if idx is None:  # nothing stored (the paper's configuration): iters iterations from random starts
            v0 = self.solver.random_start(x.shape[0], x, self.p)
            measure = complete or not self.solver.free_update
            sigma, v, u = self.solver.run(
                net, x, v0, self.solver.iters, self.p, self.eps, self.metric, self.clip, measure
            )
            return Directions(v, sigma, u, None, self.solver.iters)
        v0, warm = self._start(x, idx)
        iters = self._iterations(warm, free)
        measure = complete or not self.solver.free_update  # the free step's fd forward measures sigma anyway
        B = x.shape[0]
        v, u, sigma = v0, None, torch.full((B,), math.nan, dtype=x.dtype, device=x.device)
        for k in torch.unique(iters).tolist():
            if k == 0 and not complete:
                continue
            rows = (iters == k).nonzero().squeeze(1)
            whole = rows.numel() == B
            xs, vs = (x, v0) if whole else (x[rows], v0[rows])
            if k > 0:
                s, vk, uk = self.solver.run(net, xs, vs, k, self.p, self.eps, self.metric, self.clip, measure)
            else:
                vk, (s, uk) = vs, self.solver.measure(net, xs, vs, self.metric)
            if whole:
                v, sigma, u = vk, s, uk
                break
            v = v0.clone() if v is v0 else v
            v[rows], sigma[rows] = vk.to(v.dtype), s.to(sigma.dtype)
            if uk is not None:
                u = torch.full((B, uk.shape[1]), math.nan, dtype=uk.dtype, device=uk.device) if u is None else u
                u[rows] = uk
        if bool((iters > 0).any()):
            ran = iters > 0
            self.store.put(idx if bool(ran.all()) else idx[ran], v if bool(ran.all()) else v[ran])
        return Directions(v.detach(), sigma, u, idx, int(iters.max()))

    def direction(self, model: nn.Module, x: torch.Tensor, index: torch.Tensor | None = None) -> OperatorNormResult:
        """The explicit part of the solver (no weight gradients): an
        :class:`~opnorm.power.OperatorNormResult` with sigma (B,), v (x's shape), u (B, d) and
        ``iterations``; sets ``last_sigma`` / ``last_v``. The free step needs :meth:`joint`."""
        net = unwrap(model)
        d = self._solve(net, x, index, self._free_ok(net, index), complete=True)
        self.last_sigma, self.last_v = d.sigma, d.v
        flags = torch.zeros_like(d.sigma, dtype=torch.bool)
        return OperatorNormResult(d.sigma, d.v, d.u, d.iterations, flags, "power", flags.clone())

    # -- the free update ------------------------------------------------------------------

    def _free_ok(self, net: nn.Module, index) -> bool:
        return self.solver.free_update and self.store is not None and index is not None and self.penalty.uses_point

    def _point(self, x: torch.Tensor, v: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """``clip(x + eps v)``; with ``idx`` a leaf whose gradient (from the caller's backward)
        gives the next stored directions: one more PGA step of v."""
        x_p = fd_point(x, v, self.eps, self.clip)
        if idx is not None and torch.is_grad_enabled():
            x_p = x_p.detach().requires_grad_(True)
            x_p.register_hook(lambda g: self._absorb(idx, g, v, x.detach()))
        return x_p

    def _absorb(self, idx: torch.Tensor, g: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
        with torch.no_grad():
            ok = _usable_rows(g)
            v = self.solver.ascend(v, g, x, self.p, self.eps, self.clip)
            if bool(ok.any()):
                self.store.put(idx if bool(ok.all()) else idx[ok], v if bool(ok.all()) else v[ok])

    # -- the penalty ----------------------------------------------------------------------

    def ramp(self, model: nn.Module) -> int:
        """The warm-up W on ``model``: ``warmup``, or with ``warmup=None`` ``BATCHNORM_WARMUP``
        where the model mixes examples (BatchNorm using batch statistics) and 0 elsewhere.

        Example:
            >>> from torch import nn
            >>> from opnorm.regularizers import OperatorNormRegularizer
            >>> reg = OperatorNormRegularizer.paper("inf", 2, eps=0.1, lam=0.02)
            >>> reg.ramp(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))), reg.ramp(nn.Linear(4, 4))
            (24, 0)
        """
        if self.warmup is not None:
            return self.warmup
        return BATCHNORM_WARMUP if mixes_examples(model) else 0

    def weight(self, training: bool = False) -> float:
        """The weight of this call: lam, or during the warm-up ``lam * min(1, k / W)`` for the
        k-th training call (W: :meth:`ramp` of the last call's model; ``training``: the model is
        in training mode and gradients are on; such a call advances k)."""
        if self.warmup != 0 and training and torch.is_grad_enabled():
            self.calls += 1
        if not self._ramp:
            return self.lam
        return self.lam * min(1.0, max(int(self.calls), 1) / self._ramp)

    def _weigh(self, net: nn.Module, sigma: torch.Tensor) -> float:
        """The weight of a call on net (advancing the warm-up), after checking sigma's growth."""
        training = net.training and torch.is_grad_enabled()
        self._ramp = self.ramp(net)
        if training:
            self._watch(sigma)
        return self.weight(training)

    def _watch(self, sigma: torch.Tensor) -> None:
        if self._first_level == math.inf:  # warned already
            return
        level = float(sigma.detach().double().square().mean())
        if self._first_level is None:
            self._first_level = level
        elif not level <= GROWTH_WARNING * self._first_level:  # also NaN
            warnings.warn(
                f"the operator-norm penalty is diverging: mean sigma^2 {level:.3g} against {self._first_level:.3g} "
                f"at the first training call; the optimizer's step exceeds the penalty's stability limit (lam="
                f"{self.lam:g}): lower the learning rate or lam, or use Adam (docs/theory.md section 7)",
                RuntimeWarning,
                stacklevel=4,
            )
            self._first_level = math.inf

    def _finish(self, sigma: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None) -> None:
        if s is not None:  # rows without iterations: the fd value of this forward
            sigma = torch.where(torch.isnan(sigma), s.detach().to(sigma.dtype), sigma)
        self.last_sigma, self.last_v = sigma, v

    def joint(
        self, model: nn.Module, x: torch.Tensor, index: torch.Tensor | None = None, *, perturbed: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """(f(x), penalty) from a single forward of ``model``; with ``perturbed=True`` (fd only)
        also f(clip(x + eps v)), for a task loss taken at the penalty's point."""
        net = unwrap(model)
        free = self._free_ok(net, index)
        if perturbed and not self.penalty.uses_point:
            raise ValueError(
                "perturbed=True returns f(x + eps v) of the fd penalty's forward; the exact penalty has none"
            )
        d = self._solve(net, x, index, free, complete=not self.penalty.uses_point)
        x_p = self._point(x, d.v, d.idx if free else None) if self.penalty.uses_point else None
        terms = self.penalty.evaluate(model, x, x_p, d.v, d.u, self.metric, self.eps)
        self._finish(d.sigma, d.v, terms.s if self.penalty.uses_point else None)
        value = self.penalty.reduce(terms.s, terms.s_sq, self._weigh(net, self.last_sigma), self.eps)
        return (terms.clean, value, terms.pert) if perturbed else (terms.clean, value)

    def fd_value(self, logits_clean: torch.Tensor, logits_pert: torch.Tensor) -> torch.Tensor:
        """The penalty from f(x) and f(x + eps v) computed by the caller (at the current
        weight; it does not advance the warm-up)."""
        return self.penalty.reduce(*self.metric.fd(logits_clean, logits_pert, self.eps), self.weight(), self.eps)

    def forward(
        self,
        model: nn.Module,
        x: torch.Tensor,
        index: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if logits is None or not self.penalty.uses_point:
            return self.joint(model, x, index)[1]
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"logits must be f(x) of shape (B, d) with B = {x.shape[0]}, got {tuple(logits.shape)}")
        net = unwrap(model)
        if batch_norms(net):
            raise ValueError(
                "with BatchNorm in training mode f(x + eps v) must be normalized with the clean "
                "batch's statistics in the same forward: call reg.joint(model, x, index), not logits="
            )
        free = self._free_ok(net, index)
        d = self._solve(net, x, index, free, complete=False)
        s, s_sq = self.metric.fd(logits, forward(model, self._point(x, d.v, d.idx if free else None)), self.eps)
        self._finish(d.sigma, d.v, s)
        return self.penalty.reduce(s, s_sq, self._weigh(net, self.last_sigma), self.eps)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        if hasattr(self, "calls") and prefix + "calls" not in state_dict:
            # saved without a warm-up (warmup=0, or before it existed): the run used lam in full, and goes on so
            state_dict[prefix + "calls"] = torch.tensor(torch.iinfo(torch.long).max // 2)
        # states saved before the store existed keep "bank" / "seen" (rows up to the largest index seen)
        if prefix + "bank" in state_dict and self.store is not None:
            bank, seen = state_dict.pop(prefix + "bank"), state_dict.pop(prefix + "seen")
            n, total = seen.shape[0], self.store.num_examples
            if n > total:
                raise ValueError(f"the saved directions cover {n} examples, more than this store's {total}")
            state_dict[prefix + "store.seen"] = torch.cat([seen, seen.new_zeros(total - n)])
            pad = bank.new_zeros(total - n, *bank.shape[1:])
            state_dict[prefix + "store.directions"] = torch.cat([bank, pad]) if bank.numel() else bank
            state_dict[prefix + "store._extra_state"] = {
                "p": None,
                "signs": bank.dtype == torch.int8,
                "num_examples": total,
            }
        super()._load_from_state_dict(state_dict, prefix, *args)

    def sync(self) -> None:
        """Share the store's updates across DDP ranks (call on every rank before a checkpoint)."""
        if self.store is not None:
            self.store.sync()
