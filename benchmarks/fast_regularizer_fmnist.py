"""Fashion-MNIST: the fast d.d. operator norm regularizer against PGD-10 adversarial training.

Both methods train the small CNN with ``opnorm.train`` under the same settings (l_inf,
eps = 0.1, SGD + momentum, cosine schedule, batch 128, seed, epochs, training examples).
With ``--jobs 1`` their epochs run alternately in one process (each run is resumed from its
checkpoint for the next epoch; resume is exact); with ``--jobs 2`` they train (and are
evaluated) at the same time in two processes. Either way drifts in machine load hit both
alike. Training time is the trainer's per-epoch ``seconds`` (batches only: no evaluation,
no checkpointing).

* ``pgd-at``: ``method="pgd-at"``, PGD-10 with the cross-entropy loss (Madry et al.).
* ``fast``: ``method="opnorm"`` in its default fast mode, (p, q) = (inf, 2), the fd point
  clamped to [0, 1], the output metric ``--output`` (default ``kl``: the softmax's Fisher
  metric; ``logits``: the l_2 norm of the logit change), lam chosen by the ``tune`` phase.

Phases:

* ``tune``: lam for the fast regularizer on a held-out run: train on the first
  ``--tune-train`` training images, measure PGD-20 robust accuracy on the last
  ``--tune-heldout`` training images (never trained on, and not the test set); the best
  lam (highest held-out robust accuracy) is written to ``tuning.json`` and used by ``main``.
* ``main``: the comparison. After training, on a fixed subset of ``--points`` test images:
  clean accuracy, PGD-20 with ``--restarts`` restarts (``opnorm.pgd``), torchattacks
  APGD-CE and APGD-DLR (``--apgd-steps`` steps), and PGD-20 robust accuracy over a range of
  eps; the per-epoch curve (robust accuracy on the same points after each epoch against
  cumulative training seconds) comes from the trainer's own evaluation. The banked
  directions of the fast run are compared with PGA on the same logit loss.
* ``variants``: on the tuning setup (same training and held-out images, the chosen lam),
  which parts of the fast configuration pay off: the default, ``free-only`` (no explicit
  iteration on later visits: the floor-cost route), ``no-free-update``, ``no-clip``, the
  ``paper`` configuration (10 iterations from scratch), the ``dynamic`` power method and
  PGD-10 AT, with training seconds (``--only NAME ...``: some of them; two such jobs may run
  side by side). Merges its rows into ``variants.json``.
* ``paper``: the paper configuration of the same regularizer (``opnorm.mode = "paper"``: 10
  power iterations per batch from random starts; otherwise the main run's settings, output
  metric, ``--dynamic``, clip and lam), trained alone afterwards and evaluated like the others: does the fast solver lose
  robustness against it? Writes ``paper.json``.
* ``one`` / ``combine``: one method's job of ``main`` (``--which``), and results.json from two such jobs
  that finished in ``--runs`` at different times, when the machine could not run them side by side
  (accuracies and gaps as in ``main``; the time ratio is marked as not comparable).
* ``report``: rewrite README.md and the plots from results.json (with the ``seed-*/`` and
  ``epochs-*/seed-*/`` comparisons found beside it, and ``NAME/seed-*/``: other fast
  configurations, e.g. ``--task perturbed --step 0.25 --cold-iters 1 --warm-iters 2``, against
  the same seeds' AT runs).

Writes ``docs/results/fast-regularizer/{tuning.json, results.json, README.md,
robust_vs_eps.png, robust_vs_time.png}``; the run directories (checkpoints) go to ``--runs``.

    python benchmarks/fast_regularizer_fmnist.py --phase all        # tune, then main, then report
    python benchmarks/fast_regularizer_fmnist.py --phase all --tiny --out /tmp/fr  # a smoke run
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import opnorm
from opnorm.evaluation import APGDAttack, evaluate
from opnorm.jacobian import eval_mode
from opnorm.training.config import FAST_COLD_ITERS, FAST_WARM_ITERS, OPNORM_TASKS, TrainConfig
from opnorm.training.data import load_dataset
from opnorm.training.files import write_text_atomic
from opnorm.training.trainer import accuracy, robust_accuracy, train

INF = math.inf
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "docs" / "results" / "fast-regularizer"
# lam grids per output metric. kl: lam * 2 KL / eps^2, i.e. lam = 0.06 at eps 0.1 is the TRADES
# term with beta = 12 (2 KL * lam / eps^2 = beta KL)
LAMS = {"logits": (0.01, 0.02, 0.04), "kl": (0.03, 0.06, 0.12)}
EPS_GRID = (0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2)
GAP_KEYS = ("gap_points_pgd20", "gap_points_apgd_ce", "gap_points_apgd_dlr")
GAP_GOAL = 2.0  # points: every robust-accuracy gap to PGD-10 AT at most this
TIME_GOAL = 0.5  # fast training time over AT's at most this


def common(args: argparse.Namespace, **changes: Any) -> dict[str, Any]:
    """The settings both methods share."""
    base = dict(
        dataset="fashion-mnist",
        model="cnn",
        p="inf",
        q=2,
        eps=0.1,
        epochs=args.epochs,
        batch_size=128,
        seed=args.seed,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        scheduler="cosine",
        steps=10,
        eval_points=args.points,
        eval_steps=20,
        limit_train=args.train,
        progress=False,
    )
    base.update(changes)
    return base


def fast_flags(args: argparse.Namespace) -> list[str]:
    """The command-line flags that define the fast configuration, for the jobs a phase starts."""
    return (
        ["--output", args.output, "--task", args.task]
        + (["--dynamic"] if args.dynamic else [])
        + (["--step", repr(args.step)] if args.step is not None else [])
        + (["--cold-iters", str(args.cold_iters)] if args.cold_iters is not None else [])
        + (["--warm-iters", str(args.warm_iters)] if args.warm_iters is not None else [])
    )


def method_config(name: str, args: argparse.Namespace, lam: float, **changes: Any) -> TrainConfig:
    if name == "pgd-at":
        return TrainConfig(method="pgd-at", **common(args, **changes))
    # fast mode (the regularizer's defaults) in the chosen output metric
    changes.setdefault("dynamic", args.dynamic)
    changes.setdefault("opnorm_task", args.task)
    changes.setdefault("opnorm_step", args.step)
    if changes.get("opnorm_mode", "fast") == "fast":  # the paper mode keeps its own 10 iterations
        if args.cold_iters is not None:
            changes.setdefault("iters", args.cold_iters)
        if args.warm_iters is not None:
            changes.setdefault("warm_iters", args.warm_iters)
    # the flat opnorm_* / iters keys move into TrainConfig.opnorm (migrate)
    return TrainConfig.from_dict(dict(method="opnorm", lam=lam, opnorm_output=args.output, **common(args, **changes)))


# ----------------------------------------------------------------------------- tune


def heldout_run(args: argparse.Namespace, cfg: TrainConfig) -> dict:
    """Train ``cfg`` on the tuning images; clean and PGD-20 accuracy on the held-out ones, training seconds."""
    full = load_dataset("fashion-mnist")
    n = full.train.x.shape[0]
    held_x, held_y = full.train.x[n - args.tune_heldout :], full.train.y[n - args.tune_heldout :]
    res = train(cfg)
    gen = torch.Generator().manual_seed(1)
    return {
        "clean": accuracy(res.model, held_x, held_y),
        "pgd20": robust_accuracy(res.model, held_x, held_y, eps=0.1, p=INF, steps=20, generator=gen),
        "train_seconds": sum(m["seconds"] for m in res.history),
    }


def tune_one(args: argparse.Namespace, lam: float) -> dict:
    """Train the fast regularizer with ``lam`` on the tuning images; score it on the held-out ones."""
    cfg = method_config(
        "fast", args, lam, limit_train=args.tune_train, epochs=args.tune_epochs, eval_points=50, eval_steps=2
    )
    t0 = time.perf_counter()
    row = {"lam": lam, **heldout_run(args, cfg)}
    row["wall_seconds"] = time.perf_counter() - t0
    print(
        f"tune lam={lam:g}: held-out clean {row['clean']:.4f} PGD-20 {row['pgd20']:.4f} ({row['train_seconds']:.0f} s)",
        flush=True,
    )
    return row


def tune(args: argparse.Namespace, out: Path) -> float:
    if args.tune_train + args.tune_heldout > 60000:
        raise SystemExit("--tune-train + --tune-heldout must leave the held-out images out of training (<= 60000)")
    if args.jobs == 1:
        rows = [tune_one(args, lam) for lam in args.lams]
    else:  # args.jobs lams at a time, one process each
        tmp = Path(args.runs) / "tune"
        tmp.mkdir(parents=True, exist_ok=True)
        job_args = [
            "--phase",
            "tune-one",
            "--tune-train",
            str(args.tune_train),
            "--tune-heldout",
            str(args.tune_heldout),
            "--tune-epochs",
            str(args.tune_epochs),
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
            "--runs",
            str(tmp),
            *fast_flags(args),
        ]
        rows = []
        for k in range(0, len(args.lams), args.jobs):
            procs = [
                (lam, subprocess.Popen([sys.executable, __file__, *job_args, "--lam", repr(lam)]))
                for lam in args.lams[k : k + args.jobs]
            ]
            for lam, proc in procs:
                if proc.wait() != 0:
                    raise SystemExit(f"the tuning job for lam {lam:g} failed (exit {proc.returncode})")
                rows.append(json.loads((tmp / f"lam-{lam!r}.json").read_text()))
    best = max(rows, key=lambda r: (round(r["pgd20"], 4), -r["lam"]))
    record = {
        "dynamic": args.dynamic,
        "what": f"lam of the fast regularizer (method opnorm, output {args.output!r}, defaults otherwise), chosen by "
        "PGD-20 robust accuracy (l_inf eps 0.1) on held-out training images",
        "output": args.output,
        "command": args.command,
        "train_images": f"the first {args.tune_train} training images, {args.tune_epochs} epochs",
        "heldout_images": f"the last {args.tune_heldout} training images (not trained on in this phase; "
        "the main runs train on the first --train images)",
        "runs": rows,
        "chosen_lam": best["lam"],
    }
    (out / "tuning.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"chosen lam {best['lam']:g}", flush=True)
    return best["lam"]


VARIANTS = {
    "fast (default)": dict(method="opnorm"),
    "free-only (warm_iters=0)": dict(method="opnorm", warm_iters=0),
    "2 explicit iterations per visit": dict(method="opnorm", warm_iters=2),
    "no free update": dict(method="opnorm", free_update=False),
    "no clip": dict(method="opnorm", opnorm_clip=False),
    "paper (10 iterations)": dict(method="opnorm", opnorm_mode="paper"),
    "l_2 logit output, lam 0.02": dict(method="opnorm", opnorm_output="logits", lam=0.02),
    "l_2 logit output, lam 0.04": dict(method="opnorm", opnorm_output="logits", lam=0.04),
    # 2 KL * 6 at any eps (lam = 0.06 at eps = 0.1, where the radii agree)
    "training eps 0.125 (penalty 12 KL)": dict(method="opnorm", eps=0.125, scale_by_eps=True, lam=6.0),
    # explicit iterations linearize at x + eps v (the paper code's dynamic power method): the
    # warm step is then a gradient step of the penalty at its own point, as PGA's second step
    "dynamic (linearize at x + eps v)": dict(method="opnorm", dynamic=True),
    "dynamic, lam 0.12": dict(method="opnorm", dynamic=True, lam=0.12),
    "dynamic, lam 0.03": dict(method="opnorm", dynamic=True, lam=0.03),
    "dynamic, 2 explicit iterations per visit": dict(method="opnorm", dynamic=True, warm_iters=2),
    "dynamic, 1 cold + 2 warm iterations": dict(method="opnorm", dynamic=True, iters=1, warm_iters=2),
    # a training radius above the threat radius, with the dynamic solver (the static one collapsed)
    "dynamic, training eps 0.11 (penalty 12 KL)": dict(
        method="opnorm", dynamic=True, eps=0.11, scale_by_eps=True, lam=6.0
    ),
    "dynamic, training eps 0.125 (penalty 12 KL)": dict(
        method="opnorm", dynamic=True, eps=0.125, scale_by_eps=True, lam=6.0
    ),
    # a change of objective: the cross-entropy at the penalty's point x + eps v instead of at x
    # (adversarial training with the power method's direction, plus the penalty; free)
    "dynamic, CE at x + eps v": dict(method="opnorm", dynamic=True, opnorm_task="perturbed"),
    # finite PGA steps instead of the power method's infinite one: the store carries the PGA
    # iterate delta / eps from visit to visit (transferable perturbations), the CE taken there
    "dynamic, PGA step eps/2, CE at x + delta": dict(
        method="opnorm", dynamic=True, opnorm_task="perturbed", opnorm_step=0.5
    ),
    "dynamic, PGA step eps/4, CE at x + delta": dict(
        method="opnorm", dynamic=True, opnorm_task="perturbed", opnorm_step=0.25
    ),
    "dynamic, PGA step eps/4": dict(method="opnorm", dynamic=True, opnorm_step=0.25),
    "dynamic, PGA step eps/4, CE at x + delta, lam 0.03": dict(
        method="opnorm", dynamic=True, opnorm_task="perturbed", opnorm_step=0.25, lam=0.03
    ),
    "dynamic, PGA step eps/4, CE at x + delta, lam 0.12": dict(
        method="opnorm", dynamic=True, opnorm_task="perturbed", opnorm_step=0.25, lam=0.12
    ),
    "pgd-at": dict(method="pgd-at"),
    # the penalty's objective with a strong adversary: TRADES (clean CE + beta KL at PGD-10's point on
    # the KL), beta 12 = the fast regularizer's 2 KL * lam / eps^2 at lam 0.06. Does the objective or
    # the direction solver limit robustness?
    "TRADES, PGD-10 on the KL, beta 12": dict(method="trades", beta=12.0),
}


def variants(args: argparse.Namespace, out: Path, lam: float) -> None:
    """Held-out runs of VARIANTS (``--only``: some of them); each row goes into variants.json as
    soon as it is done, replacing an earlier row of the same name (jobs may run side by side)."""
    names = args.only or list(VARIANTS)
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(map(repr, VARIANTS))}")
    for name in names:
        kw = dict(VARIANTS[name])
        method = kw.pop("method")
        extra = (
            dict(lam=kw.pop("lam", lam), opnorm_output=kw.pop("opnorm_output", args.output))
            if method == "opnorm"
            else {}
        )
        cfg = TrainConfig.from_dict(
            dict(
                method=method,
                **extra,
                **common(
                    args, limit_train=args.tune_train, epochs=args.tune_epochs, eval_points=50, eval_steps=2, **kw
                ),
            )
        )
        row = {"variant": name, "changes": {**kw, **extra}, "command": args.command, **heldout_run(args, cfg)}
        print(
            f"variant {name}: held-out clean {row['clean']:.4f} PGD-20 {row['pgd20']:.4f} "
            f"({row['train_seconds']:.0f} s)",
            flush=True,
        )
        Path(args.runs).mkdir(parents=True, exist_ok=True)
        with open(Path(args.runs) / "variants.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another job may be merging its row
            path = out / "variants.json"
            record = (
                json.loads(path.read_text())
                if path.exists()
                else {
                    "what": "held-out PGD-20 (l_inf 0.1) and training seconds of variants of the fast configuration",
                    "train_images": f"the first {args.tune_train} training images, {args.tune_epochs} epochs",
                    "heldout_images": f"the last {args.tune_heldout} training images",
                    "runs": [],
                }
            )
            record["runs"] = [r for r in record["runs"] if r["variant"] != name] + [row]
            write_text_atomic(path, json.dumps(record, indent=2) + "\n")


# ----------------------------------------------------------------------------- main


def apgd_accuracy(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, steps: int, batch: int = 250
) -> float:
    atk = APGDAttack(loss, steps=steps, seed=0, batch_size=batch)
    return evaluate(model, x, y, eps=0.1, p=INF, attacks=[atk], every_example=True).accuracy(atk.name, 0.1)


def direction_quality(model: torch.nn.Module, reg_state: dict, x: torch.Tensor, index: torch.Tensor) -> dict:
    """The stored directions against PGA on the same logit loss ||f(clip(x + eps v)) - f(x)||_2."""
    bank = reg_state["reg.store.directions"]
    seen = reg_state["reg.store.seen"]
    v = bank[index].to(x.dtype)
    with torch.no_grad(), eval_mode(model):
        clean = model(x)
        banked = torch.linalg.vector_norm(model((x + 0.1 * v).clamp(0, 1)) - clean, dim=1)
    out = {"examples": int(x.shape[0]), "all_seen": bool(seen[index].all())}
    for k in (1, 10):
        adv = opnorm.pgd(
            model,
            x,
            eps=0.1,
            p=INF,
            loss="logit",
            q=2,
            steps=k,
            step_size=float("inf"),
            random_start=True,
            generator=torch.Generator().manual_seed(k),
        )
        with torch.no_grad(), eval_mode(model):
            ref = torch.linalg.vector_norm(model(adv) - clean, dim=1)
        out[f"banked_over_pga{k}_median"] = float((banked / ref).median())
    return out


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    gen = lambda: torch.Generator().manual_seed(123)  # noqa: E731  the same attack randomness for both models
    res: dict[str, Any] = {"clean": accuracy(model, x, y)}
    res["pgd20_restarts"] = robust_accuracy(
        model, x, y, eps=0.1, p=INF, steps=20, restarts=args.restarts, generator=gen()
    )
    res["apgd_ce"] = apgd_accuracy(model, x, y, "ce", args.apgd_steps)
    res["apgd_dlr"] = apgd_accuracy(model, x, y, "dlr", args.apgd_steps)
    res["worst_case"] = min(res["pgd20_restarts"], res["apgd_ce"], res["apgd_dlr"])
    res["pgd20_vs_eps"] = {
        f"{e:g}": (res["clean"] if e == 0 else robust_accuracy(model, x, y, eps=e, p=INF, steps=20, generator=gen()))
        for e in EPS_GRID
    }
    res["eval_seconds"] = time.perf_counter() - t0
    return res


def summarize(name: str, res, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Training history and the evaluation of one finished run (JSON-ready)."""
    hist = res.history
    cumulative = [sum(h["seconds"] for h in hist[: i + 1]) for i in range(len(hist))]
    summary = {
        "config": res.config.to_dict(),
        "train_seconds": cumulative[-1],
        "epochs": [
            {
                "epoch": h["epoch"],
                "cumulative_train_seconds": c,
                "accuracy": h["accuracy"],
                "pgd20": h["robust_accuracy"],
                "operator_norm": h["operator_norm"],
                "loss": h["loss"],
            }
            for h, c in zip(hist, cumulative)
        ],
        **evaluate(res.model, x, y, args),
    }
    print(
        f"{name}: {json.dumps({k: v for k, v in summary.items() if k in ('clean', 'pgd20_restarts', 'apgd_ce', 'apgd_dlr', 'train_seconds')})}",
        flush=True,
    )
    return summary


