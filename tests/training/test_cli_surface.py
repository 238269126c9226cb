"""What `opnorm train` tells its user: every method in --help, and the settings it filled from defaults."""

from __future__ import annotations

import re

import pytest

from opnorm.training.config import METHODS, TrainConfig, defaults_used

from .cli_helpers import run_main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--epochs",
    "1",
    "--limit-train",
    "64",
    "--limit-test",
    "32",
    "--eval-points",
    "8",
    "--eval-steps",
    "1",
    "--batch-size",
    "32",
]


def test_method_help_lists_every_method(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_main(["train", "--help"], capsys)
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    shown = re.search(r"--method METHOD (.*?) config section", text).group(1)
    assert set(shown.replace("|", " ").split()) == set(METHODS)
    assert {"fgsm-rs", "n-fgsm", "free"} <= set(METHODS)


def test_defaults_used_names_what_the_method_fills_in():
    # by hand: digits' eps table (l_2 0.5, l_inf 0.1), sgd's lr 0.05, fgsm-rs' start 1 and step 1.25 of eps,
    # opnorm's lam 0.02 for sigma^2, free's 4 replays
    assert defaults_used({"method": "fgsm-rs"}, TrainConfig(method="fgsm-rs").resolved()) == {
        "p": 2.0,
        "eps": 0.5,
        "lr": 0.05,
        "fgsm_start": 1.0,
        "fgsm_step": 1.25,
    }
    given = {"method": "fgsm-rs", "p": "inf", "lr": 0.1, "fgsm_step": 1.0}
    assert defaults_used(given, TrainConfig(**given).resolved()) == {"eps": 0.1, "fgsm_start": 1.0}
    given = {"method": "opnorm", "p": "inf", "eps": 0.1}
    assert defaults_used(given, TrainConfig(**given).resolved()) == {"lr": 0.05, "q": 2.0, "lam": 0.02}
    given = {"method": "free", "epochs": 4}
    assert defaults_used(given, TrainConfig(**given).resolved()) == {
        "p": 2.0,
        "eps": 0.5,
        "lr": 0.05,
        "fgsm_step": 1.0,
        "replays": 4,
    }


def test_the_runs_first_line_names_the_defaults_it_filled_in(capsys):
    code, out, err = run_main(["train", "--method", "fgsm-rs", *TINY], capsys)
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("fgsm-rs on digits (cnn)"), first
    for flag in ("--p 2", "--eps 0.5", "--lr 0.05", "--fgsm-start 1", "--fgsm-step 1.25"):
        assert flag in first, (flag, first)
    code, out, err = run_main(["train", "--method", "fgsm-rs", "--p", "inf", "--lr", "0.05", *TINY], capsys)
    first = out.splitlines()[0]
    assert code == 0 and "--eps 0.1" in first and "--p " not in first and "--lr" not in first, first


def test_a_default_decided_at_run_time_is_named_by_its_rule(capsys):
    """pgd-at without --step-size: the first line names the field decided at run time
    (pgd-at's step size, None until the attack runs) by its rule, not a crash on None."""
    code, out, err = run_main(["train", "--method", "pgd-at", "--steps", "2", *TINY], capsys)
    assert code == 0, err
    assert "--step-size (2.5 eps / steps)" in out.splitlines()[0], out.splitlines()[0]
