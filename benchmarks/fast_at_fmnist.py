"""Fashion-MNIST: fast adversarial training methods against the fast d.d. operator norm regularizer.

Every method trains the small CNN with ``opnorm.train`` under the same settings (l_inf, SGD +
momentum 0.9, lr 0.05, weight decay 5e-4, cosine schedule, batch 128, ``--epochs`` epochs of
optimizer steps, the first ``--train`` training images, one thread), one run after the other in
one process; training time is the trainer's per-epoch ``seconds`` (batches only). Methods
(:data:`METHODS`): PGD-10 AT, TRADES (beta 6, PGD-10 on the KL), FGSM-RS, free (``--replays``
replays, ``epochs / replays`` passes), N-FGSM, and the d.d. operator norm regularizer in its
default fast mode (KL output, lam 0.06: the output and lam of docs/results/fast-regularizer/),
in ``configs/fashion-mnist-fast-robust.json`` and in the paper configuration (``opnorm_mode
"paper"``: 10 power iterations per batch, otherwise as the default); and two changes of the
fast-robust configuration: an FGSM-size step of the stored iterate (chosen on held-out training
images by ``fast_at_variants.py``) and weight 0 (the store of iterates alone, ATTA's idea).

Each finished run is evaluated on the first ``--points`` test images: clean accuracy and, per
example, robustness under PGD-20 with ``--restarts`` restarts (opnorm.pgd), APGD-CE and APGD-DLR
(torchattacks, ``--apgd-steps`` steps) and Square (torchattacks, ``--square-queries`` queries,
black-box); the worst case over the attacks is taken per example (an example counts as robust
only if no attack fools it, as AutoAttack reports). Each run writes
``<out>/runs/eps-<eps>/<method>/seed-<seed>/results.json`` (checkpoints go to ``--runs``), so the
study resumes where it stopped: finished runs are skipped, an interrupted one resumes from its
last epoch. ``--phase report`` (also the end of ``--phase all``) writes ``results.json``,
``report.md`` and ``robust_vs_time_eps-<eps>.png`` from the runs on disk.

    python benchmarks/fast_at_fmnist.py                                   # everything, resumable
    python benchmarks/fast_at_fmnist.py --seeds 0 --radii 0.1 --methods fgsm-rs free
    python benchmarks/fast_at_fmnist.py --phase report                    # only the report
    python benchmarks/fast_at_fmnist.py --tiny --out /tmp/fa --runs /tmp/fa-runs   # a smoke run (digits)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from opnorm.evaluation import APGDAttack, PGDAttack, SquareAttack
from opnorm.evaluation import evaluate as evaluate_attacks
from opnorm.training.config import TrainConfig
from opnorm.training.data import load_dataset
from opnorm.training.files import write_text_atomic
from opnorm.training.trainer import CHECKPOINT, accuracy, train

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = ROOT / "docs" / "results" / "fast-at"
FAST_ROBUST = ROOT / "configs" / "fashion-mnist-fast-robust.json"
ATTACKS = ("pgd20", "apgd_ce", "apgd_dlr", "square")
GAP_GOAL = 1.0  # points of worst-case robust accuracy below PGD-10 AT, on every seed
TIME_GOAL = 0.3  # training time over PGD-10 AT's
# the harness sets these for every method; a method's own config may set the rest
SHARED = (
    "dataset",
    "model",
    "p",
    "eps",
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "scheduler",
    "seed",
    "eval_points",
    "eval_steps",
    "limit_train",
    "out",
    "progress",
)
OPNORM_DEFAULT = dict(method="opnorm", lam=0.06, opnorm={"output": "kl"})
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "pgd-at": ("PGD-10 AT", dict(method="pgd-at", steps=10)),
    "trades": ("TRADES (beta 6)", dict(method="trades", steps=10, beta=6.0)),
    "fgsm-rs": ("FGSM-RS", dict(method="fgsm-rs")),
    "free": ("free", dict(method="free")),
    "n-fgsm": ("N-FGSM", dict(method="n-fgsm")),
    "opnorm-fast": ("op-norm reg., fast default", OPNORM_DEFAULT),
    "opnorm-fast-robust": ("op-norm reg., fast-robust", {}),  # FAST_ROBUST's fields, then these
    # the change chosen on held-out training images (fast_at_variants.py): the stored iterate moves
    # by FGSM-RS's step once per visit instead of two steps of 0.25 eps
    "opnorm-fast-robust-fgsm": (
        "op-norm reg., fast-robust, FGSM-size step",
        {"opnorm": {"warm_iters": 1, "step": 1.25}},
    ),
    # the store of PGA iterates alone (ATTA's idea: Zheng et al., CVPR 2020): cross-entropy at the stored
    # point, penalty weight 0 (still computed, so its time is not ATTA's)
    "opnorm-fast-robust-lam0": ("fast-robust store without the penalty (lam 0, ATTA-style)", {"lam": 0.0}),
    "opnorm-paper": ("op-norm reg., paper", dict(OPNORM_DEFAULT, opnorm={"output": "kl", "mode": "paper"})),
}


def fast_robust_config(changes: dict[str, Any]) -> dict[str, Any]:
    """The fast-robust configuration's own fields with ``changes`` applied (``opnorm`` merged)."""
    own = {k: v for k, v in json.loads(FAST_ROBUST.read_text()).items() if k not in SHARED}
    for key, value in changes.items():
        own[key] = {**own.get(key, {}), **value} if isinstance(value, dict) else value
    return own


