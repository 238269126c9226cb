"""The paper's own training setup as options of :class:`~opnorm.training.config.TrainConfig`:
the multi-margin task loss, adversarial examples appended to the batch, and a fixed input range.

* :func:`task_loss`: the per-batch task loss by name ("ce" or "multi-margin").
* :class:`AppendedAdversarialLoss`: PGD with the cross-entropy on the first
  ``round(share * B)`` examples, appended to the batch; the task loss on ``[x; x_adv]``.
* :func:`input_normalization`: the (mean, std) of the model's ``Normalize`` layer.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
    >>> from opnorm.training.paper_setup import AppendedAdversarialLoss, task_loss
    >>> loss = AppendedAdversarialLoss(task_loss("multi-margin"), share=0.75, eps=0.875, p=2, steps=10, step_size=0.175)
    >>> loss(model, x, y).backward()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from opnorm.attacks import pgd
from opnorm.jacobian import forward, unwrap
from opnorm.norms import order_text

__all__ = ["task_loss", "AppendedAdversarialLoss", "input_normalization"]

TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def task_loss(name: str) -> TaskLoss:
    """``(logits (B, d), y (B,)) -> scalar``: "ce" (cross-entropy) or "multi-margin"
    (``F.multi_margin_loss``, margin 1, p 1: the paper's code's ``nn.MultiMarginLoss``), batch mean.

    Example:
        >>> import torch
        >>> from opnorm.training.paper_setup import task_loss
        >>> task_loss("multi-margin")(torch.zeros(2, 3), torch.tensor([0, 1]))
        tensor(0.6667)
    """
    if name == "ce":
        return F.cross_entropy
    if name == "multi-margin":
        return F.multi_margin_loss
    raise ValueError(f"unknown train_loss {name!r}; valid: ce, multi-margin")


class AppendedAdversarialLoss(nn.Module):
    """PGD adversarial training with adversarial examples appended to the batch.

    The first ``round(share * B)`` examples (batches are shuffled) are attacked by
    :func:`opnorm.attacks.pgd` with the cross-entropy (eval mode, random start, box [0, 1]);
    the loss is ``task(f([x; x_adv]), [y; y_adv])``, one forward of the model as trained.

    Args:
        task: the training loss, e.g. :func:`task_loss`. share: in (0, 1].
        eps, p: the attack's l_p ball. steps: PGD steps. step_size: per step (None: the
            attack's default 2.5 eps / steps).
    """

    def __init__(
        self, task: TaskLoss, share: float, eps: float, p: float, *, steps: int = 10, step_size: float | None = None
    ) -> None:
        super().__init__()
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        self.task, self.share, self.eps, self.p = task, float(share), float(eps), p
        self.steps, self.step_size = int(steps), step_size

    def extra_repr(self) -> str:
        return f"share={self.share:g}, eps={self.eps:g}, p={order_text(self.p)}, steps={self.steps}"

    def forward(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        k = round(self.share * x.shape[0])
        if k > 0:
            with torch.autocast(x.device.type, enabled=False):
                x_adv = pgd(
                    unwrap(net),
                    x[:k],
                    y[:k],
                    eps=self.eps,
                    p=self.p,
                    loss="ce",
                    steps=self.steps,
                    step_size=self.step_size,
                    random_start=True,
                ).detach()
            x, y = torch.cat([x, x_adv]), torch.cat([y, y[:k]])
        return self.task(forward(net, x).float(), y)


def input_normalization(input_range: Sequence[float] | None, mean: Sequence[float], std: Sequence[float]):
    """(mean, std) for the model's ``Normalize``: the data's statistics, or with
    ``input_range = [lo, hi]`` the affine map of [0, 1] onto [lo, hi] (mean -lo / (hi - lo),
    std 1 / (hi - lo) per channel).

    Example:
        >>> from opnorm.training.paper_setup import input_normalization
        >>> input_normalization([-1, 1], (0.4,), (0.2,))  # x -> 2 x - 1
        ((0.5,), (0.5,))
    """
    if input_range is None:
        return mean, std
    lo, hi = (float(v) for v in input_range)
    c = len(mean)
    return (-lo / (hi - lo),) * c, (1.0 / (hi - lo),) * c
