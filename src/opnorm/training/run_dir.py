"""A run directory as the trainer writes it: one writer, checkpoint before metrics, verified reads.

Files (see :mod:`opnorm.training.trainer` for their contents): ``config.json``,
``metrics.jsonl``, ``checkpoint.pt`` + ``checkpoint.pt.sha256``, at the end
``model.safetensors`` + ``model.safetensors.sha256``, and ``.lock`` (the PID of the process
writing the run; see :class:`~opnorm.training.files.RunLock`). Every file is written
atomically with the user's umask and synced; an epoch's checkpoint is on disk before its
metrics line, so ``metrics.jsonl`` never lists an epoch that a resume could not continue from.

Example::

    >>> run = RunDir("runs/a")
    >>> with run.lock():
    ...     run.remove_stale_files(); run.write_config(cfg); run.write_epoch(state, history)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from opnorm.training.checkpoint import CheckpointError, export_weights, load_checkpoint, save_checkpoint
from opnorm.training.config import TrainConfig
from opnorm.training.files import RunLock, remove_stale_temp_files, write_text_atomic

__all__ = ["RunDir", "CHECKPOINT", "METRICS", "CONFIG", "WEIGHTS"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"

# what a checkpoint must hold to be resumed
_RESUME_KEYS = ("model", "optimizer", "epoch", "rng", "history", "config")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}


class RunDir:
    """The files of one training run in ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoint = self.path / CHECKPOINT

    def _check_is_dir(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path} is a file; pass a directory for the run")

    def lock(self) -> RunLock:
        """The run's one-writer lock (creates the directory); use it as a context manager."""
        self._check_is_dir()
        return RunLock(self.path)

    def refuse_existing(self) -> None:
        """A new run must not overwrite another: ValueError if a checkpoint is there."""
        self._check_is_dir()
        if self.checkpoint.exists():
            raise ValueError(f"{self.path} already holds a run ({CHECKPOINT}); pass --resume to continue it or "
                             f"choose another --out")

    def exists_for_resume(self) -> None:
        """FileNotFoundError unless there is a checkpoint to resume (checked before locking,
        so that a mistyped --out creates nothing)."""
        self._check_is_dir()
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"no run to resume in {self.path} (no {CHECKPOINT})")

    def load_for_resume(self) -> dict:
        """The verified checkpoint, with every key a resume needs (CheckpointError otherwise)."""
        self.exists_for_resume()
        state = load_checkpoint(self.checkpoint)  # before anything is written: a bad file changes nothing
        for key in _RESUME_KEYS:
            if key not in state:
                raise CheckpointError(f"checkpoint {self.checkpoint} lacks {key!r}; it was not written by opnorm train")
        return state

    def remove_stale_files(self) -> list[Path]:
        """Temp files of a writer killed mid-save (call holding the lock)."""
        return remove_stale_temp_files(self.path, (CHECKPOINT, METRICS, CONFIG, WEIGHTS))

    def write_config(self, cfg: TrainConfig) -> None:
        write_text_atomic(self.path / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        write_text_atomic(self.path / METRICS, "".join(json.dumps(_jsonable(m)) + "\n" for m in history))

    def write_epoch(self, state: dict, history: list[dict[str, Any]]) -> None:
        """The epoch's checkpoint, then (only then) the metrics that list it."""
        save_checkpoint(self.checkpoint, state)
        self.write_metrics(history)

    def export(self, model: nn.Module, cfg: TrainConfig) -> None:
        export_weights(model, self.path / WEIGHTS, {"model": cfg.model, "dataset": cfg.dataset, "method": cfg.method})