def method_config(name: str, args: argparse.Namespace, eps: float, seed: int, out: Path) -> TrainConfig:
    """The TrainConfig of one run: the shared settings plus the method's own fields."""
    own = dict(METHODS[name][1])
    if name.startswith("opnorm-fast-robust"):
        own = fast_robust_config(own)
    if name == "free":
        own["replays"] = args.replays
    shared = dict(
        dataset=args.dataset,
        model="cnn",
        p="inf",
        eps=eps,
        epochs=args.epochs,
        batch_size=128,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        scheduler="cosine",
        seed=seed,
        eval_points=args.epoch_points,
        eval_steps=10,
        limit_train=args.train,
        out=str(out),
        progress=False,
    )
    return TrainConfig.from_dict({**own, **shared})  # from_dict: the config file's flat keys migrate


def run_path(root: Path, eps: float, name: str, seed: int) -> Path:
    return root / f"eps-{eps:g}" / name / f"seed-{seed}"


# ----------------------------------------------------------------------------- train + evaluate


def bits(mask: torch.Tensor) -> str:
    return "".join("1" if b else "0" for b in mask.tolist())


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, args: argparse.Namespace) -> dict:
    """Per-attack and worst-case robust accuracy, with the per-example masks (``"1"``: robust)."""
    t0 = time.perf_counter()
    suite = {
        "pgd20": PGDAttack(steps=20, restarts=args.restarts, seed=123),
        "apgd_ce": APGDAttack("ce", steps=args.apgd_steps),
        "apgd_dlr": APGDAttack("dlr", steps=args.apgd_steps),
        "square": SquareAttack(queries=args.square_queries),
    }
    ev = evaluate_attacks(model, x, y, eps=eps, p=math.inf, attacks=list(suite.values()), every_example=True)
    masks = {k: ev.correct[a.name][0] == 1 for k, a in suite.items()}
    worst = torch.stack(list(masks.values())).all(dim=0)
    gradient_worst = torch.stack([masks[k] for k in ATTACKS if k != "square"]).all(dim=0)
    res: dict[str, Any] = {"clean": accuracy(model, x, y)}
    res.update({k: float(m.double().mean()) for k, m in masks.items()})
    res["worst_case"] = float(worst.double().mean())
    res["square_only"] = int((gradient_worst & ~masks["square"]).sum())  # fooled by Square alone
    res["eval_seconds"] = time.perf_counter() - t0
    res["robust_masks"] = {**{k: bits(m) for k, m in masks.items()}, "worst_case": bits(worst)}
    return res


def claim_path(run_dir: Path) -> Path:
    """The file that marks a run as claimed by a process (it holds the pid)."""
    return run_dir.with_name(run_dir.name + ".claim")


