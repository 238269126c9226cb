"""Run directories that cannot be turned against their user, resumes that cannot drift, faults
that keep the epoch, and errors that name what was wrong.

Every case runs the CLI (or ``train``) as a careless or hostile user would: a symbolic link or
a hard link planted in a run directory, an empty ``--out``, a resume under another world size
or on other data, a check that fails after an epoch, a damaged file in reproduce's runs
directory. The victim file of each link is compared byte for byte after the run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from opnorm.experiments.runs import Runs
from opnorm.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from opnorm.training.config import TrainConfig
from opnorm.training.data import load_dataset
from opnorm.training.files import RunLockedError, UnsafePathError, atomic_write, read_json, read_json_object
from opnorm.training.trainer import CHECKPOINT, CONFIG, METRICS, EpochCheckFailed, train

from .cli_helpers import SMALL, SMALL_CFG, one_line_error, run_main
from .test_data import IDX_NAMES, idx_bytes, write_idx_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

PRECIOUS = b"precious\n"


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    """A 1-epoch clean run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs") / "r"
    train(TrainConfig(method="clean", epochs=1, out=str(out), **SMALL_CFG))
    return out


def copy_of(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    v.write_bytes(PRECIOUS)
    return v


def plant_link(run: Path, name: str, target: Path) -> Path:
    link = run / name
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target)
    return link


# ----------------------------------------------------------------------------- nothing followed outside


@pytest.mark.parametrize("name", [".lock", CHECKPOINT, CHECKPOINT + ".sha256", METRICS, CONFIG])
def test_a_link_in_a_run_directory_is_refused_and_its_target_unchanged(run1, tmp_path, capsys, name):
    target = victim(tmp_path)
    run = copy_of(run1, tmp_path)
    plant_link(run, name, target)
    code, _, err = run_main(["train", "--out", str(run), "--resume", "--epochs", "2"], capsys)
    one_line_error(code, err, f"{run / name} is a symbolic link", "remove the link")
    assert target.read_bytes() == PRECIOUS
    fresh = tmp_path / "fresh"  # a new run into a directory holding only the link
    fresh.mkdir()
    plant_link(fresh, name, target)
    code, _, err = run_main(["train", "--out", str(fresh), "--epochs", "1", *SMALL], capsys)
    one_line_error(code, err, "is a symbolic link")
    assert target.read_bytes() == PRECIOUS and os.listdir(fresh) == [name]  # refused before writing anything


def test_a_hard_linked_lock_file_is_refused(run1, tmp_path, capsys):
    target = victim(tmp_path)
    run = copy_of(run1, tmp_path)
    (run / ".lock").unlink(missing_ok=True)
    os.link(target, run / ".lock")
    code, _, err = run_main(["train", "--out", str(run), "--resume", "--epochs", "2"], capsys)
    one_line_error(code, err, f"lock file {run / '.lock'} is not a plain file of its own")
    assert target.read_bytes() == PRECIOUS


def test_a_link_named_as_a_temp_file_is_removed_never_followed(run1, tmp_path):
    target = victim(tmp_path)
    run = copy_of(run1, tmp_path)
    links = [
        plant_link(run, n, target)
        for n in (
            ".checkpoint.pt.x1.tmp",
            ".metrics.jsonl.x2.tmp",
            ".config.json.x3.tmp",
            ".checkpoint.pt.sha256.x4.tmp",
        )
    ]
    res = train({"out": str(run), "epochs": 2}, resume=True)
    assert res.completed and target.read_bytes() == PRECIOUS
    assert not any(p.is_symlink() for p in links)


def test_a_directory_named_as_a_temp_file_does_not_block_a_resume(run1, tmp_path):
    run = copy_of(run1, tmp_path)
    (run / ".checkpoint.pt.blocker.tmp").mkdir()
    assert train({"out": str(run), "epochs": 2}, resume=True).completed


def test_atomic_writes_refuse_a_link(tmp_path):
    target = victim(tmp_path)
    (tmp_path / "out.json").symlink_to(target)
    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        atomic_write(tmp_path / "out.json", b"{}")
    assert target.read_bytes() == PRECIOUS


@pytest.mark.parametrize("where", ["default", "prefix"])
def test_eval_outputs_refuse_a_link(run1, tmp_path, capsys, where):
    target = victim(tmp_path)
    run = copy_of(run1, tmp_path)
    args = ["eval", "--checkpoint", str(run), "--eps", "0.1", "--steps", "2", "--limit", "8", "--device", "cpu"]
    if where == "default":
        link = plant_link(run, "eval-pgd-p2-eps0.1-lossce-n8-seed0.json", target)
    else:
        args += ["--out", str(tmp_path / "mine")]
        link = plant_link(tmp_path, "mine.csv", target)
    code, _, err = run_main(args, capsys)
    one_line_error(code, err, f"{link} is a symbolic link")
    assert target.read_bytes() == PRECIOUS


