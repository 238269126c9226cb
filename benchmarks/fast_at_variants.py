"""Changes to the fast-robust regularizer, chosen on held-out training images, never on the test set.

The fast-AT study (``fast_at_fmnist.py``) trains on the first ``--train`` Fashion-MNIST training
images and evaluates on the test set. This script trains variants of
``configs/fashion-mnist-fast-robust.json`` in the same harness (same settings, same attacks) and
evaluates them on the ``--points`` training images that follow the training subset, which no
run trains on: a validation set, so a variant can be picked without looking at the test set.
Each variant changes one thing that the study's measurements point at (:data:`VARIANTS`).

    python benchmarks/fast_at_variants.py                 # all variants, seed 0, eps 0.1
    python benchmarks/fast_at_variants.py --variants base fgsm-step

Writes ``<out>/runs/eps-<eps>/<variant>/seed-<seed>/results.json`` (resumable, as the study) and
``<out>/variants.json`` (the variants' records side by side).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import fast_at_fmnist as study

from opnorm.training.data import load_dataset
from opnorm.training.files import write_text_atomic

# one change each against the fast-robust configuration (values replace, ``opnorm`` is merged)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "base": ("fast-robust as configured", {}),
    "warm-1": ("one warm iteration instead of two (cheaper)", {"opnorm": {"warm_iters": 1}}),
    "fgsm-step": (
        "one warm iteration of step 1.25 eps (FGSM-RS's step, from the stored iterate)",
        {"opnorm": {"warm_iters": 1, "step": 1.25}},
    ),
    "lam-0.2": ("penalty weight 0.2 instead of 0.06", {"lam": 0.2}),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument(
        "--references",
        nargs="+",
        default=["fgsm-rs", "pgd-at"],
        choices=list(study.METHODS),
        help="study methods trained and validated alongside, to judge the variants against",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--train", type=int, default=10000, help="train on the first N images; validate on the next")
    ap.add_argument("--points", type=int, default=300, help="validation images (after the training subset)")
    ap.add_argument("--out", default=str(study.DEFAULT_OUT / "variants"))
    ap.add_argument("--runs", default=str(study.ROOT / "runs" / "fast-at-variants"))
    ap.add_argument("--tiny", action="store_true", help="a smoke run: digits, few images, epochs and queries")
    args = ap.parse_args(argv)
    harness = study.parser().parse_args([])  # the study's training settings and attacks, at its defaults
    for key in ("epochs", "replays", "epoch_points", "threads", "restarts", "apgd_steps", "square_queries"):
        setattr(args, key, getattr(harness, key))
    study.settle(args, "fast_at_variants.py", argv)
    train = load_dataset(args.dataset).train
    if train.x.shape[0] < args.train + args.points:
        raise SystemExit(
            f"--train {args.train} + --points {args.points} exceeds the {train.x.shape[0]} training images"
        )
    held_out = (train.x[args.train : args.train + args.points], train.y[args.train : args.train + args.points])
    records = {}
    for name in args.variants:
        label, changes = VARIANTS[name]
        study.METHODS[name] = (label, study.fast_robust_config(changes))
        records[name] = study.one_run(name, args.eps, args.seed, args, held_out)
    for name in args.references:
        records[name] = study.one_run(name, args.eps, args.seed, args, held_out)
    busy = [n for n, r in records.items() if r is None]
    if busy:
        raise SystemExit(f"{', '.join(busy)}: another process is training them; rerun when it has finished")
    table = {
        n: {k: r[k] for k in ("label", "train_seconds", "clean", *study.ATTACKS, "worst_case")}
        for n, r in records.items()
    }
    write_text_atomic(
        Path(args.out) / "variants.json",
        json.dumps(
            {
                "command": args.command,
                "validation": f"training images {args.train} to {args.train + args.points - 1}",
                "seed": args.seed,
                "eps": args.eps,
                "variants": table,
            },
            indent=1,
        )
        + "\n",
    )


if __name__ == "__main__":
    main()