def claim(run_dir: Path) -> bool:
    """Take a run for this process (``<run>.claim`` holds its pid); False while a live process holds it."""
    lock = claim_path(run_dir)
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)  # pid 0 (not yet written): the group, alive
            return False
        except (ValueError, ProcessLookupError):  # a killed process's claim: take it over
            lock.unlink(missing_ok=True)
            return claim(run_dir)
        except PermissionError:
            return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def one_run(name: str, eps: float, seed: int, args: argparse.Namespace, test: tuple) -> dict | None:
    """Train (resuming an interrupted run) and evaluate one method; write and return its record.

    Several invocations may share the work: a run that another live process has claimed is
    skipped (None)."""
    rec_path = run_path(Path(args.out) / "runs", eps, name, seed) / "results.json"
    if rec_path.exists():
        return json.loads(rec_path.read_text())
    run_dir = run_path(Path(args.runs), eps, name, seed)
    if not claim(run_dir):
        print(f"eps {eps:g} {name} seed {seed}: another process is training it, skipped", flush=True)
        return None
    try:
        return train_and_evaluate(name, eps, seed, args, test, run_dir, rec_path)
    finally:
        claim_path(run_dir).unlink(missing_ok=True)


def train_and_evaluate(
    name: str, eps: float, seed: int, args: argparse.Namespace, test: tuple, run_dir: Path, rec_path: Path
) -> dict:
    """Train one claimed run, evaluate it on ``test`` and write its record to ``rec_path``."""
    cfg = method_config(name, args, eps, seed, run_dir)
    load0, t0 = os.getloadavg(), time.perf_counter()
    res = train(cfg, resume=(run_dir / CHECKPOINT).exists())
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    x, y = test
    record = {
        "method": name,
        "label": METHODS[name][0],
        "eps": eps,
        "seed": seed,
        "config": res.config.to_dict(),
        "train_seconds": sum(h["seconds"] for h in res.history),
        "train_wall_seconds_this_call": wall,
        "loadavg_1min_before_after": [load0[0], load1[0]],
        "epochs": [
            {k: h[k] for k in ("epoch", "seconds", "loss", "accuracy", "robust_accuracy") if k in h}
            for h in res.history
        ],
        "test_points": int(x.shape[0]),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": args.command,
        **evaluate(res.model, x, y, eps, args),
    }
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(rec_path, json.dumps(record, indent=1) + "\n")
    shown = {k: round(record[k], 4) for k in ("train_seconds", "clean", *ATTACKS, "worst_case")}
    print(f"eps {eps:g} {name} seed {seed}: {json.dumps(shown)}", flush=True)
    return record


def methods_at(eps: float, args: argparse.Namespace) -> list[str]:
    """The methods run at radius ``eps``: all at the first radius, the overfitting check's at the others."""
    if eps == args.radii[0]:
        return list(args.methods)
    return [m for m in args.methods if m in args.later_radii_methods]


def train_phase(args: argparse.Namespace) -> None:
    splits = load_dataset(args.dataset, limit_test=args.points)
    test = (splits.test.x[: args.points], splits.test.y[: args.points])
    for seed in args.seeds:  # all methods of a seed before the next seed: partial studies stay balanced
        for eps in args.radii:
            for name in methods_at(eps, args):
                one_run(name, eps, seed, args, test)


# ----------------------------------------------------------------------------- report


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
    return m, se


def collect(out: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("eps-*/*/seed-*/results.json"))]
    return sorted(runs, key=lambda r: (r["eps"], list(METHODS).index(r["method"]), r["seed"]))


