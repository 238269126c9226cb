"""opnorm.evaluate: per-attack and worst-case robust accuracy, the Wilson interval, and the
per-example results, against direct calls of opnorm.pgd and torchattacks and scipy's interval."""

from __future__ import annotations

import math

import pytest
import torch

import opnorm
from opnorm.evaluation import APGDAttack, PGDAttack, SquareAttack, attack_names, wilson_interval
from opnorm.training.trainer import robust_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")
INF = math.inf


@pytest.fixture(scope="module")
def points(trained_digits_model):
    d = trained_digits_model
    return d.model, d.x[:120], d.y[:120]


def reference_pgd_correct(model, x, y, *, eps, p, steps, restarts, seed, batch_size):
    """The per-example loop written out: opnorm.pgd per batch, one generator for all batches."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, len(x), batch_size):
        xb, yb = x[s : s + batch_size], y[s : s + batch_size]
        adv = opnorm.EvalPGD(steps=steps, restarts=restarts)(model, xb, yb, eps=eps, p=p, random_start=gen)
        with torch.no_grad():
            out.append(model(adv).argmax(1) == yb)
    return torch.cat(out)


@pytest.mark.parametrize("p, eps", [(INF, 0.1), (2, 0.8)])
def test_pgd_attack_equals_pgd_called_directly(points, p, eps):
    model, x, y = points
    ref = reference_pgd_correct(model, x, y, eps=eps, p=p, steps=5, restarts=2, seed=3, batch_size=50)
    res = opnorm.evaluate(
        model,
        x,
        y,
        eps=eps,
        p=p,
        every_example=True,
        attacks=[PGDAttack(steps=5, restarts=2, seed=3, batch_size=50, schedule="constant")],
    )
    assert torch.equal(res.correct["pgd"][0] == 1, ref)
    assert 0 < res.accuracy("pgd", eps) < 1  # the attack fools some examples, not all
    gen = torch.Generator().manual_seed(3)
    assert robust_accuracy(
        model, x, y, eps=eps, p=p, steps=5, restarts=2, generator=gen, batch_size=50
    ) == pytest.approx(float(ref.double().mean()), abs=0)


def test_torchattacks_attacks_equal_torchattacks_called_directly(points):
    ta = pytest.importorskip("torchattacks")
    model, x, y = points
    direct = {
        "apgd-ce": ta.APGD(model, norm="Linf", eps=0.1, steps=5, n_restarts=1, seed=0, loss="ce"),
        "square": ta.Square(model, norm="Linf", eps=0.1, n_queries=30, n_restarts=1, seed=0),
    }
    res = opnorm.evaluate(
        model,
        x,
        y,
        eps=[0.1],
        p="inf",
        every_example=True,
        attacks=[APGDAttack("ce", steps=5), SquareAttack(queries=30)],
    )
    for name, atk in direct.items():
        with torch.no_grad():
            expected = model(atk(x, y)).argmax(1) == y  # one call: the evaluation's chunk holds all 120
        assert torch.equal(res.correct[name][0] == 1, expected), name


def test_worst_case_is_every_attack_and_clean(points):
    pytest.importorskip("torchattacks")
    model, x, y = points
    attacks = [
        PGDAttack(steps=5, seed=1, batch_size=40),
        APGDAttack("dlr", steps=5, batch_size=40),
        SquareAttack(queries=30, batch_size=40),
    ]
    res = opnorm.evaluate(model, x, y, eps=[0.0, 0.05, 0.15], p="inf", attacks=attacks, every_example=True)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    assert torch.equal(res.clean, clean)
    assert torch.equal(res.worst[0], clean)  # eps 0: no attack runs
    for r, e in enumerate(res.eps):
        hand = clean.clone()
        for a in res.attacks:
            hand &= res.correct[a][r] == 1
            assert res.worst_case(e) <= res.accuracy(a, e)
        assert torch.equal(res.worst[r], hand)
        assert res.worst_case(e) == pytest.approx(float(hand.double().mean()), abs=0)
        assert res.after(res.attacks[-1], e) == res.worst_case(e)
    assert res.worst_case(0.15) < res.clean_accuracy


def test_attacking_only_the_robust_examples_gives_the_same_worst_case(points):
    pytest.importorskip("torchattacks")
    model, x, y = points

    def suite():
        return [
            PGDAttack(steps=5, restarts=2, seed=1, batch_size=32),
            APGDAttack("ce", steps=5, batch_size=32),
            APGDAttack("t", steps=3, batch_size=32),
            SquareAttack(queries=30, batch_size=32),
        ]

    every = opnorm.evaluate(model, x, y, eps=[0.05, 0.15], attacks=suite(), every_example=True)
    pruned = opnorm.evaluate(model, x, y, eps=[0.05, 0.15], attacks=suite())
    assert torch.equal(every.worst, pruned.worst)
    for a in every.attacks:
        assert every.after(a, 0.15) == pruned.after(a, 0.15)
        skipped = pruned.correct[a] == -1
        assert torch.equal(pruned.correct[a][~skipped], every.correct[a][~skipped])
    assert (pruned.correct["pgd"] == -1).any()  # the clean-misclassified examples were never attacked
    with pytest.raises(ValueError, match="every_example=True"):
        pruned.accuracy("pgd", 0.15)


@pytest.mark.parametrize("k, n", [(80, 100), (0, 17), (17, 17), (733, 1000), (1, 3)])
def test_wilson_interval_matches_the_formula_and_scipy(k, n):
    stats = pytest.importorskip("scipy.stats")
    z = 1.959963984540054  # the 97.5% normal quantile
    phat = k / n
    center = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    lo, hi = wilson_interval(k, n)
    assert (lo, hi) == pytest.approx((center - half, center + half), abs=1e-12)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert lo <= phat <= hi and (lo == 0) == (k == 0) and (hi == 1) == (k == n)
    assert wilson_interval(80, 100) == pytest.approx((0.711, 0.867), abs=5e-4)  # the textbook example


def test_interval_of_an_evaluation_contains_its_estimate(points):
    model, x, y = points
    res = opnorm.evaluate(model, x, y, eps=[0.1], attacks=[PGDAttack(steps=3)])
    k = int(res.worst[0].sum())
    lo, hi = res.interval(0.1)
    assert (lo, hi) == wilson_interval(k, len(x)) and lo <= res.worst_case(0.1) <= hi
    summary = res.summary()
    assert summary["results"][0]["interval"] == [lo, hi] and summary["interval"] == "Wilson score, 95%"
    rows = res.rows()
    assert len(rows) == len(x) and sum(r["worst"] for r in rows) == k


def test_names_suites_and_refusals(points):
    model, x, y = points
    assert attack_names("all") == ["pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square", "autoattack"]
    assert attack_names("square, pgd,square") == ["square", "pgd"]
    with pytest.raises(ValueError, match="unknown attack 'fgsm'; valid: pgd, apgd-ce"):
        attack_names("pgd,fgsm")
    with pytest.raises(ValueError, match="attack names must differ"):
        opnorm.evaluate(model, x, y, eps=0.1, attacks=[PGDAttack(), PGDAttack(loss="cw")])
    with pytest.raises(ValueError, match="p = inf or 2"):
        opnorm.evaluate(model, x, y, eps=0.1, p=1, attacks="apgd-ce")
    with pytest.raises(ValueError, match="eps must be"):
        opnorm.evaluate(model, x, y, eps=[-0.1])
