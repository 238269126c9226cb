"""Measurements on trained models: robust accuracy curves, alignment, linear regions,
spectra, the theorem check, and the sanity checks that guard against weak attacks.

Each function takes a model and a fixed batch of test points and returns plain floats
and lists, ready for JSON.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from opnorm.analysis import activation_agreement, alignment, verify_equivalence
from opnorm.attacks import pgd
from opnorm.evaluation import APGDAttack, PGDAttack, SquareAttack, evaluate
from opnorm.jacobian import eval_mode, unwrap
from opnorm.linearity import (
    Penultimate,
    alignment_by_rank,
    linearity_deviation,
    pearson_alignment,
    top_singular_value,
)
from opnorm.losses import targeted
from opnorm.norms import lp_norm, order_json
from opnorm.power import operator_norm, singular_values

NORMS = {"linf": math.inf, "l2": 2.0}


def robust_suite(*, steps: int, restarts: int, schedule: str, dlr_steps: int, seed: int, dlr_batch: int = 50) -> list:
    """The study's attack suite, run in this order by :func:`~opnorm.evaluation.evaluate`:
    opnorm's PGD on the cross-entropy (random start, ``restarts``, best iterate, ``schedule``),
    then torchattacks' APGD-DLR (scale-invariant loss, ``dlr_steps``, ``dlr_batch`` examples per
    call) on the examples still robust. Robust accuracy is the per-example worst case over both
    (AutoAttack's rule)."""
    return [
        PGDAttack(steps=steps, restarts=restarts, schedule=schedule, seed=seed),
        # a torchattacks chunk runs whole when one of its examples is still robust
        APGDAttack("dlr", steps=dlr_steps, seed=seed, batch_size=dlr_batch),
    ]


def robust_curves(model, x, y, *, p: float, eps_grid: Sequence[float], suite: list) -> dict:
    """Robust accuracy at each eps of ``eps_grid`` (eps 0: clean accuracy) under ``suite``
    (:func:`robust_suite`): ``acc`` the per-example worst case over the suite, ``pgd_ce`` the
    first attack (CE-PGD) alone, ``suite`` the attacks in words."""
    radii = [float(e) for e in eps_grid if e > 0]
    try:
        res = evaluate(model, x, y, eps=radii or [0.0], p=p, attacks=suite)
    except ImportError as e:
        raise ImportError(f"the study's attack suite needs torchattacks: pip install 'opnorm[eval]' ({e})") from None
    first = res.attacks[0]
    clean = res.clean_accuracy
    return {
        "acc": [clean if e == 0 else res.worst_case(float(e)) for e in eps_grid],
        "pgd_ce": [clean if e == 0 else res.after(first, float(e)) for e in eps_grid],
        "suite": " + ".join(res.descriptions[a] for a in res.attacks),
    }


def paper_attack_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, p: float, eps: float, steps: int):
    """Accuracy under the paper's code's evaluation attack: ``steps`` PGA steps of 2.5 eps /
    steps on the cross-entropy, *targeted* at (y + 1) mod C, from x (no random start), in the
    pixel box [0, 1]. A point counts as robust when it is still classified as y."""
    net = unwrap(model)
    with torch.no_grad(), eval_mode(net):
        num_classes = int(net(x[:1]).shape[1])
    targets = (y + 1) % num_classes
    xa = pgd(model, x, targets, eps=eps, p=p, loss=targeted("ce"), steps=steps, random_start=False)
    with torch.no_grad(), eval_mode(net):
        return float((net(xa).argmax(1) == y).double().mean())


def top_singular_vector(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return operator_norm(model, x, 2, 2, method="exact").v


def alignment_curve(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps_grid: Sequence[float], steps: int, seed: int
) -> dict:
    """Mean and std over points of |cos(delta_PGA, v_1)| for the logit (q = 2) and CE losses.

    l_2 PGA, unconstrained by the pixel box (the claim is about the geometry of J(x)). The logit
    loss is run twice: with the theorem's infinite step size (key ``logit``; PGA = the power
    method inside the linear region) and with the usual 2.5 eps / steps (``logit_finite``), whose
    damped iteration needs many more steps to reach v_1 when sigma_2 / sigma_1 is close to 1.
    ``random`` is the same statistic for a Gaussian direction: the level that means no alignment.
    """
    v1 = top_singular_vector(model, x)
    res: dict = {"eps": list(eps_grid), "p": 2, "q": 2, "steps": steps}
    for key, loss, step_size in (("logit", "logit", math.inf), ("logit_finite", "logit", None), ("ce", "ce", None)):
        means, stds = [], []
        for e in eps_grid:
            gen = torch.Generator().manual_seed(seed)
            xa = pgd(model, x, y, eps=e, p=2, loss=loss, steps=steps, step_size=step_size, clip=None, random_start=gen)
            cos = alignment(xa - x, v1)
            means.append(float(cos.mean()))
            stds.append(float(cos.std()) if len(cos) > 1 else 0.0)
        res[key] = {"mean": means, "std": stds}
    rnd = alignment(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype), v1)
    res["random"] = {"mean": float(rnd.mean()), "std": float(rnd.std()) if len(rnd) > 1 else 0.0}
    return res


