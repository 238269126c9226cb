"""The study's measurements of one seed's models, as plain numbers ready for JSON.

* :func:`screen`: clean accuracy and robust accuracy at the reference radii (every model,
  sweep points included: enough to pick the matched-clean-accuracy lambda);
* :func:`full`: robust accuracy curves, spectrum, alignment against eps and by
  singular-vector rank, linearity;
* :func:`random_net_alignment`: alignment by singular-vector rank of a randomly initialized
  network (:func:`random_net`);
* :func:`first_seed_checks`: the theorem, linear regions (activation agreement) and the
  alignment curve at unjittered points, on the first seed's clean model;
* :func:`stronger_pgd` and :func:`square_check`: the attacks of the sanity checks, per model;
* :func:`sanity_checks`: monotone curves, a stronger PGD and black-box Square against the suite.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from opnorm.evaluation import PGDAttack
from opnorm.experiments import evaluate as E
from opnorm.experiments.study import StudyConfig
from opnorm.training.evaluation import accuracy
from opnorm.training.inputs import registry_model

INF = math.inf


def jitter(x: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """``x + scale * N(0, 1)`` per pixel, seeded (not clipped: the analysis is about J(x), not the box)."""
    if scale == 0:
        return x
    return x + scale * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 7919), dtype=x.dtype)


def suite(cfg: StudyConfig, seed: int) -> list:
    """The study's attack suite (:func:`~opnorm.experiments.evaluate.robust_suite`)."""
    return E.robust_suite(
        steps=cfg.eval_steps,
        restarts=cfg.eval_restarts,
        schedule=cfg.eval_schedule,
        dlr_steps=cfg.dlr_steps,
        dlr_batch=cfg.dlr_batch,
        seed=seed,
    )


def _robust(cfg: StudyConfig, model, x, y, norm: str, grid, seed: int) -> dict:
    return E.robust_curves(model, x, y, p=E.NORMS[norm], eps_grid=grid, suite=suite(cfg, seed))


def screen(cfg: StudyConfig, model: nn.Module, x, y, seed: int) -> dict:
    """Clean accuracy and robust accuracy at the reference radii (l_inf, l_2): the suite's worst
    case (``robust_at_reference``) and CE-PGD alone (``robust_pgd_ce_at_reference``)."""
    out: dict = {"clean_acc": accuracy(model, x, y), "robust_at_reference": {}, "robust_pgd_ce_at_reference": {}}
    for norm in ("linf", "l2"):
        curves = _robust(cfg, model, x, y, norm, [cfg.reference_eps[norm]], seed)
        out["robust_at_reference"][norm] = curves["acc"][0]
        out["robust_pgd_ce_at_reference"][norm] = curves["pgd_ce"][0]
    return out


def full(cfg: StudyConfig, model: nn.Module, x, y, seed: int, screened: dict | None = None) -> dict:
    """Every per-model measurement of the report (test points x, y; analysis at jittered points).

    ``robust``: per norm the radii, ``acc`` the suite's per-example worst case and ``pgd_ce``
    CE-PGD alone; ``robust_at_reference`` / ``robust_pgd_ce_at_reference`` the same at the
    reference radii; ``paper_attack_at_reference``: the paper's 10-step targeted attack there.

    ``screened``: this model's :func:`screen` result (same points and seed), whose reference
    radii are then not attacked again: each radius is attacked on its own with the same
    randomness, so the numbers are those of attacking the whole grid."""
    m: dict = {"clean_acc": accuracy(model, x, y), "robust": {}}
    for key in ("robust_at_reference", "robust_pgd_ce_at_reference", "paper_attack_at_reference"):
        m[key] = {}
    for norm, grid in (("linf", cfg.eps_grid_linf), ("l2", cfg.eps_grid_l2)):
        ref = cfg.reference_eps[norm]
        grid = list(grid) if ref in grid else sorted(set(grid) | {ref})
        known = _screened_at(screened, norm)
        curves = _robust(cfg, model, x, y, norm, [e for e in grid if known is None or e != ref], seed)
        if known is not None:
            at = grid.index(ref)
            curves["acc"].insert(at, known[0])
            curves["pgd_ce"].insert(at, known[1])
        m["robust"][norm] = {"eps": grid, "acc": curves["acc"], "pgd_ce": curves["pgd_ce"]}
        m["robust_suite"] = curves["suite"]
        m["robust_at_reference"][norm] = curves["acc"][grid.index(ref)]
        m["robust_pgd_ce_at_reference"][norm] = curves["pgd_ce"][grid.index(ref)]
        m["paper_attack_at_reference"][norm] = E.paper_attack_accuracy(
            model, x, y, p=E.NORMS[norm], eps=ref, steps=cfg.paper_attack_steps
        )
    xa, ya = x[: cfg.align_points], y[: cfg.align_points]
    xj = jitter(xa, cfg.analysis_jitter, seed)
    k = min(cfg.spectrum_k, int(model(xa[:1]).shape[1]))
    m["spectrum"] = E.mean_spectrum(model, xa, k)
    m["alignment"] = E.model_alignment(model, xj, ya, eps_grid=cfg.align_eps, steps=cfg.align_steps, seed=seed)
    m["linearity"] = E.linearity_curve(model, xj, ya, radii=cfg.linearity_radii, steps=cfg.align_steps, seed=seed)
    m["rank_alignment"] = _rank_alignment(cfg, model, xj, ya, seed)
    return m


