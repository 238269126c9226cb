"""Adversarial losses on logits, one value per example.

Every loss has the signature ``loss(logits_adv, logits_clean, y) -> (B,)``:

* ``logits_adv``: (B, d) logits of the perturbed inputs (differentiable);
* ``logits_clean``: (B, d) logits of the clean inputs, computed once per attack and
  detached (``None`` is passed to losses that do not need them);
* ``y``: (B,) integer labels, or the targets of a targeted attack (``None`` for losses
  that do not need labels).

The attack maximizes ``sum_b loss_b``; examples are independent, so the gradient of the
sum gives every example its own gradient.

Built-in losses (:data:`LOSSES`):

* ``"ce"``: softmax cross-entropy ``-log softmax(f(x+delta))_y`` (Madry-style PGD).
* ``"cw"``: the logit margin ``max_{j != y} f_j(x+delta) - f_y(x+delta)`` (Carlini-Wagner
  margin loss without the clamp); positive exactly when the example is misclassified.
* ``"logit"``: ``||f(x+delta) - f(x)||_q``, the loss of the operator-norm theorem.
  Its gradient at ``delta = 0`` is undefined, so attacks with it need a nonzero start.
* ``"kl"``: ``KL(softmax f(x) || softmax f(x+delta))`` (TRADES / VAT), clean
  probabilities detached. Its gradient vanishes at ``delta = 0``.

Loss objects (:class:`LossSpec`) carry what an attack needs to know about a loss: whether it
needs labels or the clean logits, and how success is judged. :func:`logit_loss` sets the q of
the logit loss; :func:`targeted` turns a label loss into a targeted one (the attack then
minimizes the loss toward the targets).

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
    >>> from opnorm.losses import logit_loss
    >>> spec = logit_loss(q=2)
    >>> delta = 0.01 * torch.randn_like(x)
    >>> spec.fn(model(x + delta), model(x).detach(), None).shape  # (B,)
    torch.Size([4])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opnorm.norms import Order, norm_order

__all__ = [
    "LossFn",
    "LossSpec",
    "LOSSES",
    "cross_entropy",
    "cw_margin",
    "logit_distance",
    "kl_divergence",
    "kl_rows",
    "full",
    "get_loss",
    "logit_loss",
    "targeted",
]

LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def cross_entropy(logits_adv: torch.Tensor, logits_clean: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """Per-example softmax cross-entropy of the perturbed logits against labels y: (B,)."""
    return F.cross_entropy(logits_adv, y, reduction="none")


def cw_margin(logits_adv: torch.Tensor, logits_clean: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """Per-example logit margin ``max_{j != y} z_j - z_y`` of the perturbed logits: (B,).

    > 0 exactly when the example is misclassified (ties aside).
    """
    true = logits_adv.gather(1, y.unsqueeze(1)).squeeze(1)
    # mask the true class with -inf so that the max runs over the other classes only
    others = logits_adv.masked_fill(F.one_hot(y, logits_adv.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - true


def logit_distance(
    logits_adv: torch.Tensor, logits_clean: torch.Tensor, y: torch.Tensor | None = None, q: Order = 2
) -> torch.Tensor:
    """Per-example ``||f(x+delta) - f(x)||_q``: (B,).

    Inside a linear region its gradient in delta is ``J^T psi_q(J delta)``, the
    power-method step; at delta = 0 the gradient is undefined (autograd returns 0).
    """
    return torch.linalg.vector_norm(logits_adv - logits_clean.detach(), ord=norm_order(q, "q"), dim=1)


def full(t: torch.Tensor) -> torch.Tensor:
    """Half-precision values (autocast) in float32 for a loss or reduction; other dtypes unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def kl_rows(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-example ``KL(softmax(logits_p) || softmax(logits_q))`` (B,), differentiable in both;
    half-precision logits are reduced in float32."""
    log_p = F.log_softmax(full(logits_p), dim=1)
    log_q = F.log_softmax(full(logits_q), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def kl_divergence(logits_adv: torch.Tensor, logits_clean: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example ``KL(softmax(clean) || softmax(adv))`` with the clean side detached: (B,)."""
    return kl_rows(logits_clean.detach(), logits_adv)


@dataclass(frozen=True)
class LossSpec:
    """A resolved attack loss.

    Attributes:
        fn: the per-example loss ``(logits_adv, logits_clean, y) -> (B,)``.
        name: the built-in name, or ``"callable"``.
        needs_labels: y must be given (ce, cw).
        needs_clean: the clean logits must be computed (logit, kl, callables).
        zero_gradient_at_start: the gradient at delta = 0 is undefined or zero (logit, kl),
            so an attack started at delta = 0 cannot move.
        labelled_success: the loss says whether the example is fooled (ce, cw), so that
            restarts can prefer misclassified points.
        targeted: ``fn`` is the negated loss toward targets y (see :func:`targeted`): an example
            is fooled when it is classified as its target.
    """

    fn: LossFn
    name: str
    needs_labels: bool
    needs_clean: bool
    zero_gradient_at_start: bool
    labelled_success: bool
    targeted: bool = False


def _logit_fn(q: float) -> LossFn:
    def fn(logits_adv, logits_clean, y=None):
        return logit_distance(logits_adv, logits_clean, y, q)

    return fn


def _negated(fn: LossFn) -> LossFn:
    def neg(logits_adv, logits_clean, y):
        return -fn(logits_adv, logits_clean, y)

    return neg


LOSSES: tuple[str, ...] = ("ce", "cw", "logit", "kl")


def logit_loss(q: Order = 2) -> LossSpec:
    """The logit loss ``||f(x + delta) - f(x)||_q`` of the operator-norm theorem (``"logit"`` is q = 2).

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> from opnorm.losses import logit_loss
        >>> opnorm.pgd(model, x, eps=0.1, p=2, loss=logit_loss("inf"), clip=None).shape
        torch.Size([4, 8])
    """
    return LossSpec(_logit_fn(norm_order(q, "q")), "logit", False, True, True, False)


def targeted(loss: str | LossFn | LossSpec) -> LossSpec:
    """The targeted version of a label loss (``"ce"``, ``"cw"`` or a callable): the attack then
    minimizes the loss toward the targets it is given as y (the loss is negated, so that
    maximizing it descends toward the targets), and an example counts as fooled when it is
    classified as its target.

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> from opnorm.losses import targeted
        >>> targets = (y + 1) % 3
        >>> x_adv = opnorm.pgd(model, x, targets, eps=0.1, loss=targeted("ce"))
        >>> x_adv.shape
        torch.Size([4, 8])
    """
    spec = get_loss(loss)
    if spec.targeted:
        raise ValueError("the loss is already targeted; pass it as is")
    if not spec.needs_labels and spec.name != "callable":
        raise ValueError(f"a targeted loss needs a label loss ('ce', 'cw' or a callable), got loss={spec.name!r}")
    return LossSpec(
        _negated(spec.fn),
        spec.name,
        needs_labels=True,
        needs_clean=spec.needs_clean,
        zero_gradient_at_start=spec.zero_gradient_at_start,
        labelled_success=spec.labelled_success,
        targeted=True,
    )


def get_loss(loss: str | LossFn | LossSpec) -> LossSpec:
    """Resolve a loss name (one of :data:`LOSSES`), a user callable or a :class:`LossSpec` into a
    :class:`LossSpec` (returned as is).

    Args:
        loss: ``"ce"``, ``"cw"``, ``"logit"`` (q = 2; :func:`logit_loss` for another q), ``"kl"``,
            a callable ``(logits_adv, logits_clean, y) -> (B,)``, or a :class:`LossSpec`
            (:func:`logit_loss`, :func:`targeted`). A callable always receives the clean
            logits and receives y as given to the attack (possibly None).

    Example:
        >>> import torch
        >>> from opnorm.losses import get_loss
        >>> spec = get_loss("cw")
        >>> spec.needs_labels, spec.fn(torch.randn(4, 3), None, torch.tensor([0, 1, 2, 0])).shape
        (True, torch.Size([4]))
    """
    if isinstance(loss, LossSpec):
        return loss
    if callable(loss) and not isinstance(loss, str):
        return LossSpec(
            loss, "callable", needs_labels=False, needs_clean=True, zero_gradient_at_start=False, labelled_success=False
        )
    if not isinstance(loss, str):
        raise TypeError(
            f"loss must be one of {LOSSES}, a callable (logits_adv, logits_clean, y) -> (B,) or a LossSpec, "
            f"got {type(loss).__name__}"
        )
    name = loss.strip().lower()
    if name == "ce":
        return LossSpec(cross_entropy, "ce", True, False, False, True)
    if name == "cw":
        return LossSpec(cw_margin, "cw", True, False, False, True)
    if name == "logit":
        return logit_loss(2)
    if name == "kl":
        return LossSpec(kl_divergence, "kl", False, True, True, False)
    raise ValueError(
        f"unknown loss {loss!r}; valid names are {', '.join(repr(n) for n in LOSSES)}, or pass a callable "
        "(logits_adv, logits_clean, y) -> (B,)"
    )
