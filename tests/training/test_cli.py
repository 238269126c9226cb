"""The command line: train / eval / demo / reproduce, and one-line errors without tracebacks."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

import opnorm.cli as cli
from opnorm.cli import main
from opnorm.training.checkpoint import load_checkpoint
from opnorm.training.config import flat_settings
from opnorm.training.trainer import CHECKPOINT, CONFIG, METRICS, WEIGHTS

from .cli_helpers import one_line_error, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [
    "--dataset",
    "digits",
    "--model",
    "cnn",
    "--limit-train",
    "128",
    "--limit-test",
    "60",
    "--eval-points",
    "20",
    "--eval-steps",
    "3",
    "--batch-size",
    "32",
    "--quiet",
]
ATTACK = ["--steps", "3"]  # the training attack's (pgd-at); clean refuses it


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-epoch pgd-at run made through the CLI."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert (
        main(
            [
                "train",
                "--method",
                "pgd-at",
                "--p",
                "inf",
                "--eps",
                "0.1",
                "--epochs",
                "2",
                "--out",
                str(out),
                *ATTACK,
                *SMALL,
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 4-epoch pgd-at run on 1000 digits (about 97 % clean, 67 % under PGD at l_inf 0.15):
    something for the attacks to find, and something left."""
    out = tmp_path_factory.mktemp("cli") / "trained"
    assert (
        main(
            [
                "train",
                "--method",
                "pgd-at",
                "--p",
                "inf",
                "--eps",
                "0.1",
                "--epochs",
                "4",
                "--out",
                str(out),
                "--dataset",
                "digits",
                "--model",
                "cnn",
                "--limit-train",
                "1000",
                "--eval-every",
                "0",
                "--eval-points",
                "20",
                "--eval-steps",
                "3",
                "--steps",
                "3",
                "--batch-size",
                "32",
                "--quiet",
            ]
        )
        == 0
    )
    return out


# ----------------------------------------------------------------------------- train


def test_train_writes_the_run_directory(run_dir):
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [CHECKPOINT, CONFIG, METRICS, WEIGHTS, CHECKPOINT + ".sha256", WEIGHTS + ".sha256", ".lock"]
    )
    cfg = flat_settings(json.loads((run_dir / CONFIG).read_text()))
    assert cfg["method"] == "pgd-at" and cfg["p"] == "inf" and cfg["eps"] == 0.1 and cfg["epochs"] == 2
    assert cfg["out"] == str(run_dir)
    lines = (run_dir / METRICS).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


@pytest.mark.parametrize("every, evaluated", [(None, [1, 2, 3]), ("2", [2, 3]), ("0", [3])])
def test_eval_every_sets_the_epochs_that_are_evaluated(tmp_path, capsys, every, evaluated):
    small = [a for a in SMALL if a != "--quiet"]
    argv = ["train", "--method", "clean", "--epochs", "3", "--out", str(tmp_path / "r"), *small]
    code, out, err = run_main(argv + (["--eval-every", every] if every else []), capsys)
    assert code == 0, err
    metrics = [json.loads(line) for line in (tmp_path / "r" / METRICS).read_text().splitlines()]
    keys = ("accuracy", "robust_accuracy", "operator_norm", "eval_seconds")
    assert [m["epoch"] for m in metrics if all(k in m for k in keys)] == evaluated
    assert all(not any(k in m for k in keys) for m in metrics if m["epoch"] not in evaluated)
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    for m, line in zip(metrics, lines):  # training and evaluation seconds apart
        assert f"train {m['seconds']:.1f}s" in line
        if m["epoch"] in evaluated:
            assert f"eval {m['eval_seconds']:.1f}s" in line and f"acc {m['accuracy']:.4f}" in line
        else:
            assert "eval" not in line and "acc" not in line
    if every is not None:
        assert flat_settings(json.loads((tmp_path / "r" / CONFIG).read_text()))["eval_every"] == int(every)


