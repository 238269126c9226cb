"""Regularizers built from a :class:`~opnorm.training.config.TrainConfig`.

Example:
    >>> from opnorm.training.config import TrainConfig
    >>> from opnorm.training.objectives import opnorm_regularizer
    >>> reg = opnorm_regularizer(TrainConfig(method="opnorm").resolved(), num_examples=100)  # the training set's length
    >>> type(reg).__name__, reg.store.num_examples
    ('OperatorNormRegularizer', 100)
"""

from __future__ import annotations

import math

from opnorm.regularizers import (
    DirectionStore,
    ExactPenalty,
    FDPenalty,
    FisherKL,
    LogitNorm,
    OperatorNormRegularizer,
    PGASolver,
)
from opnorm.training.config import TrainConfig

__all__ = ["opnorm_regularizer"]


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
    )
