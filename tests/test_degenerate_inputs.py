"""Degenerate inputs that must not give a silently wrong number: a direction stored while J(x)
was zero, attack settings that cannot attack, and randomness the fd penalty cannot pair.

References are independent of opnorm: an SVD of the explicit weight matrix, and brute force
over the sign vectors for the (inf, 2) norm.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import opnorm
from opnorm.regularizers import OperatorNormRegularizer


class Gated(nn.Module):
    """f(x) = gate * W x: J(x) = gate * W, so gate 0 kills J for a step (as a dead ReLU layer does)."""

    def __init__(self, n: int = 6, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(n, d, bias=False)
        self.gate = 1.0

    def forward(self, x):
        return self.gate * self.lin(x)


def reference_norm(W: torch.Tensor, p: float) -> float:
    if p == 2:
        return float(torch.linalg.svdvals(W.double())[0])
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=W.shape[1])), dtype=torch.float64)
    return float((signs @ W.double().T).norm(dim=1).max())  # max over the l_inf ball's vertices


@pytest.mark.parametrize("p", [2, math.inf])
def test_a_step_with_zero_jacobian_does_not_stick_in_the_store(p):
    torch.manual_seed(0)
    model = Gated()
    reg = OperatorNormRegularizer.fast(p, 2, eps=0.05, lam=1.0, num_examples=8)
    x, idx = 0.4 + 0.2 * torch.rand(8, 6), torch.arange(8)
    for gate in (1.0, 0.0, 1.0, 1.0, 1.0, 1.0):
        model.gate = gate
        _, pen = reg.joint(model, x, idx)
        pen.backward()
    ref = reference_norm(model.lin.weight.detach(), p)
    sigma = reg.last_sigma
    assert float(pen.detach()) > 0 and bool((sigma <= ref * (1 + 1e-4)).all())
    assert bool((sigma >= 0.5 * ref).all()), (sigma, ref)
    assert bool(reg.store.seen.all())


def test_the_store_keeps_no_zero_or_non_finite_direction():
    from opnorm.regularizers.store import DirectionStore

    store = DirectionStore(4)
    store.configure(2, signs=False)
    v = torch.tensor([[1.0, 0.0], [0.0, 0.0], [float("nan"), 1.0], [0.5, 0.5]])
    store.put(torch.arange(4), v)
    assert store.seen.tolist() == [True, False, False, True]
    assert torch.isfinite(store.directions).all()


@pytest.fixture
def classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), torch.rand(6, 5), torch.randint(0, 3, (6,))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(eps=0.1, step_size=0.0), "step_size must be a float > 0"),
        (dict(eps=0.0), "eps is 0"),
        (dict(eps=0.1, steps=0, random_start=False), "steps 0 without a random start"),
    ],
)
def test_attack_settings_that_cannot_attack_are_refused(classifier, kwargs, match):
    net, x, y = classifier
    with pytest.raises(ValueError, match=match):
        opnorm.pgd(net, x, y, p=2, **kwargs)


def test_adversarial_training_refuses_a_zero_step_size():
    from opnorm.regularizers import AdversarialTrainingLoss

    with pytest.raises(ValueError, match="step_size must be > 0"):
        AdversarialTrainingLoss("ce", 0.1, 2, steps=3, step_size=0.0)


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(F.dropout(torch.relu(self.a(x)), 0.5, self.training))


class ModuleDropout(FunctionalDropout):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x))))


def test_functional_dropout_is_refused_in_one_line_and_module_dropout_is_paired():
    torch.manual_seed(0)
    x = torch.rand(8, 6)
    OperatorNormRegularizer.paper(2, 2, eps=0.1, lam=1.0).joint(ModuleDropout().train(), x)  # paired: accepted
    bad = FunctionalDropout().train()
    with pytest.raises(ValueError, match="random in training mode outside nn.Dropout modules") as info:
        OperatorNormRegularizer.paper(2, 2, eps=0.1, lam=1.0).joint(bad, x)
    assert "\n" not in str(info.value)
    OperatorNormRegularizer.paper(2, 2, eps=0.1, lam=1.0).joint(bad.eval(), x)  # eval mode: deterministic