# ----------------------------------------------------------------------------- --out that is no directory


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_out_is_refused_and_the_current_directory_untouched(tmp_path, monkeypatch, capsys, value):
    monkeypatch.chdir(tmp_path)
    (tmp_path / CONFIG).write_text('{"mine": 1}\n')
    (tmp_path / METRICS).write_text("mine\n")
    before = sorted(os.listdir(tmp_path))
    code, _, err = run_main(["train", "--out", value, "--epochs", "1", *SMALL], capsys)
    one_line_error(code, err, "--out is empty")
    code, _, err = run_main(["train", "--out", value, "--resume"], capsys)
    one_line_error(code, err, "--out is empty")
    code, _, err = run_main(["reproduce", "--quick", "--runs", value], capsys)
    one_line_error(code, err, "--runs is empty")
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / CONFIG).read_text() == '{"mine": 1}\n'


def test_a_directory_of_other_files_is_refused_unless_forced(tmp_path, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / CONFIG).write_text('{"not": "an opnorm config"}\n')
    (out / METRICS).write_text("theirs\n")
    code, _, err = run_main(["train", "--out", str(out), "--epochs", "1", *SMALL], capsys)
    one_line_error(code, err, f"--out {out} holds files that are not an opnorm run's (config.json)", "--force")
    (out / "notes.txt").write_text("x")
    code, _, err = run_main(["train", "--out", str(out), "--epochs", "1", *SMALL], capsys)
    one_line_error(code, err, "notes.txt")
    assert (out / METRICS).read_text() == "theirs\n" and not (out / CHECKPOINT).exists()
    code, _, err = run_main(["train", "--out", str(out), "--epochs", "1", "--force", *SMALL], capsys)
    assert code == 0, err
    assert (out / CHECKPOINT).is_file() and (out / "notes.txt").read_text() == "x"


def test_a_dangling_link_as_out_is_one_line(tmp_path, capsys):
    out = tmp_path / "gone"
    out.symlink_to(tmp_path / "missing")
    code, _, err = run_main(["train", "--out", str(out), "--epochs", "1", *SMALL], capsys)
    one_line_error(code, err, f"--out {out} is a symbolic link to {tmp_path / 'missing'}, which does not exist")


# ----------------------------------------------------------------------------- resume invariants


def _rewrite(run: Path, **changes) -> None:
    state = load_checkpoint(run / CHECKPOINT)
    state.update(changes)
    save_checkpoint(run / CHECKPOINT, state)


def test_the_checkpoint_records_the_world_size_and_the_data(run1):
    import hashlib

    state = load_checkpoint(run1 / CHECKPOINT)
    train_set = load_dataset("digits", limit_train=96).train
    sha = hashlib.sha256()  # written out here as the contract: dtype, shape, bytes of x then y
    for t in (train_set.x, train_set.y):
        sha.update(f"{t.dtype} {tuple(t.shape)};".encode())
        sha.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert state["world_size"] == 1 and state["data"] == sha.hexdigest()


def test_a_resume_under_another_world_size_is_refused(run1, tmp_path, capsys):
    run = copy_of(run1, tmp_path)
    _rewrite(run, world_size=2)
    code, _, err = run_main(["train", "--out", str(run), "--resume", "--epochs", "2"], capsys)
    one_line_error(
        code,
        err,
        "trained in 2 process(es), a global batch of 64",
        "runs in 1 (global batch 32)",
        "torchrun --nproc_per_node=2",
    )
    assert load_checkpoint(run / CHECKPOINT)["epoch"] == 1


def test_a_resume_on_other_data_is_refused(run1, tmp_path, capsys, monkeypatch):
    from opnorm.training import inputs as T  # where the trainer's data are loaded

    run = copy_of(run1, tmp_path)
    before = (run / CONFIG).read_bytes()
    real = T.load_dataset

    def shifted(*args, **kwargs):  # the same images with the labels shifted by one
        splits = real(*args, **kwargs)
        splits.train.y = (splits.train.y + 1) % 10
        return splits

    monkeypatch.setattr(T, "load_dataset", shifted)
    code, _, err = run_main(["train", "--out", str(run), "--resume", "--epochs", "2"], capsys)
    one_line_error(code, err, "the digits training data differ from the run's", "--data-dir")
    assert (run / CONFIG).read_bytes() == before


