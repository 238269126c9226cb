"""Adversarial losses against hand-written per-example formulas."""

import math

import numpy as np
import pytest
import torch

from opnorm import losses


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(7, 5, generator=g, dtype=torch.float64)
    clean = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=g)
    return adv, clean, y


def test_cross_entropy_matches_log_softmax_by_hand(logits):
    adv, clean, y = logits
    a = adv.numpy()
    ref = [np.log(np.exp(a[b]).sum()) - a[b, y[b]] for b in range(len(a))]
    np.testing.assert_allclose(losses.cross_entropy(adv, clean, y).numpy(), ref, rtol=1e-12)


def test_cw_margin_brute_force_and_sign(logits):
    adv, clean, y = logits
    a = adv.numpy()
    ref = [max(a[b, j] for j in range(5) if j != y[b]) - a[b, y[b]] for b in range(len(a))]
    out = losses.cw_margin(adv, clean, y)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12)
    assert torch.equal(out > 0, adv.argmax(1) != y)


@pytest.mark.parametrize("q", [1, 2, 3, math.inf, "inf"])
def test_logit_distance_is_the_lq_norm_of_the_logit_change(logits, q):
    adv, clean, _ = logits
    qq = math.inf if q == "inf" else q
    diff = (adv - clean).numpy()
    ref = [np.linalg.norm(diff[b], ord=qq) for b in range(len(diff))]
    np.testing.assert_allclose(losses.logit_distance(adv, clean, None, q).numpy(), ref, rtol=1e-12)
    spec = losses.logit_loss(q)
    np.testing.assert_allclose(spec.fn(adv, clean, None).numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("q", [1, 2, math.inf])
def test_logit_gradient_is_the_power_method_step_on_a_linear_map(q):
    """grad_delta ||W delta||_q = W^T psi_q(W delta), psi written out by hand."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)
    delta = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    clean = torch.randn(3, 4, generator=g, dtype=torch.float64)
    out = losses.logit_distance(clean + delta @ W.T, clean, None, q)
    (grad,) = torch.autograd.grad(out.sum(), delta)
    z = (delta @ W.T).detach()
    if q == 2:
        psi = z / z.norm(dim=1, keepdim=True)
    elif q == 1:
        psi = torch.sign(z)
    else:
        psi = torch.nn.functional.one_hot(z.abs().argmax(1), 4).double() * torch.sign(z)
    torch.testing.assert_close(grad, psi @ W, rtol=1e-12, atol=1e-12)


def test_kl_matches_formula_is_nonnegative_and_detaches_clean(logits):
    adv, clean, y = logits
    clean = clean.clone().requires_grad_(True)
    adv = adv.clone().requires_grad_(True)
    out = losses.kl_divergence(adv, clean, y)
    p = torch.softmax(clean.detach(), 1).numpy()
    r = torch.softmax(adv.detach(), 1).numpy()
    np.testing.assert_allclose(out.detach().numpy(), (p * np.log(p / r)).sum(1), rtol=1e-10)
    assert (out >= 0).all()
    assert losses.kl_divergence(clean, clean, y).abs().max() < 1e-12
    g_adv, g_clean = torch.autograd.grad(out.sum(), (adv, clean), allow_unused=True)
    assert g_clean is None and g_adv.abs().sum() > 0


def test_get_loss_names_callables_and_errors():
    assert losses.get_loss("CE").needs_labels and losses.get_loss("cw").labelled_success
    assert losses.get_loss("logit").zero_gradient_at_start and losses.get_loss("kl").needs_clean

    def mine(a, c, y):
        return a.sum(1)

    spec = losses.get_loss(mine)
    assert spec.fn is mine and spec.needs_clean and not spec.needs_labels
    assert losses.get_loss(spec) is spec  # loss objects pass through
    with pytest.raises(ValueError, match="'ce', 'cw', 'logit', 'kl'"):
        losses.get_loss("hinge")
    with pytest.raises(TypeError, match="loss must be"):
        losses.get_loss(3)
    with pytest.raises(ValueError, match="q must"):
        losses.logit_loss(0.5)