def _screened_at(screened: dict | None, norm: str) -> tuple[float, float] | None:
    """(worst case, CE-PGD) at the reference radius from a screen; None where it lacks them
    (a screen of an earlier version kept only the worst case)."""
    if screened is None or norm not in screened.get("robust_pgd_ce_at_reference", {}):
        return None
    return screened["robust_at_reference"][norm], screened["robust_pgd_ce_at_reference"][norm]


def _rank_alignment(cfg: StudyConfig, model: nn.Module, xj, ya, seed: int) -> dict:
    return E.rank_alignment(model, xj, ya, eps=cfg.eps_l2, k=cfg.rank_k, steps=cfg.align_steps, seed=seed)


def random_net(cfg: StudyConfig, splits, seed: int) -> nn.Module:
    """The study's architecture, randomly initialized (seeded), untrained, in eval mode."""
    torch.manual_seed(10_000 + seed)
    net = registry_model(cfg.model, splits, input_range=cfg.train.get("input_range"), width=cfg.train.get("width"))
    return net.eval()


def random_net_alignment(cfg: StudyConfig, net: nn.Module, x, y, seed: int) -> dict:
    """Alignment by rank (at the l_2 reference radius) of a randomly initialized network ``net``
    (:func:`random_net`), at the points where :func:`full` measures it for the trained models."""
    xa, ya = x[: cfg.align_points], y[: cfg.align_points]
    return _rank_alignment(cfg, net, jitter(xa, cfg.analysis_jitter, seed), ya, seed)


def first_seed_checks(cfg: StudyConfig, clean: nn.Module, x, y, seed: int) -> dict:
    """The theorem, linear regions and the clean model's alignment curve (jittered and raw points)."""
    xa, ya = x[: cfg.align_points], y[: cfg.align_points]
    xj = jitter(xa, cfg.analysis_jitter, seed)
    out: dict = {}
    for tag, pts in (("", xj), ("_raw", xa)) if cfg.analysis_jitter else (("", xa),):
        alignment = E.alignment_curve(clean, pts, ya, eps_grid=cfg.align_eps, steps=cfg.align_steps, seed=seed)
        agreement = E.agreement_curve(clean, pts, ya, eps_grid=cfg.align_eps, steps=cfg.align_steps, seed=seed)
        for c in (alignment, agreement):
            c.update(model="clean", jitter=cfg.analysis_jitter if not tag else 0.0)
        out["alignment" + tag], out["agreement" + tag] = alignment, agreement
    out.setdefault("alignment_raw", out["alignment"])
    out.setdefault("agreement_raw", out["agreement"])
    e0 = cfg.theorem_eps[0]
    cases = [(2.0, 2.0, e) for e in cfg.theorem_eps] + [(INF, 2.0, e0 / 10), (INF, 1.0, e0 / 10)]
    out["theorem"] = {
        "steps": cfg.theorem_steps,
        "jitter": cfg.analysis_jitter,
        "cases": E.theorem_cases(clean, xj[:32], cases, cfg.theorem_steps, seed),
    }
    return out


def _check(name: str, holds: bool, detail: str) -> dict:
    return {"name": name, "holds": bool(holds), "detail": detail}


