"""The command line: train / eval / demo / reproduce, and one-line errors without tracebacks."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import types

import pytest
import torch

from opnorm.cli import main
from opnorm.training.checkpoint import load_checkpoint
from opnorm.training.trainer import CHECKPOINT, CONFIG, METRICS, WEIGHTS

from .cli_helpers import run_main, one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--dataset", "digits", "--model", "cnn", "--limit-train", "128", "--limit-test", "60", "--eval-points", "20",
         "--eval-steps", "3", "--steps", "3", "--batch-size", "32", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-epoch pgd-at run made through the CLI."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--method", "pgd-at", "--p", "inf", "--eps", "0.1", "--epochs", "2", "--out", str(out), *SMALL]) == 0
    return out


# ----------------------------------------------------------------------------- train


def test_train_writes_the_run_directory(run_dir):
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [CHECKPOINT, CONFIG, METRICS, WEIGHTS, CHECKPOINT + ".sha256", WEIGHTS + ".sha256", ".lock"])
    cfg = json.loads((run_dir / CONFIG).read_text())
    assert cfg["method"] == "pgd-at" and cfg["p"] == "inf" and cfg["eps"] == 0.1 and cfg["epochs"] == 2
    assert cfg["out"] == str(run_dir)
    lines = (run_dir / METRICS).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_config_file_reruns_and_flags_override(run_dir, tmp_path, capsys):
    out = tmp_path / "again"
    code, _, err = run_main(["train", "--config", str(run_dir / CONFIG), "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    a, b = load_checkpoint(run_dir / CHECKPOINT)["model"], load_checkpoint(out / CHECKPOINT)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # same config, same seed: same weights
    out2 = tmp_path / "override"
    code, _, err = run_main(["train", "--config", str(run_dir / CONFIG), "--out", str(out2), "--epochs", "1",
                             "--method", "clean", "--quiet"], capsys)
    assert code == 0, err
    cfg = json.loads((out2 / CONFIG).read_text())
    assert cfg["epochs"] == 1 and cfg["method"] == "clean" and cfg["limit_train"] == 128


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
    code, stdout, _ = run_main(["train", "--method", "clean", "--epochs", "2", "--out", str(out), "--stop-after", "1",
                                *SMALL[:-1]], capsys)
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
        (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/opnorm-data"], ["fashion-mnist", "/nonexistent/opnorm-data"]),
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
    proc = subprocess.run([sys.executable, "-m", "opnorm", "train", "--method", "nope", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "opnorm: error: unknown method 'nope'; valid: clean, pgd-at, logit-at, opnorm, global-snr, trades, fgsm-rs, free, "
        "n-fgsm"
    ]
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- eval


def test_eval_prints_a_table_and_writes_json_and_csv(run_dir, tmp_path, capsys):
    prefix = tmp_path / "report" / "robust"
    code, out, err = run_main(["eval", "--checkpoint", str(run_dir), "--attack", "pgd", "--p", "inf",
                               "--eps", "0,0.05,0.1", "--steps", "5", "--out", str(prefix)], capsys)
    assert code == 0, err
    assert "robust accuracy" in out and "0.05" in out and "360 test points" in out  # the whole test split
    report = json.loads(prefix.with_suffix(".json").read_text())
    assert [r["eps"] for r in report["results"]] == [0.0, 0.05, 0.1]
    assert report["results"][0]["robust_accuracy"] == report["clean_accuracy"]
    accs = [r["robust_accuracy"] for r in report["results"]]
    assert all(0 <= a <= 1 for a in accs) and accs[2] <= accs[0]
    assert report["n"] == 360 and report["method"] == "pgd-at" and report["p"] == "inf"
    assert report["schedule"] == "halving" and "halving step" in out  # the default
    rows = list(csv.reader(prefix.with_suffix(".csv").open()))
    assert rows[0] == ["eps", "robust_accuracy"] and len(rows) == 4


def test_eval_default_output_and_bad_arguments(run_dir, capsys):
    code, _, err = run_main(["eval", "--checkpoint", str(run_dir / CHECKPOINT), "--steps", "2", "--limit", "20"], capsys)
    assert code == 0, err
    assert (run_dir / "eval-pgd-pinf.json").exists() and (run_dir / "eval-pgd-pinf.csv").exists()
    for argv, fragment in [
        (["--eps", "0.1,abc"], "--eps must be comma-separated numbers"),
        (["--eps", "-0.1"], "eps must be >= 0"),
        (["--attack", "fgsm"], "unknown attack 'fgsm'"),
        (["--p", "0"], "p must satisfy"),
    ]:
        code, _, err = run_main(["eval", "--checkpoint", str(run_dir), *argv], capsys)
        one_line_error(code, err, fragment)
    code, _, err = run_main(["eval", "--checkpoint", "/nonexistent/checkpoint.pt"], capsys)
    one_line_error(code, err, "no checkpoint at")


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
    fake = types.ModuleType("opnorm.experiments.reproduce")
    fake.run_reproduce = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "opnorm.experiments.reproduce", fake)
    assert main(["reproduce", "--quick", "--seed", "3"]) == 0
    assert calls == [dict(dataset="digits", quick=True, out="reports/digits", seeds=[3], data_dir=None, config=None, runs=None)]
    calls.clear()
    assert main(["reproduce", "--seeds", "0,1,2", "--limit-train", "50"]) == 0
    assert calls[0]["seeds"] == [0, 1, 2] and calls[0]["limit_train"] == 50
    code, _, err = run_main(["reproduce", "--seeds", "0,x"], capsys)
    one_line_error(code, err, "--seeds must be comma-separated")
    monkeypatch.setitem(sys.modules, "opnorm.experiments.reproduce", None)  # import fails
    code, _, err = run_main(["reproduce"], capsys)
    one_line_error(code, err, "reproduce study is not available")


def test_python_dash_m_and_help():
    proc = subprocess.run([sys.executable, "-m", "opnorm", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for cmd in ("train", "eval", "demo", "reproduce"):
        assert cmd in proc.stdout