def aggregate(runs: list[dict]) -> dict:
    """eps -> method -> {seeds, mean/se of seconds, clean, each attack and the worst case}."""
    table: dict[str, dict[str, Any]] = {}
    for r in runs:
        table.setdefault(f"{r['eps']:g}", {}).setdefault(r["method"], []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for eps, by_method in table.items():
        for name, rs in by_method.items():
            row: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
            for key in ("train_seconds", "clean", *ATTACKS, "worst_case"):
                row[key] = dict(zip(("mean", "se"), mean_se([r[key] for r in rs])))
            out.setdefault(eps, {})[name] = row
    return out


def goal(runs: list[dict], eps: float = 0.1) -> dict:
    """The fast-robust regularizer against PGD-10 AT (seed by seed) and against FGSM-RS and free."""
    by = {(r["method"], r["seed"]): r for r in runs if r["eps"] == eps}
    seeds = sorted(s for (m, s) in by if m == "opnorm-fast-robust" and ("pgd-at", s) in by)
    if not seeds:
        return {"status": "not yet measured", "eps": eps}
    per_seed = []
    for s in seeds:
        f, a = by[("opnorm-fast-robust", s)], by[("pgd-at", s)]
        row = {
            "seed": s,
            "gap_points": 100 * (a["worst_case"] - f["worst_case"]),
            "time_ratio": f["train_seconds"] / a["train_seconds"],
        }
        for other in ("fgsm-rs", "free"):
            if (other, s) in by:
                o = by[(other, s)]
                row[f"over_{other}_points"] = 100 * (f["worst_case"] - o["worst_case"])
                row[f"time_ratio_over_{other}"] = f["train_seconds"] / o["train_seconds"]
        per_seed.append(row)
    within = all(r["gap_points"] <= GAP_GOAL for r in per_seed)
    fast = all(r["time_ratio"] <= TIME_GOAL for r in per_seed)
    return {
        "status": "measured",
        "eps": eps,
        "seeds": seeds,
        "per_seed": per_seed,
        "within_gap_every_seed": within,
        "time_ratio_met_every_seed": fast,
        "gap_goal_points": GAP_GOAL,
        "time_goal_ratio": TIME_GOAL,
    }


def plot(agg: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for eps, by_method in agg.items():
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for k, (name, row) in enumerate(by_method.items()):
            t, w = row["train_seconds"], row["worst_case"]
            se = lambda d: 0.0 if math.isnan(d["se"]) else d["se"]  # noqa: E731  one seed: no bar
            ax.errorbar(
                t["mean"],
                100 * w["mean"],
                xerr=se(t),
                yerr=100 * se(w),
                fmt="o",
                color=f"C{k}",
                capsize=3,
                label=f"{METHODS[name][0]} (n={len(row['seeds'])})",
            )
        ax.set_xscale("log")
        ax.set_xlabel("training seconds (log)")
        ax.set_ylabel("worst-case robust accuracy (%)")
        ax.set_title(f"Fashion-MNIST, l_inf eps {eps}: mean +- s.e. over seeds")
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        name = f"robust_vs_time_eps-{eps}.png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names


def secs(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def pct(d: dict) -> str:
    return f"{100 * d['mean']:.1f}" + ("" if math.isnan(d["se"]) else f" ± {100 * d['se']:.1f}")


def goal_lines(goals: dict) -> list[str]:
    """The report's goal sections, one per radius."""
    lines: list[str] = []
    for eps, g in goals.items():
        lines += [f"## Goal for the fast regularizer (fast-robust configuration), eps {eps}", ""]
        if g["status"] != "measured":
            lines += ["Not yet measured (no seed has both the fast-robust and the PGD-10 AT run).", ""]
            continue
        lines += [
            f"Within {GAP_GOAL:g} point of PGD-10 AT's worst case on every seed: "
            f"**{'met' if g['within_gap_every_seed'] else 'not met'}**; at <= {TIME_GOAL:g}x its training "
            f"time: **{'met' if g['time_ratio_met_every_seed'] else 'not met'}** "
            f"({len(g['seeds'])} seed(s)).",
            "",
            "| seed | AT minus fast-robust (points) | time / AT's | minus FGSM-RS (points) | time / FGSM-RS's "
            "| minus free (points) | time / free's |",
            "|---|---|---|---|---|---|---|",
        ]
        f = lambda r, k, fmt: fmt.format(r[k]) if k in r else "-"  # noqa: E731
        for r in g["per_seed"]:
            lines.append(
                f"| {r['seed']} | {r['gap_points']:+.1f} | {r['time_ratio']:.2f} | "
                f"{f(r, 'over_fgsm-rs_points', '{:+.1f}')} | {f(r, 'time_ratio_over_fgsm-rs', '{:.2f}')} | "
                f"{f(r, 'over_free_points', '{:+.1f}')} | {f(r, 'time_ratio_over_free', '{:.2f}')} |"
            )
        lines.append("")
    return lines


def variant_lines(out: Path) -> list[str]:
    """The fast-robust variants validated on held-out training images (fast_at_variants.py), if run."""
    path = out / "variants" / "variants.json"
    if not path.exists():
        return []
    v = json.loads(path.read_text())
    lines = [
        f"## Changes tried on the fast-robust configuration (validation: {v['validation']}, seed {v['seed']}, "
        f"eps {v['eps']:g})",
        "",
        f"Made by `{v['command']}`; no test image is used to choose among them.",
        "",
        "| variant | training s | clean (%) | PGD-20 (%) | APGD-CE (%) | APGD-DLR (%) | Square (%) | worst case (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in v["variants"].items():
        lines.append(
            f"| {name}: {r['label']} | {secs(r['train_seconds'])} | "
            + " | ".join(f"{100 * r[k]:.1f}" for k in ("clean", *ATTACKS, "worst_case"))
            + " |"
        )
    return lines + [""]


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    runs = collect(out)
    agg = aggregate(runs)
    goals = {f"{e:g}": goal(runs, e) for e in args.radii}
    planned = [(e, m, s) for s in args.seeds for e in args.radii for m in methods_at(e, args)]
    done = {(r["eps"], r["method"], r["seed"]) for r in runs}
    pending = [p for p in planned if p not in done]
    settings = {
        "dataset": args.dataset,
        "train_images": args.train,
        "epochs": args.epochs,
        "batch_size": 128,
        "optimizer": "sgd lr 0.05 momentum 0.9 wd 5e-4, cosine",
        "free_replays": args.replays,
        "test_points": args.points,
        "pgd_restarts": args.restarts,
        "apgd_steps": args.apgd_steps,
        "square_queries": args.square_queries,
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    record = {
        "schema": "opnorm.fast-at/1",
        "report_command": args.command,
        "settings": settings,
        "planned_runs": len(planned),
        "finished_runs": len(planned) - len(pending),
        "pending": [{"eps": e, "method": m, "seed": s} for e, m, s in pending],
        "goal": goals,
        "aggregate": agg,
        "runs": [{k: v for k, v in r.items() if k != "robust_masks"} for r in runs],
    }
    write_text_atomic(out / "results.json", json.dumps(record, indent=1) + "\n")
    pngs = plot(agg, out) if agg else []
    commands = sorted({r["command"] for r in runs})
    lines = [
        f"# Fast adversarial training vs the fast d.d. operator norm regularizer ({args.dataset})",
        "",
        f"**Status: {len(planned) - len(pending)} of {len(planned)} planned runs finished** "
        f"(radius {args.radii[0]:g}: {len(methods_at(args.radii[0], args))} methods"
        + "".join(f"; radius {e:g}: {len(methods_at(e, args))}" for e in args.radii[1:])
        + "; seeds "
        f"{', '.join(map(str, args.seeds))}). "
        + (
            "All done."
            if not pending
            else "Pending (the study resumes where it stopped): "
            + "; ".join(
                f"eps {e:g}: " + ", ".join(f"{m} seed {s}" for ee, m, s in pending if ee == e)
                for e in args.radii
                if any(p[0] == e for p in pending)
            )
            + "."
        ),
        "",
        "This report, `results.json` and the plots were written by",
        "",
        "```",
        args.command,
        "```",
        "",
        "from the per-run records in `runs/eps-*/<method>/seed-*/results.json`, which were made by "
        + (", ".join(f"`{c}`" for c in commands) if commands else "(none yet)")
        + ".",
        "",
        f"Settings: small CNN, {'all' if args.train is None else f'the first {args.train}'} training images, "
        f"{args.epochs} epochs of optimizer steps (free: {args.replays} replays per batch, "
        f"{args.epochs // args.replays} pass(es)), batch 128, SGD lr 0.05 momentum 0.9 wd 5e-4, cosine schedule; "
        f"every run trained alone in one process with {args.threads} thread(s), one after the other, on a shared "
        "2-core machine (other jobs ran beside it: each record holds the 1-minute load average before and after; "
        "training seconds are the trainer's batch time). Evaluation on the first "
        f"{args.points} test images: PGD-20 ({args.restarts} restarts, CE, best iterate), APGD-CE and APGD-DLR "
        f"({args.apgd_steps} steps), Square ({args.square_queries} queries); worst case = robust under all four, "
        "per example. Mean ± standard error over seeds (no ± with one seed).",
        "",
    ]
    lines += goal_lines(goals)
    for eps, by_method in agg.items():
        lines += [
            f"## eps {eps}",
            "",
            "| method | seeds | training s | clean (%) | PGD-20 (%) | APGD-CE (%) | "
            "APGD-DLR (%) | Square (%) | worst case (%) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in by_method.items():
            t = row["train_seconds"]
            lines.append(
                f"| {METHODS[name][0]} | {len(row['seeds'])} | {secs(t['mean'])}"
                + ("" if math.isnan(t["se"]) else f" ± {secs(t['se'])}")
                + " | "
                + " | ".join(pct(row[k]) for k in ("clean", *ATTACKS, "worst_case"))
                + " |"
            )
        lines += ["", f"![worst-case robust accuracy vs training time](robust_vs_time_eps-{eps}.png)", ""]
    lines += variant_lines(out)
    lines += [
        "## Per run",
        "",
        "| eps | method | seed | training s | clean | PGD-20 | APGD-CE | APGD-DLR | Square | "
        "worst | fooled by Square only | load before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['eps']:g} | {r['method']} | {r['seed']} | {secs(r['train_seconds'])} | "
            + " | ".join(f"{100 * r[k]:.1f}" for k in ("clean", *ATTACKS, "worst_case"))
            + f" | {r['square_only']} | {r['loadavg_1min_before_after'][0]:.1f} / "
            f"{r['loadavg_1min_before_after'][1]:.1f} |"
        )
    notes = out / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    print(f"wrote {out / 'report.md'}, {out / 'results.json'}" + "".join(f", {out / p}" for p in pngs), flush=True)


# ----------------------------------------------------------------------------- entry


def parser() -> argparse.ArgumentParser:
    """The study's command line; its defaults are the harness settings that other scripts reuse."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=("all", "train", "report"), default="all")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--radii", type=float, nargs="+", default=[0.1, 0.2], help="l_inf radii (train = threat)")
    ap.add_argument(
        "--later-radii-methods",
        nargs="+",
        choices=list(METHODS),
        default=["pgd-at", "fgsm-rs", "free", "n-fgsm", "opnorm-fast-robust", "opnorm-fast-robust-fgsm"],
        help="the methods also run at the radii after the first (the catastrophic-overfitting check; "
        "TRADES and the two other regularizer configurations are left out there to fit a 2-core "
        "session)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="report directory (per-run records under runs/)")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "fast-at"), help="checkpoints (not committed)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of optimizer steps (free: a multiple of --replays)")
    ap.add_argument("--replays", type=int, default=3, help="free's replays per minibatch")
    ap.add_argument(
        "--train",
        type=int,
        default=10000,
        help="train on the first N images (10000: the study fits two 2-core sessions)",
    )
    ap.add_argument("--points", type=int, default=500, help="test points of the evaluation")
    ap.add_argument("--epoch-points", type=int, default=100, help="test points of the trainer's per-epoch check")
    ap.add_argument("--restarts", type=int, default=2, help="PGD-20 restarts")
    ap.add_argument("--apgd-steps", type=int, default=50)
    ap.add_argument("--square-queries", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="a smoke run: digits, few images, epochs and queries")
    return ap


def settle(args: argparse.Namespace, script: str, argv: list[str] | None) -> None:
    """Set the dataset, the ``--tiny`` smoke settings, the recorded command and the thread count."""
    args.command = f"python benchmarks/{script} " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    args.dataset = "fashion-mnist"
    if args.tiny:
        args.dataset, args.train, args.epochs, args.replays = "digits", 256, 2, 2
        args.points, args.epoch_points, args.restarts, args.apgd_steps, args.square_queries = 40, 20, 1, 5, 20
    torch.set_num_threads(args.threads)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    settle(args, "fast_at_fmnist.py", argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.phase in ("all", "train"):
        train_phase(args)
    if args.phase in ("all", "report"):
        report(args)


if __name__ == "__main__":
    main()
