"""`opnorm reproduce --quick` end to end: files, sections, seeds, JSON schema, sanity checks,
resuming from the runs directory; aggregation over seeds against numpy."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from opnorm.experiments.aggregate import aggregate, stat
from opnorm.experiments.findings import below
from opnorm.experiments.plots import PLOTS
from opnorm.experiments.reproduce import SCHEMA, run_reproduce
from opnorm.experiments.runs import Runs
from opnorm.experiments.study import parse_seeds, study_config

TIMING_KEYS = {
    "train_seconds",
    "time_vs_clean",
    "seconds_total",
    "cpu_seconds_total",
    "phase_seconds",
    "command",
    "runs_directory",
}  # what an invocation did, not what it measured
SECTIONS = [
    "Alignment vs singular-vector rank",
    "Alignment vs eps per trained model",
    "Spectra",
    "Deviation from linearity",
    "Robustness at matched clean accuracy",
    "Theorem check",
    "Sanity checks",
]
# two seeds (standard errors exist), every section, as small as the measurements allow
TINY = dict(
    seeds=[0, 1],
    epochs=1,
    limit_train=200,
    eval_points=16,
    align_points=8,
    spectrum_k=3,
    rank_k=3,
    theorem_steps=2,
    eps_grid_linf=[0.0, 0.1],
    eps_grid_l2=[0.0, 0.5],
    align_eps=[0.1, 1.0],
    linearity_radii=[0.1, 1.0],
    eval_steps=20,
    sweep_dd=[1.0, 10.0],
    sweep_snr=[1.0],
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    # one thread: two spinning threads only cost time on a shared machine; the numbers do not depend on it
    proc = subprocess.run(
        [sys.executable, "-m", "opnorm", "reproduce", "--quick", "--out", str(out), "--seeds", "0"],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
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


def test_files_sections_and_schema(quick_run):
    out, proc = quick_run
    assert len(PLOTS) >= 9
    for name in PLOTS.values():
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    r = json.loads((out / "results.json").read_text())
    assert r["schema"] == SCHEMA and r["seeds"] == [0]
    assert set(r["methods"]) >= {"clean", "pgd-at-linf", "pgd-at-l2", "logit-at", "opnorm", "global-snr"}
    for key, m in r["methods"].items():
        assert 0.1 < m["clean_acc"]["mean"] <= 1.0, key  # beats chance (10 classes)
        for norm in ("linf", "l2"):
            curve = m["robust"][norm]
            assert len(curve["eps"]) == len(curve["acc"]) >= 2 and curve["eps"][0] == 0.0
            assert curve["acc"][0]["mean"] == pytest.approx(m["clean_acc"]["mean"])
        assert [s["mean"] for s in m["spectrum"]] == sorted((s["mean"] for s in m["spectrum"]), reverse=True)
        assert all(0 <= c["mean"] <= 1 + 1e-9 for c in m["alignment"]["ce"] + m["alignment"]["logit"])
        assert len(m["linearity"]["adversarial"]["relative"]) == len(m["linearity"]["radii"])
    assert r["methods"]["clean"]["spectrum_ratio"][0]["mean"] == pytest.approx(1.0)
    assert r["matched"]["picked"]["opnorm"]["key"] in r["methods"]
    ra = r["rank_alignment"]
    assert set(ra) == {"clean", "random-init"} and len(ra["clean"]["ce"]) == ra["clean"]["k"]
    assert [f["id"] for f in r["findings"]] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    for f in r["findings"]:
        assert f["verdict"] in ("holds", "partly holds", "does not hold") and f["parts"] and f["numbers"]
        assert f["holds"] == all(p["holds"] for p in f["parts"])
        assert f["metric"] and f["models"] and f["source"] and "t-interval" in f["interval"]
    assert [f["claim_is"] for f in r["findings"]][-1] == "ours"  # the relative metric is labelled as ours
    matched = next(f for f in r["findings"] if f["id"] == 4)
    assert set(matched["bracketing_lambdas"]) == {"opnorm", "global-snr"}
    for key, m in r["methods"].items():  # the paper's metric, both directions, every model
        for direction in ("adversarial", "random"):
            dev = m["linearity"][direction]["penultimate_absolute"]
            assert len(dev) == len(m["linearity"]["radii"]) and all(d["mean"] >= 0 for d in dev), key
        assert len(m["rank_alignment"]["ce"]) == m["rank_alignment"]["k"], key
    for path, value in _finite_numbers({k: v for k, v in r.items() if k != "theorem"}):
        assert math.isfinite(value), path
    report = (out / "report.md").read_text()
    for title in SECTIONS:
        assert f"## {title}" in report, title
    cells = None  # every row of every table has its header's number of cells
    for line in report.splitlines():
        n = line.replace("\\|", "").count("|") if line.startswith("|") else None
        if n is None or cells is None:
            cells = n
        else:
            assert n == cells, line
    assert "Pearson" in report and "predicted label" in report
    assert 'The paper: "' not in report and "in our words" in report  # no paraphrase in quotation marks
    assert "penultimate layer" in report and "t-interval" in report
    assert "report:" in proc.stdout


def test_theorem_and_sanity_checks(quick_run):
    out, _ = quick_run
    r = json.loads((out / "results.json").read_text())
    small = [c for c in r["theorem"]["cases"] if c["eps"] <= 1e-5]
    assert small and all(c["inside_fraction"] >= 0.9 for c in small)
    assert max(max(c["iterate_gap_inside"]) for c in small) < 1e-6
    # the largest radius leaves the linear region, and the gap shows it: the check can fail
    large = max((c for c in r["theorem"]["cases"] if c["p"] == 2.0), key=lambda c: c["eps"])
    assert large["eps"] >= 0.3 and large["inside_fraction"] < 1.0 and max(large["iterate_gap"]) > 1e-2
    assert next(f for f in r["findings"] if f["id"] == 3)["holds"]
    names = [s["name"] for s in r["sanity"]]
    assert any("does not increase with eps" in n for n in names) and any("Square" in n for n in names)
    for s in r["sanity"]:
        assert s["holds"], s  # a failing sanity check means an attack or a model is broken
    # each model's sanity attacks are kept on disk (an interrupted phase resumes), one per model and attack
    kept = {p.name for p in (out / "runs" / "seed-0").glob("sanity-*.json")}
    for key in r["methods"]:
        assert f"sanity-stronger-{key}.json" in kept
    square = ["pgd-at-l2", *(m["key"] for m in r["matched"]["picked"].values())]
    for key in square:  # the black-box check attacks the matched comparison's models
        assert {f"sanity-square-l2-{key}.json", f"sanity-square-linf-{key}.json"} <= kept


def test_robust_accuracy_is_the_suites_worst_case(quick_run):
    """Every robust accuracy is the per-example worst case over CE-PGD and APGD-DLR: never above
    CE-PGD alone, named in the report, with the paper's 10-step targeted attack beside it."""
    out, _ = quick_run
    r = json.loads((out / "results.json").read_text())
    for key, m in r["methods"].items():
        assert "APGD-DLR" in m["robust_suite"] and "PGD-20" in m["robust_suite"], key
        for norm in ("l2", "linf"):
            worst, ce = m["robust"][norm]["acc"], m["robust"][norm]["pgd_ce"]
            assert all(w["mean"] <= c["mean"] + 1e-12 for w, c in zip(worst, ce)), key
            assert worst[0]["mean"] == ce[0]["mean"] == m["clean_acc"]["mean"]  # eps 0: clean
            assert 0 <= m["paper_attack_at_reference"][norm]["mean"] <= m["clean_acc"]["mean"]
    report = (out / "report.md").read_text()
    assert "per-example worst case over the suite PGD-20" in report and "Evaluation strength" in report
    assert "targeted at (y + 1) mod 10" in report


