"""Seconds per training step of every method, relative to a clean step.

One step = the method's batch loss (attack / power method included) + backward + SGD step,
on the small CNN ``build_model("cnn", input_shape=(1, 28, 28), num_classes=10)`` with a
batch of 128 Fashion-MNIST images (uniform noise when the files are absent). The methods
run interleaved (one step of each per repetition, in a rotating order) so that drifts in
machine load hit all alike; each method's time is the median over repetitions, and the
ratio is median(method) / median(clean). Writes ``benchmarks/results/training.json``.

    python benchmarks/training.py [--reps 15] [--batch 128] [--threads 2] [--p inf --eps 0.1]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from opnorm.training.config import TrainConfig
from opnorm.training.models import build_model
from opnorm.training.objectives import build_objective

# name -> TrainConfig changes (the training defaults otherwise: 10 PGD steps, opnorm's fast mode)
VARIANTS = {
    "clean": dict(method="clean"),
    "pgd-at": dict(method="pgd-at"),
    "logit-at": dict(method="logit-at"),
    "trades": dict(method="trades"),
    "opnorm": dict(method="opnorm"),
    "opnorm-exact": dict(method="opnorm", opnorm={"penalty": "exact"}),
    "opnorm-dynamic": dict(method="opnorm", opnorm={"dynamic": True}),
    "global-snr": dict(method="global-snr"),
}


def data(n: int):
    """(x, y, source): the first n Fashion-MNIST training images, else uniform noise."""
    try:
        from opnorm.training.data import load_dataset

        s = load_dataset("fashion-mnist", limit_train=n, limit_test=1)
        return s.train.x, s.train.y, s.mean, s.std, "fashion-mnist train"
    except (FileNotFoundError, ValueError):
        g = torch.Generator().manual_seed(0)
        return (
            torch.rand(n, 1, 28, 28, generator=g),
            torch.randint(0, 10, (n,), generator=g),
            None,
            None,
            "uniform noise",
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--p", default="inf")
    ap.add_argument("--q", default="2")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "training.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    x, y, mean, std, source = data(args.batch)
    index = torch.arange(args.batch)
    torch.manual_seed(0)
    base = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, mean=mean, std=std)
    cases = {}
    for name, changes in VARIANTS.items():
        cfg = TrainConfig(dataset="fashion-mnist", model="cnn", p=args.p, q=args.q, eps=args.eps, **changes).resolved()
        model = copy.deepcopy(base).train()
        objective = build_objective(cfg, model, num_examples=args.batch)  # index covers the one batch
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        cases[name] = (cfg, model, objective, opt)

    def step(name: str) -> float:
        cfg, model, objective, opt = cases[name]
        start = time.perf_counter()
        loss, _ = objective(model, x, y, index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    names = list(VARIANTS)
    for name in names:  # warm-up
        step(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            times[name].append(step(name))
    clean_med, clean_min = statistics.median(times["clean"]), min(times["clean"])
    rows = {}
    for name in names:
        cfg = cases[name][0]
        med = statistics.median(times[name])
        rows[name] = {
            "seconds_per_step": round(med, 5),
            "ratio_to_clean": round(med / clean_med, 3),
            "ratio_of_minima": round(min(times[name]) / clean_min, 3),
            "settings": {
                k: v
                for k, v in cfg.to_dict().items()
                if k in ("method", "p", "q", "eps", "lam", "iters", "steps", "squared", "adv_fraction", "beta")
                or (k == "opnorm" and cfg.method == "opnorm")
            },
            "all_seconds": [round(t, 5) for t in times[name]],
        }
    result = {
        "benchmark": "seconds per training step (loss + backward + SGD step), median over interleaved repetitions, "
        "relative to a clean step",
        "model": "build_model('cnn', input_shape=(1, 28, 28), num_classes=10)",
        "data": source,
        "batch": args.batch,
        "threads": args.threads,
        "reps": args.reps,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "methods": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'method':16} {'s/step':>9} {'x clean':>8} {'x clean (minima)':>17}")
    for name, r in rows.items():
        print(f"{name:16} {r['seconds_per_step']:9.4f} {r['ratio_to_clean']:8.2f} {r['ratio_of_minima']:17.2f}")
    print(
        f"(torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.reps} interleaved reps, "
        f"data: {source}; written to {args.out})"
    )


if __name__ == "__main__":
    main()