def _mean(t: torch.Tensor) -> float:
    return float(t.double().mean())


def model_alignment(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps_grid: Sequence[float], steps: int, seed: int
) -> dict:
    """Alignment against eps of one trained model: mean over points of |cos| and |Pearson corr|
    between v_1 of J(x) and the l_2 PGA perturbation of the cross-entropy (true label, step
    2.5 eps / steps) and of the logit loss (the theorem's infinite step); ``random``: a Gaussian
    direction. Unconstrained by the pixel box."""
    v1 = top_singular_vector(model, x)
    res: dict = {"eps": list(eps_grid)}
    for key, loss, step_size in (("ce", "ce", None), ("logit", "logit", math.inf)):
        cos, corr = [], []
        for e in eps_grid:
            xa = pgd(
                model,
                x,
                y,
                eps=e,
                p=2,
                loss=loss,
                steps=steps,
                step_size=step_size,
                clip=None,
                random_start=torch.Generator().manual_seed(seed),
            )
            cos.append(_mean(alignment(xa - x, v1)))
            corr.append(_mean(pearson_alignment(xa - x, v1)))
        res[key], res[key + "_pearson"] = cos, corr
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    res["random"], res["random_pearson"] = _mean(alignment(g, v1)), _mean(pearson_alignment(g, v1))
    return res


def rank_alignment(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, k: int, steps: int, seed: int
) -> dict:
    """Alignment by singular-vector rank (v_1..v_k of J(x)) at radius eps: mean |cos| and
    |Pearson corr| per rank of the l_2 PGA perturbation of the cross-entropy with the true label
    (``ce``) and with the predicted label (``ce_predicted``, the paper's code's convention), of
    the logit loss (infinite step) and of a Gaussian direction (``random``)."""
    k = min(k, int(model(x[:1]).shape[1]), x[0].numel())
    V = singular_values(model, x, k, return_vectors=True, method="exact").V
    with torch.no_grad(), eval_mode(unwrap(model)):
        pred = model(x).argmax(1)
    deltas = {}
    for key, loss, labels, step_size in (
        ("ce", "ce", y, None),
        ("ce_predicted", "ce", pred, None),
        ("logit", "logit", y, math.inf),
    ):
        xa = pgd(
            model,
            x,
            labels,
            eps=eps,
            p=2,
            loss=loss,
            steps=steps,
            step_size=step_size,
            clip=None,
            random_start=torch.Generator().manual_seed(seed),
        )
        deltas[key] = xa - x
    deltas["random"] = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x.dtype)
    out: dict = {"eps": eps, "k": k}
    for key, d in deltas.items():
        out[key] = [float(a) for a in alignment_by_rank(d, V).double().mean(dim=0)]
        out[key + "_pearson"] = [_mean(pearson_alignment(d, V[..., j])) for j in range(k)]
    return out


