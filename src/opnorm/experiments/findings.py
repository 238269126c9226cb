"""Verdicts on the paper's claims, computed from the aggregated measurements.

Each verdict is a comparison the paper makes (one method against another, one rank against
the others, a trained model against a random direction), judged on every model the claim
names: the default-lambda models and the models matched in clean accuracy to PGD-AT. A
difference counts when its 95 % t-interval over seeds excludes 0 (``INTERVAL_TEXT``). Where a
rule needs a threshold of our own, the part's text says so.

Every claim is the paper's, in our words, with the section or figure it comes from; each
finding records its metric, the models compared and the interval's method (results.json).

Example (``results``: a study's results.json)::

    [(f["id"], f["verdict"]) for f in findings(results)]
"""

from __future__ import annotations

import math
from typing import Any

from opnorm.experiments.aggregate import INTERVAL_TEXT, difference, half_width, mean, stat

__all__ = ["findings", "below", "fmt", "pct", "per_seed", "INTERVAL_TEXT", "AGREEMENT_MIN_CORRELATION"]

# ours: the activation agreement "explains" the alignment when the two curves move together over eps
AGREEMENT_MIN_CORRELATION = 0.8


def below(a: Any, b: Any) -> bool:
    """a's mean is below b's, and the 95 % t-interval of the difference excludes 0 (one seed: the means)."""
    d, hw = difference(a, b)
    return d > (hw or 0.0)