def one_phase(args: argparse.Namespace, lam: float) -> None:
    """Train and evaluate one method (``--which``) and write its summary: a job of ``--jobs 2``."""
    run = Path(args.runs) / args.which
    if run.exists():
        shutil.rmtree(run)
    res = train(method_config(args.which, args, lam, out=str(run)))
    splits = load_dataset("fashion-mnist")
    summary = summarize(args.which, res, args, splits.test.x[: args.points], splits.test.y[: args.points])
    summary["threads"] = args.threads
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main_phase(args: argparse.Namespace, out: Path, lam: float) -> dict:
    runs_dir = Path(args.runs)
    if runs_dir.exists():
        shutil.rmtree(runs_dir)
    names = ("pgd-at", "fast")
    splits = load_dataset("fashion-mnist")
    x, y = splits.test.x[: args.points], splits.test.y[: args.points]
    t_start = time.perf_counter()
    methods: dict[str, Any] = {}
    if args.jobs > 1:
        # both methods at once, one process and args.threads threads each: they share the
        # machine's load at every moment, as the alternating epochs of --jobs 1 do in turn
        job_args = [
            "--phase",
            "one",
            "--lam",
            repr(lam),
            "--runs",
            str(runs_dir),
            "--epochs",
            str(args.epochs),
            "--points",
            str(args.points),
            "--restarts",
            str(args.restarts),
            "--apgd-steps",
            str(args.apgd_steps),
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
            *fast_flags(args),
        ]
        if args.train is not None:
            job_args += ["--train", str(args.train)]
        procs = {n: subprocess.Popen([sys.executable, __file__, *job_args, "--which", n]) for n in names}
        for n, proc in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"the {n} job failed (exit {proc.returncode})")
        for n in names:
            methods[n] = json.loads((runs_dir / n / "summary.json").read_text())
        results = {n: train(method_config(n, args, lam, out=str(runs_dir / n)), resume=True) for n in names}
    else:
        cfgs = {n: method_config(n, args, lam, out=str(runs_dir / n)) for n in names}
        results = {}
        for epoch in range(args.epochs):
            order = names if epoch % 2 == 0 else names[::-1]  # alternate who goes first
            for n in order:
                results[n] = train(cfgs[n], resume=epoch > 0, stop_after=1)
                m = results[n].history[-1]
                print(
                    f"{n:7} epoch {epoch + 1}/{args.epochs}: {m['seconds']:.1f} s, acc {m['accuracy']:.4f}, "
                    f"PGD-20 {m['robust_accuracy']:.4f}",
                    flush=True,
                )
        for n in names:
            methods[n] = summarize(n, results[n], args, x, y)
    train_wall = time.perf_counter() - t_start
    return write_record(args, out, lam, splits, methods, results, train_wall)