def test_compare_puts_two_arms_side_by_side(quick_run, tmp_path):
    """`opnorm compare` on two report directories: one row per finding with both verdicts, a
    finding whose verdict differs is marked as changing with the protocol, and the paper's eps
    rule is computed from each arm's clean model (here checked by hand on its l_2 curve)."""
    import shutil

    from opnorm.cli import main
    from opnorm.experiments.aggregate import mean
    from opnorm.experiments.arms import RULE_LEVEL, eps_rule

    out, _ = quick_run
    a, b = tmp_path / "default", tmp_path / "paper"
    for d in (a, b):
        d.mkdir()
        shutil.copy(out / "results.json", d / "results.json")
    r = json.loads((b / "results.json").read_text())
    flipped = r["findings"][0]
    flipped["verdict"] = "does not hold" if flipped["verdict"] != "does not hold" else "holds"
    (b / "results.json").write_text(json.dumps(r))
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "arms.md")]) == 0
    text = (tmp_path / "arms.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "|" in line}
    assert rows[str(flipped["id"])].rstrip(" |").endswith("yes")
    assert all(rows[str(f["id"])].rstrip(" |").endswith("no") for f in r["findings"][1:])
    curve = r["methods"]["clean"]["robust"]["l2"]
    want = next((e for e, acc in zip(curve["eps"], curve["acc"]) if e > 0 and mean(acc) <= RULE_LEVEL), None)
    assert eps_rule(r)["eps"] == want
    assert main(["compare", str(a), "--out", str(tmp_path / "one.md")]) == 1  # one arm: refused in one line


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


@pytest.mark.usefixtures("without_plots")
def test_two_seeds_resume_from_the_runs_directory(tmp_path):
    logs: list[str] = []
    a = run_reproduce(quick=True, out=str(tmp_path / "a"), runs=str(tmp_path / "runs"), log=logs.append, **TINY)
    assert a["seeds"] == [0, 1] and any("training" in line for line in logs)
    # the recorded command reruns this study: every option that changes it is in it
    assert a["config"]["command"].startswith(
        "opnorm reproduce --dataset digits --quick --seeds 0,1 --limit-train 200 "
        "--eval-points 16  (and run_reproduce overrides epochs=1, "
    )
    assert [p["lam"] for p in a["matched"]["sweeps"]["opnorm"]] == pytest.approx(
        [0.1, 1.0]
    )  # the sweep, main lambda 0.1
    m = a["methods"]["clean"]["clean_acc"]
    assert m["n"] == 2 and m["se"] == pytest.approx(np.std(m["values"], ddof=1) / np.sqrt(2))
    logs.clear()
    b = run_reproduce(quick=True, out=str(tmp_path / "b"), runs=str(tmp_path / "runs"), log=logs.append, **TINY)
    assert not any("training" in line for line in logs)  # nothing retrained: the runs directory was read
    assert a["runs_directory"]["models_trained"] > 0 and a["runs_directory"]["models_read"] == 0
    assert b["runs_directory"]["models_trained"] == 0 and b["runs_directory"]["measurements_computed"] == 0
    assert b["runs_directory"]["models_read"] == a["runs_directory"]["models_trained"]
    assert "read 0 from the runs directory" in (tmp_path / "a" / "report.md").read_text()
    assert _strip(a) == _strip(b)
    # a longer sweep reuses every finished run: runs are named by their own lambda, not by the sweep
    logs.clear()
    c = run_reproduce(
        quick=True,
        out=str(tmp_path / "c"),
        runs=str(tmp_path / "runs"),
        log=logs.append,
        **{**TINY, "sweep_dd": [1.0, 10.0, 30.0]},
    )
    trained = [line for line in logs if "training" in line]
    assert len(trained) == 2 and all("opnorm-lam3 " in line for line in trained), trained
    assert [p["lam"] for p in c["matched"]["sweeps"]["opnorm"]] == pytest.approx([0.1, 1.0, 3.0])
    with pytest.raises(ValueError, match="holds another study"):
        run_reproduce(
            quick=True, out=str(tmp_path / "d"), runs=str(tmp_path / "runs"), log=logs.append, **{**TINY, "lam": 0.5}
        )


@pytest.mark.usefixtures("without_plots")
def test_a_diverged_sweep_point_leaves_the_sweep_and_is_reported(tmp_path, monkeypatch):
    import opnorm.experiments.runs as runs  # the runs directory trains the models it lacks
    import opnorm.training.trainer as trainer

    real = trainer.train
    tiny = {**TINY, "seeds": [0], "sweep_dd": [1.0], "sweep_snr": [1.0, 10.0]}

    def train(cfg, **kw):  # the x10 global SNR point diverges; everything else trains for real
        if cfg.method == "global-snr" and cfg.lam > 0.05:
            raise trainer.TrainingDiverged(
                "training diverged (NaN/inf) at epoch 1, step 3: the loss (nan) became non-finite"
            )
        return real(cfg, **kw)

    monkeypatch.setattr(runs, "train", train)
    logs: list[str] = []
    a = run_reproduce(quick=True, out=str(tmp_path / "a"), runs=str(tmp_path / "runs"), log=logs.append, **tiny)
    assert [d["key"] for d in a["matched"]["diverged"]] == ["global-snr-lam0.1"] and a["matched"]["diverged"][0][
        "seeds"
    ] == [0]
    assert [p["key"] for p in a["matched"]["sweeps"]["global-snr"]] == ["global-snr"]
    assert "Left out of the sweep: `global-snr-lam0.1` (lambda 0.1)" in (tmp_path / "a" / "report.md").read_text()
    monkeypatch.setattr(runs, "train", real)  # a rerun reads the record: it neither retrains nor crashes
    logs.clear()
    b = run_reproduce(quick=True, out=str(tmp_path / "b"), runs=str(tmp_path / "runs"), log=logs.append, **tiny)
    assert not any("training" in line for line in logs) and b["matched"]["diverged"] == a["matched"]["diverged"]
    monkeypatch.setattr(runs, "train", lambda cfg, **kw: (_ for _ in ()).throw(trainer.TrainingDiverged("boom")))
    with pytest.raises(trainer.TrainingDiverged):  # a main method that diverges stops the study
        run_reproduce(quick=True, out=str(tmp_path / "c"), runs=str(tmp_path / "runs2"), log=logs.append, **tiny)


def test_stat_and_aggregate_against_numpy():
    vals = [0.5, 0.7, 0.9, 0.6]
    s = stat(vals)
    assert s["mean"] == pytest.approx(np.mean(vals)) and s["se"] == pytest.approx(np.std(vals, ddof=1) / 2)
    assert stat([0.3])["se"] is None and stat([float("nan"), 1.0])["n"] == 1
    agg = aggregate(
        [{"a": [1.0, 2.0], "eps": [0.1, 0.2], "label": "x"}, {"a": [3.0, 4.0], "eps": [0.1, 0.2], "label": "x"}]
    )
    assert agg["eps"] == [0.1, 0.2] and agg["label"] == "x" and agg["a"][1]["mean"] == 3.0
    with pytest.raises(ValueError, match="different"):
        aggregate([{"a": 1.0}, {"b": 1.0}])
    # the margin: the 95 % t-interval of the per-seed difference (t = 12.71 with 2 seeds)
    assert below(stat([0.1, 0.1]), stat([0.9, 0.9])) and not below(stat([0.1, 0.5]), stat([0.4, 0.6]))
    # d = (0.2, 0.25, 0.3): mean 0.25, se 0.0289, t_2 = 4.303: half-width 0.124 < 0.25; 2 se would also pass
    assert below(stat([0.5, 0.5, 0.5]), stat([0.7, 0.75, 0.8]))
    # d = (0.05, 0.1, 0.0): mean 0.05, se 0.0289: two standard errors (0.058) would nearly pass it, t (0.124) does not
    assert not below(stat([0.5, 0.5, 0.5]), stat([0.55, 0.6, 0.5]))


def test_seeds_and_config_errors(tmp_path):
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("", "0,a", "-1"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)
    with pytest.raises(ValueError, match="distinct"):
        study_config("digits", seeds=[0, 0])
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="dlr_batch must be an int >= 1"):
            study_config("digits", dlr_batch=bad)
    with pytest.raises(ValueError, match="p 2 and q 2"):
        study_config(train_config={"dataset": "digits", "p": "inf"})
    cfg = study_config(
        train_config={
            "dataset": "digits",
            "eps": 0.7,
            "lam": 0.3,
            "optimizer": "rmsprop",
            "lr": 1e-3,
            "method": "opnorm",
            "opnorm": {"iters": 4},
        }
    )
    assert (cfg.eps_l2, cfg.lam, cfg.lr, cfg.train, cfg.power_iters) == (0.7, 0.3, 1e-3, {"optimizer": "rmsprop"}, 4)
    Runs(tmp_path / "r", {"x": 1})
    with pytest.raises(ValueError, match="differs in x"):
        Runs(tmp_path / "r", {"x": 2})


