"""Every training method as an objective, and the table that builds them.

An objective is an ``nn.Module`` called as ``objective(net, x, y, index) -> (loss, logs)``:
``net`` is the model as trained (DDP / compiled wrappers included), ``x`` a batch in [0, 1],
``y`` its labels, ``index`` the examples' positions in the training set (the fast opnorm mode
keys its direction store by it), ``loss`` a scalar to backpropagate and ``logs`` a dict of
floats that the trainer averages over the epoch. The trainer calls that and nothing else.

:data:`METHODS` maps each method name to its :class:`Method`: the builder of its objective,
the method options it reads (the others are refused by
:meth:`~opnorm.training.config.TrainConfig.resolved` when set) and the validation that fills
the defaults of what it reads. Adding a method is one entry. The losses and regularizers the
objectives are built on are library pieces: :class:`~opnorm.regularizers.AdversarialTrainingLoss`,
:class:`~opnorm.regularizers.OperatorNormRegularizer`,
:class:`~opnorm.regularizers.GlobalSpectralNormRegularizer`, the single-step losses of
:mod:`opnorm.fast_at` and the paper's :class:`~opnorm.training.paper_setup.AppendedAdversarialLoss`.

State that a resumed run needs (the direction store, the spectral-norm vectors, free AT's
perturbation) is in the objective's ``state_dict()`` under ``reg.`` (regularizers) or ``at.``
(adversarial losses); :meth:`Objective.sync` shares it across DDP ranks.

Example:
    >>> from opnorm.training.config import TrainConfig
    >>> from opnorm.training.objectives import opnorm_regularizer
    >>> reg = opnorm_regularizer(TrainConfig(method="opnorm").resolved(), num_examples=100)  # the training set's length
    >>> type(reg).__name__, reg.store.num_examples
    ('OperatorNormRegularizer', 100)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from opnorm.fast_at import FREE_DEFAULT_REPLAYS, FREE_DEFAULT_STEP, SINGLE_STEP_DEFAULTS, FreeATLoss, SingleStepATLoss
from opnorm.jacobian import forward
from opnorm.regularizers import (
    AdversarialTrainingLoss,
    DirectionStore,
    ExactPenalty,
    FDPenalty,
    FisherKL,
    GlobalSpectralNormRegularizer,
    LogitNorm,
    OperatorNormRegularizer,
    PGASolver,
)
from opnorm.training.paper_setup import AppendedAdversarialLoss, TaskLoss, task_loss
from opnorm.validation import integer

if TYPE_CHECKING:  # config.py imports this module for METHODS
    from opnorm.training.config import TrainConfig

__all__ = [
    "Objective",
    "TaskObjective",
    "OperatorNormObjective",
    "GlobalSNRObjective",
    "AdversarialObjective",
    "Method",
    "METHODS",
    "build_objective",
    "opnorm_regularizer",
]

PGD_ORDERS = (1.0, 2.0, math.inf)  # the l_p balls that the attacks' steps and projections implement


# ----------------------------------------------------------------------------- the protocol


class Objective(nn.Module):
    """The per-batch training loss of one method: ``objective(net, x, y, index) -> (loss, logs)``.

    Subclasses implement :meth:`terms`, which returns the loss and the values to log as
    tensors; ``forward`` turns the logged values into floats. Every objective does exactly
    one training forward through ``net`` (attacks and power iterations run on the plain
    module besides).

    Attributes:
        divergence_hint: advice added to the message of a run whose loss became non-finite.
    """

    divergence_hint: str | None = None

    def terms(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, logs = self.terms(net, x, y, index)
        return loss, {k: float(v.detach().mean()) for k, v in logs.items()}

    def sync(self) -> None:
        """Share state across DDP ranks (the direction store, free AT's per-rank deltas); every rank calls it."""
        for part in self.children():
            if callable(getattr(part, "sync", None)):
                part.sync()


class TaskObjective(Objective):
    """clean: the task loss ``task(f(x), y)`` (cross-entropy, or the paper's multi-margin loss)."""

    def __init__(self, task: TaskLoss) -> None:
        super().__init__()
        self.task = task

    def terms(self, net, x, y, index):
        return self.task(forward(net, x).float(), y), {}


class OperatorNormObjective(Objective):
    """opnorm: ``task(f(x), y) + lam * mean sigma^(1|2)`` from one forward of ``[x; x + eps v]``
    (:meth:`OperatorNormRegularizer.joint`, given the batch's dataset ``index``: in fast mode the
    backward of this loss also advances each example's stored direction). With
    ``perturbed=True`` the task loss is taken at ``x + eps v``, the penalty's point.

    Logs ``penalty`` and ``train_sigma`` (the batch's mean estimated operator norm).
    """

    def __init__(self, reg: OperatorNormRegularizer, task: TaskLoss, *, perturbed: bool = False) -> None:
        super().__init__()
        self.reg, self.task, self.perturbed = reg, task, bool(perturbed)

    def terms(self, net, x, y, index):
        if self.perturbed:  # the task loss where the penalty looks: f(x + eps v) from the same forward
            _, pen, logits = self.reg.joint(net, x, index, perturbed=True)
        else:
            logits, pen = self.reg.joint(net, x, index)
        return self.task(logits.float(), y) + pen, {"penalty": pen, "train_sigma": self.reg.last_sigma}


class GlobalSNRObjective(Objective):
    """global-snr: ``task(f(x), y) + lam * sum_l sigma(W_l)^2`` (Yoshida & Miyato); logs ``penalty``."""

    def __init__(self, reg: GlobalSpectralNormRegularizer, task: TaskLoss, divergence_hint: str | None = None) -> None:
        super().__init__()
        self.reg, self.task, self.divergence_hint = reg, task, divergence_hint

    def terms(self, net, x, y, index):
        pen = self.reg()
        return self.task(forward(net, x).float(), y) + pen, {"penalty": pen}


class AdversarialObjective(Objective):
    """A loss module ``at(net, x, y, index) -> scalar`` as an objective: pgd-at, logit-at, trades
    (:class:`AdversarialTrainingLoss`), pgd-at with appended examples, fgsm-rs, n-fgsm and free
    (the trainer replays each minibatch ``replays`` times for it, :func:`~opnorm.training.config.replays_per_batch`)."""

    def __init__(self, at: nn.Module) -> None:
        super().__init__()
        self.at = at

    def terms(self, net, x, y, index):
        return self.at(net, x, y, index), {}


# ----------------------------------------------------------------------------- the table

Builder = Callable[["TrainConfig", nn.Module, "int | None"], Objective]


@dataclass(frozen=True)
class Method:
    """One training method.

    Attributes:
        build: ``build(cfg, model, num_examples) -> Objective`` for a resolved config
            (``model``: the plain module; ``num_examples``: the training set's length).
        reads: the settings it reads beyond the threat model (p, eps) and the shared ones: method
            options (:data:`opnorm.training.config.METHOD_OPTIONS`; ``"opnorm"`` for the whole
            ``opnorm`` section; a config that sets another one is refused) and ``"q"`` where its
            penalty measures the logits in l_q.
        resolve: ``resolve(cfg)`` validates what the method reads and fills its defaults, in place.
        notes: why a method option is ignored, where the plain "applies to ... only" needs more.
    """

    build: Builder
    reads: tuple[str, ...] = ()
    resolve: Callable[[TrainConfig], None] = lambda cfg: None
    notes: dict[str, str] = field(default_factory=dict)


def _task(cfg: TrainConfig) -> TaskLoss:
    return task_loss(cfg.train_loss)


def _lam(by_squared: dict[bool, float]) -> Callable[[TrainConfig], None]:
    def fill(cfg: TrainConfig) -> None:
        if cfg.lam is None:
            cfg.lam = by_squared[bool(cfg.squared)]

    return fill


def _attack_order(cfg: TrainConfig) -> None:
    if cfg.p not in PGD_ORDERS:
        raise ValueError(f"adversarial training attacks need p in 1, 2, inf, got {cfg.p:g}")


def _both(*steps: Callable[[TrainConfig], None]) -> Callable[[TrainConfig], None]:
    def run(cfg: TrainConfig) -> None:
        for step in steps:
            step(cfg)

    return run


def _adversarial(kind: str) -> Builder:
    def build(cfg: TrainConfig, model: nn.Module, num_examples: int | None) -> Objective:
        return AdversarialObjective(
            AdversarialTrainingLoss(
                kind,
                cfg.eps,
                cfg.p,
                steps=cfg.steps,
                step_size=cfg.step_size,
                q=cfg.q,
                lam=cfg.beta if kind == "trades" else cfg.lam,
                squared=cfg.squared,
                adv_fraction=cfg.adv_fraction,
            )
        )

    return build


def _pgd_at(cfg: TrainConfig, model: nn.Module, num_examples: int | None) -> Objective:
    if cfg.adv_append > 0:  # the paper's batch: adversarial examples appended
        return AdversarialObjective(
            AppendedAdversarialLoss(
                _task(cfg), cfg.adv_append, cfg.eps, cfg.p, steps=cfg.steps, step_size=cfg.step_size
            )
        )
    return _adversarial("ce")(cfg, model, num_examples)


def _resolve_pgd_at(cfg: TrainConfig) -> None:
    _attack_order(cfg)
    if cfg.train_loss != "ce" and cfg.adv_append == 0:
        raise ValueError(f"train_loss {cfg.train_loss} with pgd-at needs adv_append > 0 (the paper's appended batch)")
    if cfg.adv_append > 0 and cfg.adv_fraction != 1:
        raise ValueError(
            "adv_fraction is ignored with adv_append > 0 (pgd-at then appends adversarial examples instead of "
            "replacing a share of the batch): drop one of them"
        )


def opnorm_regularizer(cfg: TrainConfig, num_examples: int | None) -> OperatorNormRegularizer:
    """The d.d. operator norm regularizer that ``cfg`` (resolved, method opnorm) describes.

    ``cfg.opnorm`` picks the parts: the metric (output), the solver (iters, warm_iters, step,
    dynamic, free_update), the store (fast mode: one direction per training example, so
    ``num_examples`` is the training set's length), the penalty (penalty, squared,
    scale_by_eps) and the box (clip).
    """
    o = cfg.opnorm
    fast = o.mode == "fast"
    if fast and num_examples is None:
        raise ValueError("the fast opnorm mode keeps one direction per training example: pass num_examples")
    metric = FisherKL() if o.output == "kl" else LogitNorm(cfg.q)
    solver = PGASolver(
        o.iters,
        o.warm_iters,
        step=math.inf if o.step is None else o.step,
        dynamic=o.dynamic,
        free_update=fast and o.free_update,
    )
    penalty = (FDPenalty if o.penalty == "fd" else ExactPenalty)(squared=cfg.squared, scale_by_eps=o.scale_by_eps)
    return OperatorNormRegularizer(
        cfg.p,
        cfg.q,
        cfg.eps,
        cfg.lam,
        metric=metric,
        solver=solver,
        penalty=penalty,
        store=DirectionStore(num_examples) if fast else None,
        clip=(0.0, 1.0) if o.clip else None,
        warmup=o.warmup,
    )


def _opnorm(cfg: TrainConfig, model: nn.Module, num_examples: int | None) -> Objective:
    return OperatorNormObjective(
        opnorm_regularizer(cfg, num_examples), _task(cfg), perturbed=cfg.opnorm.task == "perturbed"
    )


def _resolve_opnorm(cfg: TrainConfig) -> None:
    cfg.opnorm = cfg.opnorm.resolved()
    o = cfg.opnorm
    if o.output == "kl" and cfg.q != 2:
        raise ValueError("opnorm.output kl is a 2-norm (the softmax's Fisher metric): use q 2")
    if o.penalty == "fd" and cfg.eps == 0:
        raise ValueError(
            "method opnorm with penalty fd needs eps > 0 (it divides by eps); or use --opnorm-penalty exact"
        )
    if o.step not in (None, math.inf) and cfg.p not in PGD_ORDERS:
        raise ValueError(
            f"opnorm.step projects onto the l_p ball, implemented for p in 1, 2, inf; got p {cfg.p:g} "
            "(leave opnorm.step unset for the power method)"
        )
    if o.penalty == "exact" and cfg.compile is not False:
        raise ValueError(
            "penalty exact needs double backward, which torch.compile does not support; drop --compile "
            "or use --opnorm-penalty fd"
        )


def _global_snr(cfg: TrainConfig, model: nn.Module, num_examples: int | None) -> Objective:
    hint = None
    if cfg.optimizer == "sgd" and cfg.momentum > 0:  # momentum overshoots as the top singular direction switches
        hint = f"lower --lam (global SNR with lam {cfg.lam:g} and momentum {cfg.momentum:g} overshoots)"
    reg = GlobalSpectralNormRegularizer(model, iters=cfg.iters, lam=cfg.lam, seed=cfg.seed)
    return GlobalSNRObjective(reg, _task(cfg), divergence_hint=hint)


def _resolve_global_snr(cfg: TrainConfig) -> None:
    if cfg.lam is None:
        cfg.lam = 0.01
    cfg.iters = integer(1 if cfg.iters is None else cfg.iters, "iters", lo=1)


def _single_step(cfg: TrainConfig, model: nn.Module, num_examples: int | None) -> Objective:
    return AdversarialObjective(SingleStepATLoss(cfg.method, cfg.eps, cfg.p, step=cfg.fgsm_step, start=cfg.fgsm_start))


def _fast_at_checks(cfg: TrainConfig) -> None:
    if cfg.p not in PGD_ORDERS:
        raise ValueError(f"method {cfg.method} takes l_p steps for p in 1, 2, inf, got p {cfg.p:g}")
    if cfg.eps == 0:
        raise ValueError(f"method {cfg.method} needs eps > 0 (its steps are fractions of eps)")


def _resolve_single_step(cfg: TrainConfig) -> None:
    _fast_at_checks(cfg)
    start, step, _ = SINGLE_STEP_DEFAULTS[cfg.method]
    cfg.fgsm_start = start if cfg.fgsm_start is None else cfg.fgsm_start
    cfg.fgsm_step = step if cfg.fgsm_step is None else cfg.fgsm_step


def _free(cfg: TrainConfig, model: nn.Module, num_examples: int | None) -> Objective:
    return AdversarialObjective(FreeATLoss(cfg.eps, cfg.p, step=cfg.fgsm_step))


def _resolve_free(cfg: TrainConfig) -> None:
    _fast_at_checks(cfg)
    cfg.fgsm_step = FREE_DEFAULT_STEP if cfg.fgsm_step is None else cfg.fgsm_step
    cfg.replays = FREE_DEFAULT_REPLAYS if cfg.replays is None else cfg.replays
    if cfg.epochs % cfg.replays:
        lo, hi = (cfg.epochs // cfg.replays) * cfg.replays, (cfg.epochs // cfg.replays + 1) * cfg.replays
        raise ValueError(
            f"method free makes epochs / replays passes over the data: epochs ({cfg.epochs}) must be a "
            f"multiple of replays ({cfg.replays}), e.g. {f'{lo} or {hi}' if lo else hi}"
        )


# Default penalty weights by ``squared``: opnorm multiplies sigma^2 or sigma; logit-at the (squared)
# logit distance ||f(x + delta) - f(x)||_q^(2|1), which is eps^(2|1) sigma^(2|1) in the linear region
# (as opnorm with scale_by_eps); global-snr (0.01) the sum of squared layer spectral norms.
_PGD = ("steps", "step_size", "adv_fraction")
_WHOLE_BATCH = "attacks the whole batch: adv_fraction applies to pgd-at, logit-at and trades only"

METHODS: dict[str, Method] = {
    "clean": Method(lambda cfg, model, n: TaskObjective(_task(cfg)), reads=("train_loss",)),
    "pgd-at": Method(_pgd_at, reads=(*_PGD, "adv_append", "train_loss"), resolve=_resolve_pgd_at),
    "logit-at": Method(
        _adversarial("logit"),
        reads=(*_PGD, "q", "lam", "squared"),
        resolve=_both(_attack_order, _lam({True: 0.1, False: 0.3})),
    ),
    "opnorm": Method(
        _opnorm,
        reads=("q", "lam", "squared", "opnorm", "train_loss"),
        resolve=_both(_lam({True: 0.02, False: 0.3}), _resolve_opnorm),
        notes={"iters": "iters sets global-snr's power iterations; for opnorm use opnorm.iters (--opnorm-iters)"},
    ),
    "global-snr": Method(_global_snr, reads=("lam", "iters", "train_loss"), resolve=_resolve_global_snr),
    "trades": Method(
        _adversarial("trades"),
        reads=(*_PGD, "beta"),
        resolve=_attack_order,
        notes={"lam": "trades weighs its KL term with beta (--beta), not lam"},
    ),
    "fgsm-rs": Method(
        _single_step,
        reads=("fgsm_step", "fgsm_start"),
        resolve=_resolve_single_step,
        notes={"adv_fraction": f"method fgsm-rs {_WHOLE_BATCH}"},
    ),
    "free": Method(
        _free,
        reads=("fgsm_step", "replays"),
        resolve=_resolve_free,
        notes={
            "fgsm_start": "method free has no random start (its perturbation carries over between replays)",
            "adv_fraction": f"method free {_WHOLE_BATCH}",
        },
    ),
    "n-fgsm": Method(
        _single_step,
        reads=("fgsm_step", "fgsm_start"),
        resolve=_resolve_single_step,
        notes={"adv_fraction": f"method n-fgsm {_WHOLE_BATCH}"},
    ),
}


def build_objective(cfg: TrainConfig, model: nn.Module, num_examples: int | None = None) -> Objective:
    """The objective of ``cfg.method`` (``cfg`` resolved) for ``model`` (the plain module);
    ``num_examples``: the training set's length (the fast opnorm mode keeps a direction per example).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from opnorm.training.config import TrainConfig
        >>> from opnorm.training.objectives import build_objective
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> objective = build_objective(TrainConfig(method="trades", eps=0.1, steps=2).resolved(), model)
        >>> loss, logs = objective(model, torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]), None)
        >>> loss.shape
        torch.Size([])
    """
    return METHODS[cfg.method].build(cfg, model, num_examples)
