"""alignment, activation_agreement and verify_equivalence against hand-computed references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import opnorm
from opnorm.analysis import EquivalenceResult, NoActivationsError

INF = math.inf


# --------------------------------------------------------------------------- alignment


def test_alignment_is_the_absolute_cosine_per_example():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(6, 18, generator=g, dtype=torch.float64)
    an, bn = a.reshape(6, -1).numpy(), b.numpy()
    ref = [abs(an[i] @ bn[i]) / np.linalg.norm(an[i]) / np.linalg.norm(bn[i]) for i in range(6)]
    np.testing.assert_allclose(opnorm.alignment(a, b).numpy(), ref, rtol=1e-12)
    torch.testing.assert_close(opnorm.alignment(-3 * a, 0.5 * b), opnorm.alignment(a, b))
    same = opnorm.alignment(a, a.reshape(6, -1))
    torch.testing.assert_close(same, torch.ones(6, dtype=torch.float64))
    a[2] = 0
    assert opnorm.alignment(a, b)[2] == 0
    with pytest.raises(ValueError, match="same number"):
        opnorm.alignment(a, b[:, :5])


# --------------------------------------------------------------------------- activation agreement


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(inplace=True), nn.Linear(16, 4)
    ).double()


def test_activation_agreement_matches_preactivation_signs_by_hand():
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, 4, generator=g, dtype=torch.float64)
    x2 = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)

    def signs(z):
        W1, b1 = model[1].weight, model[1].bias
        W2, b2 = model[3].weight, model[3].bias
        h1 = z.reshape(len(z), -1) @ W1.T + b1
        h2 = torch.relu(h1) @ W2.T + b2
        return torch.cat([h1 > 0, h2 > 0], dim=1)

    with torch.no_grad():
        ref = (signs(x) == signs(x2)).double().mean(dim=1)
    got = opnorm.activation_agreement(model, x, x2)
    torch.testing.assert_close(got, ref)
    assert (got < 1).any() and (got > 0.5).all()
    torch.testing.assert_close(opnorm.activation_agreement(model, x, x), torch.ones(10, dtype=torch.float64))


def test_activation_agreement_sees_leaky_relu_and_max_pool_argmaxes():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 5)
    ).double()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(8, 1, 6, 6, generator=g, dtype=torch.float64)
    x2 = x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)

    def patterns(z):
        c = model[0](z)  # (B, 3, 6, 6)
        a = F.leaky_relu(c, 0.1)
        windows = a.reshape(len(z), 3, 3, 2, 3, 2).permute(0, 1, 2, 4, 3, 5).reshape(len(z), 3, 3, 3, 4)
        return (c > 0).reshape(len(z), -1), windows.argmax(-1).reshape(len(z), -1)

    with torch.no_grad():
        (s1, m1), (s2, m2) = patterns(x), patterns(x2)
    same = (s1 == s2).sum(1) + (m1 == m2).sum(1)
    ref = same.double() / (s1.shape[1] + m1.shape[1])
    got = opnorm.activation_agreement(model, x, x2)
    torch.testing.assert_close(got, ref)
    assert (got < 1).any()


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.unused = nn.ReLU()

    def forward(self, z):
        return self.b(F.relu(self.a(z)))


def test_activation_agreement_refuses_models_it_cannot_see():
    x = torch.rand(3, 4)
    with pytest.raises(NoActivationsError, match="F.relu"):
        opnorm.activation_agreement(nn.Sequential(nn.Linear(4, 3)), x, x)
    with pytest.raises(ValueError, match="never called"):  # has an nn.ReLU, but forward uses F.relu
        opnorm.activation_agreement(_Functional(), x, x)
    with pytest.raises(ValueError, match="same shape"):
        opnorm.activation_agreement(_mlp(), torch.rand(2, 12).double(), torch.rand(3, 12).double())


def test_activation_agreement_restores_mode_and_removes_hooks():
    model = _mlp().train()
    x = torch.rand(2, 12, dtype=torch.float64)
    opnorm.activation_agreement(model, x, x + 0.1)
    assert model.training and all(m.training for m in model.modules())
    assert all(len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0 for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- verify_equivalence


def _psi(z, r):
    if r == 2:
        return z / z.norm(dim=1, keepdim=True)
    if r == 1:
        return torch.sign(z)
    return F.one_hot(z.abs().argmax(dim=1), z.shape[1]).to(z.dtype) * torch.sign(z)


PAIRS = [(2, 2), (INF, 2), (INF, INF), (2, 1), (INF, 1)]


@pytest.mark.parametrize("p,q", PAIRS)
def test_equivalence_is_exact_on_an_affine_model(p, q):
    torch.manual_seed(5)
    lin = nn.Linear(27, 7).double()
    model = nn.Sequential(nn.Flatten(), lin)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    eps, steps = 0.4, 10
    start = torch.randn(4, 27, generator=g, dtype=torch.float64)
    delta0 = (eps * start / torch.linalg.vector_norm(start, ord=p, dim=1, keepdim=True)).reshape(x.shape)
    res = opnorm.verify_equivalence(model, x, p=p, q=q, eps=eps, steps=steps, delta0=delta0)
    assert res.direction_gap.shape == (steps, 4) and res.value_gap.shape == (steps, 4)
    assert res.max_direction_gap().max() < 1e-10 and res.max_value_gap().max() < 1e-10
    assert res.agreement is None  # nothing to hook in an affine model
    # the power iterates themselves, recomputed with the explicit matrix and closed-form psi
    W = lin.weight.detach()
    p_star = {2: 2, INF: 1}[p]
    v = delta0.reshape(4, -1) / eps
    for k in range(steps):
        v = _psi(_psi(v @ W.T, q) @ W, p_star)
        sigma = torch.linalg.vector_norm(v @ W.T, ord=q, dim=1)
        torch.testing.assert_close(res.sigma[k], sigma, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res.pga_value[k], eps * sigma, rtol=1e-10, atol=1e-12)


def _relu_net(kind: str) -> nn.Module:
    torch.manual_seed(7)
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 6)
        ).double()
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 6)
    ).double()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("p,q", [(2, 2), (INF, 2), (INF, 1)])
def test_equivalence_on_a_relu_network_holds_while_activations_agree(kind, p, q):
    model = _relu_net(kind)
    g = torch.Generator().manual_seed(8)
    x = torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64)
    u = torch.randn(x.shape, generator=g, dtype=torch.float64)
    u = u / torch.linalg.vector_norm(u.reshape(6, -1), ord=p, dim=1).reshape(6, 1, 1, 1)
    steps = 8
    rows = []
    for eps in (1e-5, 1e-3, 1e-2, 0.1, 0.5, 2.0):
        delta0 = eps * u  # the same start direction at every radius
        res = opnorm.verify_equivalence(model, x, p=p, q=q, eps=eps, steps=steps, delta0=delta0)
        start_agree = opnorm.activation_agreement(model, x, x + delta0)
        agree = torch.cat([start_agree[None], res.agreement])  # (steps + 1, B): delta_0 .. delta_steps
        inside = torch.cumprod((agree == 1).double(), dim=0).bool()  # delta_0..delta_k all in x's region
        torch.testing.assert_close(res.start_agreement, start_agree)
        assert torch.equal(res.inside(), inside[-1])  # the start and every iterate
        # iterate k is computed at delta_{k-1}: exact while delta_0..delta_{k-1} share x's region
        assert (res.direction_gap[inside[:-1]] < 1e-6).all(), eps
        # its value L(delta_k) = eps * sigma_k needs delta_k in the region too
        assert (res.value_gap[inside[1:]] < 1e-6 * max(1.0, eps)).all(), eps
        rows.append(
            (
                eps,
                res.agreement.min().item(),
                res.agreement.mean().item(),
                res.max_direction_gap().max().item(),
                res.max_value_gap().max().item(),
            )
        )
    print(f"\n{kind} (p={p}, q={q}): eps | min agreement | mean agreement | max |delta/eps - v| | max |L - eps sigma|")
    for r in rows:
        print(f"  {r[0]:8.0e} | {r[1]:.4f} | {r[2]:.4f} | {r[3]:.2e} | {r[4]:.2e}")
    # the smallest radius stays in the linear region: the theorem holds to float error
    assert rows[0][1] == 1.0 and rows[0][3] < 1e-6 and rows[0][4] < 1e-6
    # the largest leaves it, and the comparison sees the difference in both gaps (the test can fail):
    # a flipped unit changes the gradient, so PGA's iterate moves off the power method's (a whole
    # sign, gap 2, for p = inf; a rotation of the unit vector for p = 2)
    assert rows[-1][1] < 1.0 and rows[-1][4] > 1e-6
    assert rows[-1][3] > 0.5
    outside = ~res.inside()
    assert outside.any() and (res.direction_gap[:, outside].amax(dim=0) > 1e-3).any()
    # no monotone trend is asserted in between: a flipped unit need not change the output (a
    # max-pool window can switch between units with equal downstream effect, a flipped ReLU can
    # feed a dead unit), and deeper units can flip back as the radius grows


def test_inside_needs_the_start_and_every_iterate_in_the_region():
    steps, B = 3, 4
    gaps = torch.zeros(steps, B, dtype=torch.float64)
    agreement = torch.ones(steps, B, dtype=torch.float64)
    agreement[1, 2] = 0.9  # example 2 leaves the region at iterate 2
    start = torch.tensor([1.0, 0.95, 1.0, 1.0], dtype=torch.float64)  # example 1 starts outside
    res = EquivalenceResult(gaps, gaps, gaps, gaps, agreement, start)
    assert res.inside().tolist() == [True, False, False, True]
    assert EquivalenceResult(gaps, gaps, gaps, gaps, None, None).inside().tolist() == [True] * B


def test_verify_equivalence_default_start_is_seeded_and_arguments_checked():
    model = _relu_net("mlp")
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    a = opnorm.verify_equivalence(model, x, p=2, q=2, eps=1e-3, steps=3)
    b = opnorm.verify_equivalence(model, x, p=2, q=2, eps=1e-3, steps=3)
    c = opnorm.verify_equivalence(model, x, p=2, q=2, eps=1e-3, steps=3, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a.sigma, b.sigma, rtol=0, atol=0)
    assert not torch.equal(a.sigma[0], c.sigma[0])
    assert a.max_direction_gap().max() < 1e-6
    with pytest.raises(ValueError, match="eps"):
        opnorm.verify_equivalence(model, x, p=2, q=2, eps=0.0, steps=3)
    with pytest.raises(ValueError, match="p must"):
        opnorm.verify_equivalence(model, x, p=3, q=2, eps=0.1, steps=3)
