"""Turn the numbers of a reproduction study into report.md and results.json (its PNG plots:
:mod:`opnorm.experiments.plots`).

The report's sections follow the paper's figures; each has a plot, a table (means ± standard
errors over seeds) and the verdict of :mod:`opnorm.experiments.findings`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from opnorm.experiments.findings import INTERVAL_TEXT, fmt, pct
from opnorm.experiments.plots import PLOTS
from opnorm.training.files import write_text_atomic

__all__ = ["PLOTS", "render_markdown", "write_report"]

CONVENTIONS = (
    "Conventions: alignment is |cos| between the perturbation and v_k, attacks use the true label, and PGA is "
    "l_2 and not clipped to the pixel box. The paper's code measures |Pearson correlation| and attacks the "
    "predicted label; both are reported where cheap (Pearson rows; `ce_predicted` in the rank table)."
)


def _cell(text: Any) -> str:
    """Text for a markdown table cell: a literal "|" (as in |cos|) would end the cell."""
    return str(text).replace("|", "\\|")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out + [""]


def claim_text(f: dict) -> str:
    """A finding's claim as the report states it: the paper's claim in our words (no quotation
    marks: the text is not verbatim), with the section or figure it comes from; or ours."""
    if f["claim_is"] == "ours":
        return f"Ours (not a claim of the paper): {f['claim']}."
    return f"The paper ({f['source']}), in our words: {f['claim']}."


def _section(r: dict, fid: int, plots: list[str]) -> list[str]:
    f = next(x for x in r["findings"] if x["id"] == fid)
    lines = [f"## {f['section']}", "", claim_text(f), "", f"Metric: {f['metric']}.", ""]
    lines += [f"![{p}]({PLOTS[p]})" for p in plots] + [""] if plots else []
    lines += [
        f"**Verdict: {f['verdict']}.** "
        + "; ".join(f"{p['what']}: {'holds' if p['holds'] else 'does not hold'}" for p in f["parts"])
        + ".",
        "",
    ]
    return lines + ([f"Note: {f['note']}.", ""] if f.get("note") else [])


def _rank_lines(r: dict) -> list[str]:
    lines = _section(r, 1, ["alignment_rank"])
    k = r["rank_alignment"]["clean"]["k"]
    models = [(m["label"], m["rank_alignment"]) for m in r["methods"].values()]
    models.append(("randomly initialized network", r["rank_alignment"]["random-init"]))
    lines += [f"PGA cross-entropy (true label), l_2 eps {r['rank_alignment']['clean']['eps']:g}, |cos| with v_k:", ""]
    lines += table(
        ["model"] + [f"k={i}" for i in range(1, k + 1)], [[lab] + [fmt(s) for s in ra["ce"]] for lab, ra in models]
    )
    for model in ("clean", "random-init"):
        ra = r["rank_alignment"][model]
        rows = [
            [f"{label}{' (Pearson)' if metric else ''}"] + [fmt(s) for s in ra[key + metric]]
            for metric in ("", "_pearson")
            for key, label in (
                ("ce", "PGA CE, true label"),
                ("ce_predicted", "PGA CE, predicted label"),
                ("logit", "PGA logit, infinite step"),
                ("random", "random direction"),
            )
        ]
        lines += [f"{model} model, l_2 eps {ra['eps']:g}, |cos| (and |Pearson corr|) with v_k:", ""]
        lines += table(["perturbation"] + [f"k={i}" for i in range(1, ra["k"] + 1)], rows)
    return lines


def _alignment_eps_lines(r: dict) -> list[str]:
    lines = _section(r, 2, ["alignment_eps"])
    first = next(iter(r["methods"].values()))["alignment"]
    for loss, label in (("ce", "PGA cross-entropy"), ("logit", "PGA logit loss, infinite step")):
        rows = [
            [m["label"]] + [fmt(s) for s in m["alignment"][loss]] + [fmt(m["alignment"]["random"])]
            for m in r["methods"].values()
        ]
        rows += [
            [m["label"] + " (Pearson)"]
            + [fmt(s) for s in m["alignment"][loss + "_pearson"]]
            + [fmt(m["alignment"]["random_pearson"])]
            for m in r["methods"].values()
        ]
        lines += [f"{label}, |cos(delta, v_1)| by l_2 eps:", ""]
        lines += table(["model"] + [f"{e:g}" for e in first["eps"]] + ["random dir."], rows)
    return lines


def _spectra_lines(r: dict) -> list[str]:
    lines = _section(r, 5, ["spectra_ratio", "spectra"])
    k = len(r["methods"]["clean"]["spectrum"])
    rows = [
        [m["label"]] + [fmt(s, digits=2) for s in m["spectrum_ratio"]]
        for key, m in r["methods"].items()
        if key != "clean"
    ]
    lines += ["sigma_k(J(x)) / clean model's sigma_k, mean over points:", ""]
    lines += table(["method"] + [f"k={i}" for i in range(1, k + 1)], rows)
    rows = [[m["label"]] + [fmt(s, digits=3) for s in m["spectrum"]] for m in r["methods"].values()]
    return lines + ["Mean sigma_k(J(x)):", ""] + table(["method"] + [f"k={i}" for i in range(1, k + 1)], rows)


def _linearity_lines(r: dict) -> list[str]:
    lines = _section(r, 6, ["linearity", "linearity_sigma"])
    radii = r["methods"]["clean"]["linearity"]["radii"]
    for what, label in (
        ("penultimate_absolute", "absolute deviation from linearity at the penultimate layer (the paper's metric)"),
        ("absolute", "absolute deviation from linearity at the logits"),
    ):
        for direction in ("adversarial", "random"):
            rows = [[m["label"]] + [fmt(s) for s in m["linearity"][direction][what]] for m in r["methods"].values()]
            lines += [f"{label}, {direction} direction, by ||z||_2:", ""]
            lines += table(["model"] + [f"{e:g}" for e in radii], rows)
    lines += _section(r, 8, [])
    for direction in ("adversarial", "random"):
        rows = [
            [m["label"], fmt(m["linearity"]["sigma1_at_x"])] + [fmt(s) for s in m["linearity"][direction]["sigma1"]]
            for m in r["methods"].values()
        ]
        lines += [f"sigma_1(J(x + z)), {direction} direction, by ||z||_2:", ""]
        lines += table(["model", "at x"] + [f"{e:g}" for e in radii], rows)
    lines += _section(r, 9, [])
    rows = [[m["label"]] + [fmt(s) for s in m["linearity"]["adversarial"]["relative"]] for m in r["methods"].values()]
    lines += ["relative deviation at the logits, adversarial direction, by ||z||_2:", ""]
    return lines + table(["model"] + [f"{e:g}" for e in radii], rows)


def _matched_lines(r: dict) -> list[str]:
    lines = _section(r, 4, ["matched", "frontier"])
    mt = r["matched"]
    lines += [
        f"Reference: {r['methods'][mt['reference']]['label']}, clean accuracy {pct(mt['reference_clean_acc'])} %. "
        f"Each sweep is extended ({mt['search']['method']}; at most {mt['search']['max_new']} added lambdas, "
        f"stopping once a bracketing lambda is within {100 * mt['search']['tol']:g} points). The sweeps (clean and "
        "robust accuracy at the reference radii):",
        "",
    ]

    def role(fam: str, p: dict) -> str:
        b = mt["bracket"][fam]
        tags = ["bracket, above" if b["bracketed"] and b["above"]["lam"] == p["lam"] else ""]
        tags.append("bracket, below" if b["bracketed"] and b["below"]["lam"] == p["lam"] else "")
        tags.append("measured in full" if p["key"] == mt["picked"][fam]["key"] else "")
        return ", ".join(t for t in tags if t)

    rows = [
        [
            fam,
            f"{p['lam']:g}",
            pct(p["clean_acc"]),
            pct(p["robust_at_reference"]["l2"]),
            pct(p["robust_at_reference"]["linf"]),
            role(fam, p),
        ]
        for fam, pts in mt["sweeps"].items()
        for p in pts
    ]
    ref = r["config"]["reference_eps"]
    head = [f"robust l_2 {ref['l2']:g} (%)", f"robust l_inf {ref['linf']:g} (%)"]
    lines += table(["family", "lambda", "clean (%)", *head, ""], rows)
    for d in mt.get("diverged", []):  # left out of the sweep: no mean over seeds exists
        lines += [
            f"Left out of the sweep: `{d['key']}` (lambda {d['lam']:g}), whose training diverged on seed(s) "
            f"{', '.join(map(str, d['seeds']))}: {d['message']}",
            "",
        ]
    at, clean = r["methods"][mt["reference"]], r["methods"]["clean"]
    rows = [
        [at["label"], pct(at["clean_acc"])] + [pct(at["robust_at_reference"][n]) for n in ("l2", "linf")],
        [clean["label"], pct(clean["clean_acc"])] + [pct(clean["robust_at_reference"][n]) for n in ("l2", "linf")],
    ]
    for fam, name in (("opnorm", "d.d. (2,2) op-norm reg."), ("global-snr", "Global SNR")):
        b, v = mt["bracket"][fam], mt["at_reference_clean_acc"][fam]
        how = (
            f"interpolated between lambda {b['above']['lam']:g} and {b['below']['lam']:g}"
            if b["bracketed"]
            else f"nearest lambda {b['nearest']['lam']:g} (not bracketed)"
        )
        rows.append([f"{name}, {how}", f"{pct(mt['reference_clean_acc'])} (matched)", pct(v["l2"]), pct(v["linf"])])
    lines += ["Robust accuracy (%) at the reference's clean accuracy, on each sweep's frontier:", ""]
    lines += table(["model", "clean (%)", *head], rows)
    keys = [mt["reference"]] + [p["key"] for p in mt["picked"].values()]
    lines += _strength_lines(r, [*keys, "clean"])
    for norm in ("l2", "linf"):
        eps = r["methods"][mt["reference"]]["robust"][norm]["eps"]
        rows = [[r["methods"][k]["label"]] + [pct(a) for a in r["methods"][k]["robust"][norm]["acc"]] for k in keys]
        lines += [f"Robust accuracy (%) of the lambdas nearest in clean accuracy, l_{norm[1:]}:", ""]
        lines += table(["method"] + [f"{e:g}" for e in eps], rows)
    return lines


def _strength_lines(r: dict, keys: list[str]) -> list[str]:
    """The evaluation-strength arm: the suite's worst case, CE-PGD alone and the paper's attack."""
    c, ref = r["config"], r["config"]["reference_eps"]
    lines = [
        f"Evaluation strength at the reference radii (%): the suite's per-example worst case ({_suite(r)}), "
        f"CE-PGD alone (the suite's first attack), and the paper's code's attack ({c['paper_attack_steps']} steps "
        "of 0.25 eps, targeted at (y + 1) mod 10, no random start). The difference between columns is what "
        "the attack, not the model, contributes to a gap.",
        "",
    ]
    rows = []
    for k in keys:
        m = r["methods"][k]
        row = [m["label"]]
        for n in ("l2", "linf"):
            row += [pct(m[f][n]) for f in STRENGTH_FIELDS]
        rows.append(row)
    names = ("worst case", "CE-PGD", "paper's attack")
    head = [f"{name} l_{n[1:]} {ref[n]:g}" for n in ("l2", "linf") for name in names]
    return lines + table(["model", *head], rows)


STRENGTH_FIELDS = ("robust_at_reference", "robust_pgd_ce_at_reference", "paper_attack_at_reference")


def _suite(r: dict) -> str:
    first = next(iter(r["methods"].values()))
    return first.get("robust_suite", "CE-PGD")


def _checks_lines(r: dict) -> list[str]:
    lines = _section(r, 3, ["theorem"])
    rows = [
        [
            f"({c['p']}, {c['q']})",
            f"{c['eps']:g}",
            f"{100 * c['inside_fraction']:.0f}% of {c['points']}",
            "n/a" if c["iterate_gap_inside"][0] is None else f"{max(c['iterate_gap_inside']):.2e}",
            f"{max(c['iterate_gap']):.2e}",
        ]
        for c in r["theorem"]["cases"]
    ]
    lines += table(["(p, q)", "eps", "points inside", "max iterate gap inside", "max gap, all points"], rows)
    lines += _section(r, 7, ["agreement"])
    lines += ["## Sanity checks (first seed)", ""]
    lines += table(
        ["check", "result", "verdict"],
        [
            [
                s["name"],
                s["detail"],
                "skipped" if s.get("skipped") else ("holds" if s["holds"] else "**does not hold**"),
            ]
            for s in r["sanity"]
        ],
    )
    return lines


def _methods_lines(r: dict) -> list[str]:
    c, ref = r["config"], r["config"]["reference_eps"]
    lines = [
        "## Methods",
        "",
        f"Robust accuracy is the per-example worst case over the suite {_suite(r)} (a later attack runs on "
        f"the points still robust), on {c['eval_points']} test points; CE-PGD alone is shown beside it.",
        "",
    ]
    rows = [
        [
            m["label"],
            m["settings"],
            pct(m["clean_acc"]),
            pct(m["robust_at_reference"]["linf"]),
            pct(m["robust_pgd_ce_at_reference"]["linf"]),
            pct(m["robust_at_reference"]["l2"]),
            pct(m["robust_pgd_ce_at_reference"]["l2"]),
            fmt(m["spectrum"][0], digits=3),
            fmt(m["train_seconds"], digits=1),
            fmt(m["time_vs_clean"], digits=2),
        ]
        for m in r["methods"].values()
    ]
    lines += table(
        [
            "method",
            "settings",
            "clean (%)",
            f"robust l_inf {ref['linf']:g} (%)",
            "CE-PGD",
            f"robust l_2 {ref['l2']:g} (%)",
            "CE-PGD",
            "sigma_1",
            "train s",
            "time vs clean",
        ],
        rows,
    )
    lines += [f"![robust_l2]({PLOTS['robust_l2']}) ![robust_linf]({PLOTS['robust_linf']}) ![time]({PLOTS['time']})", ""]
    return lines


def _cost_line(r: dict) -> str:
    """What the study cost, and what this invocation did (it may have read trained runs from disk)."""
    line = f"This invocation: {r['seconds_total']:.0f} s wall, {r['cpu_seconds_total']:.0f} s CPU"
    runs = r.get("runs_directory")
    if runs is None:
        return line + "."
    line += (
        f"; it trained {runs['models_trained']} models and read {runs['models_read']} from the runs directory, "
        f"computed {runs['measurements_computed']} measurements and read {runs['measurements_read']}"
    )
    total = r["train_seconds_all_models"]
    return line + f". Training all models of the study took {total:.0f} s (sum of their training times)."


def render_markdown(r: dict) -> str:
    c = r["config"]
    seeds = ", ".join(str(s) for s in r["seeds"])
    images = "all" if c["limit_train"] is None else f"the first {c['limit_train']}"
    lines = [
        f"# opnorm reproduce: {c['dataset']}",
        "",
        f"Model `{c['model']}`, {c['epochs']} epochs per method{' (quick)' if c['quick'] else ''} on "
        f"{images} training images, "
        f"{c['eval_points']} test points, seeds {seeds} (means ± 95 % t-interval half-widths over seeds). "
        f"Command: `{c['command']}`.",
        "",
        _cost_line(r),
        "",
        CONVENTIONS,
        "",
        f"Intervals: {INTERVAL_TEXT}. Tables show mean ± the half-width of that interval.",
        "",
        "## Findings",
        "",
    ]
    rows = [[f["id"], f["section"], f["source"], claim_text(f), f["numbers"], f["verdict"]] for f in r["findings"]]
    lines += table(["#", "section", "source", "claim", "our numbers", "verdict"], rows)
    lines += _rank_lines(r) + _alignment_eps_lines(r) + _spectra_lines(r) + _linearity_lines(r) + _matched_lines(r)
    lines += _checks_lines(r) + _methods_lines(r)
    env = r["environment"]
    lines += [f"torch {env['torch']}, python {env['python']}, {env['threads']} threads, {env['platform']}.", ""]
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write results.json and report.md into ``out`` (the plots it shows:
    :func:`~opnorm.experiments.plots.write_plots`); return the report path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, sort_keys=False) + "\n")
    report = out / "report.md"
    write_text_atomic(report, render_markdown(results))
    return report
