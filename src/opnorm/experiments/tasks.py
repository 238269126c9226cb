"""The study's units of work and the records they leave in the runs directory.

A :class:`Task` names one measurement of one (seed, model); :func:`perform` reads its record
back from the runs directory (:class:`~opnorm.experiments.runs.Runs`) or computes and writes it.
The study (:mod:`opnorm.experiments.reproduce`) and its worker processes
(:mod:`opnorm.experiments.parallel`) both go through :func:`perform`, so a record means the
same whoever computed it.

Kinds (``key`` is the model's method key):

* ``train``: the model's screen (:func:`~opnorm.experiments.measure.screen`; the model is
  trained first when it is not on disk);
* ``full``: every measurement of :func:`~opnorm.experiments.measure.full`;
* ``stronger``, ``square-linf``, ``square-l2``: the sanity checks' attacks
  (:func:`~opnorm.experiments.measure.stronger_pgd`, :func:`~opnorm.experiments.measure.square_check`);
* ``checks``: the first seed's checks on the clean model (:func:`~opnorm.experiments.measure.first_seed_checks`);
* ``random-init``: alignment by rank of a randomly initialized network (no trained model).

Example::

    task = Task("full", "opnorm", overrides, seed=0)
    result = perform(task, cfg, runs, model, splits, x, y)
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from opnorm.experiments import measure as M
from opnorm.experiments.runs import Runs
from opnorm.experiments.study import StudyConfig

__all__ = ["KINDS", "Task", "perform"]

KINDS = ("train", "full", "stronger", "square-linf", "square-l2", "checks", "random-init")


class Task(NamedTuple):
    """One unit of work: ``kind`` (:data:`KINDS`) for ``key`` on ``seed``, the model built from
    the study's base config and ``overrides``; ``may_diverge``: a sweep point whose training
    may diverge (recorded, not raised)."""

    kind: str
    key: str
    overrides: dict
    seed: int
    may_diverge: bool = False

    @property
    def record(self) -> str:
        """The name of the task's record in the runs directory's seed folder."""
        if self.kind not in KINDS:
            raise ValueError(f"unknown task kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        names = {"train": f"screen-{self.key}", "full": f"full-{self.key}", "checks": "checks"}
        names["random-init"] = "rank-alignment-random-init"
        return names.get(self.kind, f"sanity-{self.kind}-{self.key}")

    @property
    def needs_model(self) -> bool:
        """False for the random network, which is built, not trained."""
        return self.kind != "random-init"


def perform(
    task: Task,
    cfg: StudyConfig,
    runs: Runs,
    model: nn.Module | None,
    splits,
    x,
    y,
    screened: dict | None = None,
) -> dict:
    """The task's record: read from ``runs`` when there, else computed on ``model`` (the task's
    trained model; None for ``random-init``) at the test points (x, y) and written.

    ``screened`` (``full`` only): the model's screen, whose reference radii are then not attacked
    again; None: read from ``runs`` (the ``train`` task's record), or computed."""
    s = task.seed

    def compute():
        if task.kind == "train":
            return M.screen(cfg, model, x, y, s)
        if task.kind == "full":
            screen = screened
            if screen is None:
                screen = perform(task._replace(kind="train"), cfg, runs, model, splits, x, y)
            return M.full(cfg, model, x, y, s, screen)
        if task.kind == "stronger":
            return {"value": M.stronger_pgd(cfg, model, x, y, s)}
        if task.kind in ("square-linf", "square-l2"):
            return M.square_check(cfg, model, x, y, s, task.kind.split("-")[1])
        if task.kind == "checks":
            return M.first_seed_checks(cfg, model, x, y, s)
        return M.random_net_alignment(cfg, M.random_net(cfg, splits, s), x, y, s)

    return runs.measured(s, task.record, compute)
