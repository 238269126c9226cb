"""The fast adversarial training study's harness (benchmarks/fast_at_fmnist.py) in its --tiny
mode on digits: per-run records, resume, per-example worst case, report and plots."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fast_at_fmnist.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("fast_at_fmnist", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_tiny_study_writes_records_resumes_and_reports(study, tmp_path, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = [
        "--tiny",
        "--out",
        str(out),
        "--runs",
        str(runs),
        "--radii",
        "0.1",
        "--methods",
        "fgsm-rs",
        "free",
        "--seeds",
        "0",
        "1",
    ]
    study.main(argv[:-1])  # seed 0 only
    recs = sorted((out / "runs").glob("eps-0.1/*/seed-*/results.json"))
    assert [p.parent.parent.name for p in recs] == ["fgsm-rs", "free"]
    first = {p: p.read_text() for p in recs}
    capsys.readouterr()
    study.main(argv)  # seed 1 is new; seed 0's records are reused as they are
    assert all(p.read_text() == text for p, text in first.items())
    printed = capsys.readouterr().out
    assert "fgsm-rs seed 1" in printed and "seed 0" not in printed
    rec = json.loads(recs[1].read_text())
    assert rec["config"]["method"] == "free" and rec["config"]["replays"] == 2 and len(rec["epochs"]) == 1
    masks = rec["robust_masks"]
    n = rec["test_points"]
    worst = [all(masks[k][i] == "1" for k in study.ATTACKS) for i in range(n)]
    assert masks["worst_case"] == "".join("1" if w else "0" for w in worst)
    assert rec["worst_case"] == pytest.approx(sum(worst) / n)
    assert rec["worst_case"] <= min(rec[k] for k in study.ATTACKS)

    record = json.loads((out / "results.json").read_text())
    assert record["finished_runs"] == record["planned_runs"] == 4 and not record["pending"]
    agg = record["aggregate"]["0.1"]["fgsm-rs"]
    assert agg["seeds"] == [0, 1] and agg["worst_case"]["se"] >= 0
    assert (out / "robust_vs_time_eps-0.1.png").stat().st_size > 0
    # a report over more methods than were run lists the rest as pending
    study.main(["--phase", "report", *argv[:7], "--methods", "fgsm-rs", "free", "n-fgsm", "--seeds", "0", "1"])
    text = (out / "report.md").read_text()
    assert "4 of 6 planned runs finished" in text and "n-fgsm seed 0, n-fgsm seed 1" in text
    assert "--phase report" in text


def test_variants_validate_on_held_out_training_images(tmp_path, study):
    """The variants script trains each variant and reference once and never reads the test set."""
    here = SCRIPT.parent
    spec = importlib.util.spec_from_file_location("fast_at_variants", here / "fast_at_variants.py")
    sys.path.insert(0, str(here))
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        own = study.fast_robust_config({"opnorm": {"warm_iters": 1}, "lam": 0.2})
        assert own["lam"] == 0.2 and own["opnorm"]["warm_iters"] == 1 and own["opnorm"]["output"] == "kl"
        mod.main(
            [
                "--tiny",
                "--variants",
                "warm-1",
                "--references",
                "fgsm-rs",
                "--out",
                str(tmp_path / "v" / "variants"),
                "--runs",
                str(tmp_path / "r"),
            ]
        )
    finally:
        sys.path.remove(str(here))
    table = json.loads((tmp_path / "v" / "variants" / "variants.json").read_text())
    assert set(table["variants"]) == {"warm-1", "fgsm-rs"}
    assert table["validation"] == "training images 256 to 295"
    rec = json.loads(
        (tmp_path / "v" / "variants" / "runs" / "eps-0.1" / "warm-1" / "seed-0" / "results.json").read_text()
    )
    assert rec["config"]["opnorm"]["warm_iters"] == 1 and rec["test_points"] == 40
    study.main(["--tiny", "--phase", "report", "--out", str(tmp_path / "v"), "--runs", str(tmp_path / "r")])
    text = (tmp_path / "v" / "report.md").read_text()
    assert "## Changes tried on the fast-robust configuration (validation: training images 256 to 295" in text
    assert "| warm-1: one warm iteration instead of two (cheaper) |" in text


def test_a_run_claimed_by_a_live_process_is_skipped_and_a_dead_claim_is_taken_over(tmp_path, study):
    import os
    import subprocess

    run = tmp_path / "eps-0.1" / "fgsm-rs" / "seed-0"
    lock = run.with_name("seed-0.claim")
    assert study.claim(run) and lock.read_text() == str(os.getpid())
    assert not study.claim(run)  # this live process holds it
    lock.unlink()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(str(dead.pid))  # a finished process's claim
    assert study.claim(run) and lock.read_text() == str(os.getpid())
    args = type("A", (), {"out": str(tmp_path / "out"), "runs": str(tmp_path)})()
    assert study.one_run("fgsm-rs", 0.1, 0, args, test=None) is None  # claimed: skipped before any training


def test_the_fgsm_step_and_no_penalty_methods_are_the_fast_robust_configuration_with_one_change(tmp_path, study):
    import argparse

    args = argparse.Namespace(epochs=3, train=100, epoch_points=10, replays=3, dataset="digits")
    base = study.method_config("opnorm-fast-robust", args, 0.1, 0, tmp_path / "a").to_dict()
    changed = study.method_config("opnorm-fast-robust-fgsm", args, 0.1, 0, tmp_path / "b").to_dict()
    assert changed["opnorm"]["warm_iters"] == 1 and changed["opnorm"]["step"] == 1.25
    assert base["opnorm"]["warm_iters"] == 2 and base["opnorm"]["step"] == 0.25
    differ = {k for k in base if base[k] != changed[k]} | {
        f"opnorm.{k}" for k in base["opnorm"] if base["opnorm"][k] != changed["opnorm"][k]
    }
    assert differ == {"out", "opnorm", "opnorm.warm_iters", "opnorm.step"}
    alone = study.method_config("opnorm-fast-robust-lam0", args, 0.1, 0, tmp_path / "c").to_dict()
    assert {k for k in base if base[k] != alone[k]} == {"out", "lam"} and alone["lam"] == 0.0


def test_variants_stop_with_one_line_when_another_process_holds_a_run(tmp_path, study):
    here = SCRIPT.parent
    spec = importlib.util.spec_from_file_location("fast_at_variants", here / "fast_at_variants.py")
    sys.path.insert(0, str(here))
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for name in ("warm-1", "fgsm-rs"):  # held by this (live) process: nothing trains
            assert mod.study.claim(tmp_path / "r" / "eps-0.1" / name / "seed-0")
        with pytest.raises(SystemExit, match="warm-1, fgsm-rs: another process is training them"):
            mod.main(
                [
                    "--tiny",
                    "--variants",
                    "warm-1",
                    "--references",
                    "fgsm-rs",
                    "--out",
                    str(tmp_path / "v"),
                    "--runs",
                    str(tmp_path / "r"),
                ]
            )
    finally:
        sys.path.remove(str(here))
    assert not (tmp_path / "v" / "variants.json").exists()