def test_a_resume_with_a_data_dir_of_shifted_labels_is_refused(tmp_path, capsys):
    import numpy as np

    arrays = write_idx_dataset(tmp_path / "a", np.random.default_rng(0), n_train=48, n_test=16)
    shifted = tmp_path / "b"
    shutil.copytree(tmp_path / "a", shifted)
    (shifted / IDX_NAMES[1]).write_bytes(idx_bytes((arrays[IDX_NAMES[1]] + 1) % 10))
    run = tmp_path / "r"
    small = [
        "--dataset",
        "fashion-mnist",
        "--model",
        "cnn",
        "--eval-points",
        "4",
        "--eval-steps",
        "1",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert (
        run_main(["train", "--out", str(run), "--epochs", "1", "--data-dir", str(tmp_path / "a"), *small], capsys)[0]
        == 0
    )
    before = (run / CONFIG).read_bytes()
    code, _, err = run_main(
        ["train", "--out", str(run), "--resume", "--epochs", "2", "--data-dir", str(shifted)], capsys
    )
    one_line_error(code, err, "the fashion-mnist training data", f"(--data-dir {shifted}) differ from the run's")
    assert (run / CONFIG).read_bytes() == before and load_checkpoint(run / CHECKPOINT)["epoch"] == 1
    code, _, err = run_main(
        ["train", "--out", str(run), "--resume", "--epochs", "2", "--data-dir", str(tmp_path / "a")], capsys
    )
    assert code == 0, err  # the run's own data: resumed


# ----------------------------------------------------------------------------- the epoch is kept


def test_a_failing_check_keeps_the_epoch_and_the_resume_is_exact(tmp_path, monkeypatch):
    from opnorm.training import trainer as T

    whole = train(TrainConfig(method="opnorm", p="inf", eps=0.1, epochs=3, out=str(tmp_path / "whole"), **SMALL_CFG))
    real, calls = T.evaluate_epoch, {"n": 0}

    def fails_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "evaluate_epoch", fails_in_epoch_2)
    run = tmp_path / "r"
    cfg = TrainConfig(method="opnorm", p="inf", eps=0.1, epochs=3, out=str(run), **SMALL_CFG)
    with pytest.raises(EpochCheckFailed) as info:
        train(cfg)
    msg = str(info.value)
    assert "the check after epoch 2" in msg and "LinAlgError" in msg and f"{run / CHECKPOINT} holds epoch 2" in msg
    assert "\n" not in msg and load_checkpoint(run / CHECKPOINT)["epoch"] == 2
    res = train({"out": str(run)}, resume=True)
    for a, b in zip(res.model.state_dict().values(), whole.model.state_dict().values()):
        assert torch.equal(a, b)
    keys = ("epoch", "loss", "accuracy", "robust_accuracy", "operator_norm")
    lines = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    assert [{k: m[k] for k in keys} for m in lines] == [{k: m[k] for k in keys} for m in whole.history]


