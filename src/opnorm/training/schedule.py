"""The learning rate of each epoch, including runs whose length changed on resume.

``scheduler="cosine"``: epoch e of a run with horizon T trains at ``lr (1 + cos(pi e / T)) / 2``
(torch's ``CosineAnnealingLR`` with ``eta_min=0``, in closed form). When a resume changes
``epochs`` after E completed epochs, the schedule from E on starts over from the last epoch's
value L: epoch e >= E trains at ``L (1 + cos(pi (e - E + 1) / (T' - E + 1))) / 2`` for the new
horizon T', which falls from L toward 0 and never rises. Each change is recorded in the
config's ``schedule_extensions``, so a config file re-runs the same schedule.
``scheduler="none"``: ``lr`` throughout.

Example:
    >>> from opnorm.training.config import TrainConfig
    >>> from opnorm.training.schedule import learning_rate
    >>> cfg = TrainConfig(epochs=4, lr=0.05, schedule_extensions=[{"epoch": 2, "replaced_epochs": 2}]).resolved()
    >>> [round(learning_rate(cfg, e), 5) for e in range(4)]
    [0.05, 0.025, 0.01875, 0.00625]
"""

from __future__ import annotations

import math

from opnorm.training.config import TrainConfig, data_passes, replays_per_batch

__all__ = ["learning_rate", "extended", "describe"]


def _cosine(start_lr: float, k: int, length: int) -> float:
    return start_lr * (1.0 + math.cos(math.pi * k / length)) / 2.0


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of 0-based ``epoch`` under ``cfg`` (resolved)."""
    if cfg.scheduler == "none":
        return cfg.lr
    ext = cfg.schedule_extensions
    starts = [0] + [x["epoch"] for x in ext]
    horizons = [x["replaced_epochs"] for x in ext] + [data_passes(cfg)]  # in passes over the data
    level, offset = cfg.lr, 0  # the first segment starts at lr itself; later ones one step below L
    for i, (start, horizon) in enumerate(zip(starts, horizons)):
        end = starts[i + 1] if i + 1 < len(starts) else math.inf
        if epoch < end:
            return _cosine(level, epoch - start + offset, horizon - start + offset)
        level, offset = _cosine(level, end - 1 - start + offset, horizon - start + offset), 1
    raise AssertionError("unreachable")  # pragma: no cover - the last segment has no end


def extended(cfg: TrainConfig, saved: TrainConfig, completed: int) -> TrainConfig:
    """``cfg`` for a resume after ``completed`` epochs (passes over the data) of the run
    configured as ``saved``: unchanged when its length is the same, else with the change
    appended to ``schedule_extensions``.

    Raises:
        ValueError: the new length is not more than ``completed`` (nothing left to extend into).
    """
    old, new = data_passes(saved), data_passes(cfg)
    if new == old:
        return cfg
    if new <= completed:
        done = completed * replays_per_batch(cfg)  # in epochs, as --epochs counts them (free: passes x replays)
        raise ValueError(
            f"the run has completed {done} epochs; to extend it pass --epochs larger than that (got {cfg.epochs})"
        )
    ext = [*cfg.schedule_extensions, {"epoch": completed, "replaced_epochs": old}]
    return cfg.replace(schedule_extensions=ext).resolved()


def describe(cfg: TrainConfig, epoch: int) -> str:
    """How ``epoch``'s learning rate was chosen, for the metrics: "cosine", "none", or
    "cosine, continued from epoch E" after a change of epochs."""
    starts = [x["epoch"] for x in cfg.schedule_extensions if x["epoch"] <= epoch]
    if not starts:
        return cfg.scheduler
    return f"{cfg.scheduler}, continued from epoch {starts[-1]}"
