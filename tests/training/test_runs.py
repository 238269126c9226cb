"""Run directories that lose nothing and say what is wrong.

Resume keeps the run's trajectory (only ``RESUMABLE`` settings may change; more epochs
continue a falling learning rate), divergence stops at once, every file read back is
verified, one process writes a run, the checkpoint precedes its metrics line, files follow
the umask and are synced, exported weights are byte-reproducible, and every CLI error is
one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import opnorm.cli as cli
from opnorm.cli import main
from opnorm.training.checkpoint import CheckpointError, export_weights, load_checkpoint
from opnorm.training.config import TrainConfig, check_resume, flat_settings
from opnorm.training.files import RunLock, RunLockedError
from opnorm.training.models import build_model
from opnorm.training.schedule import learning_rate
from opnorm.training.trainer import CHECKPOINT, CONFIG, METRICS, WEIGHTS, TrainingDiverged, train

from .cli_helpers import SMALL, SMALL_CFG, one_line_error, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """A finished 2-epoch clean run made through the CLI (copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs") / "r"
    assert main(["train", "--epochs", "2", "--out", str(out), *SMALL]) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def lrs(run: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in (run / METRICS).read_text().splitlines()]


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"}


# ----------------------------------------------------------------------------- 1. extending a run


def test_extending_a_run_never_raises_the_learning_rate(run2, tmp_path, capsys):
    run = copy_of(run2, tmp_path)
    code, out, err = run_main(["train", "--out", str(run), "--resume", "--epochs", "4"], capsys)
    assert code == 0, err
    rates = lrs(run)
    assert len(rates) == 4 and all(b < a for a, b in zip(rates, rates[1:])), rates  # was 0.05, 0.025, 0.0, 0.025
    assert rates[2] == pytest.approx(0.025 * (1 + math.cos(math.pi / 3)) / 2)  # from 0.025 toward 0 over 2 + 1
    cfg = flat_settings(json.loads((run / CONFIG).read_text()))
    assert cfg["epochs"] == 4 and cfg["schedule_extensions"] == [{"epoch": 2, "replaced_epochs": 2}]
    lines = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    assert [m["lr_schedule"] for m in lines] == [
        "cosine",
        "cosine",
        "cosine, continued from epoch 2",
        "cosine, continued from epoch 2",
    ]
    # the config file re-runs the extended run: same learning rates, same weights
    again = tmp_path / "again"
    code, _, err = run_main(["train", "--config", str(run / CONFIG), "--out", str(again), "--quiet"], capsys)
    assert code == 0, err
    assert lrs(again) == rates
    a, b = load_checkpoint(run / CHECKPOINT)["model"], load_checkpoint(again / CHECKPOINT)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cosine_schedule_matches_torch_and_continues_without_rising():
    cfg = TrainConfig(epochs=7, lr=0.1).resolved()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)
    for e in range(7):  # the reference: torch's scheduler, stepped per epoch
        assert learning_rate(cfg, e) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()
    # stopped after 3 of 7 epochs, extended to 10, then after 6 to 12
    ext = [{"epoch": 3, "replaced_epochs": 7}, {"epoch": 6, "replaced_epochs": 10}]
    cfg = TrainConfig(epochs=12, lr=0.1, schedule_extensions=ext).resolved()
    rates = [learning_rate(cfg, e) for e in range(12)]
    assert rates[:3] == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 7)) / 2 for e in range(3)])
    assert rates[3] == pytest.approx(rates[2] * (1 + math.cos(math.pi / 8)) / 2)  # 1 of 10 - 3 + 1 steps
    assert all(b < a for a, b in zip(rates, rates[1:])) and rates[-1] > 0
    with pytest.raises(ValueError, match="schedule_extensions end at epoch 6 but epochs is 6"):
        TrainConfig(epochs=6, schedule_extensions=ext).resolved()


def test_extending_needs_more_epochs_than_done(run2, tmp_path, capsys):
    run = copy_of(run2, tmp_path)
    before = snapshot(run)
    code, _, err = run_main(["train", "--out", str(run), "--resume", "--epochs", "1"], capsys)
    one_line_error(code, err, "completed 2 epochs", "--epochs larger")
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- 2. changed settings


