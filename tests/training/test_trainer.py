"""The trainer on digits: every method learns, robust training is robust, resume is exact.

Every method is trained once (module fixture, 3 epochs of the small CNN on the 8x8
digits, l_inf eps = 0.1, (p, q) = (inf, 2)) and the runs are compared with each other.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import opnorm
from opnorm.fast_at import FAST_AT_METHODS
from opnorm.training.checkpoint import CheckpointError, load_checkpoint, load_weights
from opnorm.training.config import METHODS, TrainConfig, default_eps, method_settings
from opnorm.training.models import build_model
from opnorm.training.trainer import CHECKPOINT, CONFIG, METRICS, WEIGHTS, train

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(
    dataset="digits",
    model="cnn",
    p="inf",
    q=2,
    eps=0.1,
    epochs=3,
    batch_size=64,
    seed=0,
    eval_points=200,
    eval_steps=10,
    steps=5,  # the attacks' (method_settings passes it to the methods that attack)
    progress=False,
)


@pytest.fixture(scope="module")
def runs(one_thread, tmp_path_factory):
    """method -> TrainResult, each written to its own run directory (the single-step methods
    are trained in test_fast_at.py: free needs epochs divisible by its replays)."""
    root = tmp_path_factory.mktemp("runs")
    return {
        m: train(TrainConfig(method=m, out=str(root / m), **method_settings(BASE, m)))
        for m in METHODS
        if m not in FAST_AT_METHODS
    }


def test_every_method_beats_chance(runs):
    for method, res in runs.items():
        assert res.completed
        assert res.metrics["accuracy"] > 0.75, (method, res.metrics)  # chance is 0.1
        assert math.isfinite(res.metrics["loss"])


def test_robust_training_raises_robust_accuracy(runs):
    clean = runs["clean"].metrics["robust_accuracy"]
    for method in ("pgd-at", "opnorm", "trades"):
        assert runs[method].metrics["robust_accuracy"] > clean + 0.05, (method, runs[method].metrics, clean)


def test_opnorm_lowers_the_operator_norm(runs):
    clean = runs["clean"].metrics["operator_norm"]
    assert runs["opnorm"].metrics["operator_norm"] < 0.5 * clean
    # adversarial training shrinks it too (finding 4), less than the direct penalty here
    assert runs["pgd-at"].metrics["operator_norm"] < clean


def test_run_directory(runs):
    res = runs["opnorm"]
    d = res.run_dir
    lines = [json.loads(line) for line in (d / METRICS).read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    for key in ("loss", "accuracy", "robust_accuracy", "operator_norm", "seconds", "train_sigma", "lr"):
        assert all(key in m for m in lines), key
    assert lines[-1]["accuracy"] == res.metrics["accuracy"]
    cfg = TrainConfig.from_dict(json.loads((d / CONFIG).read_text()))
    assert cfg.resolved() == res.config
    assert cfg.p == "inf" and cfg.lam is not None
    # the default is opnorm's fast mode: 3 iterations on an example's first visit, 1 on later ones
    o = cfg.opnorm
    assert o.mode == "fast" and o.iters == 3 and o.warm_iters == 1 and o.clip is True and cfg.iters is None
    state = load_checkpoint(d / CHECKPOINT)
    assert state["epoch"] == 3 and len(state["history"]) == 3
    for k, v in res.model.state_dict().items():
        assert torch.equal(state["model"][k], v)
    fresh = build_model("cnn", input_shape=(1, 8, 8), num_classes=10)
    load_weights(fresh, d / WEIGHTS)
    for k, v in res.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_python_api_is_exported_and_accepts_dicts_and_overrides():
    assert opnorm.train is train and opnorm.TrainConfig is TrainConfig
    res = opnorm.train(
        {"method": "clean", "limit_train": 64, "limit_test": 40}, epochs=1, eval_points=10, eval_steps=2, progress=False
    )
    assert res.run_dir is None and res.config.epochs == 1 and len(res.history) == 1
    assert isinstance(res.model, torch.nn.Module)


# ----------------------------------------------------------------------------- resume


SMALL = dict(
    dataset="digits",
    model="cnn",
    epochs=3,
    limit_train=192,
    limit_test=60,
    eval_points=20,
    eval_steps=3,
    steps=3,  # the attacks' (method_settings passes it to the methods that attack)
    batch_size=32,
    seed=3,
    progress=False,
    p="inf",
    eps=0.1,
)


@pytest.mark.parametrize("method", ["opnorm", "pgd-at", "global-snr"])
def test_resume_is_bit_identical(tmp_path, method):
    full = train(TrainConfig(method=method, out=str(tmp_path / "full"), **method_settings(SMALL, method)))
    first = train(
        TrainConfig(method=method, out=str(tmp_path / "split"), **method_settings(SMALL, method)), stop_after=1
    )
    assert not first.completed and len(first.history) == 1
    assert load_checkpoint(tmp_path / "split" / CHECKPOINT)["epoch"] == 1
    assert not (tmp_path / "split" / WEIGHTS).exists()
    resumed = train(
        TrainConfig(method=method, out=str(tmp_path / "split"), **method_settings(SMALL, method)), resume=True
    )
    assert resumed.completed
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = load_checkpoint(tmp_path / "full" / CHECKPOINT)
    sb = load_checkpoint(tmp_path / "split" / CHECKPOINT)
    assert sa["objective"].keys() == sb["objective"].keys()
    for k, va in sa["objective"].items():  # e.g. the spectral-norm vectors, the opnorm store (and its extra state)
        vb = sb["objective"][k]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, k
    strip = lambda h: [{k: v for k, v in m.items() if "seconds" not in k} for m in h]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)
    lines = (tmp_path / "split" / METRICS).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_errors(tmp_path):
    cfg = TrainConfig(method="clean", out=str(tmp_path / "run"), **{**method_settings(SMALL, "clean"), "epochs": 2})
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        train(cfg, resume=True)
    train(cfg, stop_after=1)
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg)
    with pytest.raises(ValueError, match="cannot resume .* with model='mlp': the run was trained with model='cnn'"):
        train(cfg.replace(model="mlp"), resume=True)
    ckpt = tmp_path / "run" / CHECKPOINT
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(cfg, resume=True)
    assert ckpt.read_bytes() == good[: len(good) // 2]  # nothing rewritten


def test_interrupted_epoch_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    from opnorm.training import trainer as T

    cfg = TrainConfig(method="clean", out=str(tmp_path / "run"), **method_settings(SMALL, "clean"))
    calls = {"n": 0}
    original = T.Objective.forward

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 8:  # in epoch 2 (6 batches per epoch)
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(T.Objective, "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(T.Objective, "forward", original)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == [".lock", CHECKPOINT, CHECKPOINT + ".sha256", CONFIG, METRICS]  # no temporary or half-written files
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["epoch"] == 1
    resumed = train(cfg, resume=True)
    full = train(cfg.replace(out=None))
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v)


# ----------------------------------------------------------------------------- options


def test_amp_bf16_on_cpu_runs():
    res = train(TrainConfig(method="opnorm", amp=True, **{**method_settings(SMALL, "opnorm"), "epochs": 1}))
    assert math.isfinite(res.metrics["loss"]) and res.metrics["accuracy"] > 0.1


@pytest.mark.parametrize("method", ["opnorm", "pgd-at"])
def test_compiled_model_trains_like_the_plain_one(method):
    """torch.compile (aot_eager backend: no C++ toolchain, fast) wraps the training forward only."""
    kw = {**method_settings(SMALL, method), "epochs": 1, "limit_train": 96}
    compiled = train(TrainConfig(method=method, compile="aot_eager", **kw))
    plain = train(TrainConfig(method=method, **kw))
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["logit-at", "trades"])
def test_mixed_batch_adversarial_methods_train(method):
    res = train(TrainConfig(method=method, adv_fraction=0.5, **{**SMALL, "epochs": 1}))
    assert math.isfinite(res.metrics["loss"])


def test_opnorm_variants_train():
    for kw in (
        dict(opnorm={"penalty": "exact"}),
        dict(opnorm={"dynamic": True}),
        dict(squared=False, p=2, q=2, eps=0.5),
    ):
        res = train(TrainConfig(method="opnorm", **{**method_settings(SMALL, "opnorm"), "epochs": 1, **kw}))
        assert math.isfinite(res.metrics["loss"]) and res.metrics["train_sigma"] > 0


# ----------------------------------------------------------------------------- config


def test_config_round_trip_and_defaults():
    cfg = TrainConfig(method="opnorm", p="inf", dataset="digits").resolved()
    assert cfg.eps == default_eps("digits", math.inf) and 0.05 <= cfg.eps <= 0.2
    assert TrainConfig(dataset="cifar10").resolved().eps == pytest.approx(0.5)  # p = 2
    assert TrainConfig(dataset="cifar10", p="inf").resolved().eps == pytest.approx(8 / 255)
    d = cfg.to_dict()
    assert d["attack"]["p"] == "inf"
    json.dumps(d, allow_nan=False)  # strict JSON
    assert TrainConfig.from_dict(json.loads(json.dumps(d))).resolved() == cfg
    assert TrainConfig(method="global-snr").resolved().iters == 1
    assert TrainConfig(optimizer="adam").resolved().lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(method="mart"), r"unknown method 'mart'; valid: clean, pgd-at, logit-at, opnorm, global-snr, trades"),
        (dict(model="lenet"), r"unknown model 'lenet'; valid: mlp, cnn"),
        (dict(dataset="svhn"), r"unknown dataset 'svhn'; valid names: digits"),
        (dict(eps=-0.1), r"eps must be >= 0"),
        (dict(p=0.5), r"p must satisfy 1 <= p"),
        (dict(q="x"), r"q must be a number"),
        (dict(lam=-1), r"lam must be >= 0"),
        (dict(epochs=0), r"epochs must be >= 1"),
        (dict(batch_size=0), r"batch_size must be >= 1"),
        (dict(lr=0), r"lr must be > 0"),
        (dict(adv_fraction=2), r"adv_fraction must be in \[0, 1\]"),
        (dict(optimizer="lbfgs"), r"unknown optimizer"),
        (dict(device="tpu"), r"device must be"),
        (dict(method="opnorm", eps=0), r"needs eps > 0"),
        (dict(method="pgd-at", p=3, eps=0.1), r"p in 1, 2, inf"),
        (dict(p=3), r"no default eps for p=3"),
        (dict(method="opnorm", opnorm={"penalty": "exact"}, compile=True), r"double backward"),
        (dict(method="opnorm", iters=5), r"for opnorm use opnorm.iters"),
        (dict(compile=""), r"compile must be"),
    ],
)
def test_config_validation_messages(changes, match):
    with pytest.raises((ValueError, TypeError), match=match) as info:
        TrainConfig(**changes).resolved()
    assert "\n" not in str(info.value)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown config field"):
        TrainConfig.from_dict({"method": "clean", "learning_rate": 0.1})
