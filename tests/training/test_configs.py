"""The shipped configs (configs/*.json) are valid TrainConfigs and train through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opnorm.cli import main
from opnorm.training.checkpoint import load_checkpoint
from opnorm.training.config import TrainConfig, flat_settings, method_settings, migrate
from opnorm.training.trainer import CHECKPOINT, CONFIG

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.json"))


def test_configs_are_shipped():
    assert CONFIGS, "configs/*.json not found next to tests/"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_resolves(path):
    raw = migrate(json.loads(path.read_text()))  # flat keys of older configs move into the opnorm section
    # a study's config (paper-cifar10) also holds its AT methods' settings, which the file's method does not read
    raw = method_settings(raw, raw["method"])
    cfg = TrainConfig.from_dict(raw).resolved()
    for key, value in raw.items():  # nothing is silently replaced by resolution
        if key == "opnorm":
            for name, v in value.items():
                assert getattr(cfg.opnorm, name) == v, f"opnorm.{name}"
        else:
            assert getattr(cfg, key) == (float(value) if key in ("p", "q") else value), key


def test_fast_robust_config_trains_on_digits(tmp_path, one_thread):
    """The Fashion-MNIST config's regularizer, run for one short epoch on digits (the data
    that ships with scikit-learn): every example visited, and finite PGA steps keep a float
    store of nonzero iterates in the unit l_inf ball."""
    path = next(p for p in CONFIGS if p.name == "fashion-mnist-fast-robust.json")
    out = tmp_path / "run"
    argv = [
        "train",
        "--config",
        str(path),
        "--dataset",
        "digits",
        "--limit-train",
        "96",
        "--limit-test",
        "40",
        "--eval-points",
        "20",
        "--eval-steps",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    cfg = flat_settings(json.loads((out / CONFIG).read_text()))
    o = cfg["opnorm"]
    assert (o["output"], o["task"], o["step"], o["iters"], o["warm_iters"]) == ("kl", "perturbed", 0.25, 1, 2)
    objective = load_checkpoint(out / CHECKPOINT)["objective"]
    bank, seen = objective["reg.store.directions"], objective["reg.store.seen"]
    assert bank.is_floating_point() and bank.shape[0] == 96 and bool(seen[:96].all())
    assert float(bank[:96].abs().max()) <= 1 + 1e-6
    assert float(bank[:96].abs().max()) > 0
