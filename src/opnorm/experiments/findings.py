"""Verdicts on the paper's claims, computed from the aggregated measurements.

Each verdict is a comparison the paper makes (one method against another, one rank against
the others, a trained model against a random direction), never a cut-off of our own on a
single number. Where the comparison needs a margin, the margin is ours and is stated in
``MARGIN_TEXT``: two standard errors of the difference over seeds (about a 95% interval;
with one seed there is no standard error and the means are compared as they are).
"""

from __future__ import annotations

import math
from typing import Any

from opnorm.experiments.aggregate import mean, se

MARGIN = 2.0
MARGIN_TEXT = (
    "ours: a difference counts when it exceeds 2 standard errors of the difference over seeds "
    "(about a 95% interval); the paper gives no number"
)


def _se(s: Any) -> float:
    v = se(s)
    return 0.0 if v is None else v


def below(a: Any, b: Any) -> bool:
    """a's mean is below b's by more than MARGIN standard errors of the difference."""
    return mean(a) + MARGIN * math.hypot(_se(a), _se(b)) < mean(b)


def fmt(s: Any, scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± se`` (se left out with one seed)."""
    m, e = mean(s), se(s)
    if m is None:
        return "n/a"
    text = f"{scale * m:.{digits}f}"
    return text if e is None else text + f" ± {scale * e:.{digits}f}"


def pct(s: Any) -> str:
    return fmt(s, 100.0, 1)


def _finding(fid: int, section: str, claim: str, numbers: str, parts: list[dict], note: str | None = None) -> dict:
    held = [p for p in parts if p["holds"]]
    verdict = "holds" if len(held) == len(parts) else ("does not hold" if not held else "partly holds")
    out = {
        "id": fid,
        "section": section,
        "claim": claim,
        "numbers": numbers,
        "parts": parts,
        "holds": verdict == "holds",
        "verdict": verdict,
    }
    if note:
        out["note"] = note
    return out


def _rank(r: dict) -> dict:
    ra = r["rank_alignment"]["clean"]
    parts = []
    for key, what in (("ce", "cross-entropy PGA"), ("logit", "logit-loss PGA")):
        v = ra[key]
        others = max(range(1, len(v)), key=lambda j: mean(v[j])) if len(v) > 1 else None
        ok = (others is None or below(v[others], v[0])) and below(ra["random"][0], v[0])
        detail = f"|cos| with v_1 {fmt(v[0])}" + (
            f", best other rank v_{others + 1} {fmt(v[others])}" if others else ""
        )
        parts.append(
            {"what": what, "holds": ok, "detail": detail + f", random direction with v_1 {fmt(ra['random'][0])}"}
        )
    rn = r["rank_alignment"]["random-init"]
    numbers = (
        "; ".join(f"{p['what']}: {p['detail']}" for p in parts)
        + f"; randomly initialized network, CE PGA with v_1: {fmt(rn['ce'][0])}"
    )
    return _finding(
        1,
        "Alignment vs singular-vector rank",
        "adversarial perturbations are aligned with the dominant singular vector v_1 of J(x): more than with "
        "lower-ranked singular vectors, and more than random perturbations are",
        numbers,
        parts,
    )


def _alignment_eps(r: dict) -> dict:
    parts = []
    for m in r["methods"].values():
        al = m["alignment"]
        for loss in ("ce", "logit"):
            v = al[loss]
            high = below(al["random"], v[0])
            decays = mean(v[-1]) <= mean(v[0]) + MARGIN * math.hypot(_se(v[-1]), _se(v[0]))
            parts.append(
                {
                    "what": f"{m['label']}, {loss}",
                    "holds": high and decays,
                    "detail": f"{fmt(v[0])} at eps {al['eps'][0]:g} -> {fmt(v[-1])} at {al['eps'][-1]:g} "
                    f"(random {fmt(al['random'])})",
                }
            )
    return _finding(
        2,
        "Alignment vs eps per trained model",
        "the alignment with v_1 is high at small eps (well above a random direction) and decays as eps grows, "
        "for every trained model",
        "; ".join(f"{p['what']}: {p['detail']}" for p in parts),
        parts,
    )


def _theorem(r: dict) -> dict:
    cases = r["theorem"]["cases"]
    small = [c for c in cases if c["inside_fraction"] > 0]
    gap = max((max(c["iterate_gap_inside"]) for c in small), default=float("nan"))
    # float64 finite differences of logits at eps ~1e-5 leave ~1e-8; leaving the region gives ~1e-1 and more
    part = {
        "what": "iterate gap inside the linear region",
        "holds": len(small) > 0 and gap <= 1e-6,
        "detail": f"max {gap:.1e} (float64; ours: <= 1e-6, float error of finite differences)",
    }
    lgap = ", ".join(f"({c['p']},{c['q']}) eps {c['eps']:g}: {100 * c['inside_fraction']:.0f}% inside" for c in cases)
    return _finding(
        3,
        "Theorem check",
        "infinite-step PGA iterates equal power-method iterates inside the linear region",
        part["detail"] + "; " + lgap + " (first seed)",
        [part],
    )


def _matched(r: dict) -> dict:
    mt, M = r["matched"], r["methods"]
    at = M[mt["reference"]]
    parts, numbers = [], []
    for family, other in (("opnorm", "global-snr"),):
        pick = M[mt["picked"][family]["key"]]
        snr = M[mt["picked"][other]["key"]]
        worst = []
        for norm in ("l2", "linf"):
            for e, a, d in zip(at["robust"][norm]["eps"], at["robust"][norm]["acc"], pick["robust"][norm]["acc"]):
                if e > 0:
                    worst.append((below(d, a), f"l_{norm[1:]} {e:g}: d.d. {pct(d)} vs AT {pct(a)}"))
        close = not any(b for b, _ in worst)
        ref = r["config"]["reference_eps"]["l2"]
        beats = below(snr["robust_at_reference"]["l2"], pick["robust_at_reference"]["l2"])
        parts.append(
            {
                "what": "d.d. as robust as PGD-AT (no eps where AT is ahead beyond the margin)",
                "holds": close,
                "detail": "; ".join(t for _, t in worst),
            }
        )
        parts.append(
            {
                "what": "d.d. more robust than global SNR (l_2 reference radius)",
                "holds": beats,
                "detail": f"l_2 {ref:g}: d.d. {pct(pick['robust_at_reference']['l2'])} "
                f"vs global SNR {pct(snr['robust_at_reference']['l2'])}",
            }
        )
        numbers.append(
            f"clean accuracy: PGD-AT l_2 {pct(at['clean_acc'])}, d.d. at lam {mt['picked'][family]['lam']:g} "
            f"{pct(pick['clean_acc'])}, global SNR at lam {mt['picked'][other]['lam']:g} {pct(snr['clean_acc'])}"
        )
    note = (
        None
        if all(p["bracketed"] for p in mt["picked"].values())
        else (
            "the sweep did not bracket AT's clean accuracy for "
            + ", ".join(f for f, p in mt["picked"].items() if not p["bracketed"])
            + ": the nearest lambda is compared, the match is loose"
        )
    )
    return _finding(
        4,
        "Robustness at matched clean accuracy",
        "with lambda chosen so that its clean accuracy matches cross-entropy PGD adversarial training's, d.d. "
        "operator norm regularization reaches about the same robust accuracy, and much more than global SNR",
        "; ".join(numbers) + "; " + "; ".join(p["detail"] for p in parts),
        parts,
        note,
    )


def _spectra(r: dict) -> dict:
    M = r["methods"]
    parts = []
    for key in ("pgd-at-l2", "pgd-at-linf", "logit-at", "opnorm", "opnorm-fast"):
        if key not in M:
            continue
        ratios = M[key]["spectrum_ratio"]
        exceptions = [k + 1 for k, s in enumerate(ratios) if not (mean(s) < 1 and mean(s) + MARGIN * _se(s) < 1)]
        parts.append(
            {
                "what": M[key]["label"],
                "holds": not exceptions,
                "detail": f"sigma_1 ratio {fmt(ratios[0], digits=2)}, "
                f"sigma_k ratio in [{min(mean(s) for s in ratios):.2f}, {max(mean(s) for s in ratios):.2f}]"
                + (f"; not damped at k = {exceptions}" if exceptions else ""),
            }
        )
    snr, dd = M["global-snr"]["spectrum_ratio"][0], M["opnorm"]["spectrum_ratio"][0]
    closer = abs(math.log(mean(snr))) < abs(math.log(mean(dd)))
    parts.append(
        {
            "what": "Global SNR (paper: almost no effect, i.e. nearer to clean than d.d.)",
            "holds": closer,
            "detail": f"sigma_1 ratio {fmt(snr, digits=2)} vs d.d. {fmt(dd, digits=2)} "
            f"(lam {r['config']['lam_snr']:g})",
        }
    )
    return _finding(
        5,
        "Spectra",
        "adversarial training and d.d. regularization significantly damp the top singular values of J(x); "
        "global SNR has almost no effect on them",
        "per-rank ratio sigma_k / clean's: " + "; ".join(f"{p['what']}: {p['detail']}" for p in parts),
        parts,
    )


def _linearity(r: dict) -> dict:
    M = r["methods"]
    lin = {k: m["linearity"] for k, m in M.items()}
    radii = lin["clean"]["radii"]
    j = min(range(len(radii)), key=lambda i: abs(radii[i] - r["config"]["eps_l2"]))
    dev = {k: v["adversarial"]["relative"][j] for k, v in lin.items()}
    parts = [
        {
            "what": f"{M[k]['label']} more linear than clean",
            "holds": below(dev[k], dev["clean"]),
            "detail": f"{fmt(dev[k])} vs clean {fmt(dev['clean'])}",
        }
        for k in ("pgd-at-l2", "opnorm")
        if k in dev
    ]
    snr_near = abs(mean(dev["global-snr"]) - mean(dev["clean"])) < abs(mean(dev["global-snr"]) - mean(dev["opnorm"]))
    parts.append(
        {
            "what": "Global SNR like clean (nearer to clean than to d.d.)",
            "holds": snr_near,
            "detail": f"{fmt(dev['global-snr'])}",
        }
    )
    return _finding(
        6,
        "Deviation from linearity",
        "adversarially trained and d.d.-regularized networks are considerably more linear around the data than "
        "the clean one; global SNR behaves like the clean one",
        f"relative deviation along the adversarial direction at ||z|| = {radii[j]:g}: "
        + "; ".join(f"{p['what']}: {p['detail']}" for p in parts),
        parts,
    )


def _regions(r: dict) -> dict:
    ag, al = r["agreement"], r["alignment"]
    lg = al["logit"]["mean"]
    drop = next((e for e, a in zip(ag["eps"], ag["pga"]) if a < 0.99), None)
    part = {
        "what": "agreement and alignment both fall with eps",
        "holds": ag["pga"][0] >= ag["pga"][-1] and lg[0] >= lg[-1] and drop is not None,
        "detail": "agreement "
        + ", ".join(f"{a:.3f}" for a in ag["pga"])
        + f" at eps {', '.join(f'{e:g}' for e in ag['eps'])}; "
        f"logit alignment {', '.join(f'{a:.3f}' for a in lg)} (clean model, first seed)",
    }
    return _finding(
        7,
        "Linear regions",
        "the fraction of shared activations falls with eps, which is where the equivalence (alignment) loosens",
        part["detail"],
        [part],
    )


def findings(r: dict) -> list[dict]:
    """One verdict per figure of the paper (and the theorem and linear regions), from ``r``."""
    return [_rank(r), _alignment_eps(r), _theorem(r), _matched(r), _spectra(r), _linearity(r), _regions(r)]
