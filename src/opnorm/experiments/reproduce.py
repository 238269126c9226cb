"""``opnorm reproduce``: the paper's findings, measured on real data over seeds, as a report.

Per seed, every method of the study (:mod:`opnorm.experiments.study`) and the lambda sweeps
of d.d. regularization and global SNR are trained with the same model, data order and
budget, and kept in a runs directory (a rerun resumes: trained models and finished
measurements are read back). The sweep point whose mean clean accuracy is closest to
cross-entropy l_2 PGD-AT's is compared with it at matched clean accuracy. Then each model's
robust accuracy curves, spectrum, alignment and linearity are measured; the clean model's
alignment by singular-vector rank is set against a randomly initialized network; the first
seed checks the theorem and the attacks. Means and standard errors over seeds go into
``report.md``, ``results.json`` and PNG plots (:mod:`opnorm.experiments.report`).

Example (trains and measures every model of the study: minutes)::

    from opnorm.experiments.reproduce import run_reproduce

    results = run_reproduce(dataset="digits", quick=True, out="reports/digits-quick")
    results["seeds"], [f["verdict"] for f in results["findings"]]
"""

from __future__ import annotations

import os
import platform
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from opnorm.experiments import measure as M
from opnorm.experiments.aggregate import aggregate, mean
from opnorm.experiments.findings import findings
from opnorm.experiments.matching import BracketSearch, bracket, interpolate
from opnorm.experiments.parallel import Workers
from opnorm.experiments.plots import write_plots
from opnorm.experiments.report import write_report
from opnorm.experiments.runs import Runs
from opnorm.experiments.study import (
    FAMILIES,
    StudyConfig,
    base_config,
    fingerprint,
    method_table,
    study_config,
    sweep_key,
    sweep_lambdas,
    sweep_overrides,
)
from opnorm.experiments.tasks import Task, perform
from opnorm.training.config import method_settings
from opnorm.training.data import load_dataset
from opnorm.training.files import read_json_object
from opnorm.training.run_dir import checked_dir

SCHEMA = "opnorm.reproduce/2"


def _environment() -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def _command(dataset: str, quick: bool, seeds: list | None, config: str | None, overrides: dict) -> str:
    """The CLI command that reruns this study (every option that changes what it measures)."""
    args = ["--config", config] if config else ["--dataset", dataset]
    args += ["--quick"] if quick else []
    args += ["--seeds", ",".join(str(s) for s in seeds)] if seeds else []
    cli = {k: v for k, v in overrides.items() if k in ("limit_train", "eval_points") and v is not None}
    for key, value in cli.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    other = ", ".join(f"{k}={v!r}" for k, v in overrides.items() if k not in cli and v is not None)
    command = "opnorm reproduce " + " ".join(shlex.quote(a) for a in args)
    return command + (f"  (and run_reproduce overrides {other})" if other else "")


