"""Adversarial training objectives: PGD-AT, l_q-logit AT (the theorem's left side) and TRADES.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
    >>> from opnorm.regularizers import AdversarialTrainingLoss
    >>> at = AdversarialTrainingLoss("ce", eps=0.1, p="inf", steps=10)
    >>> at(model, x, y).backward()
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from opnorm.attacks import pgd
from opnorm.jacobian import forward, unwrap
from opnorm.losses import full, kl_rows, logit_loss
from opnorm.norms import Order, lp_norm, norm_order, order_text
from opnorm.regularizers.batchnorm import clean_statistics
from opnorm.regularizers.solver import no_autocast
from opnorm.validation import box, integer, number

__all__ = ["AdversarialTrainingLoss", "AT_KINDS"]

AT_KINDS = ("ce", "logit", "trades")


class AdversarialTrainingLoss(nn.Module):
    """Batch loss of adversarial training, with clean and adversarial examples mixed.

    Kinds:
        * ``"ce"``: Madry et al. PGD-AT: PGD with the cross-entropy loss, then
          cross-entropy on the batch in which the first ``round(adv_fraction * B)``
          examples are replaced by their adversarial versions (batches are shuffled).
        * ``"logit"``: l_q-logit adversarial training, the left side of the theorem of
          docs/theory.md: ``CE(f(x), y) + lam * mean ||f(x + delta) - f(x)||_q^(1|2)``
          over the attacked examples, delta from PGD on that same logit loss. With matched
          eps and lam it equals ``OperatorNormRegularizer(..., scale_by_eps=True)`` inside
          the linear region (``lam * (eps sigma)^(1|2)``).
        * ``"trades"``: ``CE(f(x), y) + lam * mean KL(softmax f(x) || softmax f(x_adv))``
          over the attacked examples, x_adv from PGD on the KL loss (``lam`` is TRADES' beta).

    The attack (:func:`opnorm.attacks.pgd`) runs in eval mode on the unwrapped model
    without autocast; the training loss is one forward of the (possibly DDP-wrapped) model
    on the mixed batch (``"ce"``: its own batch statistics, Madry's) or on ``[x; x_adv]``
    (``"logit"``, ``"trades"``: BatchNorm normalizes x_adv with the clean batch's statistics and
    updates its running statistics from x only, :mod:`~opnorm.regularizers.batchnorm`).

    Args:
        kind: one of ``"ce"``, ``"logit"``, ``"trades"``.
        eps: radius of the l_p ball (>= 0). p: its norm order.
        steps: PGD steps. step_size: per step (None: the attack's default, relative to eps).
        q: order of the logit loss (kind ``"logit"``).
        lam: weight of the logit penalty (kind ``"logit"``) or of the KL term (``"trades"``,
            TRADES' beta), >= 0; None: 1 (logit), 6 (trades). squared: penalize the squared
            logit distance (the paper's d.d. SNR pairing) instead of the distance.
        adv_fraction: share of the batch that is attacked, in [0, 1] (1: Madry, 0.5: the
            paper's mix).
        clip: the input box. PGD starts at a random point of the ball (Madry et al.).

    Forward:
        ``loss_fn(model, x, y, index=None) -> scalar``.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> from opnorm.regularizers import AdversarialTrainingLoss
        >>> at = AdversarialTrainingLoss("trades", eps=0.1, p="inf", steps=3)
        >>> loss = at(model, x, y)
        >>> loss.shape, loss.requires_grad
        (torch.Size([]), True)
        >>> loss.backward()
    """

    def __init__(
        self,
        kind: str = "ce",
        eps: float = 0.1,
        p: Order = math.inf,
        *,
        steps: int = 10,
        step_size: float | None = None,
        q: Order = 2,
        lam: float | None = None,
        squared: bool = True,
        adv_fraction: float = 1.0,
        clip: tuple[float, float] | None = (0.0, 1.0),
    ) -> None:
        super().__init__()
        if kind not in AT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(AT_KINDS)}, got {kind!r}")
        self.kind = kind
        self.eps = number(eps, "eps")
        self.p = norm_order(p, "p")
        self.q = norm_order(q, "q")
        self.steps = integer(steps, "steps", lo=1)
        self.step_size = None if step_size is None else number(step_size, "step_size", strict=True, finite=False)
        self.lam = number((6.0 if kind == "trades" else 1.0) if lam is None else lam, "lam")
        self.squared = bool(squared)
        frac = number(adv_fraction, "adv_fraction")
        if frac > 1:
            raise ValueError(f"adv_fraction must be in [0, 1], got {adv_fraction!r}")
        self.adv_fraction = frac
        self.clip = box(clip)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, eps={self.eps:g}, p={order_text(self.p)}, steps={self.steps}, "
            f"adv_fraction={self.adv_fraction:g}"
        )

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial versions of x (eval mode, no parameter gradients), detached."""
        loss = {"ce": "ce", "logit": logit_loss(self.q), "trades": "kl"}[self.kind]
        with no_autocast(x.device):
            x_adv = pgd(
                model,
                x,
                y,
                eps=self.eps,
                p=self.p,
                loss=loss,
                steps=self.steps,
                step_size=self.step_size,
                random_start=True,
                clip=self.clip,
            )
        return x_adv.detach()

    def n_adversarial(self, batch: int) -> int:
        return int(math.floor(self.adv_fraction * batch + 0.5))

    def forward(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        B = x.shape[0]
        m = self.n_adversarial(B)
        if m == 0 or self.eps == 0:
            return F.cross_entropy(forward(model, x), y)
        x_adv = self.attack(model, x[:m], y[:m])
        if self.kind in ("trades", "logit"):  # clean loss plus a term on the attacked examples
            with clean_statistics(unwrap(model), B, B + m):  # BatchNorm: x_adv normalized as the clean batch
                out = forward(model, torch.cat([x, x_adv]))
            clean, adv = out[:B], out[B:]
            if self.kind == "logit":
                dist = lp_norm(full(adv) - full(clean[:m]), self.q)
                return F.cross_entropy(full(clean), y) + self.lam * (dist**2 if self.squared else dist).mean()
            return F.cross_entropy(full(clean), y) + self.lam * kl_rows(clean[:m], adv).mean()
        out = forward(model, torch.cat([x_adv, x[m:]]))
        return F.cross_entropy(full(out), y)
