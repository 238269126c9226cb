"""A per-example store of directions, indexed by dataset index, consistent under DDP.

The fast regularizer keeps each training example's direction v between visits (warm starts).
:class:`DirectionStore` holds them:

* sized from the dataset (``num_examples``), so an index out of range is a clear error;
* it records the norm order p and the storage kind it holds (l_inf power-method directions
  are signs, kept exactly as int8; everything else in the inputs' dtype). Loading a state of
  another p, kind or size is refused with a message, never cast or truncated;
* a zero or non-finite direction (J(x) = 0 on one visit, e.g. a dead ReLU layer, gives
  psi(0) = 0, a fixed point of the power method) is never kept: its example counts as
  unvisited and starts again from a random direction;
* under ``torch.distributed`` every rank's updates are all-gathered by :meth:`sync` (called
  by the regularizer before each use, and by the trainer before a checkpoint), so all ranks
  hold the same direction for every example seen by any rank.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from opnorm.regularizers import DirectionStore, OperatorNormRegularizer
    >>> model, x = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), torch.rand(4, 8)
    >>> store = DirectionStore(100)  # the training set's length
    >>> reg = OperatorNormRegularizer.fast("inf", 2, eps=0.1, lam=0.02, store=store)
    >>> pen = reg(model, x, index=torch.tensor([5, 6, 7, 8]))
    >>> store.directions.shape, store.directions.dtype, int(store.seen.sum())  # l_inf: signs, as int8
    (torch.Size([100, 8]), torch.int8, 4)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from opnorm.norms import Order, norm_order, order_text
from opnorm.training.distributed import group_size
from opnorm.validation import integer

__all__ = ["DirectionStore"]


class DirectionStore(nn.Module):
    """Directions (num_examples, *in) and a seen flag per example, saved in ``state_dict``.

    Args:
        num_examples: the dataset's length; valid indices are 0 .. num_examples - 1.

    The regularizer that uses the store calls :meth:`configure` with its p and whether its
    directions are exact signs; the first :meth:`put` fixes the example shape and dtype.
    """

    def __init__(self, num_examples: int) -> None:
        super().__init__()
        self.num_examples = integer(num_examples, "num_examples", lo=1)
        self.p: float | None = None
        self.signs = False
        self.register_buffer("directions", torch.zeros(0))
        self.register_buffer("seen", torch.zeros(self.num_examples, dtype=torch.bool))
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def configure(self, p: Order, signs: bool) -> None:
        """Bind to a regularizer's p; ``signs``: the directions are +-1 vectors (stored as int8)."""
        p, signs = norm_order(p, "p"), bool(signs)
        if self.p is not None and (self.p, self.signs) != (p, signs):
            raise ValueError(
                f"this DirectionStore already holds {self._kind(self.p, self.signs)}; "
                f"a regularizer with {self._kind(p, signs)} needs its own store"
            )
        self.p, self.signs = p, signs

    @staticmethod
    def _kind(p: float, signs: bool) -> str:
        return f"l_{order_text(p)} {'sign' if signs else 'float'} directions"

    def extra_repr(self) -> str:
        return f"num_examples={self.num_examples}, seen={int(self.seen.sum())}"

    # -- access ---------------------------------------------------------------------------

    def rows(self, index: Any, batch: int, device: torch.device) -> torch.Tensor:
        """index as int64 on device, validated: one entry per example, in [0, num_examples)."""
        if not isinstance(index, torch.Tensor):
            index = torch.as_tensor(index)
        if index.shape != (batch,) or index.is_floating_point() or index.dtype == torch.bool:
            raise ValueError(
                f"index must be a 1-D integer tensor of dataset indices with one entry per example "
                f"(shape ({batch},)), got dtype {index.dtype} and shape {tuple(index.shape)}"
            )
        idx = index.to(device=device, dtype=torch.long)
        if batch and (int(idx.min()) < 0 or int(idx.max()) >= self.num_examples):
            bad = int(idx.max()) if int(idx.max()) >= self.num_examples else int(idx.min())
            raise ValueError(
                f"index {bad} is out of range for a DirectionStore of {self.num_examples} examples; "
                "size the store with the dataset's length"
            )
        return idx

    def lookup(self, idx: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored directions in like's dtype (zeros where unseen), warm mask (B,))."""
        self._place(like)
        warm = self.seen[idx]
        if self.directions.numel() == 0:
            return torch.zeros_like(like), warm
        self._check_shape(tuple(like.shape[1:]))
        return self.directions[idx].to(like.dtype), warm

    def put(self, idx: torch.Tensor, v: torch.Tensor) -> None:
        """Store v (B, *in) for the examples idx (B,); shared with the other ranks at :meth:`sync`.
        Rows of v that are zero or not finite are not kept: those examples become unvisited."""
        if self.p is None:
            raise RuntimeError("configure(p, signs) the store before use (the regularizer does it)")
        with torch.no_grad():
            self._allocate(v)
            usable = _usable(v)
            v = v.detach().masked_fill(~usable.view(-1, *[1] * (v.ndim - 1)), 0).to(self.directions.dtype)
            self.directions[idx] = v
            self.seen[idx] = usable
            if group_size() > 1:
                self._pending.append((idx.clone(), v))

    def _place(self, like: torch.Tensor) -> None:
        if self.seen.device != like.device:
            self.seen = self.seen.to(like.device)
            self.directions = self.directions.to(like.device)

    def _allocate(self, v: torch.Tensor) -> None:
        shape = tuple(v.shape[1:])
        self._place(v)
        if self.directions.numel() == 0:
            dtype = torch.int8 if self.signs else v.dtype
            self.directions = torch.zeros(self.num_examples, *shape, dtype=dtype, device=v.device)
        self._check_shape(shape)

    def _check_shape(self, shape: tuple) -> None:
        if tuple(self.directions.shape[1:]) != shape:
            raise ValueError(
                f"examples of shape {shape} do not fit a store of {tuple(self.directions.shape[1:])}; "
                "use one store per dataset"
            )

    # -- distributed ----------------------------------------------------------------------

    def sync(self) -> None:
        """All-gather every rank's updates since the last sync (a no-op in one process).
        Every rank must call it at the same point (the regularizer does, before each use)."""
        pending, self._pending = self._pending, []
        if group_size() <= 1:
            return
        device = self.seen.device
        count = torch.tensor([sum(i.numel() for i, _ in pending)], device=device)
        counts = [torch.zeros_like(count) for _ in range(group_size())]
        dist.all_gather(counts, count)
        top = int(max(c.item() for c in counts))
        if top == 0:
            return
        if self.directions.numel() == 0:
            raise RuntimeError(
                "a rank reached sync() holding no directions while others did: every rank must "
                "call the regularizer on the same steps"
            )
        idx = torch.cat([i for i, _ in pending] + [torch.zeros(top - int(count), dtype=torch.long, device=device)])
        pad = self.directions.new_zeros(top - int(count), *self.directions.shape[1:])
        v = torch.cat([d for _, d in pending] + [pad])
        all_idx = [torch.empty_like(idx) for _ in counts]
        all_v = [torch.empty_like(v) for _ in counts]
        dist.all_gather(all_idx, idx)
        dist.all_gather(all_v, v)
        with torch.no_grad():
            for c, i, d in zip(counts, all_idx, all_v):
                n = int(c.item())
                self.directions[i[:n]] = d[:n]
                self.seen[i[:n]] = _usable(d[:n])  # a zero row: unusable (put() zeroed it)

    # -- state ----------------------------------------------------------------------------

    def get_extra_state(self) -> dict:
        if self._pending:
            raise RuntimeError(
                "the DirectionStore has updates not yet shared with the other ranks: call "
                "sync() on every rank before saving"
            )
        return {
            "p": None if self.p is None else order_text(self.p),
            "signs": self.signs,
            "num_examples": self.num_examples,
        }

    def set_extra_state(self, state: dict) -> None:
        pass  # checked before the buffers are copied: see _load_from_state_dict

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict):
            self._check_compatible(extra)
        saved = state_dict.get(prefix + "directions")
        if isinstance(saved, torch.Tensor) and saved.numel():
            if self.p is not None and (saved.dtype == torch.int8) != self.signs:
                held = "sign directions (int8)" if saved.dtype == torch.int8 else f"{saved.dtype} directions"
                raise ValueError(
                    f"the saved DirectionStore holds {held}, but this regularizer uses "
                    f"{self._kind(self.p, self.signs)}; load it with the same p and step, or start a new run"
                )
        if isinstance(saved, torch.Tensor):  # its size is data-dependent: take the saved shape
            self.directions = torch.empty_like(saved, device=self.seen.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_compatible(self, extra: dict) -> None:
        n = extra.get("num_examples")
        if n != self.num_examples:
            raise ValueError(
                f"the saved DirectionStore holds {n} examples, this one {self.num_examples}: "
                "use a store sized for the same dataset, or start a new run"
            )
        if extra.get("p") is None or self.p is None:
            return
        saved = (norm_order(extra["p"]), bool(extra.get("signs")))
        if saved != (self.p, self.signs):
            raise ValueError(
                f"the saved DirectionStore holds {self._kind(*saved)}, but this regularizer uses "
                f"{self._kind(self.p, self.signs)}; load it with the same p and step, or start a new run"
            )


def _usable(v: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the row is finite and not all zero (a direction the power method can leave)."""
    flat = v.reshape(v.shape[0], -1)
    return torch.isfinite(flat).all(dim=1) & (flat != 0).any(dim=1)
