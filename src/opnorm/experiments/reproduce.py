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

Example::

    >>> from opnorm.experiments.reproduce import run_reproduce
    >>> results = run_reproduce(dataset="digits", quick=True, out="reports/digits-quick")
    >>> results["seeds"], [f["verdict"] for f in results["findings"]]
"""

from __future__ import annotations

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
from opnorm.experiments.report import write_report
from opnorm.experiments.runs import Runs
from opnorm.experiments.study import StudyConfig, fingerprint, method_table, study_config, sweep_points, sweep_table
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
    **overrides: Any,
) -> dict:
    """Run (or resume) the study and write the report into ``out`` (default ``reports/<dataset>``).

    Args:
        dataset: a preset of :data:`opnorm.experiments.study.PRESETS`. quick: a small version.
        seeds: e.g. [0, 1, 2] (default: the preset's). data_dir: the dataset's files.
        config: a training config file (JSON of TrainConfig fields, e.g.
            configs/paper-cifar10.json): its dataset, model, radius, lambda and training
            setup define the study (see :func:`~opnorm.experiments.study.study_config`).
        runs: the runs directory (default ``<out>/runs``): trained models and finished
            measurements by seed, reused by a rerun of the same study.
        **overrides: StudyConfig fields.

    Returns the results dict (also written to ``out/results.json``). Timings aside, a rerun
    with the same seeds gives the same numbers.
    """
    from opnorm.cli import _read_json  # one reader, one set of one-line errors for config files

    t_start, cpu_start = time.perf_counter(), time.process_time()
    train_config = _read_json(Path(config), "config file") if config else None
    cfg = study_config(
        dataset,
        quick,
        train_config=train_config,
        seeds=seeds,
        data_dir=data_dir,
        command=_command(dataset, quick, seeds, config, overrides),
        **overrides,
    )
    default = Path("reports") / (cfg.dataset + ("-quick" if quick else ""))
    out_dir = checked_dir(out, "--out") if out is not None else default
    with Runs(runs if runs is not None else out_dir / "runs", fingerprint(cfg)) as store:  # locked while it runs
        results, phases = _study(cfg, store, log)
    results["seconds_total"] = time.perf_counter() - t_start
    results["cpu_seconds_total"] = time.process_time() - cpu_start
    results["phase_seconds"] = phases
    results["runs_directory"] = {"path": str(store.root), **store.counts}
    report = write_report(results, out_dir)
    log(f"[reproduce] report: {report}")
    return results


def _study(cfg: StudyConfig, store: Runs, log: Callable[[str], None]) -> tuple[dict, dict]:
    from opnorm.training.data import load_dataset

    splits = load_dataset(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train)
    n_eval = min(cfg.eval_points, len(splits.test))
    x, y = splits.test.x[:n_eval], splits.test.y[:n_eval]
    methods = {key: (label, settings, kw) for key, label, settings, kw in method_table(cfg)}
    sweep = {key: kw for key, _, _, kw in sweep_table(cfg)}
    phases, t = {}, time.perf_counter()
    models, seconds, diverged = _train_all(cfg, store, splits, {k: v[2] for k, v in methods.items()}, sweep, log)
    phases["train"], t = time.perf_counter() - t, time.perf_counter()

    screens = {
        s: store.measured(s, "screen", lambda s=s: {k: M.screen(cfg, m, x, y, s) for k, m in models[s].items()})
        for s in cfg.seeds
    }
    # a sweep point that diverged on any seed has no mean over seeds: it leaves the sweep, and the report says so
    failed = {k for d in diverged.values() for k in d}
    matched = _matched(cfg, aggregate([{k: v for k, v in screens[s].items() if k not in failed} for s in cfg.seeds]))
    matched["diverged"] = [
        {
            "key": k,
            "lam": lam,
            "seeds": [s for s in cfg.seeds if k in diverged[s]],
            "message": next(diverged[s][k] for s in cfg.seeds if k in diverged[s]),
        }
        for family in ("opnorm", "global-snr")
        for k, lam in sweep_points(cfg, family)
        if k in failed
    ]
    keys = list(methods) + [m["key"] for m in matched["picked"].values() if m["key"] not in methods]
    per_seed = {}
    for s in cfg.seeds:
        log(f"[reproduce] seed {s}: measuring {len(keys)} models")
        per_seed[s] = {
            k: store.measured(s, f"full-{k}", lambda s=s, k=k: M.full(cfg, models[s][k], x, y, s)) for k in keys
        }
        clean = per_seed[s]["clean"]["spectrum"]
        for k in keys:  # per seed, then averaged: the ratio of means would hide the spread
            per_seed[s][k]["spectrum_ratio"] = [a / b for a, b in zip(per_seed[s][k]["spectrum"], clean)]
    phases["evaluate"], t = time.perf_counter() - t, time.perf_counter()

    extras = [
        store.measured(
            s,
            "rank-alignment",
            lambda s=s: M.clean_extras(cfg, models[s]["clean"], _random_net(cfg, splits, s), x, y, s),
        )
        for s in cfg.seeds
    ]
    s0 = cfg.seeds[0]
    checks = store.measured(s0, "checks", lambda: M.first_seed_checks(cfg, models[s0]["clean"], x, y, s0))
    phases["findings"], t = time.perf_counter() - t, time.perf_counter()
    log("[reproduce] sanity checks")
    labels = {k: _label(k, methods, matched) for k in keys}
    memo = lambda name, compute: store.measured(s0, f"sanity-{name}", lambda: {"value": compute()})["value"]  # noqa: E731
    sanity = store.measured(
        s0,
        "sanity",
        lambda: M.sanity_checks(cfg, per_seed[s0], labels, {k: models[s0][k] for k in keys}, x, y, s0, memo=memo),
    )
    phases["sanity"] = time.perf_counter() - t

    results = {
        "schema": SCHEMA,
        "seeds": list(cfg.seeds),
        "config": {**asdict(cfg), "reference_eps": cfg.reference_eps, "eval_points": n_eval},
        "environment": _environment(),
        "methods": {},
        "matched": matched,
        "rank_alignment": aggregate(extras),
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
    results["findings"] = findings(results)
    return results, phases


def _train_all(cfg: StudyConfig, store: Runs, splits, table: dict, sweep: dict, log) -> tuple[dict, dict, dict]:
    """Every seed's models and training seconds (``table``: the methods; ``sweep``: the sweep
    points, which may diverge: seed -> key -> message in the third dict, the model left out)."""
    from opnorm.training.config import METHOD_OPTIONS, method_settings
    from opnorm.training.trainer import TrainConfig

    # the shared settings; a method option of the config file goes to the methods that read it
    base = TrainConfig(**{k: v for k, v in cfg.train.items() if k not in METHOD_OPTIONS}).replace(
        dataset=cfg.dataset,
        model=cfg.model,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        data_dir=cfg.data_dir,
        limit_train=cfg.limit_train,
        eval_points=min(64, cfg.eval_points),
        eval_steps=5,
        progress=None,
        device="cpu" if not torch.cuda.is_available() else cfg.train.get("device", "auto"),
    )
    models: dict = {s: {} for s in cfg.seeds}
    seconds: dict = {s: {} for s in cfg.seeds}
    diverged: dict = {s: {} for s in cfg.seeds}
    for s in cfg.seeds:
        for key, kw in table.items():
            kw = {**method_settings(cfg.train, kw["method"]), **kw}
            models[s][key], seconds[s][key] = store.model(base, key, kw, s, splits, log)
        for key, kw in sweep.items():
            kw = {**method_settings(cfg.train, kw["method"]), **kw}
            model, secs = store.model(base, key, kw, s, splits, log, may_diverge=True)
            if model is None:
                diverged[s][key] = secs
            else:
                models[s][key], seconds[s][key] = model, secs
    return models, seconds, diverged


def _random_net(cfg: StudyConfig, splits, seed: int) -> torch.nn.Module:
    """The study's architecture, randomly initialized (seeded), untrained."""
    from opnorm.training.models import build_model
    from opnorm.training.paper_setup import input_normalization

    torch.manual_seed(10_000 + seed)
    mean_, std_ = input_normalization(cfg.train.get("input_range"), splits.mean, splits.std)
    return build_model(
        cfg.model,
        input_shape=splits.input_shape,
        num_classes=splits.num_classes,
        mean=mean_,
        std=std_,
        width=cfg.train.get("width"),
    ).eval()


