"""The study's measurement functions on models with known answers: an affine model with a
known SVD (linear everywhere, sigma constant, the logit PGA perturbation is v_1)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from opnorm.experiments import evaluate as E
from tests.affine_models import DT, gen


def _known_svd_model() -> tuple[nn.Module, np.ndarray]:
    """nn.Linear(8 -> 4) with W = U diag(4, 2, 1, 0.5) V^T, as (B, 1, 2, 4) inputs -> 4 logits."""
    U = torch.linalg.qr(torch.randn(4, 4, generator=gen(1), dtype=DT))[0]
    Vt = torch.linalg.qr(torch.randn(8, 4, generator=gen(2), dtype=DT))[0].T
    lin = nn.Linear(8, 4).double()
    with torch.no_grad():
        lin.weight.copy_(U @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=DT)) @ Vt)
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), classifier=lin)), np.array([4.0, 2.0, 1.0, 0.5])


def test_linearity_curve_of_an_affine_model():
    model, s = _known_svd_model()
    x, y = torch.rand(6, 1, 2, 4, generator=gen(3), dtype=DT), torch.randint(0, 4, (6,), generator=gen(4))
    out = E.linearity_curve(model, x, y, radii=[0.1, 1.0, 10.0], steps=5, seed=0)
    assert out["sigma1_at_x"] == pytest.approx(s[0])
    for direction in ("random", "adversarial"):
        assert max(out[direction]["relative"]) < 1e-12 and max(out[direction]["absolute"]) < 1e-10
        assert max(out[direction]["penultimate_absolute"]) < 1e-10  # phi: the flattened input, linear
        assert out[direction]["sigma1"] == pytest.approx([s[0]] * 3)
        assert out[direction]["norm"] == pytest.approx([0.1, 1.0, 10.0])  # PGA reaches the sphere on a linear model


def test_rank_and_eps_alignment_of_an_affine_model():
    model, _ = _known_svd_model()
    x, y = torch.rand(6, 1, 2, 4, generator=gen(5), dtype=DT), torch.randint(0, 4, (6,), generator=gen(6))
    ra = E.rank_alignment(model, x, y, eps=0.5, k=4, steps=40, seed=0)
    assert ra["k"] == 4 and ra["logit"][0] == pytest.approx(1.0, abs=1e-6)  # infinite-step PGA = the power method
    assert max(ra["logit"][1:]) < 1e-3
    # the Gaussian direction (seed + 1) against the known V, by hand: mean |cos| per rank
    Vt = torch.linalg.qr(torch.randn(8, 4, generator=gen(2), dtype=DT))[0].T
    g = torch.randn(x.shape, generator=gen(1), dtype=DT).reshape(6, -1)
    ref = ((g @ Vt.T).abs() / g.norm(dim=1, keepdim=True)).mean(dim=0)
    assert ra["random"] == pytest.approx(ref.tolist(), rel=1e-10)
    for key in ("ce", "ce_predicted"):
        # CE's gradient W^T (softmax - e_y) lies in W's row space, weighted by s_j = 4, 2, 1, 0.5: the
        # squared alignments (orthonormal v_j) sum to at most 1 and nearly reach it; rank 1 leads
        squares = sum(a * a for a in ra[key])
        assert 0.8 < squares <= 1 + 1e-9 and ra[key][0] > 0.8 > max(ra[key][1:]), (key, ra[key])
        assert all(0 <= a <= 1 + 1e-12 for a in ra[key + "_pearson"])
    al = E.model_alignment(model, x, y, eps_grid=[0.1, 1.0], steps=40, seed=0)
    assert al["logit"] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert al["random"] < 0.9


def test_paper_attack_on_an_affine_model_matches_the_closed_form():
    """The paper's attack is targeted at (y + 1) mod C. On an affine two-class model the targeted
    cross-entropy's gradient points along w_t - w_y everywhere, so its l_2 PGA (10 steps of 0.25
    eps from x, no random start) ends at x + eps (w_t - w_y) / ||w_t - w_y||: robust exactly when
    y still wins there."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 2).double()
    x = 0.4 + 0.2 * torch.rand(64, 6, generator=gen(5), dtype=DT)  # far from the pixel box's faces
    with torch.no_grad():
        lin.bias[1] -= (lin(x)[:, 1] - lin(x)[:, 0]).median()  # the boundary runs through the points
        y = lin(x).argmax(1)
    W, b = lin.weight.detach(), lin.bias.detach()
    seen = []
    for eps in (0.005, 0.02, 0.05, 0.2):
        t = (y + 1) % 2
        d = W[t] - W[y]
        z = eps * d / d.norm(dim=1, keepdim=True)  # the targeted attack's end point: the sphere along w_t - w_y
        expected = float(((x + z) @ W.T + b).argmax(1).eq(y).double().mean())
        got = E.paper_attack_accuracy(lin, x, y, p=2.0, eps=eps, steps=10)
        assert got == pytest.approx(expected), eps
        seen.append(got)
    assert any(0 < a < 1 for a in seen) and seen == sorted(seen, reverse=True)  # informative radii


