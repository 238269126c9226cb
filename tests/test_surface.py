"""The public surface: no silent zeros under torch.inference_mode(), one-line errors for outputs and
inputs opnorm cannot use, the store's index, and names that do not shadow subpackages."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import opnorm
import opnorm.linearity as L
from opnorm import OperatorNormRegularizer as ONR
from opnorm.evaluation import PGDAttack


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()


class _Scale(nn.Module):
    """A module the pattern replay does not know: differentiated there by autograd."""

    def forward(self, x):
        return 2.0 * x - 0.5


def _mlp_with_unknown_module() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(_Scale(), nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()


class _Residual(nn.Module):
    """Modules joined by a sum: the graph route of the pattern replay."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.scale, self.a, self.relu = _Scale(), nn.Linear(6, 6), nn.ReLU()
        self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.scale(x).flatten(1)
        return self.head(h + self.b(self.relu(self.a(h))))


def _hand_jacobian(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, 6): W2 diag(1[W1 x + b1 > 0]) W1, by hand."""
    l1, l2 = model[1], model[3]
    mask = (x.flatten(1) @ l1.weight.T + l1.bias > 0).to(x.dtype)
    return torch.einsum("dh,bh,hn->bdn", l2.weight, mask, l1.weight)


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(2)).double()
Y = torch.tensor([0, 1, 2, 0])
V = torch.randn(4, 6, generator=torch.Generator().manual_seed(3)).double()
U = torch.randn(4, 3, generator=torch.Generator().manual_seed(4)).double()

# every public entry point that runs the model, as a function of (model, x) returning tensors
ENTRY_POINTS = {
    "operator_norm": lambda m, x: opnorm.operator_norm(m, x, 2, 2).sigma,
    "operator_norm exact": lambda m, x: opnorm.operator_norm(m, x, 2, 2, method="exact").sigma,
    "operator_norm (inf, 2) power": lambda m, x: opnorm.operator_norm(m, x, "inf", 2, method="power").sigma,
    "singular_values": lambda m, x: opnorm.singular_values(m, x, k=2).values,
    "jacobian_matrix": lambda m, x: opnorm.jacobian_matrix(m, x),
    "jacobian.jacobian": lambda m, x: opnorm.jacobian.jacobian(m, x, route="autograd"),
    "jvp": lambda m, x: opnorm.jvp(m, x, V)[1],
    "vjp": lambda m, x: opnorm.vjp(m, x, U)[1],
    "linearize": lambda m, x: opnorm.linearize(m, x).matvec(V),
    "linearize autograd": lambda m, x: opnorm.linearize(m, x, route="autograd").rmatvec(U),
    "differentiable_jvp": lambda m, x: opnorm.jacobian.differentiable_jvp(m, x, V)[1],
    "Linearization": lambda m, x: opnorm.jacobian.Linearization(m.eval(), x).matvec(V),
    "pattern replay": lambda m, x: (
        opnorm.jacobian.PatternLinearization if isinstance(m, nn.Sequential) else opnorm.jacobian.GraphLinearization
    )(m.eval(), x).rmatvec(U),
    "PGASolver.run": lambda m, x: opnorm.PGASolver(3).run(m, x, V, 3, 2.0, 0.1, opnorm.LogitNorm(2), None, True)[0],
    "pgd": lambda m, x: opnorm.pgd(m, x, Y, eps=0.1, steps=3, clip=None),
    "PGD": lambda m, x: opnorm.PGD(m, eps=0.1, p="inf", steps=3, clip=None)(x, Y),
    "verify_equivalence": lambda m, x: opnorm.verify_equivalence(m, x, eps=0.1, p=2, q=2, steps=3).sigma,
    "activation_agreement": lambda m, x: opnorm.activation_agreement(m, x, x + 0.01),
    "alignment": lambda m, x: opnorm.alignment(V, x),
    "linearity_deviation": lambda m, x: L.linearity_deviation(m, x, 0.1 * V).relative,
    "top_singular_value": lambda m, x: L.top_singular_value(m, x),
    "ONR.paper": lambda m, x: ONR.paper(2, 2, eps=0.1, lam=1.0)(m, x),
    "ONR.fast joint": lambda m, x: ONR.fast(2, 2, eps=0.1, num_examples=4).joint(m, x, torch.arange(4))[1],
    "ONR.fast_robust direction": lambda m, x: (
        ONR.fast_robust("inf", 2, num_examples=4).direction(m, x, torch.arange(4)).v
    ),
    "GlobalSpectralNormRegularizer": lambda m, x: opnorm.GlobalSpectralNormRegularizer(m)(),
    "AdversarialTrainingLoss": lambda m, x: opnorm.AdversarialTrainingLoss("ce", eps=0.1, p=2, clip=None)(m, x, Y),
    "SingleStepATLoss": lambda m, x: opnorm.SingleStepATLoss("fgsm-rs", eps=0.1, p="inf", clip=None)(m, x, Y),
    "FreeATLoss": lambda m, x: opnorm.FreeATLoss(eps=0.1, p="inf")(m, x, Y),
    "evaluate": lambda m, x: opnorm.evaluate(m, x, Y, eps=0.1, attacks=[PGDAttack(steps=3, clip=None)]).worst,
}


@pytest.mark.parametrize(
    "make",
    [_mlp, _mlp_with_unknown_module, lambda: _Residual().double()],
    ids=["sequential", "sequential-autograd-piece", "residual"],
)
@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_inference_mode_raises_one_line_or_computes_correctly(name, make):
    model, f = make(), ENTRY_POINTS[name]
    torch.manual_seed(5)
    expected = f(model, X)
    torch.manual_seed(5)
    with torch.inference_mode():
        try:
            got = f(model, X)
        except RuntimeError as err:
            message = str(err)
            assert "inference_mode" in message and "\n" not in message, message
            return
    torch.testing.assert_close(got, expected)  # never zeros that pass for a result


def test_inference_tensors_outside_the_mode_are_used_as_values():
    model = _mlp()
    with torch.inference_mode():
        x, v, u = X.clone(), V.clone(), U.clone()
    J = _hand_jacobian(model, X)
    torch.testing.assert_close(opnorm.jvp(model, x, v)[1], torch.einsum("bdn,bn->bd", J, V))
    torch.testing.assert_close(opnorm.vjp(model, x, u)[1], torch.einsum("bdn,bd->bn", J, U))
    torch.testing.assert_close(opnorm.jacobian.differentiable_jvp(model, x, v)[1], torch.einsum("bdn,bn->bd", J, V))
    torch.testing.assert_close(opnorm.jacobian_matrix(model, x), J)
    sigma = torch.linalg.matrix_norm(J, ord=2)
    torch.testing.assert_close(opnorm.operator_norm(model, x, 2, 2, method="exact").sigma, sigma)


def test_a_model_made_under_inference_mode_is_refused_in_one_line():
    with torch.inference_mode():
        model = _mlp()
    for f in (ENTRY_POINTS["operator_norm"], ENTRY_POINTS["pgd"], ENTRY_POINTS["jvp"], ENTRY_POINTS["ONR.paper"]):
        with pytest.raises(RuntimeError, match="inference tensors") as err:
            f(model, X)
        assert "\n" not in str(err.value)


class _Pair(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.net = kind, _mlp()

    def forward(self, x):
        out = self.net(x)
        return (out, x.sum()) if self.kind == "tuple" else {"logits": out, "features": x}


@pytest.mark.parametrize("kind, key", [("tuple", 0), ("dict", "logits")])
def test_a_tuple_or_dict_output_says_what_to_pass(kind, key):
    model = _Pair(kind)
    calls = [ENTRY_POINTS[n] for n in ("operator_norm", "jacobian_matrix", "pgd", "jvp", "ONR.paper")]
    for f in calls:
        with pytest.raises(TypeError) as err:
            f(model, X)
        message = str(err.value)
        assert f"model returned a {kind}" in message and f"Logits(model, {key!r})" in message and "\n" not in message
    # what the message says to pass works, and equals the logits' own model
    wrapped = opnorm.jacobian.Logits(model, key)
    torch.testing.assert_close(opnorm.jacobian_matrix(wrapped, X), _hand_jacobian(model.net, X))
    torch.testing.assert_close(
        opnorm.operator_norm(wrapped, X, 2, 2).sigma, torch.linalg.matrix_norm(_hand_jacobian(model.net, X), ord=2)
    )


def test_an_unbatched_input_says_to_add_the_batch_dimension():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    x = torch.rand(1, 6, 6, dtype=torch.float64)  # one image without its batch dimension
    calls = [
        lambda: opnorm.operator_norm(cnn, x, 2, 2),
        lambda: opnorm.singular_values(cnn, x, k=2),
        lambda: opnorm.jacobian_matrix(cnn, x),
        lambda: opnorm.pgd(cnn, x, Y[:1], eps=0.1, steps=2),
        lambda: opnorm.operator_norm(cnn, x, 2, 2, route="autograd"),
        lambda: opnorm.jvp(cnn, x, x),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"without its batch dimension.*x\[None\]") as err:
            call()
        assert "\n" not in str(err.value)
    assert opnorm.operator_norm(cnn, x[None], 2, 2).sigma.shape == (1,)


@pytest.mark.parametrize("factory", ["fast", "fast_robust"])
def test_a_regularizer_with_a_store_refuses_a_call_without_index(factory):
    model = _mlp()
    reg = getattr(ONR, factory)("inf", 2, eps=0.1, lam=0.1, num_examples=4)
    for call in (
        lambda: reg.joint(model, X),
        lambda: reg(model, X),
        lambda: reg.direction(model, X),
        lambda: reg(model, X, logits=model(X)),
        lambda: reg.initial_vectors(X),
    ):
        with pytest.raises(ValueError, match="needs index.*IndexedTensorDataset.*store=None") as err:
            call()
        assert "\n" not in str(err.value)
    assert int(reg.store.seen.sum()) == 0
    logits, pen = reg.joint(model, X, torch.arange(4))
    assert bool(reg.store.seen.all())
    # told explicitly to run without its store: no index needed, nothing kept
    bare = getattr(ONR, factory)("inf", 2, eps=0.1, lam=0.1, store=None)
    assert bare.store is None
    _, pen = bare.joint(model, X)
    assert torch.isfinite(pen) and pen > 0


def test_indexed_dataset_is_exported_and_feeds_the_store():
    from opnorm.training import IndexedTensorDataset

    assert opnorm.IndexedTensorDataset is IndexedTensorDataset
    loader = torch.utils.data.DataLoader(IndexedTensorDataset(X, Y), batch_size=2, shuffle=True)
    model, reg = _mlp(), ONR.fast("inf", 2, eps=0.1, lam=0.1, num_examples=len(X))
    for x, y, index in loader:
        logits, pen = reg.joint(model, x, index)
        (F.cross_entropy(logits, y) + pen).backward()
    assert bool(reg.store.seen.all())


def test_no_top_level_name_shadows_a_subpackage():
    names = [m.name for m in pkgutil.iter_modules(opnorm.__path__)]
    assert "jacobian" in names
    for name in names:
        module = importlib.import_module(f"opnorm.{name}")
        assert getattr(opnorm, name, module) is module, f"opnorm.{name} is not the module opnorm.{name}"
    import opnorm.jacobian as J

    assert J is importlib.import_module("opnorm.jacobian") and J.__name__ == "opnorm.jacobian"
    assert issubclass(opnorm.jacobian.UnsupportedModelError, Exception)
    assert callable(opnorm.jacobian.differentiable_jvp) and opnorm.jacobian_matrix is J.jacobian


def test_all_lists_exactly_the_exported_names():
    """``from opnorm import *`` gives every exported function and class, and nothing undeclared."""
    exported = {
        name
        for name, value in vars(opnorm).items()
        if not name.startswith("_") and not isinstance(value, type(opnorm))  # subpackages are not exports
    }
    assert sorted(opnorm.__all__) == sorted(exported)
    assert len(set(opnorm.__all__)) == len(opnorm.__all__)