def run_reproduce(
    dataset: str = "digits",
    quick: bool = False,
    out: str | None = None,
    seeds: list | None = None,
    data_dir: str | None = None,
    config: str | None = None,
    runs: str | None = None,
    log: Callable[[str], None] = print,
    jobs: int = 1,
    **overrides: Any,
) -> dict:
    """Run (or resume) the study and write the report into ``out`` (default ``reports/<dataset>``,
    or ``reports/<config file name>`` with ``config``).

    Args:
        dataset: a preset of :data:`opnorm.experiments.study.PRESETS`. quick: a small version.
        seeds: e.g. [0, 1, 2] (default: the preset's). data_dir: the dataset's files.
        config: a training config file (JSON of TrainConfig fields, e.g.
            configs/paper-cifar10.json): its dataset, model, radius, lambda and training
            setup define the study (see :func:`~opnorm.experiments.study.study_config`).
        runs: the runs directory (default ``<out>/runs``): trained models and finished
            measurements by seed, reused by a rerun of the same study.
        jobs: processes that train and measure side by side (:mod:`opnorm.experiments.parallel`;
            1: everything in this process).
        **overrides: StudyConfig fields.

    Returns the results dict (also written to ``out/results.json``). Timings aside, a rerun
    with the same seeds gives the same numbers.
    """
    t_start, cpu_start, children_start = time.perf_counter(), time.process_time(), _children_cpu()
    train_config = read_json_object(config, "config file") if config else None
    cfg = study_config(
        dataset,
        quick,
        train_config=train_config,
        seeds=seeds,
        data_dir=data_dir,
        command=_command(dataset, quick, seeds, config, overrides),
        **overrides,
    )
    # a config file's study is its own arm: reports/<file name>, beside the dataset's default arm
    default = Path("reports") / ((Path(config).stem if config else cfg.dataset) + ("-quick" if quick else ""))
    out_dir = checked_dir(out, "--out") if out is not None else default
    with Runs(runs if runs is not None else out_dir / "runs", fingerprint(cfg)) as store:  # locked while it runs
        with Workers(jobs, cfg, store) as workers:
            results, phases = _study(cfg, store, log, workers)
            results["seconds_total"] = time.perf_counter() - t_start
            results["phase_seconds"] = phases
            results["runs_directory"] = {"path": _shown_path(store.root, out_dir), **store.counts}
            write_plots(results, out_dir, workers.map)  # the plots side by side too
    # the workers' CPU seconds are known once they have stopped
    results["cpu_seconds_total"] = time.process_time() - cpu_start + _children_cpu() - children_start
    report = write_report(results, out_dir)
    log(f"[reproduce] report: {report}")
    return results


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (the worker processes, once joined)."""
    t = os.times()
    return t.children_user + t.children_system


def _shown_path(root: Path, out_dir: Path) -> str:
    """The runs directory as the report records it: relative to the report's folder when inside
    it (a committed report names no local path), else as given."""
    try:
        return str(Path(root).resolve().relative_to(Path(out_dir).resolve()))
    except ValueError:
        return str(root)


def _study(cfg: StudyConfig, store: Runs, log: Callable[[str], None], workers: Workers) -> tuple[dict, dict]:
    splits = load_dataset(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train)
    n_eval = min(cfg.eval_points, len(splits.test))
    x, y = splits.test.x[:n_eval], splits.test.y[:n_eval]
    methods = {key: (label, settings, kw) for key, label, settings, kw in method_table(cfg)}
    phases, t = {}, time.perf_counter()
    base = base_config(cfg)
    models: dict = {s: {} for s in cfg.seeds}
    seconds: dict = {s: {} for s in cfg.seeds}
    screens: dict = {s: {} for s in cfg.seeds}
    diverged: dict = {}  # key -> {seed: message}
    overrides_of: dict = {}  # key -> its TrainConfig overrides (what builds its model)

    def train_tasks(key: str, overrides: dict, may_diverge: bool) -> list[Task]:
        # a method option of the study's training config goes to the methods that read it
        # (a main method met again as a sweep point keeps its own)
        overrides_of.setdefault(key, {**method_settings(cfg.train, overrides["method"]), **overrides})
        return [Task("train", key, overrides_of[key], s, may_diverge) for s in cfg.seeds]

    def train_and_screen(key: str, overrides: dict, may_diverge: bool) -> bool:
        """Train ``key`` on every seed and screen it; False when it diverged on some seed."""
        workers.run(train_tasks(key, overrides, may_diverge))  # side by side first (with jobs > 1)
        overrides = overrides_of[key]
        for s in cfg.seeds:
            if key in models[s]:  # a main method that is also a sweep point
                continue
            model, secs = store.model(base, key, overrides, s, splits, log, may_diverge=may_diverge)
            if model is None:
                diverged.setdefault(key, {})[s] = secs
                continue
            models[s][key], seconds[s][key] = model, secs
            screens[s][key] = perform(Task("train", key, overrides, s), cfg, store, model, splits, x, y)
        return key not in diverged

    def sweep_tasks(family: str, lam: float) -> list[Task]:
        return train_tasks(sweep_key(cfg, family, lam), sweep_overrides(cfg, family, lam), True)

    def accuracy(family: str, lam: float) -> float | None:
        key = sweep_key(cfg, family, lam)
        if not train_and_screen(key, sweep_overrides(cfg, family, lam), may_diverge=True):
            return None
        return mean(aggregate([screens[s][key] for s in cfg.seeds])["clean_acc"])

    # the methods and the sweeps' first lambdas side by side (with jobs > 1): none needs another's result
    first = [t for key, (_, _, kw) in methods.items() for t in train_tasks(key, kw, False)]
    workers.run(first + [t for f in FAMILIES for lam in sweep_lambdas(cfg, f) for t in sweep_tasks(f, lam)])
    for key, (_, _, kw) in methods.items():
        train_and_screen(key, kw, may_diverge=False)
    target = mean(aggregate([screens[s]["pgd-at-l2"] for s in cfg.seeds])["clean_acc"])
    searches = {
        f: BracketSearch(sweep_lambdas(cfg, f), target, max_new=cfg.match_points, tol=cfg.match_tol) for f in FAMILIES
    }
    while todo := {f: lams for f, search in searches.items() if (lams := search.pending())}:
        workers.run([t for f, lams in todo.items() for lam in lams for t in sweep_tasks(f, lam)])
        for f, lams in todo.items():  # both families' next lambdas side by side
            for lam in lams:
                searches[f].observe(lam, accuracy(f, lam))
    searched = {f: search.result() for f, search in searches.items()}
    phases["train"], t = time.perf_counter() - t, time.perf_counter()
    # a sweep point that diverged on any seed has no mean over seeds: it leaves the sweep, and the report says so
    done = [k for k in screens[cfg.seeds[0]] if k not in diverged]
    matched = _matched(cfg, searched, {k: aggregate([screens[s][k] for s in cfg.seeds]) for k in done})
    matched["diverged"] = [
        {"key": k, "lam": lam, "seeds": sorted(diverged[k]), "message": next(iter(diverged[k].values()))}
        for family in FAMILIES
        for lam in searched[family]
        if (k := sweep_key(cfg, family, lam)) in diverged
    ]
    keys = list(methods) + [m["key"] for m in matched["picked"].values() if m["key"] not in methods]
    s0 = cfg.seeds[0]
    # the black-box check attacks the models of the matched comparison
    square_keys = ["pgd-at-l2", *(m["key"] for m in matched["picked"].values())]
    full_tasks = [Task("full", k, overrides_of[k], s) for s in cfg.seeds for k in keys]
    random_tasks = [Task("random-init", "", {}, s) for s in cfg.seeds]
    checks_task = Task("checks", "clean", overrides_of["clean"], s0)
    sanity_tasks = [Task("stronger", k, overrides_of[k], s0) for k in keys] + [
        Task(f"square-{norm}", k, overrides_of[k], s0) for k in square_keys for norm in ("linf", "l2")
    ]
    workers.run(full_tasks + random_tasks + [checks_task] + sanity_tasks)  # side by side (with jobs > 1)

    def measured(task: Task) -> dict:
        model = models[task.seed][task.key] if task.needs_model else None
        return perform(task, cfg, store, model, splits, x, y, screened=screens[task.seed].get(task.key))

    per_seed: dict = {s: {} for s in cfg.seeds}
    for task in full_tasks:
        if not per_seed[task.seed]:
            log(f"[reproduce] seed {task.seed}: measuring {len(keys)} models")
        per_seed[task.seed][task.key] = measured(task)
    for s in cfg.seeds:
        clean = per_seed[s]["clean"]["spectrum"]
        for k in keys:  # per seed, then averaged: the ratio of means would hide the spread
            per_seed[s][k]["spectrum_ratio"] = [a / b for a, b in zip(per_seed[s][k]["spectrum"], clean)]
    phases["evaluate"], t = time.perf_counter() - t, time.perf_counter()

    extras = [measured(task) for task in random_tasks]
    checks = measured(checks_task)
    phases["findings"], t = time.perf_counter() - t, time.perf_counter()
    log("[reproduce] sanity checks")
    labels = {k: _label(k, methods, matched) for k in keys}
    attacks = {(task.kind, task.key): measured(task) for task in sanity_tasks}
    sanity = M.sanity_checks(
        cfg,
        per_seed[s0],
        labels,
        stronger={k: attacks["stronger", k]["value"] for k in keys},
        square={(k, norm): attacks[f"square-{norm}", k] for k in square_keys for norm in ("linf", "l2")},
        points=len(x),
    )
    phases["sanity"] = time.perf_counter() - t

    results = {
        "schema": SCHEMA,
        "seeds": list(cfg.seeds),
        "config": {**asdict(cfg), "reference_eps": cfg.reference_eps, "eval_points": n_eval},
        "environment": _environment(),
        "methods": {},
        "matched": matched,
        "rank_alignment": {"random-init": aggregate(extras)},
        **checks,
        "sanity": sanity,
    }
    results["train_seconds_all_models"] = sum(v for s in cfg.seeds for v in seconds[s].values())
    for k in keys:
        agg = aggregate([per_seed[s][k] for s in cfg.seeds])
        agg["train_seconds"] = aggregate([seconds[s][k] for s in cfg.seeds])
        agg["time_vs_clean"] = aggregate([seconds[s][k] / seconds[s]["clean"] for s in cfg.seeds])
        label, settings = (
            labels[k],
            methods[k][1] if k in methods else f"eps={cfg.eps_l2:g}, lam={_lam_of(k, matched):g}",
        )
        results["methods"][k] = {"label": label, "settings": settings, **agg}
    results["rank_alignment"]["clean"] = results["methods"]["clean"]["rank_alignment"]
    results["findings"] = findings(results)
    return results, phases


def _matched(cfg: StudyConfig, searched: dict, screen: dict) -> dict:
    """Per family: the sweep (every lambda trained on every seed), the lambda nearest to l_2
    PGD-AT's mean clean accuracy (``picked``: measured in full), the bracketing pair and the
    robust accuracy at the reference radii interpolated between it at AT's clean accuracy
    (the nearest lambda's where the sweep does not bracket it)."""
    ref = screen["pgd-at-l2"]["clean_acc"]
    target = mean(ref)
    out: dict = {
        "reference": "pgd-at-l2",
        "reference_clean_acc": ref,
        "search": {"max_new": cfg.match_points, "tol": cfg.match_tol, "method": "factor 10 outwards, then bisection "
                   "in log-lambda, until two lambdas bracket the reference's mean clean accuracy"},
        "sweeps": {},
        "picked": {},
        "bracket": {},
        "at_reference_clean_acc": {},
    }  # fmt: skip
    for family in FAMILIES:
        points = [
            {"key": sweep_key(cfg, family, lam), "lam": lam, **screen[sweep_key(cfg, family, lam)]}
            for lam, acc in searched[family].items()
            if acc is not None
        ]
        out["sweeps"][family] = points
        by_lam = {p["lam"]: p for p in points}
        best = min(points, key=lambda p: abs(mean(p["clean_acc"]) - target))
        out["picked"][family] = {"key": best["key"], "lam": best["lam"]}
        pair = bracket({lam: mean(p["clean_acc"]) for lam, p in by_lam.items()}, target)
        if pair is None:
            out["bracket"][family] = {
                "bracketed": False,
                "nearest": {"lam": best["lam"], "clean_acc": best["clean_acc"]},
            }
            out["at_reference_clean_acc"][family] = dict(best["robust_at_reference"])
            continue
        a, b = by_lam[pair[0]], by_lam[pair[1]]
        out["bracket"][family] = {
            "bracketed": True,
            "above": {"lam": a["lam"], "clean_acc": a["clean_acc"]},
            "below": {"lam": b["lam"], "clean_acc": b["clean_acc"]},
        }
        out["at_reference_clean_acc"][family] = {
            norm: interpolate(
                a["clean_acc"], b["clean_acc"], a["robust_at_reference"][norm], b["robust_at_reference"][norm], target
            )
            for norm in ("l2", "linf")
        }
    return out


def _lam_of(key: str, matched: dict) -> float:
    return next(p["lam"] for pts in matched["sweeps"].values() for p in pts if p["key"] == key)


def _label(key: str, methods: dict, matched: dict) -> str:
    if key in methods:
        return methods[key][0]
    family = "d.d. (2,2) op-norm reg." if key.startswith("opnorm") else "Global SNR"
    return f"{family}, lam={_lam_of(key, matched):g} (nearest to AT's clean acc.)"
