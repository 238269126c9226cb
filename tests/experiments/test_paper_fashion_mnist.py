"""configs/paper-fashion-mnist.json: the paper's protocol on Fashion-MNIST (the small CNN with
BatchNorm(affine=False) after each conv, 75 % appended adversarial examples, MultiMarginLoss,
RMSprop); it resolves, builds the study of `opnorm reproduce --config`, and trains one epoch on
digits (the same file with the dataset swapped)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from opnorm.experiments.study import method_table, study_config
from opnorm.training.config import TrainConfig, method_settings
from opnorm.training.models import build_model
from opnorm.training.trainer import train

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "paper-fashion-mnist.json"


def _file() -> dict:
    return json.loads(CONFIG.read_text())


def test_config_holds_the_paper_protocol():
    raw = _file()  # a study file: the attack settings (steps, step_size, adv_append) are pgd-at's
    cfg = TrainConfig.from_dict(method_settings(raw, "opnorm")).resolved()
    at = TrainConfig.from_dict(method_settings(raw, "pgd-at") | {"method": "pgd-at"}).resolved()
    assert (cfg.dataset, cfg.model, cfg.input_range) == ("fashion-mnist", "cnn-bn", [-1.0, 1.0])
    assert (at.adv_append, cfg.train_loss, cfg.optimizer, cfg.lr, cfg.batch_size) == (
        0.75,
        "multi-margin",
        "rmsprop",
        1e-4,
        32,
    )
    # eps 2.0 in pixel units by the paper's rule; the step of the paper's Table 1, 2 eps / 10 steps
    assert cfg.eps == 2.0 and at.steps == 10 and at.step_size == pytest.approx(0.2 * at.eps)
    assert (cfg.method, cfg.opnorm.mode, cfg.opnorm.iters, cfg.p, cfg.q, cfg.squared) == (
        "opnorm",
        "paper",
        10,
        2.0,
        2.0,
        True,
    )


def test_the_model_has_batchnorm_without_affine_after_each_conv():
    model = build_model("cnn-bn", input_shape=(1, 28, 28), num_classes=10)
    names = list(dict(model.named_children()))
    convs = [n for n in names if n.startswith("conv")]
    assert len(convs) == 2
    for conv in convs:
        bn = getattr(model, names[names.index(conv) + 1])
        assert isinstance(bn, nn.BatchNorm2d) and not bn.affine and getattr(model, conv).bias is None
    plain = build_model("cnn", input_shape=(1, 28, 28), num_classes=10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) and plain.conv1.bias is not None


def test_reproduce_builds_the_study_from_the_file():
    cfg = study_config(train_config=_file())
    assert (cfg.dataset, cfg.model, cfg.eps_l2, cfg.lam, cfg.epochs, cfg.batch_size) == (
        "fashion-mnist",
        "cnn-bn",
        2.0,
        0.02,
        3,
        32,
    )
    assert cfg.train["adv_append"] == 0.75 and cfg.train["train_loss"] == "multi-margin"
    assert cfg.train["optimizer"] == "rmsprop" and cfg.limit_train == 3000 and cfg.eval_points == 200
    assert "logit-at" not in [k for k, *_ in method_table(cfg)]  # its loss is the cross-entropy only


@pytest.mark.parametrize("method", ["opnorm", "pgd-at", "global-snr"])
def test_the_file_trains_one_epoch_on_digits(method):
    cfg = {
        **method_settings(_file(), method),
        "dataset": "digits",
        "method": method,
        "epochs": 1,
        "limit_train": 96,
        "eval_points": 8,
        "eval_steps": 1,
        "progress": False,
        **({"lam": 0.01} if method == "global-snr" else {}),
    }
    res = train(cfg)
    assert np.isfinite(res.metrics["loss"]) and res.config.model == "cnn-bn"
