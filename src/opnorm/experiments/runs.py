"""Training the study's models, kept on disk so that a study resumes where it stopped.

A runs directory holds ``study.json`` (the study's fingerprint: a directory made for another
study is refused, never silently reused) and per seed ``seed-S/<key>.pt`` (the trained
weights, with a ``.sha256`` sidecar), ``seed-S/<key>.json`` (training seconds) and
``seed-S/<phase>.json`` (measurements). One process at a time uses it: :class:`Runs` holds
the directory's ``.lock`` as ``opnorm train`` holds a run's (a second ``opnorm reproduce`` on
the same ``--runs`` stops in one line). Files are written atomically and never through a
symbolic link; a damaged file is named in a one-line error that says how to redo it.

Example (trains the model on its first use)::

    with Runs("runs/digits-study", fingerprint(cfg)) as runs:
        model, seconds = runs.model(base_config, "opnorm", overrides, seed=0, splits=splits, log=print)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opnorm.training.checkpoint import CheckpointError
from opnorm.training.files import (
    RunLock,
    one_line,
    read_json,
    refuse_link,
    save_with_digest,
    sidecar,
    verify_digest,
    write_text_atomic,
)
from opnorm.training.inputs import registry_model
from opnorm.training.run_dir import checked_dir
from opnorm.training.trainer import TrainingDiverged, train

__all__ = ["Runs"]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _read_record(path: Path) -> Any:
    """A JSON record of the runs directory; a damaged one is a CheckpointError saying to delete it."""
    refuse_link(path)  # a runs directory's files are its own, never read from elsewhere
    try:
        return read_json(path, "file")
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} in the runs directory is damaged ({one_line(err)}); delete it and rerun to compute it again"
        ) from None


class Runs:
    """Trained models and measurements of one study, by seed and method key, on disk.

    Args:
        root: the directory (created). fingerprint: what defines the study (see
            :func:`opnorm.experiments.study.fingerprint`); a directory holding another
            study's fingerprint raises ValueError.

    Raises:
        RunLockedError: another process uses the directory. ValueError: an empty ``root``
            or another study's directory.

    Use it as a context manager (or call :meth:`close`) to release the lock.
    """

    def __init__(self, root: str | Path, fingerprint: dict) -> None:
        self.root = checked_dir(root, "--runs")
        self._lock = RunLock(self.root, flag="--runs").__enter__()
        try:
            self._stamp(self.root / "study.json", _jsonable(fingerprint))
        except BaseException:
            self.close()
            raise
        # what this invocation did: a report built from reused runs must not pass its wall time off as the study's
        self.counts = {"models_trained": 0, "models_read": 0, "measurements_computed": 0, "measurements_read": 0}

    @classmethod
    def attached(cls, root: str | Path) -> Runs:
        """A view of a runs directory that another process (the study) holds open: for its
        worker processes (:mod:`opnorm.experiments.parallel`). No lock is taken and the
        fingerprint is not checked again; files are written atomically as by the study."""
        view = cls.__new__(cls)
        view.root = Path(root)
        view.counts = {"models_trained": 0, "models_read": 0, "measurements_computed": 0, "measurements_read": 0}
        return view

    def _stamp(self, stamp: Path, want: dict) -> None:
        if stamp.is_file():
            have = _read_record(stamp)
            if have != want:
                diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                raise ValueError(
                    f"runs directory {self.root} holds another study (differs in {', '.join(diff)}); "
                    "choose another --runs directory or delete it"
                )
        else:
            write_text_atomic(stamp, json.dumps(want, indent=2) + "\n")

    def close(self) -> None:
        """Release the directory's lock."""
        lock = self.__dict__.pop("_lock", None)
        if lock is not None:
            lock.__exit__(None, None, None)

    def __enter__(self) -> Runs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _dir(self, seed: int) -> Path:
        d = self.root / f"seed-{seed}"
        refuse_link(d)  # a linked seed directory would send every file of the seed elsewhere
        d.mkdir(parents=True, exist_ok=True)
        return d

    def model(
        self, base, key: str, overrides: dict, seed: int, splits, log: Callable[[str], None], may_diverge: bool = False
    ) -> tuple[nn.Module | None, float | str]:
        """The trained model (eval mode, CPU) and its training seconds: loaded when on disk, else
        trained (``base.replace(seed=seed, **overrides)``) and saved. ``splits``: the loaded
        dataset (its shapes build the model to load into).

        ``may_diverge`` (sweep points): a run whose training diverges is recorded as such, and
        ``(None, message)`` is returned now and by every rerun; otherwise the error propagates.
        """
        cfg = base.replace(seed=seed, **overrides)
        weights, meta = self._dir(seed) / f"{key}.pt", self._dir(seed) / f"{key}.json"
        record = _read_record(meta) if meta.is_file() else {}
        if "diverged" in record:
            self.counts["models_read"] += 1
            return None, str(record["diverged"])
        if weights.is_file() and meta.is_file():
            r = cfg.resolved()
            model = registry_model(r.model, splits, input_range=r.input_range, width=r.width)
            _load_into(model, weights)
            self.counts["models_read"] += 1
            return model.eval(), float(record["train_seconds"])
        log(f"[reproduce] seed {seed}: training {key} ({cfg.epochs} epochs)")
        _import_optimizers()
        t0 = time.perf_counter()
        try:
            res = train(cfg)
        except TrainingDiverged as err:
            if not may_diverge:
                raise
            write_text_atomic(meta, json.dumps({"diverged": str(err)}) + "\n")
            self.counts["models_trained"] += 1
            log(f"[reproduce] seed {seed}: {key} diverged: {err}")
            return None, str(err)
        seconds = time.perf_counter() - t0 - sum(h.get("eval_seconds", 0.0) for h in res.history)
        model = res.model.cpu().eval()
        save_with_digest(weights, lambda f: torch.save(model.state_dict(), f))
        write_text_atomic(meta, json.dumps({"train_seconds": max(seconds, 1e-9)}) + "\n")
        self.counts["models_trained"] += 1
        return model, max(seconds, 1e-9)

    def measured(self, seed: int, phase: str, compute: Callable[[], dict]) -> dict:
        """``compute()``'s result for (seed, phase), computed once and then read from disk."""
        path = self._dir(seed) / f"{phase}.json"
        if path.is_file():
            self.counts["measurements_read"] += 1
            return _read_record(path)
        self.counts["measurements_computed"] += 1
        value = compute()
        write_text_atomic(path, json.dumps(value) + "\n")
        return json.loads(json.dumps(value))

    def has(self, seed: int, phase: str) -> bool:
        return (self._dir(seed) / f"{phase}.json").is_file()


def _import_optimizers() -> None:
    """Make the first optimizer of this process now: torch imports its compiler stack then
    (seconds), which would otherwise count as the first trained model's training time."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def _load_into(model: nn.Module, weights: Path) -> None:
    """Load a trained model's weights (checked against their sidecar when there is one: runs
    directories of earlier versions have none), or a one-line CheckpointError naming the file."""
    refuse_link(weights)
    if sidecar(weights).exists():
        verify_digest(weights, "trained model")
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as err:  # zip, pickle, EOF, key and shape errors all mean the same here
        raise CheckpointError(
            f"trained model {weights} is damaged or does not fit ({one_line(err)}); delete it "
            f"and rerun to train that model again"
        ) from None
