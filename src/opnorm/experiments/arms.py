"""Two or more finished studies of one dataset side by side: which findings change with the protocol.

An *arm* is one study (``opnorm reproduce``'s report directory, its ``results.json``): e.g. the
default arm (the small CNN, Madry-style PGD-AT with cross-entropy and SGD) and the paper-protocol
arm (``configs/paper-fashion-mnist.json``: BatchNorm(affine=False) after each conv, 75 % appended
adversarial examples, MultiMarginLoss, RMSprop). :func:`render_arms` writes one markdown page:

* each arm's protocol and the radius the paper's rule gives for it (:func:`eps_rule`);
* every finding's verdict per arm, and whether it changes between the arms;
* the numbers the protocol is most likely to move: robust accuracy at matched clean accuracy
  (the suite's worst case), global SNR against the clean model, and the deviation from
  linearity at the penultimate layer;
* the evaluation-strength arm: the suite's worst case, CE-PGD alone and the paper's attack.

Example::

    opnorm compare docs/results/fashion-mnist docs/results/paper-fashion-mnist --out docs/results/fashion-mnist-arms.md
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opnorm.experiments.aggregate import mean
from opnorm.experiments.findings import fmt, pct
from opnorm.experiments.report import table
from opnorm.training.files import read_json_object

__all__ = ["load_arm", "eps_rule", "render_arms", "RULE_LEVEL"]

# the paper's rule: the smallest radius at which the clean model is fooled on "almost all"
# inputs; ours: robust accuracy (the suite's worst case) at most this fraction
RULE_LEVEL = 0.05


def load_arm(directory: str | Path) -> dict[str, Any]:
    """A finished study's results (``<directory>/results.json``), refusing anything else in one line."""
    path = Path(directory) / "results.json"
    results = read_json_object(path, "study results")
    if "findings" not in results or "methods" not in results:
        raise ValueError(f"{path} is not the results.json of `opnorm reproduce` (no findings or methods)")
    return results


def eps_rule(results: dict[str, Any], norm: str = "l2") -> dict[str, Any]:
    """The paper's rule for the radius on this study's clean model: the smallest radius of the
    grid at which its mean robust accuracy (the suite's worst case) is at most ``RULE_LEVEL``
    (``eps`` None when no radius of the grid gets there), beside the study's reference radius
    and the clean model's robust accuracy there.

    Example:
        >>> r = {"config": {"reference_eps": {"l2": 2.0}}, "methods": {"clean": {"robust": {"l2": {
        ...     "eps": [0.0, 1.0, 2.0], "acc": [0.9, 0.3, 0.02]}}}}}
        >>> eps_rule(r)
        {'eps': 2.0, 'level': 0.05, 'reference': 2.0, 'clean_at_reference': 0.02}
    """
    curve = results["methods"]["clean"]["robust"][norm]
    accs = [mean(a) for a in curve["acc"]]
    eps = next((e for e, a in zip(curve["eps"], accs) if e > 0 and a <= RULE_LEVEL), None)
    ref = results["config"]["reference_eps"][norm]
    at_ref = accs[curve["eps"].index(ref)] if ref in curve["eps"] else None
    return {"eps": eps, "level": RULE_LEVEL, "reference": ref, "clean_at_reference": at_ref}


def _protocol(r: dict[str, Any]) -> str:
    c, t = r["config"], r["config"].get("train", {})
    at = (
        f"{100 * t['adv_append']:g} % appended adversarial examples"
        if t.get("adv_append")
        else "adversarial batches (Madry)"
    )
    return (
        f"model `{c['model']}`; AT: {at}, loss {t.get('train_loss', 'ce')}; optimizer "
        f"{t.get('optimizer', 'sgd')} lr {c['lr']:g}, batch {c['batch_size']}, {c['epochs']} epochs on "
        f"{c['limit_train'] or 'all'} images; l_2 eps {c['eps_l2']:g}; seeds {', '.join(map(str, r['seeds']))}; "
        f"`{c['command']}`"
    )


def _linearity(m: dict[str, Any], radius: float) -> str:
    lin = m["linearity"]
    if radius not in lin["radii"]:
        return "n/a"
    i = lin["radii"].index(radius)
    return " / ".join(fmt(lin[d]["penultimate_absolute"][i]) for d in ("adversarial", "random"))