def test_robust_curves_worst_case_never_exceeds_any_attack():
    """robust_curves: eps 0 is clean accuracy, the worst case is at most CE-PGD alone, and with the
    suite's second attack the same points are fooled as by both attacks run on every example."""
    pytest.importorskip("torchattacks")
    from opnorm.evaluation import evaluate

    torch.manual_seed(0)
    # images (torchattacks wants (B, C, H, W)); DLR needs at least 3 classes
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))
    x = torch.rand(40, 1, 2, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:5] = (y[:5] + 1) % 5  # some points wrong clean
    suite = E.robust_suite(steps=10, restarts=1, schedule="constant", dlr_steps=10, seed=0)
    out = E.robust_curves(net, x, y, p=float("inf"), eps_grid=[0.0, 0.05, 0.2], suite=suite)
    both = evaluate(net, x, y, eps=[0.05, 0.2], p="inf", attacks=suite, every_example=True)
    assert out["acc"][0] == out["pgd_ce"][0] == both.clean_accuracy
    assert out["acc"][1:] == [both.worst_case(0.05), both.worst_case(0.2)]
    assert out["pgd_ce"][1:] == [both.accuracy("pgd", 0.05), both.accuracy("pgd", 0.2)]
    assert all(w <= c for w, c in zip(out["acc"], out["pgd_ce"]))
    assert "APGD-DLR" in out["suite"]


def test_full_reuses_the_screen_exactly():
    """full() given the model's screen attacks the reference radii no more, and its numbers are
    those of attacking the whole grid (each radius is attacked alone with the same randomness);
    a screen without CE-PGD (an earlier version's) is not used."""
    pytest.importorskip("torchattacks")
    from opnorm.experiments import measure as M
    from opnorm.experiments.study import study_config

    cfg = study_config("digits", quick=True, eps_grid_linf=[0.0, 0.05, 0.1, 0.3], eps_grid_l2=[0.0, 1.0])
    assert M.suite(cfg, 0)[1].batch_size == cfg.dlr_batch == 200  # the digits preset: one APGD-DLR call
    torch.manual_seed(0)
    net = nn.Sequential(
        OrderedDict(flatten=nn.Flatten(), hidden=nn.Linear(64, 24), relu=nn.ReLU(), classifier=nn.Linear(24, 10))
    )
    x = torch.rand(60, 1, 8, 8, generator=gen(5))
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:6] = (y[:6] + 1) % 10
    screen = M.screen(cfg, net, x, y, 0)
    alone = M.full(cfg, net, x, y, 0)
    reused = M.full(cfg, net, x, y, 0, screened=screen)
    assert reused == alone
    assert alone["robust"]["l2"]["eps"] == [0.0, 0.5, 1.0]  # the reference radius joins the grid
    for key in ("robust_at_reference", "robust_pgd_ce_at_reference"):
        assert reused[key] == screen[key]
    assert 0 < alone["robust"]["linf"]["acc"][1] < alone["clean_acc"]  # the attack does something
    # a forged screen is used as given (where the reuse happens), and an old one is not used at all
    forged = {**screen, "robust_at_reference": {"linf": -1.0, "l2": -2.0}}
    assert M.full(cfg, net, x, y, 0, screened=forged)["robust"]["linf"]["acc"][2] == -1.0
    old = {"clean_acc": screen["clean_acc"], "robust_at_reference": forged["robust_at_reference"]}
    assert M.full(cfg, net, x, y, 0, screened=old) == alone
