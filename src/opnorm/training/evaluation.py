"""Evaluation of a model during and after training: clean and robust accuracy, operator norms.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
    >>> from opnorm.training.evaluation import accuracy, mean_operator_norm, robust_accuracy
    >>> clean, robust = accuracy(model, x, y), robust_accuracy(model, x, y, eps=0.1, p="inf")
    >>> 0 <= robust <= clean <= 1
    True
    >>> mean_operator_norm(model, x, p="inf", q=2) > 0
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from opnorm.attacks import PGD_ORDERS
from opnorm.evaluation import PGDAttack, clean_correct, evaluate
from opnorm.jacobian import unwrap
from opnorm.power import operator_norm
from opnorm.training.config import TrainConfig

__all__ = ["accuracy", "robust_accuracy", "mean_operator_norm", "evaluate_epoch"]


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> float:
    """Fraction of (x, y) classified correctly, in eval mode (x, y on any device; moved to the model's)."""
    return int(clean_correct(model, x, y, batch_size).sum()) / max(1, x.shape[0])


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    p: Any,
    steps: int = 20,
    restarts: int = 1,
    loss: str = "ce",
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    progress: bool = False,
    best_iterate: bool = True,
    schedule: str = "constant",
) -> float:
    """Accuracy under :class:`opnorm.attacks.EvalPGD` (eval mode), batched; eps = 0 gives clean accuracy.

    The accuracy of :class:`opnorm.evaluation.PGDAttack` alone in :func:`opnorm.evaluation.evaluate`:
    an example counts as robust only if no point of the attack's path fools the model
    (``best_iterate``, as APGD scores; False: only the last iterate of each run counts).
    ``schedule``: the step-size schedule of :class:`~opnorm.attacks.EvalPGD` ("halving" is stronger).
    ``generator``: draws the random starts, its stream going on (None: torch's global generator).
    ``progress`` shows a bar over the batches (on stderr).
    """
    atk = PGDAttack(
        steps=steps,
        restarts=restarts,
        loss=loss,
        step_size=step_size,
        schedule=schedule,
        seed=None,
        generator=generator,
        batch_size=batch_size,
        best_iterate=best_iterate,
    )
    return evaluate(model, x, y, eps=[eps], p=p, attacks=[atk], every_example=True, progress=progress).accuracy(
        "pgd", eps
    )


def mean_operator_norm(
    model: nn.Module,
    x: torch.Tensor,
    p: Any,
    q: Any,
    *,
    iters: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> float:
    """Mean over x of ``||J(x)||_{p->q}`` (:func:`opnorm.power.operator_norm`, method "auto")."""
    net = unwrap(model)
    device = next(net.parameters()).device
    total = 0.0
    for s in _batches(x.shape[0], batch_size):
        res = operator_norm(net, x[s].to(device), p, q, iters=iters, generator=generator)
        total += float(res.sigma.sum())
    return total / max(1, x.shape[0])


def evaluate_epoch(
    model: nn.Module, splits, cfg: TrainConfig, epoch: int, device: torch.device, show: bool = False
) -> dict[str, float]:
    """The check after ``epoch``: clean accuracy on the whole test split, PGD robust accuracy (None
    for an l_p ball PGD does not attack) and the mean operator norm on its first ``cfg.eval_points``
    examples, as ``{"accuracy", "robust_accuracy", "operator_norm"}``."""
    # Own generators: evaluation never draws from the training RNG streams.
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + epoch + 1)
    xs, ys = splits.test.x[: cfg.eval_points], splits.test.y[: cfg.eval_points]
    out = {"accuracy": accuracy(model, splits.test.x, splits.test.y)}
    out["robust_accuracy"] = None  # PGD has no other l_p ball (the trainer says so once)
    if cfg.p in PGD_ORDERS:
        out["robust_accuracy"] = robust_accuracy(
            model, xs, ys, eps=cfg.eps, p=cfg.p, steps=cfg.eval_steps, generator=gen, progress=show
        )
    out["operator_norm"] = mean_operator_norm(model, xs, cfg.p, cfg.q, iters=cfg.norm_iters, generator=gen)
    return out
