"""A run directory as the trainer writes it: one writer, checkpoint before metrics, verified reads.

Files (see :mod:`opnorm.training.trainer` for their contents): ``config.json``,
``metrics.jsonl``, ``checkpoint.pt`` + ``checkpoint.pt.sha256``, at the end
``model.safetensors`` + ``model.safetensors.sha256``, and ``.lock`` (the PID of the process
writing the run; see :class:`~opnorm.training.files.RunLock`). Every file is written
atomically with the user's umask and synced; an epoch's checkpoint is on disk before its
metrics line, so ``metrics.jsonl`` never lists an epoch that a resume could not continue from.

A run directory is never turned against its user: an empty ``--out`` (an unset shell
variable) is refused rather than read as ``.``; a new run does not write into a directory
holding files of something else (unless ``force``); a symbolic link in place of one of the
run's files is refused, never followed.

Example:
    >>> import tempfile
    >>> from opnorm.training.config import TrainConfig
    >>> from opnorm.training.run_dir import RunDir
    >>> with tempfile.TemporaryDirectory() as out:
    ...     run = RunDir(out)
    ...     with run.lock():
    ...         stale = run.remove_stale_files()
    ...         run.write_config(TrainConfig().resolved())
    ...         run.save({"epoch": 1})
    ...         run.write_metrics([{"epoch": 1, "loss": 0.5}])
    ...     sorted(p.name for p in run.path.iterdir())
    ['.lock', 'checkpoint.pt', 'checkpoint.pt.sha256', 'config.json', 'metrics.jsonl']
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from opnorm.training.checkpoint import CheckpointError, export_weights, load_checkpoint, save_checkpoint
from opnorm.training.config import TrainConfig
from opnorm.training.files import (
    DIGEST_SUFFIX,
    LOCK_NAME,
    RunLock,
    refuse_link,
    remove_stale_temp_files,
    write_text_atomic,
)

__all__ = ["RunDir", "checked_dir", "CHECKPOINT", "METRICS", "CONFIG", "WEIGHTS"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"

# what a checkpoint must hold to be resumed
_RESUME_KEYS = ("model", "optimizer", "epoch", "rng", "history", "config")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    # JSON has no inf / NaN: an overflowing measurement is written as the string "inf" / "nan"
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


_FILES = (CHECKPOINT, CHECKPOINT + DIGEST_SUFFIX, METRICS, CONFIG, WEIGHTS, WEIGHTS + DIGEST_SUFFIX)


def checked_dir(path: str | Path, flag: str) -> Path:
    """``path`` as a Path, refusing an empty or blank value (``Path("")`` would be the current
    directory) and a link to a missing directory, in one line naming ``flag``.

    Example:
        >>> from opnorm.training.run_dir import checked_dir
        >>> checked_dir("runs/a", "--out")
        PosixPath('runs/a')
    """
    if not str(path).strip():
        raise ValueError(f"{flag} is empty ({str(path)!r}; an unset shell variable?); pass the directory's name")
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ValueError(
            f"{flag} {path} is a symbolic link to {os.readlink(path)}, which does not exist; create that "
            f"directory or choose another {flag}"
        )
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; pass a directory")
    return path


class RunDir:
    """The files of one training run in ``path``."""

    def __init__(self, path: str | Path) -> None:
        if not str(path).strip():
            checked_dir(path, "--out")
        self.path = Path(path)
        self.checkpoint = self.path / CHECKPOINT

    def _check_is_dir(self) -> None:
        checked_dir(self.path, "--out")
        for name in _FILES:
            refuse_link(self.path / name)

    def lock(self) -> RunLock:
        """The run's one-writer lock (creates the directory); use it as a context manager."""
        self._check_is_dir()
        return RunLock(self.path)

    def refuse_existing(self, force: bool = False) -> None:
        """A new run must not overwrite another (ValueError if a checkpoint is there), nor, unless
        ``force``, write into a directory holding files that no opnorm run writes."""
        self._check_is_dir()
        if self.checkpoint.exists():
            raise ValueError(
                f"{self.path} already holds a run ({CHECKPOINT}); pass --resume to continue it or choose another --out"
            )
        if force or not self.path.is_dir():
            return
        foreign = sorted(p.name for p in self.path.iterdir() if not self._ours(p.name))
        if not foreign and (self.path / CONFIG).is_file() and not self._run_config(self.path / CONFIG):
            foreign = [CONFIG]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
            raise ValueError(
                f"--out {self.path} holds files that are not an opnorm run's ({shown}); choose a new or "
                f"empty directory, or pass --force to write the run's files into it anyway"
            )

    @staticmethod
    def _ours(name: str) -> bool:
        # what a run killed before its first checkpoint leaves: config, metrics, lock, temp files
        if name in (CONFIG, METRICS, LOCK_NAME):
            return True
        return name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in _FILES)

    @staticmethod
    def _run_config(path: Path) -> bool:
        try:
            TrainConfig.from_dict(json.loads(path.read_text()))
        except (OSError, UnicodeDecodeError, ValueError, TypeError):
            return False
        return True

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
        epoch, history = state["epoch"], state["history"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise self._damaged("epoch", f"{epoch!r}, not a count of epochs")
        if not isinstance(history, list) or len(history) != epoch or not all(isinstance(m, dict) for m in history):
            raise self._damaged("history", f"not a list of {epoch} epochs' metrics")
        if not isinstance(state["config"], dict):
            raise self._damaged("config", "not a dict of settings")
        return state

    def _damaged(self, key: str, why: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {self.checkpoint} has a damaged {key!r} entry ({why}); it was not written "
            f"by opnorm train for this run: resume from another checkpoint or start a new run"
        )

    def remove_stale_files(self) -> list[Path]:
        """Temp files of a writer killed mid-save (call holding the lock)."""
        return remove_stale_temp_files(self.path, (CHECKPOINT, METRICS, CONFIG, WEIGHTS))

    def write_config(self, cfg: TrainConfig) -> None:
        write_text_atomic(self.path / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        write_text_atomic(self.path / METRICS, "".join(json.dumps(_jsonable(m)) + "\n" for m in history))

    def save(self, state: dict) -> None:
        """The epoch's checkpoint; write the metrics that list the epoch only after it."""
        save_checkpoint(self.checkpoint, state)

    def export(self, model: nn.Module, cfg: TrainConfig) -> None:
        export_weights(model, self.path / WEIGHTS, {"model": cfg.model, "dataset": cfg.dataset, "method": cfg.method})
