"""opnorm.train on your own nn.Module and Dataset: training, exact resume, refused resumes, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import opnorm
from opnorm.cli import main
from opnorm.training.checkpoint import load_checkpoint
from opnorm.training.config import TrainConfig, flat_settings
from opnorm.training.inputs import as_indexed, train_inputs
from opnorm.training.run_dir import CHECKPOINT, CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")

N, CLASSES = 96, 3
SETTINGS = dict(p="inf", q=2, eps=0.1, batch_size=32, eval_points=16, eval_steps=2, progress=False)
# the training attack's steps: read by pgd-at only (other methods refuse it)
ATTACK = {"pgd-at": dict(steps=2)}


class Net(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, CLASSES))


class OtherNet(Net):
    pass


def tensors(seed: int = 0, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


class Pairs(Dataset):
    """A plain Dataset of (x, y) items (no index)."""

    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def net(seed: int = 1, cls=Net) -> nn.Module:
    torch.manual_seed(seed)
    return cls()


def train_set():
    return TensorDataset(*tensors())


def held_out():
    return TensorDataset(*tensors(seed=5, n=32))


@pytest.mark.parametrize("method", ["opnorm", "pgd-at"])
def test_a_module_and_a_dataset_without_indices_train_and_resume_bit_for_bit(tmp_path, method):
    whole = net()
    full = opnorm.train(
        model=whole,
        data=train_set(),
        test_data=held_out(),
        method=method,
        epochs=2,
        out=str(tmp_path / "a"),
        **SETTINGS,
        **ATTACK.get(method, {}),
    )
    assert full.model is whole and full.completed
    first = opnorm.train(
        model=net(),
        data=train_set(),
        test_data=held_out(),
        method=method,
        epochs=2,
        stop_after=1,
        out=str(tmp_path / "b"),
        **SETTINGS,
        **ATTACK.get(method, {}),
    )
    assert not first.completed and len(first.history) == 1
    resumed = opnorm.train(
        model=net(seed=7), data=train_set(), test_data=held_out(), out=str(tmp_path / "b"), resume=True, progress=False
    )
    assert resumed.completed and len(resumed.history) == 2
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    strip = lambda h: [{k: v for k, v in m.items() if "seconds" not in k} for m in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    assert full.metrics["accuracy"] is not None and full.metrics["operator_norm"] > 0
    saved = flat_settings(json.loads((tmp_path / "a" / CONFIG).read_text()))
    assert saved["model"] == "custom:Net"
    assert saved["dataset"].startswith("custom:TensorDataset sha256:")


def test_a_plain_dataset_gets_indices_and_the_fast_store_sees_every_example(tmp_path):
    inputs = train_inputs(data=Pairs(*tensors()))
    assert torch.equal(inputs.train.x, tensors()[0]) and inputs.train[5][2] == 5
    assert inputs.data_name.startswith("custom:Pairs sha256:")
    out = tmp_path / "r"
    with pytest.warns(UserWarning, match="without test_data="):
        opnorm.train(model=net(), data=Pairs(*tensors()), method="opnorm", epochs=1, out=str(out), **SETTINGS)
    state = load_checkpoint(out / CHECKPOINT)["objective"]
    seen = next(v for k, v in state.items() if k.endswith("seen"))
    assert seen.shape == (N,) and bool(seen.all())  # one stored direction per dataset index


def test_a_resume_with_another_model_class_or_other_data_is_refused(tmp_path):
    out = str(tmp_path / "run")
    opnorm.train(
        model=net(), data=train_set(), test_data=held_out(), method="clean", epochs=2, stop_after=1, out=out, **SETTINGS
    )
    cases = [
        (dict(model=net(cls=OtherNet), data=train_set()), "with model=custom:OtherNet: the run trained custom:Net"),
        (dict(data=train_set()), "it trained a module passed as model= (custom:Net)"),
        (dict(model=net()), "it trained on data passed as data="),
        (dict(model=net(), data=TensorDataset(*tensors(seed=3))), "the run trained on custom:TensorDataset sha256:"),
        (dict(model="cnn", data=train_set()), "it trained a module passed as model="),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as err:
            opnorm.train(out=out, resume=True, **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), (kwargs, str(err.value))


def test_custom_names_without_the_objects_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"model 'custom:Net' was a module passed to opnorm.train\(model=...\)"):
        opnorm.train(TrainConfig(model="custom:Net", epochs=1))
    with pytest.raises(ValueError, match=r"was a Dataset passed to opnorm.train\(data=...\)"):
        opnorm.train(TrainConfig(dataset="custom:TensorDataset sha256:00", eps=0.1, epochs=1))
    with pytest.raises(ValueError, match="no default eps for data passed as data="):
        opnorm.train(model=net(), data=train_set(), epochs=1)
    with pytest.raises(ValueError, match="width configures the registry models"):
        opnorm.train(model=net(), data=train_set(), eps=0.1, width=8, epochs=1)
    with pytest.raises(ValueError, match="test_data= goes with data="):
        opnorm.train(test_data=train_set(), epochs=1)


def test_the_cli_refuses_a_custom_run_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    opnorm.train(
        model=net(), data=train_set(), test_data=held_out(), method="clean", epochs=1, out=str(out), **SETTINGS
    )
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--eps", "0.1"]) == 1
    assert "which the CLI cannot rebuild: load its weights into your module" in capsys.readouterr().err
    assert main(["train", "--config", str(out / CONFIG), "--out", str(tmp_path / "again")]) == 1
    assert "model 'custom:Net' was a module passed to opnorm.train(model=...)" in capsys.readouterr().err


def test_without_test_data_the_check_is_skipped_and_said(tmp_path):
    with pytest.warns(UserWarning, match="without test_data=: the per-epoch check .* is skipped"):
        res = opnorm.train(model=net(), data=train_set(), method="clean", epochs=1, out=str(tmp_path / "r"), **SETTINGS)
    assert res.completed and "accuracy" not in res.metrics and res.metrics["evaluated"] is False


def test_a_registry_model_on_your_dataset(tmp_path):
    res = opnorm.train(model="mlp", data=train_set(), test_data=held_out(), method="clean", epochs=1, **SETTINGS)
    assert res.model(torch.rand(2, 1, 8, 8)).shape == (2, CLASSES)
    assert res.config.model == "mlp" and res.config.dataset.startswith("custom:TensorDataset")


class Dicts(Pairs):
    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class FloatLabels(Pairs):
    def __getitem__(self, i):
        return self.x[i], self.y[i].float()


class Jittered(Pairs):
    def __getitem__(self, i):
        return (self.x[i] + 0.01 * torch.rand(()), int(self.y[i]))


class Shuffled(Pairs):
    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), (i + 1) % len(self)


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(1, 8, 8), 0


def test_bad_datasets_are_refused_in_one_line():
    x, y = tensors()
    cases = [
        (Dicts(x, y), TypeError, "data[0] is a dict; data must yield items (x, y) or (x, y, index)"),
        (FloatLabels(x, y), TypeError, "data[0] is a tuple of 2"),
        (Jittered(x * 0.5, y), ValueError, "gives a different x on each read (random transforms?)"),
        (Shuffled(x, y), ValueError, "data[0] carries index 1; the index must be the item's position"),
        (Stream(), TypeError, "data must be a map-style torch Dataset"),
        ([(x[0], 0)], TypeError, "data must be a map-style torch Dataset"),
        (TensorDataset(x * 255, y), ValueError, "254.959], not in [0, 1]"),
        (TensorDataset(x, y.float()), TypeError, "y must be one int class label per item"),
        (TensorDataset(x, -y - 1), ValueError, "labels must be class numbers 0..C-1"),
        (TensorDataset(x, y, torch.arange(N).flip(0)), ValueError, "the third tensor must be the index"),
    ]
    for bad, kind, message in cases:
        with pytest.raises(kind) as err:
            as_indexed(bad)
        assert message in str(err.value) and "\n" not in str(err.value), (bad, str(err.value))
    with pytest.raises(TypeError, match="model must be an nn.Module or a registry name"):
        opnorm.train(model=lambda x: x, data=TensorDataset(x, y))


def test_a_resume_in_the_middle_of_the_warmup_continues_the_ramp(tmp_path):
    """opnorm.warmup spans the resume (3 steps per epoch, a ramp of 5): the resumed run equals the
    uninterrupted one bit for bit, and the ramp's count is in the checkpoint."""
    kw = dict(data=train_set(), test_data=held_out(), method="opnorm", epochs=2, opnorm={"warmup": 5}, **SETTINGS)
    full = opnorm.train(model=net(), out=str(tmp_path / "a"), **kw)
    opnorm.train(model=net(), out=str(tmp_path / "b"), stop_after=1, **kw)
    state = load_checkpoint(tmp_path / "b" / CHECKPOINT)
    assert int(state["objective"]["reg.calls"]) == 3
    resumed = opnorm.train(model=net(), data=train_set(), test_data=held_out(), out=str(tmp_path / "b"), resume=True)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig.from_dict({"method": "pgd-at", "opnorm": {"warmup": 5}}).resolved()
