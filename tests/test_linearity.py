"""linearity_deviation, top_singular_value, alignment_by_rank and pearson_alignment against
independent references: affine models with a known W, explicit autograd Jacobians, numpy's SVD
and correlation."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import opnorm
from opnorm.linearity import (
    Penultimate,
    alignment_by_rank,
    linearity_deviation,
    pearson_alignment,
    top_singular_value,
)
from opnorm.training.models import build_model
from tests.affine_models import DT, affine_layer, gen


def _relu_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5)
    ).double()


def test_affine_model_has_zero_deviation_and_constant_sigma():
    lin, W = affine_layer(4, 9, seed=1)
    x = torch.randn(6, 9, generator=gen(2), dtype=DT)
    for scale in (1e-3, 1.0, 100.0):
        z = scale * torch.randn(6, 9, generator=gen(3), dtype=DT)
        dev = linearity_deviation(lin, x, z)
        assert float(dev.absolute.max()) <= 1e-9 * scale
        assert float(dev.relative.max()) <= 1e-12
        torch.testing.assert_close(dev.change, torch.linalg.vector_norm(z @ W.T, dim=1))
        s1 = float(np.linalg.svd(W.numpy(), compute_uv=False)[0])
        torch.testing.assert_close(top_singular_value(lin, x + z), torch.full((6,), s1, dtype=DT))


def test_relu_net_deviation_matches_an_explicit_jacobian():
    net = _relu_net()
    x = torch.randn(5, 12, generator=gen(4), dtype=DT)
    z = 0.7 * torch.randn(5, 12, generator=gen(5), dtype=DT)
    dev = linearity_deviation(net, x, z)
    for i in range(5):
        J = torch.autograd.functional.jacobian(lambda t: net(t[None])[0], x[i])  # (5, 12)
        with torch.no_grad():
            change = net(x[i : i + 1] + z[i : i + 1])[0] - net(x[i : i + 1])[0]
        ref = torch.linalg.vector_norm(change - J @ z[i])
        assert float(dev.absolute[i]) == pytest.approx(float(ref), rel=1e-10, abs=1e-12)
        assert float(dev.relative[i]) == pytest.approx(
            float(ref / torch.linalg.vector_norm(change)), rel=1e-10, abs=1e-12
        )
    assert float(dev.relative.max()) > 1e-3  # a radius of 0.7 leaves the linear region here: the test can fail
    tiny = linearity_deviation(net, x, 1e-7 * z)  # inside the region: linear up to float error
    assert float(tiny.relative.max()) < 1e-6
    sig = top_singular_value(net, x + z)
    for i in range(5):
        J = torch.autograd.functional.jacobian(lambda t: net(t[None])[0], x[i] + z[i])
        assert float(sig[i]) == pytest.approx(float(torch.linalg.matrix_norm(J, ord=2)), rel=1e-10)


def test_deviation_rejects_bad_shapes_and_handles_zero_change():
    lin, _ = affine_layer(3, 4)
    x = torch.zeros(2, 4, dtype=DT)
    with pytest.raises(ValueError, match="z must be"):
        linearity_deviation(lin, x, torch.zeros(2, 5, dtype=DT))
    dev = linearity_deviation(lin, x, torch.zeros_like(x))
    assert dev.relative.tolist() == [0.0, 0.0]


def test_alignment_by_rank_against_numpy_svd():
    J = torch.randn(3, 4, 7, generator=gen(6), dtype=DT)
    _, _, Vh = np.linalg.svd(J.numpy())
    V = torch.from_numpy(Vh[:, :3, :].transpose(0, 2, 1).copy())  # (B, n, k)
    own = alignment_by_rank(V[..., 0], V)
    torch.testing.assert_close(own[:, 0], torch.ones(3, dtype=DT))  # v_1 with itself
    assert float(own[:, 1:].abs().max()) < 1e-12  # and orthogonal to v_2, v_3
    d = torch.randn(3, 7, generator=gen(7), dtype=DT)
    ref = np.abs(np.einsum("bn,bkn->bk", d.numpy(), Vh[:, :3, :])) / np.linalg.norm(d.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(alignment_by_rank(d, V).numpy(), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="rank axis"):
        alignment_by_rank(d, V[..., 0])


def test_pearson_alignment_against_numpy_corrcoef():
    a = torch.randn(4, 2, 5, generator=gen(8), dtype=DT)
    b = torch.randn(4, 10, generator=gen(9), dtype=DT) + 3.0
    ref = [abs(np.corrcoef(a[i].reshape(-1).numpy(), b[i].numpy())[0, 1]) for i in range(4)]
    np.testing.assert_allclose(pearson_alignment(a, b).numpy(), ref, rtol=1e-12)
    # a constant shift is no signal for Pearson, while the cosine sees it
    shifted = b + 100.0
    torch.testing.assert_close(pearson_alignment(a, shifted), pearson_alignment(a, b))
    assert not torch.allclose(opnorm.alignment(a, shifted), opnorm.alignment(a, b))
    assert float(pearson_alignment(torch.ones(1, 5, dtype=DT), b[:1, :5])) == 0.0


def test_pga_logit_perturbation_of_a_linear_model_aligns_with_v1():
    """On f(x) = W x + b with a known SVD W = U diag(s) V^T, the l_2 logit loss's infinite-step PGA is the power
    method on W: its perturbation converges to v_1 (sigma_2 / sigma_1 = 0.5: 60 steps reach 1e-6)."""
    lin, _ = affine_layer(5, 8, seed=10)
    U = torch.linalg.qr(torch.randn(5, 5, generator=gen(13), dtype=DT))[0]
    Vt = torch.linalg.qr(torch.randn(8, 5, generator=gen(14), dtype=DT))[0].T
    s = np.array([3.0, 1.5, 1.0, 0.5, 0.2])
    with torch.no_grad():
        lin.weight.copy_(U @ torch.diag(torch.from_numpy(s)) @ Vt)  # a known SVD
    Vh = Vt.numpy()
    x = torch.randn(4, 8, generator=gen(11), dtype=DT)
    xa = opnorm.pgd(lin, x, eps=0.3, p=2, loss="logit", steps=60, step_size=math.inf, clip=None, random_start=gen(12))
    V = torch.from_numpy(np.repeat(Vh[None, :3, :].transpose(0, 2, 1), 4, axis=0).copy())
    al = alignment_by_rank(xa - x, V)
    torch.testing.assert_close(al[:, 0], torch.ones(4, dtype=DT), atol=1e-6, rtol=0)
    assert float(al[:, 1:].max()) < 1e-3


class _Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def _quadratic(n: int, d: int, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """phi(x) = x * x (entrywise), then a known linear classifier W: f(x) = W (x * x) + b."""
    lin, W = affine_layer(d, n, seed=seed)
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), square=_Square(), classifier=lin)), W


def test_penultimate_deviation_of_an_affine_model_is_zero():
    lin, _ = affine_layer(6, 9, seed=20)
    hidden, _ = affine_layer(9, 9, seed=21)
    model = nn.Sequential(OrderedDict(hidden=hidden, classifier=lin))
    x = torch.randn(5, 9, generator=gen(22), dtype=DT)
    for scale in (1e-3, 1.0, 100.0):
        z = scale * torch.randn(5, 9, generator=gen(23), dtype=DT)
        assert float(linearity_deviation(Penultimate(model), x, z).absolute.max()) <= 1e-9 * scale
        assert float(linearity_deviation(model, x, z).absolute.max()) <= 1e-9 * scale


def test_deviation_of_a_known_quadratic_in_closed_form():
    """f(x + z) - f(x) - J(x) z = W (z * z) and phi(x + z) - phi(x) - J_phi(x) z = z * z exactly."""
    model, W = _quadratic(7, 4, seed=24)
    x = torch.randn(6, 7, generator=gen(25), dtype=DT)
    z = 0.3 * torch.randn(6, 7, generator=gen(26), dtype=DT)
    phi = linearity_deviation(Penultimate(model), x, z)
    torch.testing.assert_close(phi.absolute, torch.linalg.vector_norm(z * z, dim=1))
    torch.testing.assert_close(phi.change, torch.linalg.vector_norm(2 * x * z + z * z, dim=1))
    logits = linearity_deviation(model, x, z)
    torch.testing.assert_close(logits.absolute, torch.linalg.vector_norm((z * z) @ W.T, dim=1))


def test_penultimate_of_the_project_models_is_the_classifier_input():
    torch.manual_seed(0)
    for name in ("mlp", "cnn", "vgg", "cnn7", "resnet18"):
        model = build_model(name, input_shape=(1, 8, 8), num_classes=10, width=4).eval()
        x = torch.rand(3, 1, 8, 8)
        phi = Penultimate(model)(x)
        assert phi.ndim == 2 and phi.shape[1] == model.classifier.in_features, name
        with torch.no_grad():
            torch.testing.assert_close(model.classifier(phi), model(x))


def test_penultimate_refuses_a_model_where_it_cannot_be_found():
    with pytest.raises(ValueError, match="no nn.Linear named 'classifier'"):
        Penultimate(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    head = nn.Linear(4, 3)
    after = nn.Sequential(OrderedDict(classifier=head, scale=_Square()))  # something after the classifier
    with pytest.raises(ValueError, match="is not its Linear's output"):
        Penultimate(after)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="not a submodule"):
        Penultimate(after, layer=nn.Linear(4, 3))
    explicit = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    assert Penultimate(explicit, layer=explicit[3])(torch.ones(2, 4)).shape == (2, 5)
