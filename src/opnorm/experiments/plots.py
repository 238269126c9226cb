"""The study's PNG plots: means over seeds as lines, 95 % t-intervals as bands.

Nothing here computes a result: every number comes from the ``results`` dict of
:mod:`opnorm.experiments.reproduce`. matplotlib's Agg backend: no screen needed.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from opnorm.experiments.aggregate import half_width, mean

PLOTS = {
    "alignment_rank": "alignment_vs_rank.png",
    "alignment_eps": "alignment_vs_eps.png",
    "spectra_ratio": "spectra_ratio.png",
    "spectra": "spectra.png",
    "linearity": "linearity_deviation.png",
    "linearity_sigma": "linearity_sigma1.png",
    "matched": "matched_robustness.png",
    "frontier": "frontier.png",
    "robust_linf": "robust_accuracy_linf.png",
    "robust_l2": "robust_accuracy_l2.png",
    "theorem": "theorem.png",
    "agreement": "activation_agreement.png",
    "time": "robustness_vs_time.png",
}


def _plt():
    try:  # matplotlib: only the plots need it
        import matplotlib
    except ImportError:
        raise ImportError(
            "the report's plots need matplotlib, a dependency of opnorm: pip install 'matplotlib>=3.5'"
        ) from None

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def band(ax, xs: list, stats: list, scale: float = 1.0, **kw: Any) -> None:
    """A line of the means and a band of the 95 % t-interval over seeds (none for one seed)."""
    m = [scale * mean(s) if mean(s) is not None else float("nan") for s in stats]
    line = ax.plot(xs, m, **kw)[0]
    errs = [half_width(s) for s in stats]
    if all(e is not None for e in errs):
        ax.fill_between(
            xs,
            [a - scale * e for a, e in zip(m, errs)],
            [a + scale * e for a, e in zip(m, errs)],
            color=line.get_color(),
            alpha=0.2,
            lw=0,
        )


def _finish(ax, xlabel: str, ylabel: str, title: str, legend: int = 7) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend)


def plot_rank(r: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ra = r["rank_alignment"]
    ks = list(range(1, ra["clean"]["k"] + 1))
    ax = axes[0]
    for m in r["methods"].values():
        band(ax, ks, m["rank_alignment"]["ce"], marker="o", ms=3, label=m["label"])
    band(ax, ks, ra["random-init"]["ce"], ls=":", color="black", marker="o", ms=3, label="randomly initialized")
    ax.set_yscale("log")
    _finish(
        ax, "singular-vector rank k", "|cos(delta, v_k)|", f"PGA CE, every model, l_2 eps {ra['clean']['eps']:g}", 6
    )
    ax = axes[1]
    for model, style in (("clean", "-"), ("random-init", ":")):
        for key, label in (("ce", "PGA CE"), ("logit", "PGA logit"), ("random", "random")):
            band(ax, ks, ra[model][key + "_pearson"], ls=style, marker="o", ms=3, label=f"{label}, {model}")
    ax.set_yscale("log")
    _finish(ax, "singular-vector rank k", "|Pearson corr|(delta, v_k)", "Clean and random network, Pearson", 6)
    _save(fig, path)


def plot_alignment_eps(r: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, loss in zip(axes, ("ce", "logit")):
        for m in r["methods"].values():
            band(ax, m["alignment"]["eps"], m["alignment"][loss], marker="o", ms=3, label=m["label"])
        ax.axhline(
            mean(r["methods"]["clean"]["alignment"]["random"]), color="gray", ls=":", label="random direction (clean)"
        )
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        _finish(
            ax,
            "eps (l_2)",
            "|cos(delta, v_1)|",
            f"PGA {'cross-entropy' if loss == 'ce' else 'logit loss, infinite step'}",
            6,
        )
    _save(fig, path)


def plot_spectra(r: dict, path: Path, ratio: bool) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, m in r["methods"].items():
        if ratio and key == "clean":
            continue
        s = m["spectrum_ratio"] if ratio else m["spectrum"]
        band(ax, list(range(1, len(s) + 1)), s, marker="o", ms=3, label=m["label"])
    if ratio:
        ax.axhline(1.0, color="gray", ls=":")
    ax.set_yscale("log")
    _finish(
        ax,
        "rank k",
        "sigma_k / clean's sigma_k" if ratio else "mean sigma_k(J(x))",
        "Per-rank ratio to the clean model" if ratio else "Top singular values of J(x)",
    )
    _save(fig, path)


def plot_linearity(r: dict, path: Path, what: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, direction in zip(axes, ("adversarial", "random")):
        for m in r["methods"].values():
            lin = m["linearity"]
            band(ax, lin["radii"], lin[direction][what], marker="o", ms=3, label=m["label"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ylabel = {
            "penultimate_absolute": "||phi(x+z) - phi(x) - J_phi z|| (penultimate layer)",
            "sigma1": "sigma_1(J(x + z))",
        }[what]
        _finish(ax, "||z||_2", ylabel, f"{direction} direction", 6)
    _save(fig, path)


def plot_matched(r: dict, path: Path) -> None:
    plt = _plt()
    mt = r["matched"]
    keys = [mt["reference"]] + [p["key"] for p in mt["picked"].values()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, norm in zip(axes, ("l2", "linf")):
        for k in keys:
            m = r["methods"][k]
            band(ax, m["robust"][norm]["eps"], m["robust"][norm]["acc"], scale=100, marker="o", ms=3, label=m["label"])
        _finish(ax, f"eps (l_{norm[1:]})", "robust accuracy (%)", f"At matched clean accuracy, l_{norm[1:]}")
    _save(fig, path)


def plot_frontier(r: dict, path: Path) -> None:
    plt = _plt()
    mt = r["matched"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for family, pts in mt["sweeps"].items():
        xs = [100 * mean(p["clean_acc"]) for p in pts]
        ys = [100 * mean(p["robust_at_reference"]["l2"]) for p in pts]
        ax.errorbar(
            xs,
            ys,
            xerr=[100 * (half_width(p["clean_acc"]) or 0) for p in pts],
            yerr=[100 * (half_width(p["robust_at_reference"]["l2"]) or 0) for p in pts],
            fmt="-o",
            ms=3,
            capsize=2,
            label=f"{'d.d. reg.' if family == 'opnorm' else 'global SNR'} sweep",
        )
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(f"{p['lam']:g}", (x, y), fontsize=6)
        v = mt["at_reference_clean_acc"][family]["l2"]
        ax.plot([100 * mean(mt["reference_clean_acc"])], [100 * mean(v)], "x", ms=8, color="gray")
    at = r["methods"][mt["reference"]]
    ax.errorbar(
        [100 * mean(at["clean_acc"])],
        [100 * mean(at["robust_at_reference"]["l2"])],
        fmt="*",
        ms=10,
        color="black",
        label="PGD-AT l_2 (CE)",
    )
    _finish(
        ax,
        "clean accuracy (%)",
        f"robust accuracy (%), l_2 eps {r['config']['eps_l2']:g}",
        "Robust vs clean (lambda annotated; x: at AT's clean accuracy)",
    )
    _save(fig, path)


def plot_robust(r: dict, norm: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m in r["methods"].values():
        band(ax, m["robust"][norm]["eps"], m["robust"][norm]["acc"], scale=100, marker="o", ms=3, label=m["label"])
    c = r["config"]
    _finish(
        ax,
        f"eps (l_{norm[1:]})",
        "robust accuracy (%)",
        f"PGD-{c['eval_steps']} ({c['eval_schedule']}) x{c['eval_restarts']}, l_{norm[1:]}",
    )
    _save(fig, path)


def plot_theorem(r: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for case in r["theorem"]["cases"]:
        if case["inside_fraction"] > 0:
            gaps = [max(g, 1e-17) for g in case["iterate_gap_inside"]]
            ax.semilogy(
                range(1, len(gaps) + 1),
                gaps,
                marker="o",
                ms=3,
                label=f"({case['p']}, {case['q']}), eps={case['eps']:g}, {100 * case['inside_fraction']:.0f}% inside",
            )
    _finish(ax, "iteration k", "max |delta_k / eps - v_k| (points inside)", "Infinite-step PGA vs the power method")
    _save(fig, path)


def plot_agreement(r: dict, path: Path) -> None:
    plt = _plt()
    ag = r["agreement"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label in (("pga", "x vs x + delta_PGA (logit loss)"), ("random", "x vs x + random delta")):
        ax.plot(ag["eps"], ag[key], marker="o", ms=3, label=label)
    ax.set_xscale("log")
    _finish(ax, "eps (l_2)", "fraction of shared activations", "Linear regions (clean model, first seed)")
    _save(fig, path)


def plot_time(r: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m in r["methods"].values():
        ax.scatter(mean(m["time_vs_clean"]), 100 * mean(m["robust_at_reference"]["l2"]), label=m["label"])
    _finish(
        ax,
        "training time relative to clean",
        f"robust accuracy (%), l_2 eps {r['config']['eps_l2']:g}",
        "Robustness per unit of compute",
    )
    _save(fig, path)


def _draw(job: partial) -> None:
    job()  # a module-level function: a process pool's map can send it


def write_plots(r: dict, out: Path, mapper: Callable = map) -> dict[str, str]:
    """Every plot of :data:`PLOTS` into ``out``; returns PLOTS. ``mapper``: how the plots are drawn
    (e.g. a process pool's ``map``, one plot per call; default: one after another here)."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        partial(plot_rank, r, out / PLOTS["alignment_rank"]),
        partial(plot_alignment_eps, r, out / PLOTS["alignment_eps"]),
        partial(plot_spectra, r, out / PLOTS["spectra_ratio"], ratio=True),
        partial(plot_spectra, r, out / PLOTS["spectra"], ratio=False),
        partial(plot_linearity, r, out / PLOTS["linearity"], "penultimate_absolute"),
        partial(plot_linearity, r, out / PLOTS["linearity_sigma"], "sigma1"),
        partial(plot_matched, r, out / PLOTS["matched"]),
        partial(plot_frontier, r, out / PLOTS["frontier"]),
        partial(plot_robust, r, "linf", out / PLOTS["robust_linf"]),
        partial(plot_robust, r, "l2", out / PLOTS["robust_l2"]),
        partial(plot_theorem, r, out / PLOTS["theorem"]),
        partial(plot_agreement, r, out / PLOTS["agreement"]),
        partial(plot_time, r, out / PLOTS["time"]),
    ]
    list(mapper(_draw, jobs))
    return dict(PLOTS)