def combine_phase(args: argparse.Namespace, out: Path, lam: float) -> dict:
    """results.json from two ``--phase one`` jobs that finished in ``--runs`` at different times (when the
    machine could not run them side by side): accuracies and gaps as in ``main``; the time ratio is marked
    as not measured side by side."""
    runs_dir = Path(args.runs)
    names = ("pgd-at", "fast")
    missing = [n for n in names if not (runs_dir / n / "summary.json").exists()]
    if missing:
        raise SystemExit(f"no finished job for {missing} in {runs_dir}: run --phase one --which NAME first")
    methods = {n: json.loads((runs_dir / n / "summary.json").read_text()) for n in names}
    results = {n: train(method_config(n, args, lam, out=str(runs_dir / n)), resume=True) for n in names}
    return write_record(args, out, lam, load_dataset("fashion-mnist"), methods, results, None)


def write_record(
    args: argparse.Namespace,
    out: Path,
    lam: float,
    splits: Any,
    methods: dict[str, Any],
    results: dict[str, Any],
    train_wall: float | None,
) -> dict:
    """Add the banked-direction check to the finished runs' summaries; write and return results.json."""
    runs_dir = Path(args.runs)
    # how good the banked directions of the fast run are at its final weights (training images)
    state = torch.load(runs_dir / "fast" / "checkpoint.pt", map_location="cpu", weights_only=True)
    n_q = min(512, splits.train.x.shape[0] if args.train is None else args.train)
    methods["fast"]["direction_quality"] = direction_quality(
        results["fast"].model, state["objective"], splits.train.x[:n_q], torch.arange(n_q)
    )

    a, f = methods["pgd-at"], methods["fast"]
    record = {
        "schema": "opnorm.fast-regularizer/1",
        "command": args.command,
        "settings": {
            "dataset": "fashion-mnist",
            "model": "cnn (build_model('cnn', input_shape=(1, 28, 28)))",
            "train_images": splits.train.x.shape[0] if args.train is None else args.train,
            "epochs": args.epochs,
            "batch_size": 128,
            "optimizer": "sgd lr 0.05 momentum 0.9 wd 5e-4, cosine",
            "threat": "l_inf eps 0.1, pixels in [0, 1]",
            "seed": args.seed,
            "threads": args.threads,
            "test_points": args.points,
            "pgd_restarts": args.restarts,
            "apgd_steps": args.apgd_steps,
            "lam": lam,
            "output": args.output,
            "dynamic": args.dynamic,
            "task": args.task,
            "step": args.step,
            "cold_iters": args.cold_iters,
            "warm_iters": args.warm_iters,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "wall_seconds_both": train_wall,
        "jobs": args.jobs if train_wall is not None else "separate",
        "methods": methods,
        "comparison": {
            "time_ratio_fast_over_at": f["train_seconds"] / a["train_seconds"],
            "gap_points_pgd20": 100 * (a["pgd20_restarts"] - f["pgd20_restarts"]),
            "gap_points_apgd_ce": 100 * (a["apgd_ce"] - f["apgd_ce"]),
            "gap_points_apgd_dlr": 100 * (a["apgd_dlr"] - f["apgd_dlr"]),
            "gap_points_clean": 100 * (a["clean"] - f["clean"]),
        },
    }
    c = record["comparison"]
    c["time_side_by_side"] = train_wall is not None
    c["robustness_goal_met"] = max(c[k] for k in GAP_KEYS) <= GAP_GOAL
    c["time_goal_met"] = c["time_ratio_fast_over_at"] <= TIME_GOAL if c["time_side_by_side"] else None
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def paper_phase(args: argparse.Namespace, out: Path, lam: float) -> None:
    run = Path(args.runs) / "paper"
    if run.exists():
        shutil.rmtree(run)
    # the same regularizer (output metric, dynamic, clip, lam) with the paper's solver
    res = train(method_config("fast", args, lam, opnorm_mode="paper", opnorm_clip=True, out=str(run)))
    splits = load_dataset("fashion-mnist")
    record = {
        "command": args.command,
        **summarize("paper", res, args, splits.test.x[: args.points], splits.test.y[: args.points]),
    }
    (out / "paper.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"paper: {json.dumps({k: v for k, v in record.items() if k in ('clean', 'pgd20_restarts', 'apgd_ce', 'apgd_dlr', 'train_seconds')})}",
        flush=True,
    )


# ----------------------------------------------------------------------------- report


def plots(record: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = record["settings"].get("output", "logits")
    metric = "Fisher metric (KL)" if output == "kl" else "l_2 logits"
    labels = {"pgd-at": "PGD-10 AT", "fast": f"fast d.d. op-norm reg., l_inf, {metric}"}
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for n, m in record["methods"].items():
        eps = [float(e) for e in m["pgd20_vs_eps"]]
        ax.plot(eps, [100 * v for v in m["pgd20_vs_eps"].values()], marker="o", label=labels.get(n, n))
    ax.axvline(0.1, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("l_inf eps (PGD-20)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(f"Fashion-MNIST, {record['settings']['test_points']} test points")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "robust_vs_eps.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for n, m in record["methods"].items():
        t = [0.0] + [e["cumulative_train_seconds"] for e in m["epochs"]]
        r = [10.0] + [100 * e["pgd20"] for e in m["epochs"]]  # an untrained net: chance (10 %)
        ax.plot(t, r, marker="o", label=labels.get(n, n))
    ax.set_xlabel("cumulative training seconds")
    ax.set_ylabel("robust accuracy (%), PGD-20 eps 0.1")
    ax.set_title("robust accuracy after each epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "robust_vs_time.png", dpi=120)
    plt.close(fig)


def side_by_side(record: dict) -> bool:
    """Whether both methods of a main-phase record trained at the same time (their time ratio is comparable)."""
    return record["comparison"].get("time_side_by_side", True)


def how_trained(record: dict) -> str:
    """The report's words for how the two runs of a main-phase record shared the machine."""
    if not side_by_side(record):
        threads = ", ".join(
            f"{n}: {m.get('threads', record['settings']['threads'])} thread(s)" for n, m in record["methods"].items()
        )
        return f"they were trained apart, not side by side ({threads}), so their seconds do not compare"
    if record.get("jobs", 1) == 2:
        return "they were trained and evaluated at the same time, in two processes on one machine"
    return "their epochs ran alternately in one process"


def mean_gaps(records: list[dict]) -> tuple[list[float], float | None]:
    """The mean gaps (PGD-20, APGD-CE, APGD-DLR) of records, and their mean side-by-side time ratio (None: none
    trained side by side)."""
    means = [sum(r["comparison"][k] for r in records) / len(records) for k in GAP_KEYS]
    timed = [r["comparison"]["time_ratio_fast_over_at"] for r in records if side_by_side(r)]
    return means, (sum(timed) / len(timed) if timed else None)


def ratio_text(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}"


def seed_records(out: Path) -> list[dict]:
    """The same comparison at other seeds: ``out/seed-K/results.json``."""
    return [json.loads(f.read_text()) for f in sorted(out.glob("seed-*/results.json"))]


def configuration_folders(out: Path) -> list[tuple[Path, list[dict]]]:
    """(folder, its seeds' records) for other fast configurations: ``out/NAME/seed-K/results.json``, NAME
    neither ``seed-*`` nor ``epochs-*``."""
    found = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(("seed-", "epochs-"))):
        records = [json.loads(f.read_text()) for f in sorted(folder.glob("seed-*/results.json"))]
        if records:
            found.append((folder, records))
    return found


def standing_lines(record: dict, others: list[dict], configurations: list[tuple[Path, list[dict]]]) -> list[str]:
    """A table of every configuration's mean gaps over its seeds against the goal (the report's summary):
    this run with ``others`` (:func:`seed_records`), then ``configurations`` (:func:`configuration_folders`)."""
    rows = [("this run (below)", [record, *others])]
    rows += [(f"`{folder.name}/`: {describe(records[0]['settings'])}", records) for folder, records in configurations]
    if len(rows) == 1:
        return []
    lines = [
        "## Where the goal stands",
        "",
        f"Mean gaps (points, PGD-10 AT minus fast) over each configuration's seeds; the goal is <= {GAP_GOAL:g} on "
        f"all three and a time ratio <= {TIME_GOAL:g} (side by side). Per-seed tables are further down.",
        "",
        "| fast configuration | seeds | PGD-20 x restarts | APGD-CE | APGD-DLR | time ratio (side by side) | goal on the mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, records in rows:
        means, ratio = mean_gaps(records)
        met = max(means) <= GAP_GOAL and ratio is not None and ratio <= TIME_GOAL
        lines.append(
            f"| {name} | {len(records)} | "
            + " | ".join(f"{v:.1f}" for v in means)
            + f" | {ratio_text(ratio)} | {'met' if met else 'not met'} |"
        )
    return lines + [""]


def gap_rows(records: list[dict]) -> list[str]:
    """Table rows of main-phase records (one per seed: AT / fast accuracies, gaps, time ratio), a row of
    their means, and whether the largest mean gap meets the goal."""
    records = sorted(records, key=lambda r: r["settings"]["seed"])
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [
        "| seed | clean | PGD-20 x restarts | APGD-CE | APGD-DLR | gaps PGD-20 / APGD-CE / APGD-DLR | time ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        a, f, c = r["methods"]["pgd-at"], r["methods"]["fast"], r["comparison"]
        lines.append(
            f"| {r['settings']['seed']} | "
            + " | ".join(f"{pct(a[k])} / {pct(f[k])}" for k in ("clean", "pgd20_restarts", "apgd_ce", "apgd_dlr"))
            + " | "
            + " / ".join(f"{c[k]:.1f}" for k in GAP_KEYS)
            + (f" | {c['time_ratio_fast_over_at']:.2f} |" if side_by_side(r) else " | n/a (trained apart) |")
        )
    means, ratio = mean_gaps(records)
    lines.append(
        f"| mean of {len(records)} | | | | | " + " / ".join(f"{m:.1f}" for m in means) + f" | {ratio_text(ratio)} |"
    )
    lines += [
        "",
        f"Largest mean gap: {max(means):.1f} points (goal <= {GAP_GOAL:g}: "
        f"**{'met' if max(means) <= GAP_GOAL else 'not met'}** "
        f"on the mean of {len(records)} seed(s)).",
    ]
    return lines


def seed_table(record: dict, others: list[dict]) -> list[str]:
    """Report lines comparing this run with the same comparison at other seeds (:func:`seed_records`, main
    runs with ``--seed K --out OUT/seed-K``): per-seed gaps, and their means."""
    if not others:
        return []
    return [
        "",
        "## Seeds",
        "",
        "The same comparison (command above) at other seeds (`--seed K --out <this folder>/seed-K`): "
        "the initialization and the batch order change; training settings, test points and attack seeds are "
        "the same. Accuracies in %, AT / fast; gaps in points.",
        "",
        *gap_rows([record, *others]),
    ]


def epochs_table(out: Path) -> list[str]:
    """Report lines for the same comparison trained longer (``out/epochs-E/seed-K/results.json``, main runs with
    ``--epochs E --seed K --out OUT/epochs-E/seed-K``): per-seed gaps and their means, per number of epochs."""
    found: dict[int, list[dict]] = {}
    for f in sorted(out.glob("epochs-*/seed-*/results.json")):
        r = json.loads(f.read_text())
        found.setdefault(r["settings"]["epochs"], []).append(r)
    if not found:
        return []
    lines = [
        "",
        "## Longer training",
        "",
        "The same comparison with more epochs for both methods (the cosine schedule stretched to them; "
        "`--epochs E --seed K --out <this folder>/epochs-E/seed-K`; everything else as above). "
        "Accuracies in %, AT / fast; gaps in points.",
    ]
    if not all(side_by_side(r) for records in found.values() for r in records):
        lines[-1] += (
            " Rows whose time ratio reads n/a trained apart (`--phase one --which NAME` for each method, "
            "then `--phase combine`): their accuracies compare, their seconds do not."
        )
    for epochs, records in sorted(found.items()):
        lines += ["", f"### {epochs} epochs", "", *gap_rows(records)]
    return lines


def describe(s: dict) -> str:
    """The fast configuration of a record's settings, in words."""
    words = [f"output {s.get('output', 'logits')}", f"lam {s['lam']:g}"]
    if s.get("dynamic"):
        words.append("dynamic")
    if s.get("step") is not None:
        words.append(f"PGA steps of {s['step']:g} eps kept in the bank (step={s['step']:g})")
    if s.get("task") == "perturbed":
        words.append('cross-entropy at the penalty\'s point (opnorm_task="perturbed")')
    if s.get("cold_iters") is not None or s.get("warm_iters") is not None:
        cold = FAST_COLD_ITERS if s.get("cold_iters") is None else s["cold_iters"]
        warm = FAST_WARM_ITERS if s.get("warm_iters") is None else s["warm_iters"]
        words.append(f"{cold} explicit iteration(s) on the first visit, {warm} on later ones")
    return ", ".join(words)


def configuration_tables(configurations: list[tuple[Path, list[dict]]]) -> list[str]:
    """Report lines for other fast configurations against the same AT runs (:func:`configuration_folders`):
    per-seed gaps and their means, per configuration."""
    lines: list[str] = []
    for folder, records in configurations:
        if not lines:
            lines = [
                "",
                "## Other fast configurations",
                "",
                "Other configurations of the fast run against the PGD-10 AT runs of the same seeds (the AT "
                "runs above, reused: the seed's `pgd-at` run folder copied into the `--runs` folder, then "
                "`--phase one --which fast` with the configuration's flags and `--phase combine`; a seed whose "
                "time ratio is given trained both methods side by side with `--phase main --jobs 2`). "
                "Accuracies in %, AT / fast; gaps in points.",
            ]
        made = []
        for r in sorted(records, key=lambda r: r["settings"]["seed"]):
            command = r["command"]
            if "--phase combine" in command:  # the fast job that preceded it, with the same flags
                one = re.sub(r" --out \S+", "", command.replace("--phase combine", "--phase one --which fast"))
                command = f"{one}`, then `{command}"
            made.append(f"* seed {r['settings']['seed']}: `{command}`")
        lines += [
            "",
            f"### `{folder.name}/`: {describe(records[0]['settings'])}",
            "",
            "Made by:",
            "",
            *made,
            "",
            *gap_rows(records),
        ]
    return lines


def readme(record: dict, out: Path) -> None:
    s, c, m = record["settings"], record["comparison"], record["methods"]
    a, f = m["pgd-at"], m["fast"]
    others, configurations = seed_records(out), configuration_folders(out)
    tuning = json.loads((out / "tuning.json").read_text()) if (out / "tuning.json").exists() else None
    bench_path = HERE / "results" / "fast_regularizer.json"
    bench = json.loads(bench_path.read_text()) if bench_path.exists() else None
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [
        "# Fast d.d. operator norm regularization vs PGD-10 adversarial training (Fashion-MNIST)",
        "",
        *standing_lines(record, others, configurations),
        "Made by:",
        "",
        "```",
        record["command"],
        "```",
        "",
        f"Small CNN, {s['train_images']} training images, {s['epochs']} epochs, batch {s['batch_size']}, "
        f"{s['optimizer']}, seed {s['seed']}, {s['threads']} thread(s); {s['threat']}. Both runs share every "
        f"setting; {how_trained(record)}. Evaluation on the first {s['test_points']} test images; torch {s['torch']}.",
        "",
        f"The fast regularizer: `OperatorNormRegularizer('inf', 2, eps=0.1, lam={s['lam']:g}, "
        f"output={s.get('output', 'logits')!r}, clip=(0, 1)"
        + (", dynamic=True" if s.get("dynamic") else "")
        + ")` in its default fast mode"
        + (
            " (the change of the softmax output measured by KL, locally the Fisher metric: the power method on "
            "J^T H J, penalty lam * 2 KL(f(x) || f(x + eps v)) / eps^2)"
            if s.get("output") == "kl"
            else ""
        )
        + (
            "; its explicit iteration linearizes at x + eps v (the stored direction's point) instead of at x"
            if s.get("dynamic")
            else ""
        )
        + (
            '; its cross-entropy is taken at x + eps v instead of at x (`opnorm_task="perturbed"`)'
            if s.get("task") == "perturbed"
            else ""
        )
        + ".",
        "",
        "| | PGD-10 AT | fast op-norm reg. | gap (points) |",
        "|---|---|---|---|",
        f"| training seconds | {a['train_seconds']:.0f} | {f['train_seconds']:.0f} | "
        f"ratio {c['time_ratio_fast_over_at']:.2f}" + ("" if side_by_side(record) else " (trained apart)") + " |",
        f"| clean accuracy (%) | {pct(a['clean'])} | {pct(f['clean'])} | {c['gap_points_clean']:+.1f} |",
        f"| PGD-20, {s['pgd_restarts']} restarts (%) | {pct(a['pgd20_restarts'])} | {pct(f['pgd20_restarts'])} | "
        f"{c['gap_points_pgd20']:+.1f} |",
        f"| APGD-CE, {s['apgd_steps']} steps (%) | {pct(a['apgd_ce'])} | {pct(f['apgd_ce'])} | "
        f"{c['gap_points_apgd_ce']:+.1f} |",
        f"| APGD-DLR, {s['apgd_steps']} steps (%) | {pct(a['apgd_dlr'])} | {pct(f['apgd_dlr'])} | "
        f"{c['gap_points_apgd_dlr']:+.1f} |",
        f"| worst of the three (%) | {pct(a['worst_case'])} | {pct(f['worst_case'])} | "
        f"{100 * (a['worst_case'] - f['worst_case']):+.1f} |",
        "",
        "Gap = PGD-10 AT minus fast, in accuracy points (positive: AT is more robust).",
        "",
        f"* Robustness goal (every gap <= 2 points): **{'met' if c['robustness_goal_met'] else 'not met'}**.",
        f"* Training-time goal (fast <= half of AT's): **{'met' if c['time_goal_met'] else 'not met'}** "
        f"(ratio {c['time_ratio_fast_over_at']:.2f})."
        if side_by_side(record)
        else "* Training-time goal: not measured by this run (the two methods trained apart).",
    ]
    if bench is not None:
        lines += [
            f"* Step-time benchmark (`benchmarks/fast_regularizer.py`, {bench['threads']} threads, steady state): "
            f"fast step / PGD-10 AT step = **{bench['fast_over_pgd10_at']:.2f}** (goal <= 0.5), "
            f"fast step / clean step = **{bench['fast_over_clean']:.2f}** (floor about 2)"
            + (
                f"; with the KL output: **{bench['fast_kl_over_pgd10_at']:.2f}** and **{bench['fast_kl_over_clean']:.2f}**"
                if "fast_kl_over_pgd10_at" in bench
                else ""
            )
            + (
                f"; with the KL output, dynamic: **{bench['fast_kl_dynamic_over_pgd10_at']:.2f}** and "
                f"**{bench['fast_kl_dynamic_over_clean']:.2f}**"
                if "fast_kl_dynamic_over_pgd10_at" in bench
                else ""
            )
            + (
                f"; with finite PGA steps and the cross-entropy at the PGA point (`pga-step/` below): "
                f"**{bench['fast_kl_pga_perturbed_over_pgd10_at']:.2f}** and **{bench['fast_kl_pga_perturbed_over_clean']:.2f}**"
                if "fast_kl_pga_perturbed_over_pgd10_at" in bench
                else ""
            )
            + (
                f"; over a 3-epoch run (one cold visit, two warm), 3 + 1 explicit iterations: "
                f"**{bench['fast_kl_pga_perturbed_3_epochs_over_pgd10_at']:.2f}**, 1 + 2 (`pga-c1w2/` below): "
                f"**{bench['fast_kl_pga_perturbed_c1w2_3_epochs_over_pgd10_at']:.2f}**"
                if "fast_kl_pga_perturbed_c1w2_3_epochs_over_pgd10_at" in bench
                else ""
            )
            + ".",
        ]
    lines += [
        "",
        "![robust accuracy vs eps](robust_vs_eps.png) ![robust accuracy vs training time](robust_vs_time.png)",
        "",
    ]
    lines += [
        "## Per epoch (trainer's evaluation: PGD-20, 1 restart, same test points)",
        "",
        "| method | epoch | cumulative train s | clean (%) | PGD-20 (%) | mean J(x) (inf,2) norm |",
        "|---|---|---|---|---|---|",
    ]
    for n, mm in m.items():
        for e in mm["epochs"]:
            lines.append(
                f"| {n} | {e['epoch']} | {e['cumulative_train_seconds']:.0f} | {pct(e['accuracy'])} | "
                f"{pct(e['pgd20'])} | {e['operator_norm']:.2f} |"
            )
    lines += [
        "",
        "## Robust accuracy (%) vs eps (PGD-20, 1 restart)",
        "",
        "| eps | " + " | ".join(m) + " |",
        "|---|" + "---|" * len(m),
    ]
    for e in a["pgd20_vs_eps"]:
        lines.append(f"| {e} | " + " | ".join(pct(mm["pgd20_vs_eps"][e]) for mm in m.values()) + " |")
    lines += seed_table(record, others)
    lines += epochs_table(out)
    lines += configuration_tables(configurations)
    if "direction_quality" in f:
        dq = f["direction_quality"]
        lines += [
            "",
            "## Banked directions",
            "",
            f"At the fast run's final weights, on {dq['examples']} training images, the stored direction v "
            f"reaches a median of {dq['banked_over_pga1_median']:.3f} of the logit loss "
            f"||f(clip(x + eps v)) - f(x)||_2 of one PGA step (infinite step size, random start) and "
            f"{dq['banked_over_pga10_median']:.3f} of ten (the (inf, 2) power method with the box).",
        ]
    if tuning is not None:
        lines += [
            "",
            "## lam (tuned before the main run, on held-out training images)",
            "",
            f"{tuning['train_images']}; held out: {tuning['heldout_images']}.",
            "",
            "| lam | held-out clean (%) | held-out PGD-20 (%) |",
            "|---|---|---|",
        ]
        for r in tuning["runs"]:
            lines.append(f"| {r['lam']:g} | {pct(r['clean'])} | {pct(r['pgd20'])} |")
        lines += [
            "",
            f"Chosen: lam = {tuning['chosen_lam']:g} (highest held-out PGD-20)."
            + (
                " Tuned with the static solver (dynamic=False) and kept for the dynamic one, whose held-out runs "
                "at other lams are below."
                if s.get("dynamic") and not tuning.get("dynamic")
                else ""
            ),
        ]
    paper_path = out / "paper.json"
    if paper_path.exists():
        pp = json.loads(paper_path.read_text())
        lines += [
            "",
            "## The paper configuration under the same settings",
            "",
            '`opnorm_mode="paper"` (10 power iterations per batch from random starts, nothing kept), '
            "the main run's settings, output metric, clip and lam"
            + (", dynamic" if pp["config"].get("dynamic") else "")
            + f", trained alone afterwards (its seconds were not measured side by side with the others). "
            f"Made by `{pp['command']}`.",
            "",
            "| | PGD-10 AT | fast | paper |",
            "|---|---|---|---|",
            f"| training seconds | {a['train_seconds']:.0f} | {f['train_seconds']:.0f} | {pp['train_seconds']:.0f} |",
        ]
        for key, label in (
            ("clean", "clean"),
            ("pgd20_restarts", "PGD-20"),
            ("apgd_ce", "APGD-CE"),
            ("apgd_dlr", "APGD-DLR"),
            ("worst_case", "worst of the three"),
        ):
            lines.append(f"| {label} (%) | {pct(a[key])} | {pct(f[key])} | {pct(pp[key])} |")
    var_path = out / "variants.json"
    if var_path.exists():
        var = json.loads(var_path.read_text())
        commands = sorted({r["command"] for r in var["runs"]})
        lines += [
            "",
            "## Which parts pay off (held-out runs, the tuning setup)",
            "",
            f"{var['train_images']}; held out: {var['heldout_images']}; PGD-20 l_inf 0.1, 1 restart. Jobs ran "
            "two at a time, one thread each: seconds compare roughly. Made by "
            + ", ".join(f"`{c}`" for c in commands)
            + ".",
            "",
            "| variant | lam | training s | held-out clean (%) | held-out PGD-20 (%) |",
            "|---|---|---|---|---|",
        ]
        for r in var["runs"]:
            lam_r = r["changes"].get("lam")
            lines.append(
                f"| {r['variant']} | {'' if lam_r is None else f'{lam_r:g}'} | {r['train_seconds']:.0f} | "
                f"{pct(r['clean'])} | {pct(r['pgd20'])} |"
            )
    notes = out / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    (out / "README.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--phase",
        choices=("tune", "main", "variants", "paper", "report", "all", "one", "tune-one", "combine"),
        default="all",
    )
    ap.add_argument(
        "--output",
        choices=("kl", "logits"),
        default="kl",
        help="the fast regularizer's output metric: kl (the softmax's Fisher metric) or logits (l_2)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        choices=(1, 2),
        help="main phase: 1 alternates the two methods' epochs in one process; 2 trains and "
        "evaluates them at the same time in two processes (half the wall time)",
    )
    ap.add_argument("--which", choices=("pgd-at", "fast"), help="--phase one: the method of this job")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument(
        "--runs",
        default=str(HERE.parent / "runs" / "fast-regularizer"),
        help="run directories (checkpoints; not committed)",
    )
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train", type=int, default=None, help="train on the first N images (default: all 60k)")
    ap.add_argument("--points", type=int, default=1000, help="test points of the evaluation")
    ap.add_argument("--restarts", type=int, default=3, help="PGD-20 restarts")
    ap.add_argument("--apgd-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lam", type=float, default=None, help="skip tuning and use this lam")
    ap.add_argument("--lams", type=float, nargs="+", default=None, help="default: LAMS[--output]")
    ap.add_argument("--tune-train", type=int, default=10000)
    ap.add_argument("--tune-heldout", type=int, default=1000)
    ap.add_argument("--tune-epochs", type=int, default=3)
    ap.add_argument(
        "--dynamic",
        action="store_true",
        help="the fast regularizer's explicit iterations linearize at x + eps v (dynamic=True)",
    )
    ap.add_argument(
        "--task",
        choices=OPNORM_TASKS,
        default="clean",
        help="where the fast run's cross-entropy is taken: clean (at x, the d.d. regularization) or "
        "perturbed (at x + eps v: adversarial training with the power method's direction plus the "
        "penalty; opnorm_task)",
    )
    ap.add_argument(
        "--step",
        type=float,
        default=None,
        help="the fast run's PGA step as a fraction of eps (opnorm_step; default: infinite, the power method)",
    )
    ap.add_argument(
        "--cold-iters",
        type=int,
        default=None,
        help=f"the fast run's explicit iterations on an example's first visit (iters; default: {FAST_COLD_ITERS})",
    )
    ap.add_argument(
        "--warm-iters",
        type=int,
        default=None,
        help=f"the fast run's explicit iterations on later visits (warm_iters; default: {FAST_WARM_ITERS})",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help="--phase variants: run only these (names of VARIANTS)",
    )
    ap.add_argument("--tiny", action="store_true", help="a smoke run: few images, epochs and steps")
    args = ap.parse_args()
    args.command = "python benchmarks/fast_regularizer_fmnist.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.lams is None:
        args.lams = list(LAMS[args.output])
    if args.tiny:
        args.epochs, args.train, args.points, args.restarts, args.apgd_steps = 2, 512, 64, 1, 5
        args.tune_train, args.tune_heldout, args.tune_epochs, args.lams = 256, 64, 1, [0.01, 0.04]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    lam = args.lam
    if args.phase in ("tune", "all") and lam is None:
        lam = tune(args, out)
    if args.phase == "tune-one":
        row = tune_one(args, args.lam)
        (Path(args.runs) / f"lam-{args.lam!r}.json").write_text(json.dumps(row) + "\n")
        return
    if args.phase in ("main", "variants", "paper", "all", "one", "combine"):
        if lam is None:
            tuned = out / "tuning.json"
            if not tuned.exists():
                raise SystemExit("no lam: run --phase tune first or pass --lam")
            lam = json.loads(tuned.read_text())["chosen_lam"]
    if args.phase == "one":
        one_phase(args, lam)
        return
    if args.phase in ("main", "all"):
        main_phase(args, out, lam)
    if args.phase == "combine":
        combine_phase(args, out, lam)
    if args.phase == "variants":
        variants(args, out, lam)
    if args.phase == "paper":
        paper_phase(args, out, lam)
    if args.phase in ("main", "report", "all", "combine"):
        record = json.loads((out / "results.json").read_text())
        plots(record, out)
        readme(record, out)
        print(f"written to {out}", flush=True)


if __name__ == "__main__":
    main()
