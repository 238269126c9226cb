"""Worker processes for ``opnorm reproduce --jobs N``: the study's independent tasks, side by side.

The study (:mod:`opnorm.experiments.reproduce`) keeps its own order; before a phase it hands
the tasks (:class:`~opnorm.experiments.tasks.Task`) whose record is not on disk yet to a
:class:`Workers` pool. Each task trains or measures one (seed, model) through
:func:`~opnorm.experiments.tasks.perform` and leaves its record in the runs directory, written
atomically, exactly as the study itself would; the study then reads them back. A worker computes
with one thread (small models gain little from a second one, and two processes use two cores
fully), so numbers can differ from ``--jobs 1`` in their last digits where a sum runs in another
order.

Example (2 worker processes; they start on the first task)::

    with Workers(2, cfg, store) as workers:
        workers.run([Task("train", "pgd-at-l2", overrides, seed) for seed in cfg.seeds])
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import torch

from opnorm.experiments.runs import Runs
from opnorm.experiments.study import StudyConfig, base_config
from opnorm.experiments.tasks import Task, perform
from opnorm.training.data import load_dataset

__all__ = ["Workers", "run_task"]

_STATE: dict = {}  # per worker process: the study, its runs directory and the loaded data


def _start(cfg: StudyConfig, root: str) -> None:
    torch.set_num_threads(1)
    _STATE.update(cfg=cfg, runs=Runs.attached(root))
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()


def _exit_with(parent: int) -> None:
    """Stop this worker once the study's process is gone (killed, say): an orphaned worker would
    wait for tasks forever, holding its memory."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _data():
    """The worker's dataset and test points, loaded once per process."""
    if "splits" not in _STATE:
        cfg = _STATE["cfg"]
        splits = load_dataset(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train)
        n = min(cfg.eval_points, len(splits.test))
        _STATE.update(splits=splits, x=splits.test.x[:n], y=splits.test.y[:n])
    return _STATE["splits"], _STATE["x"], _STATE["y"]


def run_task(task: Task) -> dict:
    """Do one task in this process (the study's runs directory must be attached by the pool's
    initializer); returns the models trained and measurements computed."""
    cfg, runs = _STATE["cfg"], _STATE["runs"]
    splits, x, y = _data()
    before = dict(runs.counts)
    model = None
    if task.needs_model:
        model, _ = runs.model(base_config(cfg), task.key, task.overrides, task.seed, splits, print, task.may_diverge)
    diverged = task.needs_model and model is None  # recorded as such by runs.model: nothing to measure
    if not diverged:
        perform(task, cfg, runs, model, splits, x, y)
    return {k: runs.counts[k] - before[k] for k in ("models_trained", "measurements_computed")}


class Workers:
    """``jobs`` worker processes for one study (started on the first :meth:`run`); with
    ``jobs`` 1 nothing starts and :meth:`run` does nothing (the study computes in order).

    Args:
        jobs: worker processes (>= 1). cfg: the study. store: its runs directory (open: the
            study holds the lock; the workers write into it).
    """

    def __init__(self, jobs: int, cfg: StudyConfig, store: Runs) -> None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
        self.jobs, self.cfg, self.store = jobs, cfg, store
        self._pool: ProcessPoolExecutor | None = None

    def run(self, tasks: list[Task]) -> None:
        """Run the tasks whose result is not on disk yet, and wait for all of them. The work a
        worker did is counted as trained / computed in the store's counts (the study reads it back
        once, so those reads are taken off)."""
        todo, seen = [], set()
        for t in tasks:  # a task listed twice (a main method that is also a sweep point) runs once
            if (t.kind, t.key, t.seed) not in seen and not self._done(t):
                todo.append(t)
            seen.add((t.kind, t.key, t.seed))
        if self.jobs == 1 or len(todo) == 0:
            return
        for done in self._started().map(run_task, todo):
            for did, read in (("models_trained", "models_read"), ("measurements_computed", "measurements_read")):
                self.store.counts[did] += done[did]
                self.store.counts[read] -= done[did]

    def map(self, fn: Callable, items: list) -> list:
        """``[fn(item) for item in items]``, computed by the workers (here with ``jobs`` 1); ``fn``
        and the items must pickle (a module-level function, e.g. the report's plots)."""
        if self.jobs == 1:
            return [fn(item) for item in items]
        return list(self._started().map(fn, items))

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")  # fork after torch's threads started can hang
            self._pool = ProcessPoolExecutor(
                self.jobs, mp_context=ctx, initializer=_start, initargs=(self.cfg, str(self.store.root))
            )
        return self._pool

    def _done(self, t: Task) -> bool:
        # a trained model without its screen (an interrupted run), or a diverged one: the study does it
        return self.store.has(t.seed, t.record) or (t.kind == "train" and self.store.has(t.seed, t.key))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
