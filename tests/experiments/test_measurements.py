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
