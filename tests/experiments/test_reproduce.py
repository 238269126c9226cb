"""`opnorm reproduce --quick` end to end: files, JSON schema, enforced sanity checks."""

import json
import math
import subprocess
import sys

import pytest

from opnorm.experiments.report import PLOTS
from opnorm.experiments.reproduce import SCHEMA, run_reproduce

TIMING_KEYS = {"train_seconds", "time_vs_clean", "seconds_total", "phase_seconds", "command"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    proc = subprocess.run(
        [sys.executable, "-m", "opnorm", "reproduce", "--quick", "--out", str(out), "--seed", "0"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def _finite_numbers(obj, path="results"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        yield path, obj


def test_files_and_schema(quick_run):
    out, proc = quick_run
    assert (out / "report.md").is_file() and (out / "results.json").is_file()
    for name in PLOTS.values():
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    r = json.loads((out / "results.json").read_text())
    assert r["schema"] == SCHEMA
    assert set(r) >= {"config", "environment", "methods", "alignment", "agreement", "alignment_raw", "agreement_raw", "theorem", "sanity", "findings", "seconds_total"}
    assert set(r["methods"]) == {"clean", "pgd-at-linf", "pgd-at-l2", "logit-at", "opnorm", "opnorm-fast", "global-snr"}
    for key, m in r["methods"].items():
        assert 0.1 < m["clean_acc"] <= 1.0, key  # beats chance (10 classes)
        for norm in ("linf", "l2"):
            curve = m["robust"][norm]
            assert len(curve["eps"]) == len(curve["acc"]) >= 2 and curve["eps"][0] == 0.0
            assert curve["acc"][0] == pytest.approx(m["clean_acc"])
            assert all(0.0 <= a <= 1.0 for a in curve["acc"])
        assert m["time_vs_clean"] > 0 and len(m["spectrum"]) == r["config"]["spectrum_k"]
        assert m["spectrum"] == sorted(m["spectrum"], reverse=True)
    assert r["config"]["eval_steps"] >= 20 and r["config"]["eval_restarts"] >= 2
    assert r["config"]["eval_schedule"] == "halving"
    for loss in ("logit", "logit_finite", "ce"):
        assert all(0.0 <= c <= 1.0 + 1e-9 for c in r["alignment"][loss]["mean"])
    assert 0.0 <= r["alignment"]["random"]["mean"] <= 1.0
    for f in r["findings"]:  # a finding split by loss or method holds only when every part does
        if "parts" in f:
            assert f["parts"] and f["holds"] == all(q["holds"] for q in f["parts"])
    assert [f["id"] for f in r["findings"]] == [1, 2, 3, 4, 5]
    assert all(isinstance(f["holds"], bool) and f["numbers"] for f in r["findings"])
    for path, value in _finite_numbers({k: v for k, v in r.items() if k != "theorem"}):
        assert math.isfinite(value), path
    report = (out / "report.md").read_text()
    for f in r["findings"]:  # the report states every finding with its verdict
        assert f["claim"].replace("|", "\\|") in report  # a literal "|" (|cos|) is escaped in table cells
    cells = None  # every row of every table has its header's number of cells
    for line in report.splitlines():
        n = line.replace("\\|", "").count("|") if line.startswith("|") else None
        if n is None or cells is None:
            cells = n
        else:
            assert n == cells, line
    assert ("does not hold" in report) or all(x["holds"] for x in r["findings"])
    assert "report:" in proc.stdout


def test_theorem_holds_at_jittered_points(quick_run):
    """Digits images sit on region boundaries (max-pool ties); the jittered analysis points do not,
    so at the smallest eps every point stays inside its region and the iterates agree to float error."""
    out, _ = quick_run
    r = json.loads((out / "results.json").read_text())
    assert r["theorem"]["jitter"] > 0
    small = [c for c in r["theorem"]["cases"] if c["eps"] <= 1e-5]
    assert small and all(c["inside_fraction"] >= 0.9 for c in small)
    assert max(max(c["iterate_gap_inside"]) for c in small) < 1e-6
    assert next(f for f in r["findings"] if f["id"] == 2)["holds"]


def test_sanity_checks_enforced(quick_run):
    out, _ = quick_run
    r = json.loads((out / "results.json").read_text())
    names = [s["name"] for s in r["sanity"]]
    assert any("does not increase with eps" in n for n in names)
    assert any("clean accuracy >= robust" in n for n in names)
    assert any("restarts do not raise" in n for n in names)
    assert any("APGD" in n for n in names)
    for s in r["sanity"]:
        assert s["holds"], s  # a failing sanity check means an attack or a model is broken
    # the numbers behind the first two, re-checked here from the curves themselves
    for m in r["methods"].values():
        for norm in ("linf", "l2"):
            acc = m["robust"][norm]["acc"]
            tol = max(r["config"]["noise_points"] / 100, 1 / r["config"]["eval_points"])
            assert all(b <= a + tol for a, b in zip(acc, acc[1:]))
            assert all(a <= m["clean_acc"] + 1e-12 for a in acc)


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def test_rerun_with_same_seed_gives_same_numbers(tmp_path):
    tiny = dict(
        epochs=1, limit_train=200, eval_points=16, align_points=8, spectrum_k=3, theorem_steps=2,
        eps_grid_linf=[0.0, 0.1], eps_grid_l2=[0.0, 0.5], align_eps=[0.1], eval_steps=20,
    )
    a = run_reproduce(quick=True, out=str(tmp_path / "a"), seed=3, log=lambda s: None, **tiny)
    b = run_reproduce(quick=True, out=str(tmp_path / "b"), seed=3, log=lambda s: None, **tiny)
    assert _strip(a) == _strip(b)


def test_method_table_builds_the_intended_training_configs():
    """Every method of the study is a valid TrainConfig; the two opnorm rows are the paper
    configuration (power_iters iterations) and the fast one, both at the logit-loss scale."""
    from opnorm.experiments.reproduce import method_table, study_config
    from opnorm.training.config import TrainConfig

    study = study_config("digits", quick=True)
    cfgs = {key: TrainConfig(dataset="digits").replace(**kw).resolved() for key, _, _, kw in method_table(study)}
    paper, fast = cfgs["opnorm"].opnorm, cfgs["opnorm-fast"].opnorm
    assert (paper.mode, paper.iters, paper.scale_by_eps) == ("paper", study.power_iters, True)
    assert (fast.mode, fast.iters, fast.warm_iters, fast.scale_by_eps) == ("fast", 3, 1, True)
