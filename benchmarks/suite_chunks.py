"""The study's attack suite (CE-PGD, then APGD-DLR on the survivors) with APGD-DLR in chunks of 50
against one call of 200, on trained digits CNNs.

A torchattacks call runs its whole chunk when one example in it is still robust (the randomness
then never depends on which are), so the chunk size trades per-call overhead against attacking
examples that are already fooled. The study's digits preset attacks its 200 test points in one
call (``dlr_batch=200``); the Fashion-MNIST presets keep 50. Each chunk size evaluates the
digits study's radius grids, alternately (50, 200, 50, 200, ...), with one thread as a worker
process of ``opnorm reproduce --jobs`` does; the time is the median over repetitions. The worst
case differs between the two only by randomness (another random start per chunk).
Writes ``benchmarks/results/suite_chunks.json`` and prints a table.

    python benchmarks/suite_chunks.py [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import opnorm
from opnorm.experiments.evaluate import NORMS, robust_suite
from opnorm.experiments.study import study_config
from opnorm.training.data import load_dataset

CHUNKS = (50, 200)


def trained(method: str, seed: int) -> torch.nn.Module:
    """A digits CNN trained as the study trains it (4 epochs, SGD 0.05)."""
    cfg = study_config("digits")
    res = opnorm.train(
        dataset="digits", model="cnn", method=method, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
        eps=cfg.eps_l2, p=2, seed=seed, progress=False,
    )  # fmt: skip
    return res.model.cpu().eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "suite_chunks.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = study_config("digits")
    test = load_dataset("digits").test
    x, y = test.x[: cfg.eval_points], test.y[: cfg.eval_points]
    grids = {"linf": [e for e in cfg.eps_grid_linf if e > 0], "l2": [e for e in cfg.eps_grid_l2 if e > 0]}
    models = {"clean": trained("clean", 0), "pgd-at l2": trained("pgd-at", 0)}
    load_before = os.getloadavg()
    rows = {}
    for name, model in models.items():
        seconds = {c: [] for c in CHUNKS}
        worst = {}
        for _ in range(args.reps):
            for chunk in CHUNKS:
                suite = robust_suite(
                    steps=cfg.eval_steps, restarts=cfg.eval_restarts, schedule=cfg.eval_schedule,
                    dlr_steps=cfg.dlr_steps, seed=0, dlr_batch=chunk,
                )  # fmt: skip
                start = time.perf_counter()
                res = {n: opnorm.evaluate(model, x, y, eps=g, p=NORMS[n], attacks=suite) for n, g in grids.items()}
                seconds[chunk].append(time.perf_counter() - start)
                worst[chunk] = {n: [r.worst_case(e) for e in grids[n]] for n, r in res.items()}
        med = {c: statistics.median(s) for c, s in seconds.items()}
        rows[name] = {
            **{f"seconds_chunk_{c}": round(med[c], 3) for c in CHUNKS},
            "ratio_200_over_50": round(med[200] / med[50], 3),
            **{f"worst_case_chunk_{c}": worst[c] for c in CHUNKS},
            **{f"all_seconds_chunk_{c}": [round(t, 3) for t in seconds[c]] for c in CHUNKS},
        }
    result = {
        "benchmark": "the study's suite on the digits grids, APGD-DLR in chunks of 50 vs one call of 200, alternately",
        "grids": grids,
        "points": len(x),
        "suite": f"CE-PGD {cfg.eval_steps} steps x {cfg.eval_restarts}, then APGD-DLR {cfg.dlr_steps} steps",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "reps": args.reps,
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "models": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':10} {'chunks of 50 (s)':>17} {'one call (s)':>13} {'ratio':>7}")
    for name, r in rows.items():
        print(f"{name:10} {r['seconds_chunk_50']:17.2f} {r['seconds_chunk_200']:13.2f} {r['ratio_200_over_50']:7.3f}")
    print(f"(torch {torch.__version__}, {args.threads} thread(s), {args.reps} alternating reps; written to {args.out})")


if __name__ == "__main__":
    main()