def stronger_pgd(cfg: StudyConfig, model: nn.Module, x, y, seed: int) -> float:
    """Robust accuracy at the l_inf reference radius under a PGD 3x as long as the suite's, with
    2x its restarts and other random starts (seed + 1)."""
    attack = PGDAttack(
        steps=3 * cfg.eval_steps, restarts=2 * cfg.eval_restarts, schedule=cfg.eval_schedule, seed=seed + 1
    )
    return E.robust_curves(model, x, y, p=INF, eps_grid=[cfg.eps_linf], suite=[attack])["acc"][0]


def square_check(cfg: StudyConfig, model: nn.Module, x, y, seed: int, norm: str) -> dict:
    """The suite, then black-box Square on its survivors, at the reference radius of ``norm``
    on the first ``cfg.square_points`` test points (:func:`~opnorm.experiments.evaluate.independent_check`)."""
    n = min(cfg.square_points, len(x))
    return E.independent_check(
        model,
        x[:n],
        y[:n],
        p=E.NORMS[norm],
        eps=cfg.reference_eps[norm],
        suite=suite(cfg, seed),
        queries=cfg.square_queries,
        seed=seed,
    )


def sanity_checks(
    cfg: StudyConfig, measured: dict, labels: dict, stronger: dict, square: dict, points: int
) -> list[dict]:
    """Checks that guard against weak attacks, on one seed's models and curves.

    Args:
        measured: key -> :func:`full` result. labels: key -> label.
        stronger: key -> :func:`stronger_pgd` result (every model of ``measured``).
        square: (key, norm) -> :func:`square_check` result (the models the black-box check attacks).
        points: the number of test points of ``measured``.
    """
    one = 1.0 / points
    tol = max(cfg.noise_points / 100, one)  # noise: the configured points, never less than one test point
    worst_rise, where = 0.0, ""
    for key, m in measured.items():
        for norm in ("linf", "l2"):
            acc, eps = m["robust"][norm]["acc"], m["robust"][norm]["eps"]
            for a, b, e in zip(acc, acc[1:], eps[1:]):
                if b - a > worst_rise:
                    worst_rise, where = b - a, f"{labels[key]}, l_{norm[1:]} at eps {e:g}"
    checks = [
        _check(
            "robust accuracy does not increase with eps",
            worst_rise <= tol + 1e-6,
            f"largest rise {100 * worst_rise:.1f} points"
            + (f" ({where})" if where else "")
            + f"; tolerance {100 * tol:.2g} points",
        )
    ]
    worst = min(
        m["clean_acc"] - max(m["robust"][n]["acc"][1:] or [0.0]) for m in measured.values() for n in ("linf", "l2")
    )
    checks.append(
        _check(
            "clean accuracy >= robust accuracy",
            worst >= -1e-12,
            f"smallest clean - robust gap {100 * worst:.1f} points",
        )
    )
    # a 3x longer PGD with 2x the restarts finds no more than the suite
    drop, who = max((measured[k]["robust_at_reference"]["linf"] - stronger[k], labels[k]) for k in measured)
    checks.append(
        _check(
            f"PGD with {3 * cfg.eval_steps} steps x {2 * cfg.eval_restarts} restarts finds no more than the suite",
            drop <= tol + 1e-6,
            f"largest drop below the suite's worst case {100 * drop:+.1f} points ({who}), l_inf eps "
            f"{cfg.eps_linf:g}; tolerance {100 * tol:.2g} points",
        )
    )
    # an independent, gradient-free attack (gradient masking check)
    name = f"black-box Square ({cfg.square_queries} queries) finds no more than the suite"
    if any(res["suite"] is None for res in square.values()):
        return checks + [{**_check(name, True, "torchattacks not installed"), "skipped": True}]
    gap, who = max(
        (
            res["suite"] - res["with_square"],
            f"{labels[key]}, l_{norm[1:]}: suite {100 * res['suite']:.1f}, with Square {100 * res['with_square']:.1f}",
        )
        for (key, norm), res in square.items()
    )
    n_square = min(cfg.square_points, points)
    square_tol = max(tol, 1.0 / n_square)
    checks.append(
        _check(
            name,
            gap <= square_tol + 1e-6,
            f"largest gap {100 * gap:.1f} points ({who}; first {n_square} test points); "
            f"tolerance {100 * square_tol:.2g} points",
        )
    )
    return checks