def _headline(name: str, r: dict[str, Any]) -> list[list[str]]:
    """Rows of the numbers the protocol may move, for one arm."""
    M, mt = r["methods"], r["matched"]
    ref = r["config"]["reference_eps"]["l2"]
    dd, snr = (mt["at_reference_clean_acc"][f]["l2"] for f in ("opnorm", "global-snr"))
    at = M[mt["reference"]]
    radius = 1.0
    rows = [
        [name, f"robust l_2 {ref:g} at AT's clean accuracy ({pct(mt['reference_clean_acc'])})",
         f"AT {pct(at['robust_at_reference']['l2'])}, d.d. {pct(dd)}, global SNR {pct(snr)}, "
         f"clean model {pct(M['clean']['robust_at_reference']['l2'])}"],
        [name, f"deviation from linearity, penultimate layer, ||z|| = {radius:g} (adversarial / random)",
         "; ".join(f"{M[k]['label']} {_linearity(M[k], radius)}"
                   for k in ("clean", mt["reference"], mt["picked"]["opnorm"]["key"], "global-snr"))],
    ]  # fmt: skip
    return rows


def _strength(name: str, r: dict[str, Any]) -> list[list[str]]:
    M, mt = r["methods"], r["matched"]
    keys = [mt["reference"], mt["picked"]["opnorm"]["key"], mt["picked"]["global-snr"]["key"], "clean"]
    fields = ("robust_at_reference", "robust_pgd_ce_at_reference", "paper_attack_at_reference")
    return [[name, M[k]["label"], *(pct(M[k][f]["l2"]) for f in fields)] for k in keys]


def render_arms(arms: dict[str, dict[str, Any]]) -> str:
    """Markdown comparing the arms (name -> results of :func:`load_arm`), findings matched by id."""
    if len(arms) < 2:
        raise ValueError(f"comparing arms needs at least two studies, got {len(arms)}")
    datasets = {r["config"]["dataset"] for r in arms.values()}
    if len(datasets) > 1:
        raise ValueError(f"the arms are studies of different datasets ({', '.join(sorted(datasets))})")
    names = list(arms)
    lines = [f"# The paper's findings under two protocols: {datasets.pop()}", ""]
    lines += ["Each arm is one `opnorm reproduce` study; intervals are 95 % t-intervals over seeds.", ""]
    for name, r in arms.items():
        rule = eps_rule(r)
        rule_text = (
            f"the paper's rule (the smallest radius where the clean model keeps at most "
            f"{100 * RULE_LEVEL:g} %, ours) gives l_2 eps {rule['eps']:g} on the grid"
            if rule["eps"] is not None
            else f"no radius of the grid leaves the clean model at {100 * RULE_LEVEL:g} % or less"
        )
        at_ref = rule["clean_at_reference"]
        lines += [
            f"- **{name}**: {_protocol(r)}. Radius: {rule_text}; at the study's l_2 eps {rule['reference']:g} "
            f"the clean model keeps {'n/a' if at_ref is None else f'{100 * at_ref:.1f}'} %.",
        ]
    lines += ["", "## Verdicts", ""]
    by_id = {name: {f["id"]: f for f in r["findings"]} for name, r in arms.items()}
    ids = sorted(set().union(*(set(v) for v in by_id.values())))
    rows = []
    for i in ids:
        found = [by_id[n].get(i) for n in names]
        section = next(f["section"] for f in found if f is not None)
        verdicts = [f["verdict"] if f is not None else "not measured" for f in found]
        rows.append([i, section, *verdicts, "yes" if len(set(verdicts)) > 1 else "no"])
    lines += table(["#", "finding", *names, "changes with the protocol"], rows)
    lines += ["## The numbers the protocol moves", ""]
    lines += table(["arm", "measure", "numbers"], [row for n in names for row in _headline(n, arms[n])])
    lines += [
        "## Evaluation strength (l_2, the study's radius, %)",
        "",
        "The suite's per-example worst case, CE-PGD alone, and the paper's code's 10-step targeted attack, "
        "on the matched comparison's models:",
        "",
    ]
    lines += table(
        ["arm", "model", "worst case", "CE-PGD", "paper's attack"],
        [row for n in names for row in _strength(n, arms[n])],
    )
    return "\n".join(lines)
