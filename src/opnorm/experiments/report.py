"""Turn the numbers of a reproduction run into report.md, results.json and PNG plots.

Nothing here computes a result: every number comes from the ``results`` dict that
:mod:`opnorm.experiments.reproduce` measured. Plots use matplotlib's Agg backend, so
they work without a screen.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from opnorm.training.trainer import write_text_atomic

PLOTS = {
    "robust_linf": "robust_accuracy_linf.png",
    "robust_l2": "robust_accuracy_l2.png",
    "alignment": "alignment.png",
    "spectra": "spectra.png",
    "agreement": "activation_agreement.png",
    "time": "robustness_vs_time.png",
    "theorem": "theorem.png",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def plot_robust(results: dict, norm: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, m in results["methods"].items():
        curve = m["robust"][norm]
        ax.plot(curve["eps"], [100 * a for a in curve["acc"]], marker="o", ms=3, label=m["label"])
    ax.set_xlabel(f"eps (l_{'inf' if norm == 'linf' else '2'})")
    ax.set_ylabel("robust accuracy (%)")
    cfg = results["config"]
    ax.set_title(f"PGD-{cfg['eval_steps']} ({cfg.get('eval_schedule', 'constant')} step) x{cfg['eval_restarts']} restarts, l_{norm[1:]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_alignment(results: dict, path: Path) -> None:
    plt = _plt()
    al = results["alignment"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, style, label in (("logit", "-o", "PGA, logit loss, infinite step"), ("logit_finite", "--o", "PGA, logit loss, finite step"),
                              ("ce", "-s", "PGA, cross-entropy loss")):
        mean, std = al[key]["mean"], al[key]["std"]
        ax.errorbar(al["eps"], mean, yerr=std, fmt=style, ms=3, capsize=2, label=label)
    raw = results.get("alignment_raw")
    if al.get("jitter") and raw is not None:
        ax.plot(raw["eps"], raw["logit"]["mean"], ":", color="black", marker="x", ms=4,
                label="logit loss, infinite step, unjittered points")
    ax.axhline(al["random"]["mean"], color="gray", ls=":", label="a random direction")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"eps (l_{al['p']})")
    ax.set_ylabel("|cos(delta, v_1)|")
    ax.set_title(f"Alignment with the top singular vector ({al['model']} model)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_spectra(results: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, m in results["methods"].items():
        s = m["spectrum"]
        ax.plot(range(1, len(s) + 1), s, marker="o", ms=3, label=m["label"])
    ax.set_yscale("log")
    ax.set_xlabel("index k")
    ax.set_ylabel("mean sigma_k(J(x)) over test points")
    ax.set_title("Top singular values of the Jacobian")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_agreement(results: dict, path: Path) -> None:
    plt = _plt()
    ag = results["agreement"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label in (("pga", "x vs x + delta_PGA (logit loss)"), ("random", "x vs x + random delta")):
        ax.plot(ag["eps"], ag[key], marker="o", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(f"eps (l_{ag['p']})")
    ax.set_ylabel("fraction of shared activations")
    ax.set_title(f"Linear regions ({ag['model']} model)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_time(results: dict, path: Path) -> None:
    plt = _plt()
    ref = results["config"]["reference_eps"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, m in results["methods"].items():
        ax.scatter(m["time_vs_clean"], 100 * m["robust_at_reference"]["linf"], label=m["label"])
    ax.set_xlabel("training time relative to clean")
    ax.set_ylabel(f"robust accuracy (%), l_inf eps = {ref['linf']:g}")
    ax.set_title("Robustness per unit of compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_theorem(results: dict, path: Path) -> None:
    plt = _plt()
    th = results["theorem"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for case in th["cases"]:
        if case["inside_fraction"] == 0:
            continue
        gaps = [max(g, 1e-17) for g in case["iterate_gap_inside"]]
        ax.semilogy(range(1, len(gaps) + 1), gaps, marker="o", ms=3,
                    label=f"({case['p']}, {case['q']}), eps={case['eps']:g}, {100 * case['inside_fraction']:.0f}% inside")
    ax.set_xlabel("iteration k")
    ax.set_ylabel("max |delta_k / eps - v_k| (points inside)")
    ax.set_title("Infinite-step PGA vs the power method")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    _save(fig, path)


def write_plots(results: dict, out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    plot_robust(results, "linf", out / PLOTS["robust_linf"])
    plot_robust(results, "l2", out / PLOTS["robust_l2"])
    plot_alignment(results, out / PLOTS["alignment"])
    plot_spectra(results, out / PLOTS["spectra"])
    plot_agreement(results, out / PLOTS["agreement"])
    plot_time(results, out / PLOTS["time"])
    plot_theorem(results, out / PLOTS["theorem"])
    return dict(PLOTS)


def _max_or_na(values: list) -> str:
    return "n/a" if values[0] is None else f"{max(values):.2e}"


def _cell(text: Any) -> str:
    """Text for a markdown table cell: a literal "|" (as in |cos|) would end the cell."""
    return str(text).replace("|", "\\|")


def _fmt_pct(a: float) -> str:
    return f"{100 * a:.1f}"


def _mark(holds: bool) -> str:
    return "holds" if holds else "**does not hold**"


def _verdict(finding: dict) -> str:
    """A finding with parts (one per loss or per method) names which parts hold."""
    parts = finding.get("parts")
    if not parts or all(q["holds"] == finding["holds"] for q in parts):
        return _mark(finding["holds"])
    held = [q["what"] for q in parts if q["holds"]]
    failed = [f"{q['what']} ({q['detail']})" for q in parts if not q["holds"]]
    return "**does not hold** as a whole; holds for " + (", ".join(held) or "none") + "; fails for " + ", ".join(failed)


def render_markdown(results: dict) -> str:
    cfg = results["config"]
    lines: list[str] = []
    lines.append(f"# opnorm reproduce: {cfg['dataset']}")
    lines.append("")
    lines.append(
        f"Model `{cfg['model']}`, seed {cfg['seed']}, {cfg['epochs']} epochs per method"
        f"{' (quick)' if cfg['quick'] else ''}; {results['seconds_total']:.0f} s in all. "
        f"Command: `{cfg['command']}`."
    )
    lines.append("")
    lines.append("## Findings")
    lines.append("")
    lines.append("| # | claim | our numbers | verdict |")
    lines.append("|---|---|---|---|")
    for f in results["findings"]:
        lines.append(f"| {f['id']} | {_cell(f['claim'])} | {_cell(f['numbers'])} | {_cell(_verdict(f))} |")
    lines.append("")
    lines.append("## Sanity checks")
    lines.append("")
    lines.append("| check | result | verdict |")
    lines.append("|---|---|---|")
    for s in results["sanity"]:
        verdict = "skipped" if s.get("skipped") else _mark(s["holds"])
        lines.append(f"| {_cell(s['name'])} | {_cell(s['detail'])} | {verdict} |")
    lines.append("")
    ref = cfg["reference_eps"]
    lines.append("## Methods")
    lines.append("")
    lines.append(
        f"Robust accuracy under PGD-{cfg['eval_steps']} ({cfg.get('eval_schedule', 'constant')} step size, best iterate) "
        f"with {cfg['eval_restarts']} restarts on "
        f"{cfg['eval_points']} test points, at the reference radii l_inf {ref['linf']:g} and l_2 {ref['l2']:g}."
    )
    lines.append("")
    lines.append("| method | settings | clean acc (%) | robust l_inf (%) | robust l_2 (%) | mean sigma_1 | train s | time vs clean |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, m in results["methods"].items():
        lines.append(
            f"| {m['label']} | {m['settings']} | {_fmt_pct(m['clean_acc'])} | {_fmt_pct(m['robust_at_reference']['linf'])} | "
            f"{_fmt_pct(m['robust_at_reference']['l2'])} | {m['spectrum'][0]:.3g} | {m['train_seconds']:.1f} | "
            f"{m['time_vs_clean']:.2f}x |"
        )
    lines.append("")
    for norm in ("linf", "l2"):
        methods = results["methods"]
        first = next(iter(methods.values()))
        eps = first["robust"][norm]["eps"]
        lines.append(f"### Robust accuracy (%) vs eps, l_{norm[1:]}")
        lines.append("")
        lines.append("| method | " + " | ".join(f"{e:g}" for e in eps) + " |")
        lines.append("|---|" + "---|" * len(eps))
        for m in methods.values():
            lines.append(f"| {m['label']} | " + " | ".join(_fmt_pct(a) for a in m["robust"][norm]["acc"]) + " |")
        lines.append("")
    al, raw = results["alignment"], results["alignment_raw"]
    lines.append(f"### Alignment |cos(delta_PGA, v_1)| ({al['model']} model, l_{al['p']}, q = {al['q']})")
    lines.append("")
    if al.get("jitter"):
        lines.append(
            f"Measured at the test points plus N(0, {al['jitter']:g}^2) pixel noise: images with constant backgrounds "
            "hold exact ties in max-pool windows, so every such image lies on a boundary between linear regions and "
            "no eps-ball around it is linear (see the unjittered rows: activations change even at the smallest eps)."
        )
        lines.append("")
    lines.append("| eps | " + " | ".join(f"{e:g}" for e in al["eps"]) + " |")
    lines.append("|---|" + "---|" * len(al["eps"]))
    for key, label in (("logit", "logit loss, infinite step"), ("logit_finite", f"logit loss, step 2.5 eps / {al['steps']}"), ("ce", "cross-entropy loss")):
        lines.append(f"| {label} | " + " | ".join(f"{m:.3f}" for m in al[key]["mean"]) + " |")
    lines.append(f"| a random direction | " + " | ".join(f"{al['random']['mean']:.3f}" for _ in al["eps"]) + " |")
    ag, ag_raw = results["agreement"], results["agreement_raw"]
    lines.append(f"| activation agreement (logit PGA) | " + " | ".join(f"{a:.3f}" for a in ag["pga"]) + " |")
    if al.get("jitter"):
        lines.append(f"| logit loss, infinite step, unjittered | " + " | ".join(f"{m:.3f}" for m in raw["logit"]["mean"]) + " |")
        lines.append(f"| cross-entropy loss, unjittered | " + " | ".join(f"{m:.3f}" for m in raw["ce"]["mean"]) + " |")
        lines.append(f"| activation agreement (logit PGA), unjittered | " + " | ".join(f"{a:.3f}" for a in ag_raw["pga"]) + " |")
    lines.append("")
    lines.append("### Theorem check: infinite-step PGA vs power method")
    lines.append("")
    lines.append("| (p, q) | eps | points inside the linear region | max iterate gap inside | max loss gap inside | max iterate gap, all points |")
    lines.append("|---|---|---|---|---|---|")
    for c in results["theorem"]["cases"]:
        lines.append(
            f"| ({c['p']}, {c['q']}) | {c['eps']:g} | {100 * c['inside_fraction']:.0f}% of {c['points']} | {_max_or_na(c['iterate_gap_inside'])} | "
            f"{_max_or_na(c['loss_gap_inside'])} | {max(c['iterate_gap']):.2e} |"
        )
    lines.append("")
    lines.append("## Plots")
    lines.append("")
    for key, fname in PLOTS.items():
        lines.append(f"![{key}]({fname})")
    lines.append("")
    env = results["environment"]
    lines.append(f"torch {env['torch']}, python {env['python']}, {env['threads']} threads, {env['platform']}.")
    lines.append("")
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write results.json, report.md and the plots into ``out``; return the report path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_plots(results, out)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, sort_keys=False) + "\n")
    report = out / "report.md"
    write_text_atomic(report, render_markdown(results))
    return report