def test_eval_every_must_be_a_count(tmp_path, capsys):
    code, _, err = run_main(["train", "--eval-every", "-1", "--out", str(tmp_path / "r"), *SMALL], capsys)
    one_line_error(code, err, "eval_every")


def test_config_file_reruns_and_flags_override(run_dir, tmp_path, capsys):
    out = tmp_path / "again"
    code, _, err = run_main(["train", "--config", str(run_dir / CONFIG), "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    a, b = load_checkpoint(run_dir / CHECKPOINT)["model"], load_checkpoint(out / CHECKPOINT)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # same config, same seed: same weights
    out2 = tmp_path / "override"
    code, _, err = run_main(
        [
            "train",
            "--config",
            str(run_dir / CONFIG),
            "--out",
            str(out2),
            "--epochs",
            "1",
            "--method",
            "trades",  # another attack method: the run's steps apply to it too
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    cfg = flat_settings(json.loads((out2 / CONFIG).read_text()))
    assert cfg["epochs"] == 1 and cfg["method"] == "trades" and cfg["limit_train"] == 128
    # the run's config as a study file for another method: what clean does not read is left out, and named
    code, _, err = run_main(
        ["train", "--config", str(run_dir / CONFIG), "--method", "clean", "--out", str(tmp_path / "c"), "--quiet"],
        capsys,
    )
    assert code == 0 and f"{run_dir / CONFIG}: steps not used by method clean" in err, err
    code, _, err = run_main(["train", "--config", str(run_dir / CONFIG), "--method", "clean", "--steps", "3"], capsys)
    one_line_error(code, err, "steps=3 is ignored: steps applies to methods pgd-at, logit-at and trades only")


def test_resume_extends_a_run(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    code, out, err = run_main(["train", "--out", str(copy), "--resume", "--epochs", "3"], capsys)
    assert code == 0, err
    assert "epoch 3/3" in out and "epoch 2/3" not in out  # continued, not restarted
    assert load_checkpoint(copy / CHECKPOINT)["epoch"] == 3


def test_stop_after_then_resume(tmp_path, capsys):
    out = tmp_path / "r"
    code, stdout, _ = run_main(
        ["train", "--method", "clean", "--epochs", "2", "--out", str(out), "--stop-after", "1", *SMALL[:-1]], capsys
    )
    assert code == 0 and "stopped after epoch 1" in stdout
    assert not (out / WEIGHTS).exists()
    code, stdout, _ = run_main(["train", "--out", str(out), "--resume"], capsys)
    assert code == 0 and "epoch 2/2" in stdout and (out / WEIGHTS).exists()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["--method", "mart"], ["unknown method 'mart'", "pgd-at", "opnorm"]),
        (["--model", "lenet"], ["unknown model 'lenet'", "resnet18"]),
        (["--dataset", "svhn"], ["unknown dataset 'svhn'", "fashion-mnist"]),
        (["--eps", "-0.5"], ["eps must be >= 0"]),
        (["--p", "0.5"], ["p must satisfy 1 <= p"]),
        (["--lam", "-1"], ["lam must be >= 0"]),
        (["--epochs", "0"], ["epochs must be >= 1"]),
        (
            ["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/opnorm-data"],
            ["fashion-mnist", "/nonexistent/opnorm-data"],
        ),
        (["--config", "/nonexistent/config.json"], ["config file", "not found"]),
    ],
)
def test_bad_train_configs_fail_with_one_line(extra, fragments, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(["train", "--out", str(out), *extra], capsys)
    one_line_error(code, err, *fragments)
    assert not out.exists()  # nothing written, no half-written checkpoint


def test_malformed_command_lines_fail_with_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--epochs", "three"])
    assert info.value.code == 2
    one_line_error(info.value.code, capsys.readouterr().err, "--epochs")
    with pytest.raises(SystemExit):
        main(["fly"])
    one_line_error(2, capsys.readouterr().err, "invalid choice")


def test_resume_without_a_run(tmp_path, capsys):
    code, _, err = run_main(["train", "--out", str(tmp_path / "none"), "--resume"], capsys)
    one_line_error(code, err, "no run to resume")
    code, _, err = run_main(["train", "--resume"], capsys)
    one_line_error(code, err, "--resume needs the run directory")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_checkpoints_fail_with_one_line_and_stay_untouched(run_dir, tmp_path, capsys, damage):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    good = (copy / CHECKPOINT).read_bytes()
    bad = {"truncated": good[: len(good) // 3], "garbage": b"not a checkpoint" * 100, "empty": b""}[damage]
    (copy / CHECKPOINT).write_bytes(bad)
    before = sorted(p.name for p in copy.iterdir())
    code, _, err = run_main(["train", "--out", str(copy), "--resume"], capsys)
    one_line_error(code, err, "corrupt or truncated")
    assert (copy / CHECKPOINT).read_bytes() == bad and sorted(p.name for p in copy.iterdir()) == before
    code, _, err = run_main(["eval", "--checkpoint", str(copy / CHECKPOINT)], capsys)
    one_line_error(code, err, "corrupt or truncated")


def test_existing_run_is_not_overwritten(run_dir, capsys):
    before = (run_dir / CHECKPOINT).read_bytes()
    code, _, err = run_main(["train", "--out", str(run_dir), "--quiet"], capsys)
    one_line_error(code, err, "already holds a run", "--resume")
    assert (run_dir / CHECKPOINT).read_bytes() == before


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "opnorm", "train", "--method", "nope", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "opnorm: error: unknown method 'nope'; valid: clean, pgd-at, logit-at, opnorm, global-snr, trades, fgsm-rs, "
        "free, n-fgsm"
    ]
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- eval


def test_eval_prints_a_table_and_writes_json_and_csv(run_dir, tmp_path, capsys):
    prefix = tmp_path / "report" / "robust"
    code, out, err = run_main(
        [
            "eval",
            "--checkpoint",
            str(run_dir),
            "--attack",
            "pgd",
            "--p",
            "inf",
            "--eps",
            "0,0.05,0.1",
            "--steps",
            "5",
            "--out",
            str(prefix),
        ],
        capsys,
    )
    assert code == 0, err
    assert "worst case" in out and "0.05" in out and "360 test points" in out  # the whole test split
    report = json.loads(prefix.with_suffix(".json").read_text())
    assert [r["eps"] for r in report["results"]] == [0.0, 0.05, 0.1]
    assert report["results"][0]["worst_case"] == report["clean_accuracy"]
    accs = [r["worst_case"] for r in report["results"]]
    assert all(0 <= a <= 1 for a in accs) and accs[2] <= accs[0]
    assert report["n"] == 360 and report["method"] == "pgd-at" and report["p"] == "inf"
    assert report["pgd"]["schedule"] == "halving" and "halving step" in out  # the default
    rows = list(csv.DictReader(prefix.with_suffix(".csv").open()))
    assert len(rows) == 3 * 360 and list(rows[0]) == ["index", "eps", "label", "clean", "pgd", "worst"]


def test_eval_default_output_and_bad_arguments(run_dir, capsys):
    code, _, err = run_main(
        ["eval", "--checkpoint", str(run_dir / CHECKPOINT), "--steps", "2", "--limit", "20"], capsys
    )
    assert code == 0, err
    name = "eval-pgd-pinf-eps0_0.1-lossce-n20-seed0"
    assert (run_dir / f"{name}.json").exists() and (run_dir / f"{name}.csv").exists()
    for argv, fragment in [
        (["--eps", "0.1,abc"], "--eps must be comma-separated numbers"),
        (["--eps", "-0.1"], "eps must be >= 0"),
        (["--attack", "fgsm"], "unknown attack 'fgsm'"),
        (["--attack", "square", "--loss", "cw"], "--loss set the pgd attack"),
        (["--attack", "apgd-ce", "--p", "1"], "p = inf or 2"),
        (["--p", "0"], "p must satisfy"),
    ]:
        code, _, err = run_main(["eval", "--checkpoint", str(run_dir), "--limit", "5", *argv], capsys)
        one_line_error(code, err, fragment)
    code, _, err = run_main(["eval", "--checkpoint", "/nonexistent/checkpoint.pt"], capsys)
    one_line_error(code, err, "no checkpoint at")


def test_a_second_eval_never_overwrites_the_first(run_dir, tmp_path, capsys):
    argv = ["eval", "--checkpoint", str(run_dir), "--steps", "2", "--limit", "20", "--eps", "0.1", "--seed", "4"]
    assert run_main(argv, capsys)[0] == 0
    first = run_dir / "eval-pgd-pinf-eps0.1-lossce-n20-seed4"
    before = {ext: first.with_name(first.name + ext).read_bytes() for ext in (".json", ".csv")}
    code, out, err = run_main([*argv, "--steps", "4"], capsys)
    assert code == 0, err
    second = first.with_name(first.name + "-2")
    assert f"wrote {second}.json and {second}.csv" in out
    assert json.loads(second.with_name(second.name + ".json").read_text())["pgd"]["steps"] == 4
    assert {ext: first.with_name(first.name + ext).read_bytes() for ext in (".json", ".csv")} == before
    prefix = tmp_path / "mine"
    prefix.with_suffix(".csv").write_text("someone else's\n")  # half of the pair taken: the next free name
    assert run_main([*argv, "--out", str(prefix)], capsys)[0] == 0
    assert prefix.with_suffix(".csv").read_text() == "someone else's\n" and (tmp_path / "mine-2.json").exists()


def test_eval_all_prints_the_worst_case_and_the_csv_agrees_with_the_summary(trained_run, tmp_path, capsys):
    pytest.importorskip("torchattacks")
    prefix = tmp_path / "all"
    code, out, err = run_main(
        [
            "eval",
            "--checkpoint",
            str(trained_run),
            "--attack",
            "all",
            "--eps",
            "0.1,0.3",
            "--limit",
            "12",
            "--steps",
            "3",
            "--apgd-steps",
            "3",
            "--square-queries",
            "20",
            "--out",
            str(prefix),
        ],
        capsys,
    )
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.lstrip().startswith("eps"))
    assert header.split()[-5:] == ["worst", "case", "95%", "Wilson", "interval"] and "after autoattack" in header
    report = json.loads(prefix.with_suffix(".json").read_text())
    assert report["attacks"] == ["pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square", "autoattack"]
    rows = list(csv.DictReader(prefix.with_suffix(".csv").open()))
    assert len(rows) == 2 * 12
    assert report["results"][0]["worst_case"] > 0 and report["results"][1]["worst_case"] < report["clean_accuracy"]
    for res in report["results"]:
        mine = [r for r in rows if float(r["eps"]) == res["eps"]]
        worst = sum(int(r["worst"]) for r in mine) / 12
        assert worst == pytest.approx(res["worst_case"], abs=1e-12)
        lo, hi = res["interval"]
        assert lo <= worst <= hi
        for r in mine:  # worst: correct clean and under every attack that ran (-1: skipped, already fooled)
            marks = [int(r[a]) for a in report["attacks"]]
            assert int(r["worst"]) == int(r["clean"] == "1" and all(m == 1 for m in marks))
        for a in report["attacks"]:
            assert res["worst_case"] <= res["after"][a]
        line = next(line for line in out.splitlines() if line.split() and line.split()[0] == f"{res['eps']:g}")
        assert f"{res['worst_case']:.4f}" in line.split()[-3]


def test_eval_autoattack_agrees_with_torchattacks_on_the_same_points(trained_run, tmp_path, capsys):
    ta = pytest.importorskip("torchattacks")
    from opnorm.training.config import TrainConfig
    from opnorm.training.data import load_dataset
    from opnorm.training.models import build_model

    n, eps = 30, 0.15
    prefix = tmp_path / "aa"
    code, out, err = run_main(
        [
            "eval",
            "--checkpoint",
            str(trained_run),
            "--attack",
            "autoattack",
            "--eps",
            str(eps),
            "--limit",
            str(n),
            "--out",
            str(prefix),
        ],
        capsys,
    )
    assert code == 0, err
    ours = json.loads(prefix.with_suffix(".json").read_text())["results"][0]["worst_case"]

    state = load_checkpoint(trained_run / CHECKPOINT)
    cfg = TrainConfig.from_dict(state["config"]).resolved()
    splits = load_dataset(cfg.dataset)
    model = build_model(
        cfg.model,
        input_shape=splits.input_shape,
        num_classes=splits.num_classes,
        mean=splits.mean,
        std=splits.std,
        width=cfg.width,
    )
    model.load_state_dict(state["model"])
    model.eval()
    x, y = splits.test.x[:n], splits.test.y[:n]
    atk = ta.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
    with torch.no_grad():
        direct = float((model(atk(x, y)).argmax(1) == y).double().mean())
        clean = float((model(x).argmax(1) == y).double().mean())
    assert 0 < direct < clean  # the attack fools some examples, not all
    assert abs(ours - direct) <= 0.01


# ----------------------------------------------------------------------------- demo, reproduce, entry points


def test_demo_prints_operator_norms(capsys):
    code, out, err = run_main(["demo", "--epochs", "1"], capsys)
    assert code == 0, err
    for pair in ("(2, 2)", "(inf, 2)", "(inf, inf)", "(2, 1)", "(inf, 1)"):
        row = next(line for line in out.splitlines() if line.startswith(pair))
        values = [float(tok) for tok in row.split()[2:7]]
        assert len(values) == 5 and all(v > 0 for v in values)
    assert "test accuracy" in out and "lower bound" in out


def test_reproduce_calls_the_experiments_layer(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "run_reproduce", lambda **kw: calls.append(kw))
    assert main(["reproduce", "--quick", "--seed", "3"]) == 0
    jobs = cli.default_jobs()
    assert 1 <= jobs <= 4
    assert calls == [
        dict(
            dataset="digits",
            quick=True,
            out="reports/digits",
            seeds=[3],
            data_dir=None,
            config=None,
            runs=None,
            jobs=jobs,
        )
    ]
    calls.clear()
    assert main(["reproduce", "--jobs", "1"]) == 0 and calls[0]["jobs"] == 1
    calls.clear()
    assert main(["reproduce", "--seeds", "0,1,2", "--limit-train", "50"]) == 0
    assert calls[0]["seeds"] == [0, 1, 2] and calls[0]["limit_train"] == 50
    code, _, err = run_main(["reproduce", "--seeds", "0,x"], capsys)
    one_line_error(code, err, "--seeds must be comma-separated")


def test_python_dash_m_and_help():
    proc = subprocess.run([sys.executable, "-m", "opnorm", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for cmd in ("train", "eval", "demo", "reproduce", "compare"):
        assert cmd in proc.stdout


def test_a_study_config_file_gives_each_method_the_options_it_reads(capsys):
    """configs/paper-cifar10.json holds the AT runs' attack settings beside its opnorm method:
    train --config leaves out, and says, the file's options that the run's method ignores; a
    flag the method ignores is still refused."""
    from pathlib import Path

    from opnorm import cli
    from opnorm.training.config import TrainConfig

    path = str(Path(__file__).resolve().parents[2] / "configs" / "paper-cifar10.json")
    dd = cli.train_settings(cli.build_parser().parse_args(["train", "--config", path]))
    assert "adv_append" not in dd and "steps" not in dd and dd["method"] == "opnorm"
    assert "adv_append, step_size not used by method opnorm" in capsys.readouterr().err  # steps 10: the default
    at = cli.train_settings(cli.build_parser().parse_args(["train", "--config", path, "--method", "pgd-at"]))
    assert at["adv_append"] == 0.75 and at["steps"] == 10
    flag = cli.train_settings(cli.build_parser().parse_args(["train", "--config", path, "--steps", "5"]))
    with pytest.raises(ValueError, match="steps=5 is ignored"):
        TrainConfig.from_dict(flag).resolved()
