"""The METHODS table: every method an objective of one protocol; options a method ignores are refused."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opnorm.training.config import (
    METHOD_OPTIONS,
    SECTIONS,
    TrainConfig,
    check_resume,
    flat_settings,
    method_settings,
)
from opnorm.training.objectives import METHODS, Method, Objective, TaskObjective, build_objective
from opnorm.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(dataset="digits", model="mlp", limit_train=64, limit_test=20, eval_points=8, eval_steps=1, batch_size=32)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "settings,message",
    [
        (
            dict(method="opnorm", opnorm={"mode": "paper", "free_update": True}),
            "opnorm.free_update=True is ignored by opnorm.mode paper",
        ),
        (
            dict(method="opnorm", opnorm={"mode": "paper", "warm_iters": 2}),
            "opnorm.warm_iters=2 is ignored by opnorm.mode paper",
        ),
        (dict(method="clean", iters=3), "iters=3 is ignored: iters applies to method global-snr only, not clean"),
        (dict(method="pgd-at", iters=3), "iters applies to method global-snr only, not pgd-at"),
        (dict(method="opnorm", iters=3), "for opnorm use opnorm.iters (--opnorm-iters)"),
        (dict(method="trades", lam=0.5), "lam=0.5 is ignored: trades weighs its KL term with beta (--beta), not lam"),
        (dict(method="pgd-at", beta=3.0), "beta=3.0 is ignored: beta applies to method trades only, not pgd-at"),
        (dict(method="opnorm", beta=3.0), "beta applies to method trades only, not opnorm"),
        (dict(method="clean", opnorm={"mode": "paper"}), "opnorm.mode='paper' is ignored: opnorm.mode applies to"),
        (dict(method="global-snr", opnorm={"iters": 5}), "opnorm.iters applies to method opnorm only, not global-snr"),
        (
            dict(method="pgd-at", fgsm_step=0.5),
            "fgsm_step applies to methods fgsm-rs, free and n-fgsm only, not pgd-at",
        ),
        (dict(method="opnorm", fgsm_start=0.5), "fgsm_start applies to methods fgsm-rs and n-fgsm only, not opnorm"),
        (dict(method="free", epochs=4, fgsm_start=1.0), "method free has no random start"),
        (dict(method="n-fgsm", replays=2), "replays applies to method free only, not n-fgsm"),
        (dict(method="clean", adv_append=0.5), "adv_append applies to method pgd-at only, not clean"),
        (dict(method="trades", adv_append=0.5), "adv_append applies to method pgd-at only, not trades"),
        (dict(method="clean", steps=3), "steps=3 is ignored: steps applies to methods pgd-at, logit-at and trades"),
        (dict(method="opnorm", step_size=0.1), "step_size applies to methods pgd-at, logit-at and trades only"),
        (dict(method="fgsm-rs", steps=3), "steps applies to methods pgd-at, logit-at and trades only, not fgsm-rs"),
        (dict(method="fgsm-rs", adv_fraction=0.5), "method fgsm-rs attacks the whole batch"),
        (dict(method="global-snr", squared=False), "squared applies to methods logit-at and opnorm only"),
        (dict(method="trades", train_loss="multi-margin"), "train_loss applies to methods clean, pgd-at, opnorm"),
        (dict(method="pgd-at", adv_append=0.5, adv_fraction=0.5), "adv_fraction is ignored with adv_append > 0"),
    ],
)
def test_an_option_the_method_ignores_is_refused_in_one_line(settings, message):
    with pytest.raises(ValueError) as info:
        TrainConfig(**settings).resolved()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_defaults_are_not_set():
    # the field defaults, and for paper mode the values the mode itself fills in
    TrainConfig(method="clean", beta=6.0, steps=10, adv_append=0.0, squared=True, opnorm={"mode": "fast"}).resolved()
    TrainConfig(method="opnorm", opnorm={"mode": "paper", "iters": 4, "warm_iters": 4, "free_update": False}).resolved()


@pytest.mark.parametrize("method", list(METHODS))
def test_a_resolved_config_resolves_to_itself(method):
    """Resolution fills only what the method reads, so config.json re-runs (and resumes) as it is."""
    cfg = TrainConfig(method=method, epochs=4).resolved()
    assert TrainConfig.from_dict(cfg.to_dict()).resolved() == cfg


def test_every_option_is_read_by_some_method():
    read = {name for spec in METHODS.values() for name in spec.reads}
    assert set(METHOD_OPTIONS) <= read


def test_method_settings_keeps_what_the_method_reads():
    shared = {"lr": 0.1, "adv_append": 0.75, "train_loss": "multi-margin", "steps": 7, "lam": 0.2}
    assert method_settings(shared, "clean") == {"lr": 0.1, "train_loss": "multi-margin"}
    assert method_settings(shared, "pgd-at") == {
        "lr": 0.1,
        "adv_append": 0.75,
        "train_loss": "multi-margin",
        "steps": 7,
    }
    assert method_settings(shared, "global-snr") == {"lr": 0.1, "train_loss": "multi-margin", "lam": 0.2}


def test_a_config_json_of_an_earlier_version_loads():
    """config.json files used to record lam 0 and the fast opnorm section for every method."""
    old = flat_settings(TrainConfig(method="clean").resolved().to_dict())  # that version wrote them flat
    old.update(
        lam=0.0,
        opnorm={
            "mode": "fast",
            "output": "logits",
            "iters": 3,
            "warm_iters": 1,
            "step": None,
            "dynamic": False,
            "penalty": "fd",
            "scale_by_eps": False,
            "clip": True,
            "free_update": True,
            "task": "clean",
        },
    )
    assert TrainConfig.from_dict(old).resolved() == TrainConfig(method="clean").resolved()
    given = {k: v for k, v in old.items() if k != "schedule_extensions"}  # settings a person wrote
    with pytest.raises(ValueError, match="lam=0.0 is ignored"):
        TrainConfig.from_dict(given).resolved()


# ----------------------------------------------------------------------------- the protocol


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_is_an_objective_of_one_protocol(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y, index = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,)), torch.arange(6)
    cfg = TrainConfig(method=method, eps=0.1, epochs=4).resolved()
    objective = build_objective(cfg, model, num_examples=6)
    assert isinstance(objective, Objective)
    loss, logs = objective(model, x, y, index)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach()))
    assert all(isinstance(v, float) for v in logs.values())
    loss.backward()
    objective.sync()


def test_a_method_is_one_entry(monkeypatch):
    """A method added to METHODS alone trains through the trainer and the config."""
    doubled = Method(lambda cfg, model, n: TaskObjective(lambda logits, y: 2 * F.cross_entropy(logits, y)))
    monkeypatch.setitem(METHODS, "double-ce", doubled)
    twice = train(TrainConfig(method="double-ce", epochs=1, lr=0.025, **TINY))
    once = train(TrainConfig(method="clean", epochs=1, lr=0.05, **TINY))
    assert twice.metrics["loss"] == pytest.approx(2 * once.metrics["loss"], rel=1e-4)
    with pytest.raises(ValueError, match="train_loss applies to methods clean, pgd-at, opnorm and global-snr only"):
        TrainConfig(method="double-ce", train_loss="multi-margin").resolved()


# ----------------------------------------------------------------------------- config sections


def test_every_field_has_one_section_and_config_json_is_written_in_sections(tmp_path):
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("method", "opnorm")]
    listed = [n for section in SECTIONS.values() for n in section]
    assert sorted(listed) == sorted(names) and len(listed) == len(set(listed))
    cfg = TrainConfig(method="pgd-at", p="inf", eps=0.1, lr=0.1, seed=3).resolved()
    d = json.loads(json.dumps(cfg.to_dict()))
    assert list(d)[0] == "method" and d["optimization"]["lr"] == 0.1 and d["runtime"]["seed"] == 3
    assert d["attack"]["p"] == "inf" and "lr" not in d
    assert TrainConfig.from_dict(d).resolved() == cfg  # round trip
    assert TrainConfig.from_dict(flat_settings(d)).resolved() == cfg  # the flat form of earlier versions still loads


def test_a_field_in_the_wrong_section_or_given_twice_is_refused():
    with pytest.raises(ValueError, match="section optimization has no field 'seed' .it belongs to section runtime"):
        TrainConfig.from_dict({"optimization": {"seed": 1}})
    with pytest.raises(ValueError, match="section data has no field 'bogus' .no such field"):
        TrainConfig.from_dict({"data": {"bogus": 1}})
    with pytest.raises(ValueError, match="lr is given twice"):
        TrainConfig.from_dict({"lr": 0.1, "optimization": {"lr": 0.2}})


def test_resume_checks_compare_a_flat_old_config_with_a_sectioned_one():
    new = TrainConfig(method="clean", epochs=2).resolved().to_dict()
    old = flat_settings(new)
    check_resume(old, {**new, "optimization": {**new["optimization"], "epochs": 4}}, "runs/a")  # epochs may change
    with pytest.raises(ValueError, match="cannot resume runs/a with lr=0.5"):
        check_resume(old, {**new, "optimization": {**new["optimization"], "lr": 0.5}}, "runs/a")