def test_a_check_failure_is_one_line_on_the_command_line(tmp_path, capsys, monkeypatch):
    from opnorm.training import trainer as T

    def fails(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")

    monkeypatch.setattr(T, "evaluate_epoch", fails)
    code, _, err = run_main(["train", "--out", str(tmp_path / "r"), "--epochs", "2", *SMALL], capsys)
    line = one_line_error(code, err, "the check after epoch 1", "--resume")
    assert "(unexpected" not in line


def test_an_overflowing_jacobian_gives_an_infinite_norm_not_a_linalg_error():
    from opnorm.power import operator_norm

    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for layer in net:
            layer.weight.fill_(1e30)  # finite weights, J = W2 W1 = 8e60 per entry: inf in float32
            layer.bias.zero_()
    x = torch.rand(2, 6)
    assert torch.isfinite(torch.cat([p.flatten() for p in net.parameters()])).all()
    res = operator_norm(net, x, 2, 2, method="exact")
    assert torch.isinf(res.sigma).all() and not res.exact.any()


def test_a_p_the_check_cannot_attack_is_trained_and_its_robust_accuracy_skipped(tmp_path):
    lines = []
    res = train(
        TrainConfig(method="opnorm", p=3.5, eps=0.1, epochs=1, out=str(tmp_path / "r"), **SMALL_CFG),
        verbose=True,
        log=lines.append,
    )
    assert res.completed and res.metrics["robust_accuracy"] is None and res.metrics["operator_norm"] > 0
    assert any("measures no robust accuracy: PGD needs p in 1, 2, inf (got p 3.5)" in line for line in lines)
    assert json.loads((tmp_path / "r" / METRICS).read_text())["robust_accuracy"] is None


# ----------------------------------------------------------------------------- reproduce's runs directory


def test_reproduce_takes_the_runs_directory_lock(tmp_path, capsys):
    root = tmp_path / "runs"
    with Runs(root, {"x": 1}):
        with pytest.raises(RunLockedError, match="choose another --runs"):
            Runs(root, {"x": 1})
        code, _, err = run_main(["reproduce", "--quick", "--out", str(tmp_path / "rep"), "--runs", str(root)], capsys)
        one_line_error(code, err, f"run directory {root} is in use by process {os.getpid()}")
    Runs(root, {"x": 1}).close()  # released


def test_damaged_files_in_the_runs_directory_are_named(tmp_path):
    splits = load_dataset("digits", limit_train=96)
    base = TrainConfig(method="clean", epochs=1, **SMALL_CFG)
    with Runs(tmp_path / "runs", {"x": 1}) as runs:
        runs.model(base, "clean", {}, seed=0, splits=splits, log=lambda s: None)
        weights = tmp_path / "runs" / "seed-0" / "clean.pt"
        assert weights.with_name("clean.pt.sha256").is_file()
        weights.write_bytes(weights.read_bytes()[:100])  # truncated, sidecar and all
        weights.with_name("clean.pt.sha256").unlink()
        with pytest.raises(CheckpointError, match=f"trained model {weights} is damaged .*delete it and rerun"):
            runs.model(base, "clean", {}, seed=0, splits=splits, log=lambda s: None)
        (tmp_path / "runs" / "seed-0" / "screen.json").write_text('{"a": "\x01"}')
        with pytest.raises(CheckpointError, match="screen.json in the runs directory is damaged"):
            runs.measured(0, "screen", lambda: {})


def test_runs_directory_files_are_not_written_through_links(tmp_path):
    target = victim(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with Runs(tmp_path / "runs", {"x": 1}) as runs:
        (tmp_path / "runs" / "seed-0").mkdir()
        (tmp_path / "runs" / "seed-0" / "clean.json").symlink_to(target)
        with pytest.raises(UnsafePathError, match="clean.json is a symbolic link"):
            runs.measured(0, "clean", lambda: {"v": 1})
        (tmp_path / "runs" / "seed-1").symlink_to(elsewhere)
        with pytest.raises(UnsafePathError, match="seed-1 is a symbolic link"):
            runs.measured(1, "screen", lambda: {"v": 1})
    assert target.read_bytes() == PRECIOUS and not any(elsewhere.iterdir())


# ----------------------------------------------------------------------------- errors that name the value


@pytest.mark.parametrize(
    "key,value",
    [
        ("model", {"conv.weight": torch.zeros(1)}),
        ("objective", "x"),
        ("rng", {"torch": torch.zeros(3), "python": {}, "numpy": {}}),
        ("history", [1, 2]),
        ("epoch", "1"),
    ],
)
def test_a_crafted_checkpoint_entry_is_named(run1, tmp_path, capsys, key, value):
    run = copy_of(run1, tmp_path)
    _rewrite(run, **{key: value})
    code, _, err = run_main(["train", "--out", str(run), "--resume", "--epochs", "2"], capsys)
    line = one_line_error(code, err, f"{run / CHECKPOINT} has a damaged {key!r} entry")
    assert "unexpected" not in line


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["train", "--seed", "99999999999999999999", "--epochs", "1", *SMALL], "seed must be <= 4294967295"),
        (["train", "--compile", "foo", "--epochs", "1", *SMALL], "compile backend 'foo' is not one torch knows"),
    ],
)
def test_bad_values_are_named(argv, fragment, capsys):
    code, _, err = run_main(argv, capsys)
    assert "unexpected" not in one_line_error(code, err, fragment)


def test_eval_names_an_unknown_device_and_a_zero_step_size(run1, capsys):
    base = ["eval", "--checkpoint", str(run1), "--eps", "0.1", "--steps", "2", "--limit", "8"]
    code, _, err = run_main([*base, "--device", "tpu"], capsys)
    assert "unexpected" not in one_line_error(code, err, "unknown device 'tpu'")
    code, _, err = run_main([*base, "--device", "cpu", "--step-size", "0"], capsys)
    one_line_error(code, err, "step_size must be a float > 0")


def test_extending_a_free_run_counts_epochs_as_epochs_does(tmp_path, capsys):
    out = tmp_path / "free"
    train(TrainConfig(method="free", eps=0.1, p="inf", epochs=8, replays=4, out=str(out), **SMALL_CFG))
    code, _, err = run_main(["train", "--out", str(out), "--resume", "--epochs", "4"], capsys)
    one_line_error(code, err, "has completed 8 epochs", "larger than that (got 4)")


def test_read_json_errors_are_one_line_and_name_the_file(tmp_path):
    path = tmp_path / "c.json"
    with pytest.raises(FileNotFoundError, match=r"^config file .*c\.json not found$"):
        read_json(path, "config file")
    path.write_text("[1, 2]")
    assert read_json(path, "measurement") == [1, 2]
    for text, match in (
        ('{"a": 1,', "is not valid JSON .* at line 1"),
        ("[1, 2]", "must hold a JSON object, not a list"),
        (b"\xff\xfe", "is not UTF-8 text"),
    ):
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ValueError, match=match) as info:
            read_json_object(path, "config file")
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    path.write_text('{"method": "opnorm"}')
    assert read_json_object(path, "config file") == {"method": "opnorm"}