def _matched(cfg: StudyConfig, screen: dict) -> dict:
    """Per family the sweep point whose mean clean accuracy is closest to l_2 PGD-AT's (CE)."""
    ref = mean(screen["pgd-at-l2"]["clean_acc"])
    out: dict = {
        "reference": "pgd-at-l2",
        "reference_clean_acc": screen["pgd-at-l2"]["clean_acc"],
        "sweeps": {},
        "picked": {},
    }
    for family in ("opnorm", "global-snr"):
        points = [{"key": k, "lam": lam, **screen[k]} for k, lam in sweep_points(cfg, family) if k in screen]
        out["sweeps"][family] = points
        best = min(points, key=lambda p: abs(mean(p["clean_acc"]) - ref))
        lo, hi = min(mean(p["clean_acc"]) for p in points), max(mean(p["clean_acc"]) for p in points)
        out["picked"][family] = {"key": best["key"], "lam": best["lam"], "bracketed": lo <= ref <= hi}
    return out


def _lam_of(key: str, matched: dict) -> float:
    return next(p["lam"] for pts in matched["sweeps"].values() for p in pts if p["key"] == key)


def _label(key: str, methods: dict, matched: dict) -> str:
    if key in methods:
        return methods[key][0]
    family = "d.d. (2,2) op-norm reg." if key.startswith("opnorm") else "Global SNR"
    return f"{family}, lam={_lam_of(key, matched):g} (matched clean acc.)"
