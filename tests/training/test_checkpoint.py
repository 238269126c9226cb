"""Checkpoints: round trip, atomic writes, safe loading, safetensors weights, RNG state."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from opnorm.training import checkpoint as ckpt
from opnorm.training.checkpoint import (
    CheckpointError,
    export_weights,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_digest,
)
from opnorm.training.models import build_model


class Evil:
    """Pickles as a call to os.system; a plain unpickler would run the command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def small_model(width=4, name="vgg"):
    return build_model(name, input_shape=(1, 8, 8), num_classes=10, width=width, mean=(0.3,), std=(0.4,))


def train_state():
    """A realistic training state after two steps."""
    torch.manual_seed(0)
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(torch.rand(8, 1, 8, 8)), torch.randint(0, 10, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def full_state(model, opt, sched):
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": 2,
        "rng": rng_state(),
        "config": {"model": "vgg", "eps": 0.1, "p": float("inf"), "pairs": [(2, 2), (1, None)], "flag": True},
        "metrics": [{"loss": 1.5, "acc": 0.25}],
    }


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def test_round_trip_resumes_training_exactly(tmp_path):
    model, opt, sched = train_state()
    path = tmp_path / "runs" / "last.pt"  # the directory is created
    save_checkpoint(path, full_state(model, opt, sched))
    state = load_checkpoint(path)
    assert_same(state, full_state(model, opt, sched) | {"rng": state["rng"]})

    # Resume into fresh objects; one more step must match the uninterrupted run bit for bit.
    model2 = small_model()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched2 = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=0.1, total_steps=10)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
        s.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_file_mode_follows_umask(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(path, {"epoch": 0})
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_refuses_unsafe_state_before_writing(tmp_path):
    path = tmp_path / "a.pt"
    with pytest.raises(TypeError, match=r"state\['metrics'\]\[0\] is a numpy.float64.*\.item\(\)"):
        save_checkpoint(path, {"metrics": [np.float64(0.5)]})
    with pytest.raises(TypeError, match=r"state\['fn'\]"):
        save_checkpoint(path, {"fn": len})
    with pytest.raises(TypeError, match="state must be a dict"):
        save_checkpoint(path, [1, 2])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_atomic_save_failure_leaves_previous_checkpoint(tmp_path, monkeypatch, exc):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.arange(5.0)})
    before = path.read_bytes()
    real_save = torch.save
    temp_names = []

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # bytes reach the temp file ...
        temp_names.append(f.name)
        f.truncate(f.tell() // 2)  # ... then it is cut short and the writer dies
        raise exc

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(exc)):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1000)})
    monkeypatch.setattr(torch, "save", real_save)
    assert os.path.dirname(temp_names[0]) == str(tmp_path)  # the temp file lived beside the target
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "last.pt.sha256"]  # no temp file left
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1

    fresh = tmp_path / "new.pt"
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(exc)):
        save_checkpoint(fresh, {"epoch": 0})
    assert not fresh.exists() and sorted(os.listdir(tmp_path)) == ["last.pt", "last.pt.sha256"]


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99, 10, 0])
def test_truncated_checkpoint(tmp_path, keep):
    model, opt, sched = train_state()
    path = tmp_path / "last.pt"
    save_checkpoint(path, full_state(model, opt, sched))
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="corrupt or truncated.*sha256 does not match") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    write_digest(path)  # vouched for: the damage is still found by the reader itself
    with pytest.raises(CheckpointError, match="corrupt or truncated.*delete it or resume from another") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="no checksum file noise.pt.sha256"):
        load_checkpoint(path)
    write_digest(path)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    path.write_bytes(b"PK\x03\x04" + bytes(100))  # a broken zip header
    write_digest(path)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_not_a_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    write_digest(path)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if container == "torch.save":
        torch.save({"model": {"w": torch.ones(2)}, "epoch": Evil(marker)}, path)
    else:  # protocol 2, which the weights-only unpickler reads up to the global
        path.write_bytes(pickle.dumps({"epoch": 1, "hook": Evil(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match="no checksum file"):  # refused before unpickling
        load_checkpoint(path)
    write_digest(path)
    with pytest.raises(CheckpointError, match=r"refused to load .*references \w+\.system.*nothing was executed"):
        load_checkpoint(path)
    assert not marker.exists()


def test_export_and_load_weights(tmp_path):
    torch.manual_seed(1)
    model = small_model()
    model.train()
    model(torch.rand(16, 1, 8, 8))  # non-trivial BatchNorm running statistics
    path = tmp_path / "w.safetensors"
    export_weights(nn.DataParallel(model), path, metadata={"model": "vgg"})  # wrapper is unwrapped

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"model": "vgg"}
        assert set(f.keys()) == set(model.state_dict())

    torch.manual_seed(2)
    other = small_model()
    assert load_weights(other, path) is other
    assert_same(dict(other.state_dict()), dict(model.state_dict()))
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(other.eval()(x), model.eval()(x), rtol=0, atol=0)
    double = small_model().double()  # values are cast to the model's dtype
    load_weights(double, path)
    assert double.classifier.weight.dtype == torch.float64
    torch.testing.assert_close(double.classifier.weight, model.classifier.weight.double())


def test_load_weights_mismatch_is_clear(tmp_path):
    path = tmp_path / "w.safetensors"
    export_weights(small_model(width=4), path)
    wider = small_model(width=8)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(
        CheckpointError, match=r"shape mismatches: conv1.weight: file \(4, 1, 3, 3\) vs model \(8, 1, 3, 3\)"
    ):
        load_weights(wider, path)
    assert_same(dict(wider.state_dict()), before)  # untouched
    with pytest.raises(CheckpointError, match="missing keys: .*unexpected keys: "):
        load_weights(small_model(name="mlp", width=4), path)
    with pytest.raises(CheckpointError, match="no weights file"):
        load_weights(wider, tmp_path / "none.safetensors")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="weights file .* is corrupt or truncated: its sha256 does not match"):
        load_weights(wider, path)
    path.with_name(path.name + ".sha256").unlink()  # a file from elsewhere: read as it is
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_weights(wider, path)


def draws():
    return (
        torch.rand(4).tolist() + torch.randn(3).tolist(),
        [random.random(), random.gauss(0, 1), random.gauss(0, 1), random.randint(0, 10**9)],
        np.random.rand(3).tolist() + [np.random.normal(), np.random.normal(), np.random.randint(0, 10**9)],
    )


def test_rng_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    random.gauss(0, 1)  # leave a cached gaussian in python's and numpy's states
    np.random.normal()
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    first = draws()
    draws()  # move every generator on
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draws() == first
    other = draws()
    assert other != first


def test_set_rng_state_rejects_garbage():
    with pytest.raises(CheckpointError, match="not an RNG state"):
        set_rng_state({"torch": torch.get_rng_state()})


def test_set_rng_state_warns_on_cuda_mismatch(monkeypatch):
    state = rng_state()
    state["cuda"] = [torch.get_rng_state()] * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="CUDA RNG not restored"):
        set_rng_state(state)
    assert ckpt.rng_state()["cuda"] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_round_trip():
    state = rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    a = torch.rand(5, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(5, device="cuda"), a)
