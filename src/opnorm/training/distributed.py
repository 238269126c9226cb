"""Data-parallel training with ``torch.distributed`` (one process per device).

``torchrun --nproc_per_node=N -m opnorm train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT`` in their environment;
:func:`setup` then joins the process group (gloo on CPU, nccl on CUDA, each process on
``cuda:LOCAL_RANK``). Without those variables everything runs in one process and every
helper here is a no-op.

How opnorm's training uses it:

* the model is wrapped in ``DistributedDataParallel``; each training step does exactly
  one forward through the wrapper (the methods build one batch: ``[x; x + eps v]`` for
  opnorm, the clean/adversarial mix for AT), so gradients of the loss *and* of the
  penalty are all-reduced (averaged) by DDP;
* power iterations and attacks run on the unwrapped module (``jacobian.unwrap``): they
  need no synchronization and must not trigger DDP's reducer;
* a seeded ``DistributedSampler`` (``set_epoch`` each epoch) gives each process a
  disjoint shard; ``batch_size`` is per process, so **the global batch is
  batch_size * world_size** (and an epoch has 1/world_size as many steps);
* rank 0 evaluates, logs, writes metrics and checkpoints; the others wait at a barrier;
* every rank resumes from rank 0's checkpoint; ranks > 0 re-seed their own RNG streams
  (random starts), so a resumed multi-process run is correct but not bit-identical to an
  uninterrupted one (single-process CPU runs are).

Example (in each process that ``torchrun`` starts)::

    ctx = setup("auto")  # DistContext(rank=0, world_size=1, ...) when run alone
    model = wrap(model.to(ctx.device), ctx)
    ...
    barrier(ctx)
    cleanup(ctx)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

__all__ = [
    "DistContext",
    "setup",
    "cleanup",
    "wrap",
    "barrier",
    "sampler",
    "all_reduce_mean",
    "resolve_device",
    "launched",
    "broadcast_object",
    "group_size",
    "group_rank",
]


@dataclass
class DistContext:
    """Where this process stands: rank, world size, local rank, device, backend (None alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """True when this process was started by torchrun with a world size > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def group_size() -> int:
    """The size of the joined process group: 1 when none is joined (one process alone)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def group_rank() -> int:
    """This process's rank in the joined process group: 0 when none is joined."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" -> cuda:LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if device == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def setup(device: str = "auto") -> DistContext:
    """Join the process group if launched by torchrun; return this process's context."""
    if not launched():
        return DistContext(device=resolve_device(device))
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = resolve_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank, world, local, dev, backend)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (no-op alone)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every process (no-op alone)."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around model when distributed; the model itself otherwise.

    ``find_unused_parameters`` stays off: every step does one forward whose output enters
    the loss, so every parameter receives a gradient.
    """
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sampler(dataset: Dataset, ctx: DistContext, *, seed: int, shuffle: bool = True) -> DistributedSampler | None:
    """A seeded DistributedSampler for this rank (None alone); call ``set_epoch`` every epoch."""
    if not ctx.distributed:
        return None
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed)


def all_reduce_mean(values: list[float], ctx: DistContext) -> list[float]:
    """The mean over processes of each number (identity alone)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return (t / ctx.world_size).tolist()


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's Python object on every process (identity alone)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