def linearity_curve(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, radii: Sequence[float], steps: int, seed: int
) -> dict:
    """Deviation from linearity and sigma_1(J(x + z)) against ||z||_2 = r, mean over points.

    ``random``: z = r u for one Gaussian unit direction u per point (a ray); ``adversarial``:
    z the l_2 PGA perturbation of the cross-entropy (true label) of radius r. Per direction:
    ``penultimate_absolute`` the paper's metric ||phi(x+z) - phi(x) - J_phi(x) z|| at the penultimate
    layer phi (:class:`~opnorm.linearity.Penultimate`), ``penultimate_relative`` it divided
    by ||phi(x+z) - phi(x)||; at the logits f: ``absolute`` ||f(x+z) - f(x) - J(x) z|| and
    ``relative`` it divided by ||f(x+z) - f(x)||; ``norm`` the mean ||z|| reached, ``sigma1``
    sigma_1(J(x + z)). ``sigma1_at_x``: sigma_1(J(x)).
    """
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=x.dtype)
    u = g / lp_norm(g, 2).reshape(-1, *([1] * (x.ndim - 1)))
    phi = Penultimate(model)
    out: dict = {"radii": list(radii), "sigma1_at_x": _mean(top_singular_value(model, x))}
    for key in ("random", "adversarial"):
        rows: dict = {k: [] for k in ("penultimate_absolute", "penultimate_relative", "absolute", "relative")}
        rows.update(norm=[], sigma1=[])
        for r in radii:
            if key == "random":
                z = r * u
            else:
                z = (
                    pgd(
                        model,
                        x,
                        y,
                        eps=r,
                        p=2,
                        loss="ce",
                        steps=steps,
                        clip=None,
                        random_start=torch.Generator().manual_seed(seed),
                    )
                    - x
                )
            for prefix, f in (("penultimate_", phi), ("", model)):
                dev = linearity_deviation(f, x, z)
                # a point where f did not change at all (relative inf) would swamp the mean: left out
                finite = torch.isfinite(dev.relative)
                rows[prefix + "absolute"].append(_mean(dev.absolute))
                rows[prefix + "relative"].append(_mean(dev.relative[finite]) if finite.any() else float("nan"))
            rows["norm"].append(_mean(lp_norm(z, 2)))
            rows["sigma1"].append(_mean(top_singular_value(model, x + z)))
        out[key] = rows
    return out


def agreement_curve(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps_grid: Sequence[float], steps: int, seed: int
) -> dict:
    """Fraction of shared ReLU / max-pool patterns between x and x + delta, for the logit
    PGA perturbation and for a random perturbation of the same l_2 norm."""
    pga, rnd = [], []
    gen = torch.Generator().manual_seed(seed)
    for e in eps_grid:
        xa = pgd(model, x, y, eps=e, p=2, loss="logit", steps=steps, clip=None, random_start=gen)
        pga.append(float(activation_agreement(model, x, xa).mean()))
        g = torch.randn(x.shape, generator=gen)
        g = e * g / lp_norm(g, 2).reshape(-1, *([1] * (x.ndim - 1)))
        rnd.append(float(activation_agreement(model, x, x + g).mean()))
    return {"eps": list(eps_grid), "p": 2, "pga": pga, "random": rnd}


def theorem_cases(model: nn.Module, x: torch.Tensor, cases: Sequence[tuple], steps: int, seed: int) -> list[dict]:
    """verify_equivalence in float64 for each (p, q, eps).

    Gaps are reported over all points and over the points whose activation pattern never
    changed along the PGA path, its random start included (``inside``: where the theorem
    applies exactly).
    """
    net64 = copy.deepcopy(unwrap(model)).double()
    x64 = x.double()
    out = []
    for p, q, eps in cases:
        res = verify_equivalence(
            net64, x64, p=p, q=q, eps=eps, steps=steps, generator=torch.Generator().manual_seed(seed)
        )
        agree = res.agreement if res.agreement is not None else torch.ones_like(res.direction_gap)
        inside = res.inside()  # (B,): the start and every iterate in x's linear region
        # None (JSON null) when no point stayed inside: there is nothing to compare
        gap_in = [float(g) for g in res.direction_gap[:, inside].amax(dim=1)] if inside.any() else [None] * steps
        loss_in = [float(g) for g in res.value_gap[:, inside].amax(dim=1)] if inside.any() else [None] * steps
        out.append(
            {
                "p": order_json(p),
                "q": order_json(q),
                "eps": eps,
                "points": int(x.shape[0]),
                "inside_fraction": float(inside.double().mean()),
                "iterate_gap": [float(g) for g in res.max_direction_gap()],
                "loss_gap": [float(g) for g in res.max_value_gap()],
                "iterate_gap_inside": gap_in,
                "loss_gap_inside": loss_in,
                "agreement": [float(a) for a in agree.mean(dim=1)],
            }
        )
    return out


def mean_spectrum(model: nn.Module, x: torch.Tensor, k: int) -> list[float]:
    return [float(s) for s in singular_values(model, x, k, method="exact").mean(dim=0)]


def independent_check(model: nn.Module, x, y, *, p: float, eps: float, suite: list, queries: int, seed: int) -> dict:
    """The suite at one radius, then torchattacks' black-box Square attack (``queries``) on the
    points the suite left robust: ``suite`` the suite's worst case, ``with_square`` the worst case
    with Square added. A gap means the gradient attacks missed points (e.g. gradient masking)."""
    square = SquareAttack(queries=queries, seed=seed)
    try:
        res = evaluate(model, x, y, eps=[eps], p=p, attacks=[*suite, square])
    except ImportError:
        return {"suite": None, "with_square": None}
    return {"suite": res.after(res.attacks[-2], eps), "with_square": res.worst_case(eps)}
