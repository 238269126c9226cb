"""configs/paper-cifar10.json and the options it uses (multi-margin loss, appended adversarial
examples, input range, RMSprop), on small generated files in the CIFAR python format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from opnorm.training.config import TrainConfig, flat_settings, method_settings
from opnorm.training.models import build_model
from opnorm.training.objectives import build_objective
from opnorm.training.paper_setup import AppendedAdversarialLoss, input_normalization, task_loss
from opnorm.training.trainer import train
from tests.training.test_data import write_cifar

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "paper-cifar10.json"


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    write_cifar(d, np.random.default_rng(0), sizes=(3, 2, 2, 1, 2), n_test=4)
    return d.parent


def test_config_holds_the_papers_settings():
    raw = json.loads(CONFIG.read_text())  # the study's settings: steps, step_size, adv_append are pgd-at's
    at = TrainConfig.from_dict({**method_settings(raw, "pgd-at"), "method": "pgd-at"}).resolved()
    assert at.step_size == pytest.approx(2 * at.eps / 10) and at.steps == 10 and at.adv_append == 0.75
    cfg = TrainConfig.from_dict(method_settings(raw, "opnorm")).resolved()
    assert (cfg.model, cfg.width, cfg.input_range) == ("cnn7", 128, [-1.0, 1.0])
    # l_2 eps 1.75 on [-1, 1] inputs is 0.875 on [0, 1] pixels; PGA step 2 eps / 10
    assert cfg.eps * (cfg.input_range[1] - cfg.input_range[0]) == pytest.approx(1.75)
    assert (cfg.method, cfg.opnorm.mode, cfg.lam, cfg.opnorm.iters, cfg.p, cfg.q) == (
        "opnorm",
        "paper",
        0.02,
        10,
        2.0,
        2.0,
    )
    assert cfg.opnorm.scale_by_eps and cfg.squared and cfg.opnorm.penalty == "fd"  # lam ||f(x + eps v) - f(x)||^2
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.train_loss) == ("rmsprop", 1e-4, 32, "multi-margin")


def test_train_one_step_from_the_config_on_generated_cifar_files(cifar_dir, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "opnorm.json"  # the d.d. run of the study's config (opnorm ignores the attack's settings)
    config.write_text(json.dumps(method_settings(json.loads(CONFIG.read_text()), "opnorm")))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "opnorm",
            "train",
            "--config",
            str(config),
            "--data-dir",
            str(cifar_dir),
            "--limit-train",
            "2",
            "--limit-test",
            "2",
            "--epochs",
            "1",
            "--eval-points",
            "2",
            "--eval-steps",
            "1",
            "--norm-iters",
            "1",
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and np.isfinite(json.loads(lines[0])["loss"])
    saved = flat_settings(json.loads((out / "config.json").read_text()))
    assert saved["model"] == "cnn7" and saved["train_loss"] == "multi-margin" and saved["input_range"] == [-1.0, 1.0]
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert torch.allclose(state["normalize.mean"].flatten(), torch.full((3,), 0.5))  # x -> 2 x - 1
    assert torch.allclose(state["normalize.std"].flatten(), torch.full((3,), 0.5))
    assert state["conv7.weight"].shape == (1024, 512, 3, 3)


@pytest.mark.parametrize("method,extra", [("pgd-at", {}), ("global-snr", {"lam": 3e-4, "iters": 1}), ("clean", {})])
def test_other_methods_of_the_config_train_a_step(cifar_dir, method, extra):
    cfg = {
        **method_settings(json.loads(CONFIG.read_text()), method),
        "method": method,
        "width": 4,
        "data_dir": str(cifar_dir),
        "limit_train": 4,
        "limit_test": 2,
        "epochs": 1,
        "eval_points": 2,
        "eval_steps": 1,
        "norm_iters": 1,
        "progress": False,
        **extra,
    }
    res = train(cfg)
    assert np.isfinite(res.metrics["loss"])


def test_appended_adversarial_loss_matches_a_hand_built_batch():
    torch.manual_seed(0)
    net = build_model("cnn", input_shape=(1, 8, 8), num_classes=4, width=2).double().eval()
    x, y = torch.rand(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (8,))
    from opnorm.attacks import pgd

    loss_fn = AppendedAdversarialLoss(task_loss("multi-margin"), 0.75, eps=0.5, p=2, steps=3, step_size=0.1)
    torch.manual_seed(1)
    got = loss_fn(net, x, y)
    torch.manual_seed(1)
    xa = pgd(net, x[:6], y[:6], eps=0.5, p=2, loss="ce", steps=3, step_size=0.1, random_start=True)
    ref = nn.MultiMarginLoss()(net(torch.cat([x, xa])), torch.cat([y, y[:6]]))
    torch.testing.assert_close(got, ref.float())  # the loss is taken in float32, as the trainer's
    obj = build_objective(
        TrainConfig(method="pgd-at", p=2, eps=0.5, adv_append=0.75, train_loss="multi-margin").resolved(), net
    )
    assert isinstance(obj.at, AppendedAdversarialLoss)


def test_task_loss_and_input_range_against_torch():
    logits, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 3, 1, 2, 2])
    torch.testing.assert_close(task_loss("multi-margin")(logits, y), nn.MultiMarginLoss()(logits, y))
    torch.testing.assert_close(task_loss("ce")(logits, y), nn.CrossEntropyLoss()(logits, y))
    mean, std = input_normalization([-1.0, 1.0], (0.3, 0.2, 0.1), (0.2, 0.2, 0.2))
    x = torch.rand(2, 3, 4, 4)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close((x - m) / s, 2 * x - 1)
    assert input_normalization(None, (0.3,), (0.2,)) == ((0.3,), (0.2,))


@pytest.mark.parametrize(
    "change,match",
    [
        ({"train_loss": "hinge"}, "unknown train_loss"),
        ({"method": "pgd-at", "train_loss": "multi-margin"}, "needs adv_append"),
        ({"method": "logit-at", "train_loss": "multi-margin"}, "train_loss applies to methods clean, pgd-at"),
        ({"adv_append": 1.5}, "adv_append must be in"),
        ({"input_range": [1, -1]}, "hi > lo"),
        ({"input_range": [0]}, "must be \\[lo, hi\\]"),
    ],
)
def test_bad_paper_options_are_one_line_errors(change, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**change).resolved()


@pytest.mark.usefixtures("without_plots")
def test_reproduce_with_the_config_on_generated_cifar_files(cifar_dir, tmp_path):
    """opnorm reproduce --config: the file's model, radius, lambda, loss and input range define the
    study (a width-2 copy of the file, one seed, a handful of points: the path, not the numbers)."""
    from opnorm.experiments.reproduce import run_reproduce

    small = {**json.loads(CONFIG.read_text()), "width": 2, "epochs": 1, "limit_train": 8, "batch_size": 8}
    path = tmp_path / "paper-small.json"
    path.write_text(json.dumps(small))
    r = run_reproduce(
        config=str(path),
        quick=True,
        data_dir=str(cifar_dir),
        out=str(tmp_path / "out"),
        seeds=[0],
        log=lambda s: None,
        eval_points=4,
        align_points=4,
        spectrum_k=2,
        rank_k=2,
        eval_steps=2,
        eps_grid_l2=[0.0, 0.875],
        linearity_radii=[0.5],
        align_eps=[0.1],
        theorem_steps=2,
    )
    c = r["config"]
    assert (c["model"], c["eps_l2"], c["lam"], c["power_iters"], c["lam_snr"]) == ("cnn7", 0.875, 0.02, 10, 3e-4)
    assert c["train"]["train_loss"] == "multi-margin" and c["train"]["input_range"] == [-1, 1]
    assert "logit-at" not in r["methods"] and (tmp_path / "out" / "report.md").is_file()