@pytest.mark.parametrize(
    "flag,value,key",
    [
        ("--lr", "0.5", "lr"),
        ("--seed", "1", "seed"),
        ("--batch-size", "16", "batch_size"),
        ("--eps", "0.2", "eps"),
        ("--steps", "2", "steps"),
        ("--p", "inf", "p"),
        ("--method", "opnorm", "method"),
        ("--scheduler", "none", "scheduler"),
        ("--limit-train", "64", "limit_train"),
        ("--opnorm-step", "0.5", "opnorm.step"),
    ],
)
def test_resume_refuses_a_changed_trajectory_setting(run2, tmp_path, capsys, flag, value, key):
    run = copy_of(run2, tmp_path)
    before = snapshot(run)
    code, _, err = run_main(["train", "--out", str(run), "--resume", flag, value], capsys)
    line = one_line_error(code, err, f"cannot resume {run} with {key}=", "--config", "config.json", "--out")
    assert "Traceback" not in err and "KeyError" not in line
    assert snapshot(run) == before  # config.json still describes the run


def test_resume_accepts_the_settings_that_do_not_shape_training(run2, tmp_path, capsys):
    run = copy_of(run2, tmp_path)
    code, _, err = run_main(
        [
            "train",
            "--out",
            str(run),
            "--resume",
            "--epochs",
            "3",
            "--eval-points",
            "5",
            "--eval-steps",
            "1",
            "--num-workers",
            "0",
            "--on-nan",
            "skip",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    cfg = flat_settings(json.loads((run / CONFIG).read_text()))
    assert cfg["eval_points"] == 5 and cfg["on_nan"] == "skip" and cfg["epochs"] == 3
    # the Python API: a dict names only what changes; a complete TrainConfig must match the run
    res = train({"out": str(run), "epochs": 4}, resume=True)
    assert res.completed and len(res.history) == 4
    with pytest.raises(ValueError, match="with momentum=0.5: the run was trained with momentum=0.9"):
        train({"out": str(run), "momentum": 0.5}, resume=True)


def test_check_resume_names_nested_settings():
    old = {"lr": 0.05, "epochs": 2, "opnorm": {"step": None, "iters": 3}, "device": "cpu"}
    check_resume(old, {**old, "epochs": 9, "device": "cuda"}, "runs/a")
    with pytest.raises(ValueError, match=r"cannot resume runs/a with opnorm.step=0.5: .*opnorm.step=None") as info:
        check_resume(old, {**old, "opnorm": {"step": 0.5, "iters": 3}}, "runs/a")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"with opnorm.extra=1: the run was trained with opnorm.extra=\(not set\)"):
        check_resume(old, {**old, "opnorm": {"step": None, "iters": 3, "extra": 1}}, "runs/a")


# ----------------------------------------------------------------------------- 3. divergence


def test_a_diverging_run_exits_with_one_line(tmp_path):
    out = tmp_path / "nan"
    proc = subprocess.run(
        [sys.executable, "-m", "opnorm", "train", "--lr", "10000", "--epochs", "1", "--out", str(out), *SMALL],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "NaN" in proc.stderr and "diverged (NaN/inf) at epoch 1, step" in proc.stderr
    assert not (out / CHECKPOINT).exists() and (out / METRICS).read_text() == ""


def test_a_diverging_global_snr_run_names_lam():
    from opnorm.training.trainer import TrainingDiverged

    cfg = TrainConfig(
        method="global-snr", lam=1e8, epochs=1, limit_train=256, batch_size=32, eval_points=8, progress=False
    )
    with pytest.raises(
        TrainingDiverged, match=r"lower --lam \(global SNR with lam 1e\+08 and momentum 0.9 overshoots\)"
    ):
        train(cfg)


def _poison(monkeypatch, bad_calls):
    """Make the objective's loss NaN on the given (1-based) calls."""
    from opnorm.training import trainer as T

    original, calls = T.Objective.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss, logs = original(self, *args, **kwargs)
        return (loss * float("nan") if calls["n"] in bad_calls else loss), logs

    monkeypatch.setattr(T.Objective, "forward", forward)


def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = TrainConfig(method="clean", epochs=3, out=str(tmp_path / "r"), **SMALL_CFG)
    _poison(monkeypatch, {5})  # 3 batches per epoch: epoch 2, step 2
    with pytest.raises(TrainingDiverged) as info:
        train(cfg)
    msg = str(info.value)
    assert "epoch 2, step 2" in msg and "loss (nan)" in msg and "still holds epoch 1" in msg and "\n" not in msg
    assert load_checkpoint(tmp_path / "r" / CHECKPOINT)["epoch"] == 1
    assert len((tmp_path / "r" / METRICS).read_text().splitlines()) == 1


def test_non_finite_weights_stop_the_run(tmp_path, monkeypatch):
    real_step = torch.optim.SGD.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(TrainingDiverged, match="epoch 1, step 2: the weights became non-finite"):
        train(TrainConfig(method="clean", epochs=1, **SMALL_CFG))


def test_the_finite_check_accepts_state_that_is_not_tensors(tmp_path):
    # the opnorm objective's state holds more than tensors (the direction store's records)
    res = train(TrainConfig(method="opnorm", p="inf", eps=0.1, epochs=1, out=str(tmp_path / "r"), **SMALL_CFG))
    assert res.completed and load_checkpoint(tmp_path / "r" / CHECKPOINT)["objective"]


# one entry of the objective's state made NaN after the epoch's last step, where only the
# state check can see it: the direction store (l_2: float directions), free AT's carried delta
# (inside the state's extra dict) and the global SNR regularizer's power-iteration vector
POISON = {
    "store": (dict(method="opnorm", p=2, eps=0.5), lambda o: o.reg.store.directions),
    "free-delta": (dict(method="free", replays=1), lambda o: o.at.delta),
    "snr-vector": (dict(method="global-snr"), lambda o: o.reg.u_0),
}


@pytest.mark.parametrize("part", sorted(POISON))
def test_the_finite_check_reads_the_objectives_state(tmp_path, monkeypatch, part):
    from opnorm.training import trainer as T

    settings, tensor_of = POISON[part]
    real_sync = T.Objective.sync

    def sync(self):
        real_sync(self)
        with torch.no_grad():
            tensor_of(self).view(-1)[0] = float("nan")

    monkeypatch.setattr(T.Objective, "sync", sync)
    with pytest.raises(TrainingDiverged, match="step 3: the model's or the regularizer's state became non-finite"):
        train(TrainConfig(epochs=1, out=str(tmp_path / "r"), **settings, **SMALL_CFG))
    assert not (tmp_path / "r" / CHECKPOINT).exists()  # nothing non-finite was saved


def test_on_nan_skip_skips_the_batch_and_counts_it(tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 4})
    res = train(TrainConfig(method="clean", epochs=2, on_nan="skip", **SMALL_CFG))
    assert [m["skipped_batches"] for m in res.history] == [1, 1]
    assert all(torch.isfinite(p).all() for p in res.model.parameters()) and math.isfinite(res.metrics["loss"])


# ----------------------------------------------------------------------------- 4. integrity


def flip(path: Path, n: int = 4) -> None:
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[len(data) // 2 + 97 * i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_flipped_bytes_is_refused(run2, tmp_path, capsys):
    run = copy_of(run2, tmp_path)
    flip(run / CHECKPOINT)
    torch.load(run / CHECKPOINT, weights_only=True)  # torch itself does not notice
    for argv in (
        ["eval", "--checkpoint", str(run), "--limit", "5"],
        ["train", "--out", str(run), "--resume", "--epochs", "3"],
    ):
        code, _, err = run_main(argv, capsys)
        one_line_error(code, err, f"checkpoint {run / CHECKPOINT} is corrupt", "sha256")
    (run / (CHECKPOINT + ".sha256")).unlink()
    code, _, err = run_main(["eval", "--checkpoint", str(run), "--limit", "5"], capsys)
    one_line_error(code, err, "no checksum file checkpoint.pt.sha256")


def test_a_weights_file_with_flipped_bytes_is_refused(run2, tmp_path):
    run = copy_of(run2, tmp_path)
    flip(run / WEIGHTS)
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(CheckpointError, match="weights file .*model.safetensors is corrupt"):
        opnorm_load_weights(model, run / WEIGHTS)


def opnorm_load_weights(model, path):
    from opnorm.training.checkpoint import load_weights

    return load_weights(model, path)


def test_resume_removes_stale_temporary_files(tmp_path):
    cfg = TrainConfig(method="clean", epochs=2, out=str(tmp_path / "r"), **SMALL_CFG)
    train(cfg, stop_after=1)
    stale = [
        tmp_path / "r" / name
        for name in (".checkpoint.pt.k1l2.tmp", ".metrics.jsonl.x9.tmp", ".checkpoint.pt.sha256.q.tmp")
    ]
    for p in stale:
        p.write_bytes(b"half a file")
    mine = tmp_path / "r" / ".notes.tmp"  # not a name opnorm writes: left alone
    mine.write_text("keep")
    train(cfg, resume=True)
    assert not any(p.exists() for p in stale) and mine.exists()


# ----------------------------------------------------------------------------- 5. one writer


def test_a_second_writer_is_refused_and_a_dead_holder_frees_the_run(run2, tmp_path, capsys):
    run, fresh = copy_of(run2, tmp_path), tmp_path / "fresh"  # fresh: a new run still in its first epoch
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from opnorm.training.files import RunLock\n"
            f"with RunLock({str(run)!r}), RunLock({str(fresh)!r}):\n    print('locked', flush=True); time.sleep(300)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_main(["train", "--out", str(run), "--resume", "--epochs", "3"], capsys)
        one_line_error(code, err, f"run directory {run} is in use by process {holder.pid}")
        with pytest.raises(RunLockedError, match=str(holder.pid)):
            train({"out": str(run), "epochs": 3}, resume=True)
        with pytest.raises(RunLockedError):  # a second new run into the same directory, too
            train(TrainConfig(method="clean", epochs=1, out=str(fresh), **SMALL_CFG))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(run):  # the kernel released the dead process's lock
        pass


# ----------------------------------------------------------------------------- 6. one-line errors


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    code, _, err = run_main(["train", "--out", str(target), *SMALL], capsys)
    one_line_error(code, err, f"--out {target} is a file")
    code, _, err = run_main(["train", "--out", str(target), "--resume"], capsys)
    one_line_error(code, err, f"--out {target} is a file")
    assert target.read_text() == "x"


def test_unexpected_errors_are_one_line_unless_debugging(monkeypatch, capsys):
    def boom(args):
        raise KeyError("lr_lambdas")

    monkeypatch.setattr(cli, "cmd_demo", boom)
    code, _, err = run_main(["demo"], capsys)
    one_line_error(code, err, "KeyError", "lr_lambdas", "--debug")
    assert "Traceback" not in err
    for argv in (["demo", "--debug"], ["--debug", "demo"]):
        with pytest.raises(KeyError):
            main(argv)
    monkeypatch.setenv("OPNORM_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["demo"])


def test_reproduce_accepts_the_dataset_spellings_train_accepts(monkeypatch, capsys, tmp_path):
    seen = []
    monkeypatch.setattr(cli, "run_reproduce", lambda **kw: seen.append(kw))
    for spelling in ("DIGITS", "Fashion_MNIST"):
        assert main(["reproduce", "--dataset", spelling, "--quick", "--out", str(tmp_path)]) == 0
    assert [kw["dataset"] for kw in seen] == ["digits", "fashion-mnist"]
    assert TrainConfig(dataset="Fashion_MNIST").resolved().dataset == "fashion-mnist"
    code, _, err = run_main(["reproduce", "--dataset", "svhn"], capsys)
    one_line_error(code, err, "unknown dataset 'svhn'")


def test_inputs_without_a_batch_dimension_and_labels_past_the_logits_are_refused():
    import opnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    with pytest.raises(ValueError, match=r"got shape \(16,\); for a single example use x\[None\]"):
        opnorm.operator_norm(net, torch.rand(16), 2, 2)
    with pytest.raises(ValueError, match=r"got shape \(16,\)"):
        opnorm.pgd(net, torch.rand(16), torch.tensor([0]), eps=0.1, p=2)
    x = torch.rand(2, 16)
    with pytest.raises(ValueError, match=r"labels in \[1, 3\] but the model has 3 logits"):
        opnorm.pgd(net, x, torch.tensor([1, 3]), eps=0.1, p=2)
    with pytest.raises(ValueError, match=r"labels in \[-1, 0\]"):
        opnorm.pgd(net, x, torch.tensor([-1, 0]), eps=0.1, p=2, loss="cw")
    from opnorm.power import operator_norm_of_matrix
    from opnorm.training.trainer import accuracy

    with pytest.raises(ValueError, match="3 logits"):
        accuracy(net, x, torch.tensor([0, 7]))
    for bad, err in ((-1, ValueError), (40, ValueError), (2.5, ValueError), (True, TypeError), ("x", ValueError)):
        with pytest.raises(err, match="max_enumerate"):
            opnorm.operator_norm(net, x, "inf", 2, max_enumerate=bad)
        with pytest.raises(err, match="max_enumerate"):
            operator_norm_of_matrix(torch.rand(2, 3, 4), "inf", 2, max_enumerate=bad)


# ----------------------------------------------------------------------------- 7. order, modes, bytes


def test_the_checkpoint_is_written_before_its_metrics_line(tmp_path, monkeypatch):
    from opnorm.training import run_dir as R

    real, calls = R.save_checkpoint, {"n": 0}

    def dies_on_the_second(path, state):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed while saving epoch 2
        return real(path, state)

    monkeypatch.setattr(R, "save_checkpoint", dies_on_the_second)
    cfg = TrainConfig(method="clean", epochs=3, out=str(tmp_path / "r"), **SMALL_CFG)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    lines = (tmp_path / "r" / METRICS).read_text().splitlines()
    assert (
        [json.loads(line)["epoch"] for line in lines] == [load_checkpoint(tmp_path / "r" / CHECKPOINT)["epoch"]] == [1]
    )


def test_run_files_follow_the_umask_and_are_synced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        link = f"/proc/self/fd/{fd}"
        synced.append(os.path.basename(os.readlink(link)) if os.path.exists(link) else "?")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    old = os.umask(0o027)
    try:
        train(TrainConfig(method="clean", epochs=1, out=str(tmp_path / "r"), **SMALL_CFG))
    finally:
        os.umask(old)
    for name in (CONFIG, METRICS, CHECKPOINT, WEIGHTS, CHECKPOINT + ".sha256"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == 0o640, name
    if os.path.exists("/proc/self/fd"):
        for name in (CONFIG, METRICS, CHECKPOINT, WEIGHTS):
            assert any(s.startswith(f".{name}.") for s in synced), (name, synced)


def test_exported_weights_are_byte_identical(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10)
    meta = {"model": "cnn", "dataset": "digits", "method": "clean", "seed": "0", "note": "x"}
    digests = set()
    for i in range(6):  # the header's metadata used to come out in hash order, differing call to call
        export_weights(model, tmp_path / f"w{i}.safetensors", meta)
        digests.add(hashlib.sha256((tmp_path / f"w{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    a = train(TrainConfig(method="clean", epochs=1, out=str(tmp_path / "a"), **SMALL_CFG))
    b = train(TrainConfig(method="clean", epochs=1, out=str(tmp_path / "b"), **SMALL_CFG))
    da, db = ((r.run_dir / WEIGHTS).read_bytes() for r in (a, b))
    assert hashlib.sha256(da).hexdigest() == hashlib.sha256(db).hexdigest()
    assert (a.run_dir / (WEIGHTS + ".sha256")).read_text().split()[0] == hashlib.sha256(da).hexdigest()
