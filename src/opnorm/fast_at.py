"""Fast adversarial training: single-step attacks instead of PGD's ten.

Three methods, each one objective built on :func:`opnorm.norms.pga_step` (the steepest-ascent
direction, the projection onto the l_p ball and the pixel box) and the cross-entropy of
:mod:`opnorm.losses`:

* ``"fgsm-rs"`` (Wong, Rice and Kolter, "Fast is better than free", ICLR 2020): a random start
  uniform in the ball of radius ``start * eps``, one step of length ``step * eps`` (defaults 1
  and 1.25) projected back onto the eps ball and the box, then the cross-entropy there. One
  forward-backward for the step, one for the weights.
* ``"n-fgsm"`` (de Jorge et al., "Make some noise", NeurIPS 2022): noise of radius ``start *
  eps`` (default 2), a step of ``step * eps`` (default 1) and *no* projection back onto the eps
  ball (only the box): the larger noise and the unprojected step avoid FGSM's catastrophic
  overfitting at large eps, at FGSM-RS's cost. Chosen over GradAlign (Andriushchenko and
  Flammarion, NeurIPS 2020), which fixes the same failure with a gradient-alignment penalty
  that needs double backpropagation (about 3x FGSM's cost, no ``torch.compile``) and a weight
  to tune per eps.
* ``"free"`` (Shafahi et al., "Adversarial training for free!", NeurIPS 2019): each minibatch
  is replayed ``replays`` times (default 4) in a row, one optimizer step each; a perturbation
  delta is carried across replays and minibatches and advanced by one step of ``step * eps``
  (default 1) with the input gradient of the *same* backward that gives the weight gradient,
  so an attack step costs nothing extra.

Budget of free in :class:`~opnorm.training.config.TrainConfig`: ``epochs`` counts optimizer
steps in epochs, as for every other method; free makes ``epochs / replays`` passes over the
data (``epochs`` must be a multiple of ``replays``), so a free run and a FGSM-RS run with the
same ``epochs`` take the same number of optimizer steps. The run's metrics hold one line per
pass (see :func:`opnorm.training.config.data_passes`).

The attack step of fgsm-rs and n-fgsm runs in eval mode without autocast, as the PGD attack of
:class:`~opnorm.regularizers.AdversarialTrainingLoss`; free has no separate attack forward.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
    >>> from opnorm.fast_at import FreeATLoss, SingleStepATLoss
    >>> loss_fn = SingleStepATLoss("fgsm-rs", eps=0.1, p="inf")
    >>> loss_fn(model, x, y).backward()
    >>> free = FreeATLoss(eps=0.1, p="inf")
    >>> for _ in range(4):  # the same batch, replayed (an optimizer step after each backward)
    ...     model.zero_grad()
    ...     free(model, x, y).backward()  # the backward also moves free.delta
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from opnorm.attacks import random_in_ball
from opnorm.jacobian import check_inputs, eval_mode, forward, unwrap
from opnorm.losses import cross_entropy, full
from opnorm.norms import Order, into_box, norm_order, order_text, pga_step
from opnorm.training.distributed import group_rank, group_size
from opnorm.validation import number

__all__ = [
    "FAST_AT_METHODS",
    "SINGLE_STEP_DEFAULTS",
    "FREE_DEFAULT_STEP",
    "FREE_DEFAULT_REPLAYS",
    "SingleStepATLoss",
    "FreeATLoss",
    "Replayed",
]

FAST_AT_METHODS = ("fgsm-rs", "free", "n-fgsm")
# kind -> (start radius, step length, project onto the eps ball), radii as fractions of eps
SINGLE_STEP_DEFAULTS = {"fgsm-rs": (1.0, 1.25, True), "n-fgsm": (2.0, 1.0, False)}
FREE_DEFAULT_STEP = 1.0
FREE_DEFAULT_REPLAYS = 4
Clip = tuple[float, float] | None


def _order(p: Order) -> float:
    p = norm_order(p, "p")
    if p not in (1.0, 2.0, math.inf):
        raise ValueError(f"fast adversarial training steps need p in 1, 2, inf, got {p:g}")
    return p


class SingleStepATLoss(nn.Module):
    """FGSM-RS or N-FGSM adversarial training loss: a random start, one PGA step, the CE there.

    ``delta_0 ~ U(ball of radius start * eps)``, box-clipped; ``g = grad_delta sum_b CE(f(x +
    delta_0), y)``; ``delta = pga_step(delta_0, g, p, radius, step * eps, x=x, clip=clip)`` with
    radius eps (fgsm-rs, ``project=True``) or no eps ball (n-fgsm); loss ``mean CE(f(x + delta), y)``.

    Args:
        kind: "fgsm-rs" or "n-fgsm" (sets the defaults of start, step and project).
        eps: threat radius (> 0). p: its norm, 1, 2 or inf.
        step: step length as a fraction of eps (None: 1.25 fgsm-rs, 1 n-fgsm).
        start: random-start radius as a fraction of eps (None: 1 fgsm-rs, 2 n-fgsm; 0: plain FGSM).
        project: project delta onto the eps ball after the step (None: True fgsm-rs, False n-fgsm).
        clip: the input box (None: unconstrained).

    Forward:
        ``loss_fn(model, x, y, index=None) -> scalar`` (index unused; the trainer passes it).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> from opnorm.fast_at import SingleStepATLoss
        >>> loss_fn = SingleStepATLoss("n-fgsm", eps=0.2, p="inf")
        >>> loss = loss_fn(model, x, y)
        >>> loss.shape, loss.requires_grad
        (torch.Size([]), True)
        >>> loss.backward()
    """

    def __init__(
        self,
        kind: str = "fgsm-rs",
        eps: float = 0.1,
        p: Order = math.inf,
        *,
        step: float | None = None,
        start: float | None = None,
        project: bool | None = None,
        clip: Clip = (0.0, 1.0),
    ) -> None:
        super().__init__()
        if kind not in SINGLE_STEP_DEFAULTS:
            raise ValueError(f"kind must be one of {', '.join(SINGLE_STEP_DEFAULTS)}, got {kind!r}")
        d_start, d_step, d_project = SINGLE_STEP_DEFAULTS[kind]
        self.kind = kind
        self.eps = number(eps, "eps", strict=True)
        self.p = _order(p)
        self.step = number(d_step if step is None else step, "step", strict=True)
        self.start = number(d_start if start is None else start, "start")
        self.project = d_project if project is None else bool(project)
        self.clip = clip

    def extra_repr(self) -> str:
        p = order_text(self.p)
        return (
            f"kind={self.kind!r}, eps={self.eps:g}, p={p}, step={self.step:g} eps, start={self.start:g} eps, "
            f"project={self.project}"
        )

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The adversarial perturbation delta (x's shape, detached); ``x + delta`` is the training input."""
        net = unwrap(model)
        check_inputs(net, x)
        with torch.autocast(x.device.type, enabled=False), eval_mode(net), torch.enable_grad():
            delta0 = (
                torch.zeros_like(x) if self.start == 0 else random_in_ball(x, self.p, self.start * self.eps, generator)
            )
            delta0 = into_box(delta0, x, self.clip).requires_grad_(True)
            loss = cross_entropy(forward(net, x + delta0), None, y).sum()  # per-example gradients
            (g,) = torch.autograd.grad(loss, delta0)
        radius = self.eps if self.project else math.inf
        return pga_step(delta0.detach(), g, self.p, radius, self.step * self.eps, x=x, clip=self.clip).detach()

    def forward(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        delta = self.perturb(model, x, y)
        return cross_entropy(full(forward(model, x + delta)), None, y).mean()


class FreeATLoss(nn.Module):
    """Free adversarial training loss (Shafahi et al. 2019): the CE at ``clip(x + delta)``, with
    delta advanced by the backward of that same loss.

    Each call returns ``mean CE(f(clip(x + delta)), y)`` with the stored delta (zeros at first;
    its first B rows for a batch of B). A hook on delta catches its gradient g during the
    caller's ``loss.backward()`` and sets ``delta = pga_step(delta, g, p, eps, step * eps)``
    (the eps ball; the box is applied at the next use), so the weights and the perturbation move
    with one backward. Replay each batch several times in a row (the trainer does,
    ``TrainConfig.replays``); delta carries over to the next batch as in the paper. delta is part
    of ``state_dict()`` (checkpoints resume exactly). Under DDP each rank has its own delta:
    :meth:`sync` (every rank, before a checkpoint) gathers them, the state holds one per rank,
    and loading it takes this rank's (a different number of ranks is refused).

    Args:
        eps: threat radius (> 0). p: its norm, 1, 2 or inf.
        step: the step on delta per backward, a fraction of eps (default 1).
        clip: the input box (None: unconstrained).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> from opnorm.fast_at import FreeATLoss
        >>> free = FreeATLoss(eps=0.1, p="inf")
        >>> free(model, x, y).backward()  # the backward moves free.delta too
        >>> bool(free.delta.abs().max() > 0), bool(free.delta.abs().max() <= 0.1)
        (True, True)
    """

    def __init__(
        self, eps: float = 0.1, p: Order = math.inf, *, step: float = FREE_DEFAULT_STEP, clip: Clip = (0.0, 1.0)
    ) -> None:
        super().__init__()
        self.eps = number(eps, "eps", strict=True)
        self.p = _order(p)
        self.step = number(step, "step", strict=True)
        self.clip = clip
        self.delta: torch.Tensor | None = None
        self._by_rank: list | None = None  # every rank's delta, set by sync() under DDP

    def extra_repr(self) -> str:
        p = order_text(self.p)
        return f"eps={self.eps:g}, p={p}, step={self.step:g} eps"

    def sync(self) -> None:
        """Gather every DDP rank's delta into the state (every rank calls it); no-op without DDP."""
        world = group_size()
        if world == 1:
            self._by_rank = None
            return
        mine = None if self.delta is None else self.delta.detach().cpu()
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, mine)  # deltas may be None or differ in rows
        self._by_rank = gathered

    def get_extra_state(self) -> dict:
        if group_size() > 1:
            if self._by_rank is None or len(self._by_rank) != group_size():
                raise RuntimeError("FreeATLoss under DDP: call sync() on every rank before state_dict()")
            return {"delta": None, "by_rank": self._by_rank}
        return {"delta": self.delta}

    def set_extra_state(self, state: dict) -> None:
        by_rank, world = state.get("by_rank"), group_size()
        if by_rank is None and world > 1 and state["delta"] is not None:
            raise ValueError(
                f"this free-AT state holds one process's perturbation, not one per rank; resume it "
                f"with 1 process, not {world}"
            )
        if by_rank is not None and len(by_rank) != world:
            raise ValueError(
                f"this free-AT state holds the perturbations of {len(by_rank)} DDP ranks; resume "
                f"with torchrun --nproc-per-node {len(by_rank)}, not {world} process(es)"
            )
        self.delta = state["delta"] if by_rank is None else by_rank[group_rank()]
        self._by_rank = by_rank

    def _current(self, x: torch.Tensor) -> torch.Tensor:
        """The stored delta fitted to x's batch: its first B rows, zeros where it has none."""
        d = self.delta
        if d is None or d.shape[1:] != x.shape[1:]:
            return torch.zeros_like(x)
        d = d.to(device=x.device, dtype=x.dtype)
        if d.shape[0] < x.shape[0]:
            d = torch.cat([d, d.new_zeros((x.shape[0] - d.shape[0], *x.shape[1:]))])
        return d[: x.shape[0]]

    def _update(self, delta: torch.Tensor, g: torch.Tensor) -> None:
        new = pga_step(delta.detach(), g.detach().clone(), self.p, self.eps, self.step * self.eps)
        if self.delta is not None and self.delta.shape[0] > new.shape[0] and self.delta.shape[1:] == new.shape[1:]:
            new = torch.cat([new, self.delta[new.shape[0] :].to(new)])  # a short last batch keeps the rest
        self.delta = new
        self._by_rank = None  # gathered before this step: stale, so state_dict() needs a new sync()

    def forward(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_inputs(unwrap(model), x)
        delta = self._current(x).clone().requires_grad_(True)
        if torch.is_grad_enabled():
            delta.register_hook(lambda g: self._update(delta, g))
        x_adv = x + delta if self.clip is None else (x + delta).clamp(*self.clip)
        return cross_entropy(full(forward(model, x_adv)), None, y).mean()


class Replayed:
    """An iterable yielding every item of ``batches`` ``times`` times in a row (with a length).

    Example:
        >>> from opnorm.fast_at import Replayed
        >>> list(Replayed([1, 2], 2))
        [1, 1, 2, 2]
    """

    def __init__(self, batches: Iterable, times: int) -> None:
        self.batches, self.times = batches, times

    def __iter__(self) -> Iterator:
        for item in self.batches:
            for _ in range(self.times):
                yield item

    def __len__(self) -> int:
        return len(self.batches) * self.times  # type: ignore[arg-type]
