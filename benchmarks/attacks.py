"""Per-step time of opnorm.pgd against torchattacks.PGD / PGDL2 on the same CNN and batch.

The two attacks run alternately (ours, theirs, ours, theirs, ...) so that drifts in machine
load hit both alike; the per-step time is the median over repetitions of (call time / steps).
Writes ``benchmarks/results/attacks.json`` and prints a table.

    python benchmarks/attacks.py [--reps 21] [--steps 10] [--batch 128] [--threads 2]

Both attacks run the same tensor operations per step; what moves the ratio from run to run is
mostly glibc returning freed activation buffers to the OS and page-faulting them back in
(setting MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 removes that
cost for both, about a quarter of the step time on this CNN) and the load of a shared machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import opnorm

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
LABELS = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def batch(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first n Fashion-MNIST test images in [0, 1] if present, else uniform noise."""
    if FASHION.exists() and LABELS.exists():
        with gzip.open(FASHION) as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
        with gzip.open(LABELS) as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
        return (
            torch.tensor(images / 255.0, dtype=torch.float32),
            torch.tensor(labels, dtype=torch.long),
            "fashion-mnist test",
        )
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), "uniform noise"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attacks.json"))
    args = ap.parse_args()

    import torchattacks

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    model = small_cnn().eval()
    x, y, data = batch(args.batch)
    cases = {
        "linf": (
            dict(p=math.inf, eps=8 / 255),
            lambda m: torchattacks.PGD(m, eps=8 / 255, alpha=2 / 255, steps=args.steps),
            2 / 255,
        ),
        "l2": (dict(p=2, eps=0.5), lambda m: torchattacks.PGDL2(m, eps=0.5, alpha=0.1, steps=args.steps), 0.1),
    }
    rows = {}
    for name, (ours_kw, make_theirs, alpha) in cases.items():
        theirs_atk = make_theirs(model)
        gen = torch.Generator().manual_seed(0)

        def ours(alpha=alpha, gen=gen, ours_kw=ours_kw):
            opnorm.pgd(model, x, y, steps=args.steps, step_size=alpha, random_start=gen, **ours_kw)

        def theirs(theirs_atk=theirs_atk):
            theirs_atk(x, y)

        ours(), theirs()  # warm-up
        t_ours, t_theirs = [], []
        for _ in range(args.reps):
            for fn, out in ((ours, t_ours), (theirs, t_theirs)):
                start = time.perf_counter()
                fn()
                out.append((time.perf_counter() - start) / args.steps * 1e3)
        med_o, med_t = statistics.median(t_ours), statistics.median(t_theirs)
        rows[name] = {
            "opnorm_ms_per_step": round(med_o, 4),
            "torchattacks_ms_per_step": round(med_t, 4),
            "ratio": round(med_o / med_t, 4),
            "ratio_of_minima": round(min(t_ours) / min(t_theirs), 4),
            "opnorm_all_ms": [round(t, 4) for t in t_ours],
            "torchattacks_all_ms": [round(t, 4) for t in t_theirs],
        }
    result = {
        "benchmark": "opnorm.pgd vs torchattacks PGD/PGDL2, per-step time (median), measured alternately",
        "model": "conv(1->32,3x3)-ReLU-maxpool2-conv(32->64,3x3)-ReLU-maxpool2-linear(3136->128)-ReLU-linear(128->10)",
        "data": data,
        "torch": torch.__version__,
        "torchattacks": torchattacks.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "batch": args.batch,
        "steps": args.steps,
        "reps": args.reps,
        "cpu_count": os.cpu_count(),
        # glibc returns freed activation buffers to the OS and page-faults them back in, which
        # costs ~25% per step here; MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ change that
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "cases": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'case':6} {'opnorm ms/step':>15} {'torchattacks ms/step':>21} {'ratio':>7} {'ratio of minima':>16}")
    for name, r in rows.items():
        print(
            f"{name:6} {r['opnorm_ms_per_step']:15.3f} {r['torchattacks_ms_per_step']:21.3f} {r['ratio']:7.3f} "
            f"{r['ratio_of_minima']:16.3f}"
        )
    print(
        f"(torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.steps} steps, "
        f"{args.reps} alternating reps; written to {args.out})"
    )


if __name__ == "__main__":
    main()