def test_jobs_give_the_same_study_as_one_process(tmp_path, monkeypatch):
    """--jobs 2: the runs are trained and measured by two worker processes (one thread each, as
    this process here), the report's numbers are those of one process, and the counts say what
    this invocation trained and computed."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned workers compute with one thread, as does this test
    torch_threads = __import__("torch").get_num_threads()
    __import__("torch").set_num_threads(1)
    try:
        tiny = {**TINY, "seeds": [0]}  # the methods of one seed run side by side already
        with monkeypatch.context() as m:  # the numbers are compared; the plots are drawn by the workers below
            m.setattr("opnorm.experiments.reproduce.write_plots", lambda results, out, mapper=map: {})
            one = run_reproduce(quick=True, out=str(tmp_path / "one"), log=lambda _: None, **tiny)
        two = run_reproduce(quick=True, out=str(tmp_path / "two"), log=lambda _: None, jobs=2, **tiny)
    finally:
        __import__("torch").set_num_threads(torch_threads)
    same = {"runs_directory": one["runs_directory"], "train_seconds_all_models": one["train_seconds_all_models"]}
    assert _strip(one) == _strip({**two, **same})
    for key in ("models_trained", "measurements_computed"):
        assert two["runs_directory"][key] == one["runs_directory"][key] > 0
    assert two["runs_directory"]["models_read"] == one["runs_directory"]["models_read"] == 0
    for name in PLOTS.values():  # drawn by the worker pool
        assert (tmp_path / "two" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    with pytest.raises(ValueError, match="jobs must be"):
        run_reproduce(quick=True, out=str(tmp_path / "bad"), log=lambda _: None, jobs=0, **tiny)
