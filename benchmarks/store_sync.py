"""Cost of keeping the fast regularizer's direction store consistent under DDP.

Two CPU processes (gloo), the small CNN of ``opnorm.training.models`` on digits-shaped inputs,
DDP-wrapped, ``OperatorNormRegularizer.fast("inf", 2, ...)``: per training step one
``joint`` forward, backward and SGD step. Two variants alternate in one run, step by step
blocks: ``sync`` (the store all-gathers every rank's (index, direction) pairs before each
use, as shipped) and ``local`` (each rank keeps its own store: the all-gather skipped, which
is what the store did before it was shared). ``local`` steps are not cheaper: with
reshuffled splits about half of each rank's examples find no direction in its own store and
get the cold visit's 3 explicit iterations instead of 1. The all-gather itself is timed
inside the ``sync`` steps (``sync_seconds_per_step``, and its share of a step).

    python benchmarks/store_sync.py [--steps 40] [--rounds 5] [--batch 32]

Writes ``benchmarks/results/store_sync.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import opnorm.regularizers.store as store_module
from opnorm.regularizers import OperatorNormRegularizer
from opnorm.training.models import build_model


class _Timed:
    """Wraps a store's sync and adds up the seconds it takes."""

    def __init__(self, store) -> None:
        self.inner, self.seconds = store.sync, 0.0
        store.sync = self

    def __call__(self) -> None:
        t0 = time.perf_counter()
        self.inner()
        self.seconds += time.perf_counter() - t0


def _steps(model, reg, opt, data, order, batch) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        logits, pen = reg.joint(model, data[idx], idx)
        loss = nn.functional.cross_entropy(logits, (idx % 10)) + pen
        opt.zero_grad()
        loss.backward()
        opt.step()
    reg.sync()
    return (time.perf_counter() - t0) / max(1, len(order) // batch)


def _worker(rank: int, world: int, init: str, args, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = args.steps * args.batch * world
    data = torch.rand(n, 1, 8, 8)
    model = nn.parallel.DistributedDataParallel(build_model("cnn", input_shape=(1, 8, 8), num_classes=10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    regs = {
        v: OperatorNormRegularizer.fast("inf", 2, eps=0.1, lam=0.02, num_examples=n, clip=(0.0, 1.0))
        for v in ("sync", "local")
    }
    world_size = store_module._world
    timer = _Timed(regs["sync"].store)
    times: dict[str, list[float]] = {"sync": [], "local": [], "sync_only": []}
    for r in range(args.rounds + 1):  # round 0 warms up
        order = torch.randperm(n, generator=torch.Generator().manual_seed(r))[rank::world]
        for v in ("sync", "local") if r % 2 else ("local", "sync"):
            store_module._world = world_size if v == "sync" else (lambda: 1)
            dist.barrier()
            before = timer.seconds
            t = _steps(model, regs[v], opt, data, order, args.batch)
            if r:
                times[v].append(t)
                if v == "sync":
                    times["sync_only"].append((timer.seconds - before) / max(1, len(order) // args.batch))
    store_module._world = world_size
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="steps per rank per block")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32, help="per rank")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "store_sync.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "times.json")
        mp.spawn(_worker, args=(2, f"file://{tmp}/rendezvous", args, raw), nprocs=2, join=True)
        times = json.loads(Path(raw).read_text())
    med = {v: statistics.median(t) for v, t in times.items()}
    result = {
        "benchmark": "store_sync",
        "processes": 2,
        "backend": "gloo",
        "threads_per_process": 1,
        "batch_per_rank": args.batch,
        "steps_per_block": args.steps,
        "rounds": args.rounds,
        "median_step_seconds": med,
        "sync_over_local": med["sync"] / med["local"],
        "sync_seconds_per_step": med["sync_only"],
        "sync_share_of_step": med["sync_only"] / med["sync"],
        "step_seconds": times,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"median step: sync {1e3 * med['sync']:.1f} ms (all-gather {1e3 * med['sync_only']:.2f} ms, "
        f"{100 * result['sync_share_of_step']:.1f} %), local {1e3 * med['local']:.1f} ms -> {args.out}"
    )


if __name__ == "__main__":
    main()