def fmt(s: Any, scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± half-width of the 95 % t-interval`` (the half-width left out with one seed)."""
    m, h = mean(s), half_width(s)
    if m is None:
        return "n/a"
    text = f"{scale * m:.{digits}f}"
    return text if h is None else text + f" ± {scale * h:.{digits}f}"


def pct(s: Any) -> str:
    return fmt(s, 100.0, 1)


def per_seed(stats: list, combine) -> dict:
    """A stat over seeds of ``combine(values at seed i)``: e.g. the mean of a curve per seed.

    ``stats``: stat dicts measured on the same seeds (plain numbers are constants)."""
    n = max((len(s["values"]) for s in stats if isinstance(s, dict)), default=1)
    rows = [[s["values"][i] if isinstance(s, dict) else s for s in stats] for i in range(n)]
    return stat([combine(row) for row in rows])


def _curve_mean(stats: list) -> dict:
    return per_seed(stats, lambda row: sum(row) / len(row))


def _nearest(values: list, target: float) -> int:
    return min(range(len(values)), key=lambda i: abs(values[i] - target))


def _models(r: dict) -> dict:
    """The models each claim names: key lists by role (matched models added where they differ)."""
    M, picked = r["methods"], r["matched"]["picked"]
    at = [k for k in ("pgd-at-l2", "pgd-at-linf") if k in M]
    dd = ["opnorm"] + [picked["opnorm"]["key"]] * (picked["opnorm"]["key"] != "opnorm")
    snr = ["global-snr"] + [picked["global-snr"]["key"]] * (picked["global-snr"]["key"] != "global-snr")
    trained = [k for k in M if k != "clean"]
    return {"at": at, "dd": dd, "snr": snr, "trained": trained, "all": list(M)}


def _finding(
    fid: int,
    section: str,
    claim: str,
    source: str,
    metric: str,
    models: list,
    numbers: str,
    parts: list[dict],
    note: str | None = None,
    ours: bool = False,
) -> dict:
    held = [p for p in parts if p["holds"]]
    verdict = "holds" if len(held) == len(parts) else ("does not hold" if not held else "partly holds")
    out = {
        "id": fid,
        "section": section,
        "claim": claim,
        "source": source,
        "claim_is": "ours" if ours else "the paper's, in our words",
        "metric": metric,
        "models": models,
        "interval": INTERVAL_TEXT,
        "numbers": numbers,
        "parts": parts,
        "holds": verdict == "holds",
        "verdict": verdict,
    }
    if note:
        out["note"] = note
    return out


def _part(what: str, holds: bool, detail: str) -> dict:
    return {"what": what, "holds": bool(holds), "detail": detail}


def _rank(r: dict) -> dict:
    M, roles = r["methods"], _models(r)
    parts, drops = [], {}
    for k in roles["trained"]:
        ra = M[k]["rank_alignment"]
        v = ra["ce"]
        best = max(range(1, len(v)), key=lambda j: mean(v[j])) if len(v) > 1 else None
        drops[k] = per_seed([v[0], v[-1]], lambda row: row[0] - row[1])
        ok = (best is None or below(v[best], v[0])) and below(ra["random"][0], v[0])
        parts.append(
            _part(
                f"{M[k]['label']}: v_1 above every other rank and above a random direction",
                ok,
                f"|cos| with v_1 {fmt(v[0])}"
                + (f", best other rank v_{best + 1} {fmt(v[best])}" if best else "")
                + f", v_{len(v)} {fmt(v[-1])}, random direction with v_1 {fmt(ra['random'][0])}",
            )
        )
    rn = r["rank_alignment"]["random-init"]["ce"]
    flat = per_seed([rn[0], rn[-1]], lambda row: row[0] - row[1])
    steeper = [k for k in roles["trained"] if not below(flat, drops[k])]
    parts.append(
        _part(
            "randomly initialized network: flatter than every trained model (its v_1 - v_k drop is below each one's)",
            not steeper,
            f"random network v_1 {fmt(rn[0])}, v_{len(rn)} {fmt(rn[-1])}, drop {fmt(flat)}"
            + (f"; not flatter than {', '.join(M[k]['label'] for k in steeper)}" if steeper else ""),
        )
    )
    return _finding(
        1,
        "Alignment vs singular-vector rank",
        "for every trained model, adversarial perturbations are strongly aligned with the dominant singular "
        "vectors of J(x) and the alignment decreases towards the bottom ranks; for a randomly initialized "
        "network the curve is roughly flat",
        "Fig. 1 right",
        "mean |cos(delta, v_k)| of the cross-entropy l_2 PGA perturbation (true label) at the l_2 training radius",
        roles["trained"] + ["random-init"],
        "; ".join(f"{p['what']}: {p['detail']}" for p in parts),
        parts,
    )


def _alignment_eps(r: dict) -> dict:
    M, roles = r["methods"], _models(r)
    parts = []
    for k in roles["all"]:
        al = M[k]["alignment"]
        v = al["ce"]
        high, decays = below(al["random"], v[0]), not below(v[0], v[-1])
        parts.append(
            _part(
                f"{M[k]['label']}: above a random direction at small eps, not rising with eps",
                high and decays,
                f"{fmt(v[0])} at eps {al['eps'][0]:g} -> {fmt(v[-1])} at {al['eps'][-1]:g} "
                f"(random {fmt(al['random'])})",
            )
        )
    avg = {k: _curve_mean(M[k]["alignment"]["ce"]) for k in roles["all"]}
    strong, weak = roles["at"][:1] + roles["dd"], ["clean"] + roles["snr"]
    for k in strong:
        lower = [w for w in weak if not below(avg[w], avg[k])]
        parts.append(
            _part(
                f"{M[k]['label']} above clean and global SNR",
                not lower,
                f"mean over eps {fmt(avg[k])} vs "
                + ", ".join(f"{M[w]['label']} {fmt(avg[w])}" for w in weak)
                + (f"; not above {', '.join(M[w]['label'] for w in lower)}" if lower else ""),
            )
        )
    at = roles["at"][0]
    for k in roles["dd"]:
        gap = abs(mean(avg[k]) - mean(avg[at]))
        to_weak = min(min(mean(avg[k]), mean(avg[at])) - mean(avg[w]) for w in weak)
        parts.append(
            _part(
                f"{M[k]['label']} similar to {M[at]['label']} (ours: their gap is below their lead over clean and "
                "global SNR)",
                gap < to_weak,
                f"gap {gap:.3f}, lead {to_weak:.3f}",
            )
        )
    return _finding(
        2,
        "Alignment vs eps per trained model",
        "the alignment with v_1 decreases with eps; it is similar for adversarial training and d.d. "
        "regularization, and larger for both than for global SNR and the clean model",
        "Fig. 3 right",
        "mean |cos(delta, v_1)| of the cross-entropy l_2 PGA perturbation against eps; the model ordering on its "
        "mean over the eps grid",
        roles["all"],
        "; ".join(f"{p['what']}: {p['detail']}" for p in parts),
        parts,
    )


def _theorem(r: dict) -> dict:
    cases = r["theorem"]["cases"]
    small = [c for c in cases if c["inside_fraction"] > 0]
    gap = max((max(c["iterate_gap_inside"]) for c in small), default=float("nan"))
    # float64 finite differences of logits at eps ~1e-5 leave ~1e-8; leaving the region gives ~1e-1 and more
    part = _part(
        "iterate gap inside the linear region",
        len(small) > 0 and gap <= 1e-6,
        f"max {gap:.1e} (float64; ours: <= 1e-6, float error of finite differences)",
    )
    lgap = ", ".join(f"({c['p']},{c['q']}) eps {c['eps']:g}: {100 * c['inside_fraction']:.0f}% inside" for c in cases)
    return _finding(
        3,
        "Theorem check",
        "infinite-step PGA iterates equal power-method iterates inside the linear region",
        "the paper's main theorem",
        "max |delta_k / eps - v_k| over iterations, at points whose activation pattern never changed",
        ["clean"],
        part["detail"] + "; " + lgap + " (first seed)",
        [part],
    )


def _matched(r: dict) -> dict:
    mt, M = r["matched"], r["methods"]
    at = M[mt["reference"]]
    ref = r["config"]["reference_eps"]
    parts, numbers = [], []
    inter = mt["at_reference_clean_acc"]
    for family, name in (("opnorm", "d.d."), ("global-snr", "global SNR")):
        b = mt["bracket"][family]
        numbers.append(
            f"{name}: "
            + (
                f"lambda {b['below']['lam']:g} ({pct(b['below']['clean_acc'])}) and {b['above']['lam']:g} "
                f"({pct(b['above']['clean_acc'])}) bracket AT's {pct(mt['reference_clean_acc'])}"
                if b["bracketed"]
                else "not bracketed"
            )
        )
    dd, snr = inter["opnorm"], inter["global-snr"]
    for norm in ("l2", "linf"):
        e = ref[norm]
        a = at["robust_at_reference"][norm]
        parts.append(
            _part(
                f"d.d. as robust as PGD-AT at l_{norm[1:]} {e:g} (AT not ahead beyond the interval)",
                not below(dd[norm], a),
                f"d.d. {pct(dd[norm])} vs AT {pct(a)}",
            )
        )
    parts.append(
        _part(
            f"d.d. more robust than global SNR (l_2 {ref['l2']:g})",
            below(snr["l2"], dd["l2"]),
            f"d.d. {pct(dd['l2'])} vs global SNR {pct(snr['l2'])}",
        )
    )
    clean = M["clean"]["robust_at_reference"]
    for norm in ("l2", "linf"):
        parts.append(
            _part(
                f"global SNR does not robustify: not above the clean model at l_{norm[1:]} {ref[norm]:g}",
                not below(clean[norm], snr[norm]),
                f"global SNR {pct(snr[norm])} vs clean {pct(clean[norm])}",
            )
        )
    unbracketed = [f for f, b in mt["bracket"].items() if not b["bracketed"]]
    note = (
        "the sweep did not bracket AT's clean accuracy for "
        + ", ".join(unbracketed)
        + ": the robust accuracy of the lambda nearest in clean accuracy is compared, the match is loose"
        if unbracketed
        else None
    )
    out = _finding(
        4,
        "Robustness at matched clean accuracy",
        "with lambda chosen so that clean accuracy matches adversarial training's, d.d. operator norm "
        "regularization reaches robust accuracy comparable to adversarial training's; global SNR does not seem to "
        "robustify",
        "Sec. 5.4, Table 1",
        f"robust accuracy at the reference radii, the per-example worst case over the suite "
        f"({at.get('robust_suite', 'CE-PGD')}), interpolated on each lambda sweep's frontier at PGD-AT l_2's clean "
        "accuracy (per seed, between the two bracketing lambdas)",
        [mt["reference"], "clean", "opnorm (sweep)", "global-snr (sweep)"],
        "; ".join(numbers) + "; " + "; ".join(p["detail"] for p in parts),
        parts,
        note,
    )
    out["bracketing_lambdas"] = {
        family: {"above": b["above"]["lam"], "below": b["below"]["lam"]} if b["bracketed"] else None
        for family, b in mt["bracket"].items()
    }
    return out


def _spectra(r: dict) -> dict:
    M, roles = r["methods"], _models(r)
    parts = []
    for key in roles["at"] + ["logit-at"] + roles["dd"] + ["opnorm-fast"]:
        if key not in M:
            continue
        ratios = M[key]["spectrum_ratio"]
        exceptions = [k + 1 for k, s in enumerate(ratios) if not below(s, 1.0)]
        parts.append(
            _part(
                f"{M[key]['label']} damps every top singular value",
                not exceptions,
                f"sigma_1 ratio {fmt(ratios[0], digits=2)}, sigma_k ratio in [{min(mean(s) for s in ratios):.2f}, "
                f"{max(mean(s) for s in ratios):.2f}]" + (f"; not damped at k = {exceptions}" if exceptions else ""),
            )
        )
    at = M[roles["at"][0]]["spectrum_ratio"][0]
    for k in roles["dd"]:
        dd = M[k]["spectrum_ratio"][0]
        parts.append(
            _part(
                f"{M[k]['label']} damps sigma_1 slightly more than {M[roles['at'][0]]['label']} (below it in the mean, "
                "not significantly above)",
                mean(dd) <= mean(at) and not below(at, dd),
                f"sigma_1 ratio {fmt(dd, digits=2)} vs AT {fmt(at, digits=2)}",
            )
        )
    dd_main = M["opnorm"]["spectrum_ratio"][0]
    for k in roles["snr"]:
        snr = M[k]["spectrum_ratio"][0]
        parts.append(
            _part(
                f"{M[k]['label']}: almost no effect (nearer to clean than d.d. is, on a log scale)",
                abs(math.log(mean(snr))) < abs(math.log(mean(dd_main))),
                f"sigma_1 ratio {fmt(snr, digits=2)} vs d.d. {fmt(dd_main, digits=2)}",
            )
        )
    return _finding(
        5,
        "Spectra",
        "adversarial training and d.d. regularization significantly damp the top of the singular value "
        "spectrum of J(x), d.d. slightly more than adversarial training; global SNR has almost no effect",
        "Fig. 1 left",
        "sigma_k(J(x)) / the clean model's sigma_k, per seed, mean over points",
        roles["at"] + roles["dd"] + roles["snr"],
        "; ".join(f"{p['what']}: {p['detail']}" for p in parts),
        parts,
    )


def _reference_radius(r: dict) -> int:
    return _nearest(r["methods"]["clean"]["linearity"]["radii"], r["config"]["eps_l2"])


def _linearity(r: dict) -> dict:
    M, roles = r["methods"], _models(r)
    j = _reference_radius(r)
    radius = M["clean"]["linearity"]["radii"][j]
    parts = []
    for direction in ("adversarial", "random"):
        dev = {k: M[k]["linearity"][direction]["penultimate_absolute"][j] for k in roles["all"]}
        clean = dev["clean"]
        for k in roles["at"] + roles["dd"]:
            parts.append(
                _part(
                    f"{direction}: {M[k]['label']} more linear than clean",
                    below(dev[k], clean),
                    f"{fmt(dev[k])} vs clean {fmt(clean)}",
                )
            )
        dd = dev["opnorm"]
        for k in roles["snr"]:
            parts.append(
                _part(
                    f"{direction}: {M[k]['label']} like clean (nearer to clean than to d.d., on a log scale)",
                    abs(math.log(mean(dev[k]) / mean(clean))) < abs(math.log(mean(dev[k]) / mean(dd))),
                    f"{fmt(dev[k])} vs clean {fmt(clean)}, d.d. {fmt(dd)}",
                )
            )
    return _finding(
        6,
        "Deviation from linearity",
        "adversarially trained and d.d.-regularized networks are considerably more linear than the clean one, "
        "along random and along adversarial directions; global SNR behaves like the clean one",
        "Sec. 5.3, Fig. 2 left",
        f"absolute deviation ||phi(x+z) - phi(x) - J_phi(x) z||_2 at the penultimate layer phi, ||z||_2 = "
        f"{radius:g} (the l_2 training radius), mean over points; adversarial z: cross-entropy l_2 PGA",
        roles["all"],
        "; ".join(f"{p['what']}: {p['detail']}" for p in parts),
        parts,
    )


def _linearity_relative(r: dict) -> dict:
    M, roles = r["methods"], _models(r)
    j = _reference_radius(r)
    dev = {k: M[k]["linearity"]["adversarial"]["relative"][j] for k in roles["all"]}
    parts = [
        _part(f"{M[k]['label']} more linear than clean", below(dev[k], dev["clean"]), f"{fmt(dev[k])} vs clean "
              f"{fmt(dev['clean'])}")
        for k in roles["at"] + roles["dd"]
    ]  # fmt: skip
    return _finding(
        9,
        "Deviation from linearity, relative, at the logits (ours)",
        "the same ordering holds for the deviation at the logits relative to the change of the logits",
        "ours (not in the paper)",
        f"||f(x+z) - f(x) - J(x) z|| / ||f(x+z) - f(x)|| at the logits f, adversarial direction, ||z||_2 = "
        f"{M['clean']['linearity']['radii'][j]:g}",
        roles["all"],
        "; ".join(f"{p['what']}: {p['detail']}" for p in parts),
        parts,
        ours=True,
    )


def _sigma_along(r: dict) -> dict:
    M, roles = r["methods"], _models(r)
    j = _reference_radius(r)
    parts = []
    for direction in ("adversarial", "random"):
        change = {
            k: per_seed(
                [M[k]["linearity"][direction]["sigma1"][j], M[k]["linearity"]["sigma1_at_x"]],
                lambda row: abs(row[0] / row[1] - 1.0),
            )
            for k in roles["all"]
        }
        for k in roles["at"] + roles["dd"]:
            parts.append(
                _part(
                    f"{direction}: sigma_1 of {M[k]['label']} changes less than clean's",
                    below(change[k], change["clean"]),
                    f"|sigma_1(J(x+z)) / sigma_1(J(x)) - 1| {fmt(change[k])} vs clean {fmt(change['clean'])}",
                )
            )
    return _finding(
        8,
        "Top singular value along z",
        "sigma_1(J(x + z)) of the adversarially trained and d.d.-regularized networks stays closer to sigma_1(J(x)) "
        "than the clean network's does (a network more linear around x keeps its local operator)",
        "Fig. 2 right; the figure shows the curves, the statement is our reading of it",
        f"|sigma_1(J(x+z)) / sigma_1(J(x)) - 1| per seed at ||z||_2 = {M['clean']['linearity']['radii'][j]:g}",
        roles["all"],
        "; ".join(f"{p['what']}: {p['detail']}" for p in parts),
        parts,
    )


def _pearson(a: list, b: list) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = [x - ma for x in a], [y - mb for y in b]
    den = math.sqrt(sum(x * x for x in da) * sum(y * y for y in db))
    return float("nan") if den == 0 else sum(x * y for x, y in zip(da, db)) / den


def _regions(r: dict) -> dict:
    ag, al = r["agreement"], r["alignment"]
    lg = al["logit"]["mean"]
    corr = _pearson(ag["pga"], lg) if len(lg) > 1 else float("nan")
    parts = [
        _part(
            "agreement falls with eps",
            ag["pga"][-1] < ag["pga"][0],
            "agreement "
            + ", ".join(f"{a:.3f}" for a in ag["pga"])
            + f" at eps {', '.join(f'{e:g}' for e in ag['eps'])}",
        ),
        _part(
            f"agreement and alignment move together over eps (ours: Pearson correlation >= "
            f"{AGREEMENT_MIN_CORRELATION:g})",
            corr >= AGREEMENT_MIN_CORRELATION,
            f"correlation {corr:.2f} with the logit alignment {', '.join(f'{a:.3f}' for a in lg)} (clean model, "
            "first seed)",
        ),
    ]
    return _finding(
        7,
        "Linear regions",
        "the fraction of shared activations between x and x + delta falls with eps, which is where the equivalence "
        "(the alignment) loosens",
        "the paper's discussion of linear regions (section not pinned; our reading)",
        "fraction of ReLU / max-pool patterns shared by x and x + delta (logit l_2 PGA), against the alignment of "
        "that delta with v_1, over eps",
        ["clean"],
        "; ".join(p["detail"] for p in parts),
        parts,
    )


def findings(r: dict) -> list[dict]:
    """One verdict per figure of the paper (and the theorem and linear regions), from ``r``; then ours."""
    return [
        _rank(r),
        _alignment_eps(r),
        _theorem(r),
        _matched(r),
        _spectra(r),
        _linearity(r),
        _regions(r),
        _sigma_along(r),
        _linearity_relative(r),
    ]
