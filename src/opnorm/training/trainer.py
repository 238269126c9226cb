"""The training loop behind ``opnorm train`` and ``opnorm.train(config)``.

One epoch: a loader seeded by ``(seed, epoch)`` (so a resumed run sees the same batches),
the learning rate of :mod:`opnorm.training.schedule`, the method's objective (built by
:data:`opnorm.training.objectives.METHODS`; the loop calls ``objective(net, x, y, index) ->
(loss, logs)`` and nothing else), a check that loss and weights are finite (``on_nan``), a checkpoint,
then the per-epoch check (evaluation on rank 0) and the epoch's metrics line. A check that
fails leaves the epoch saved: the resumed run checks it again and goes on. The run
directory (``config.out``, see :mod:`opnorm.training.run_dir`) holds:

* ``config.json``: the resolved :class:`~opnorm.training.config.TrainConfig`
  (re-run with ``opnorm train --config config.json``);
* ``metrics.jsonl``: one line per epoch: ``epoch, loss, lr, lr_schedule, accuracy`` (clean,
  whole test split), ``robust_accuracy`` (PGD at the training eps and p, first
  ``eval_points`` test points; null when PGD has no such p), ``operator_norm`` (mean
  ``||J(x)||_{p->q}`` on those points, via :func:`opnorm.power.operator_norm`), ``seconds``
  (training), ``eval_seconds`` (the evaluation's; these four only on the epochs that
  ``eval_every`` evaluates), ``evaluated`` (whether the epoch is one of them) and, with
  ``on_nan="skip"``, ``skipped_batches``;
* ``checkpoint.pt`` (+ ``.sha256``): model, optimizer, objective (e.g. spectral-norm
  vectors), AMP scaler, completed epochs, RNG states, config, history, the world size and
  the training data's sha256 (a resume that changes either is refused), rewritten
  atomically after every epoch, before the epoch's check and metrics line;
  ``model.safetensors`` (+ ``.sha256``): the final weights; ``.lock``: the PID of the process writing the run.

Example (trains a CNN on digits for three epochs, and writes runs/dd-snr)::

    from opnorm import TrainConfig, train

    result = train(TrainConfig(method="opnorm", epochs=3, out="runs/dd-snr"))
    result.metrics["robust_accuracy"], result.model
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from opnorm.attacks import PGD_ORDERS
from opnorm.evaluation import progress_bar
from opnorm.fast_at import Replayed
from opnorm.norms import order_text
from opnorm.training import distributed as D
from opnorm.training.checkpoint import CheckpointError, rng_state, set_rng_state
from opnorm.training.config import TrainConfig, check_resume, data_passes, flat_settings, merge, replays_per_batch
from opnorm.training.data import data_fingerprint, make_loader
from opnorm.training.evaluation import accuracy, evaluate_epoch, mean_operator_norm, robust_accuracy
from opnorm.training.files import one_line
from opnorm.training.inputs import TrainInputs, train_inputs
from opnorm.training.objectives import Objective, build_objective
from opnorm.training.run_dir import CHECKPOINT, CONFIG, METRICS, WEIGHTS, RunDir
from opnorm.training.schedule import describe, extended, learning_rate

__all__ = [
    "TrainResult",
    "TrainingDiverged",
    "EpochCheckFailed",
    "Objective",
    "train",
    "accuracy",
    "robust_accuracy",
    "mean_operator_norm",
    "CHECKPOINT",
    "METRICS",
    "CONFIG",
    "WEIGHTS",
]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained network (unwrapped, on the training device).
        metrics: the last epoch's metrics (see the module docstring).
        history: every epoch's metrics, oldest first.
        config: the resolved config.
        run_dir: the run directory, or None when ``config.out`` is None.
        completed: all ``config.epochs`` epochs are done (False after ``stop_after``).
    """

    model: nn.Module
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    config: TrainConfig
    run_dir: Path | None = None
    completed: bool = True


# ----------------------------------------------------------------------------- the loop


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or the weights became non-finite (NaN / inf); the run stopped at once.

    The message names the epoch, the step and what was non-finite; the run directory keeps
    its last good checkpoint.
    """


class EpochCheckFailed(RuntimeError):
    """The per-epoch check (evaluation) failed after the epoch's checkpoint was written; the
    message names the epoch and the cause, and ``--resume`` checks the epoch again."""


class _NonFinite(Exception):
    def __init__(self, step: int, what: str) -> None:
        super().__init__(what)
        self.step, self.what = step, what


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _progress(cfg: TrainConfig, ctx: D.DistContext) -> bool:
    if not ctx.is_main:
        return False
    if cfg.progress is not None:
        return cfg.progress
    return sys.stderr.isatty()


def _build_optimizer(cfg: TrainConfig, model: nn.Module):
    # the learning rate of each epoch is set from opnorm.training.schedule: no torch scheduler state
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":  # torch's defaults (alpha 0.99, no momentum), as the paper's code
        return torch.optim.RMSprop(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _floating(items) -> Iterator[torch.Tensor]:
    """The floating-point tensors in items, looking inside dicts, lists and tuples (a state's extra state)."""
    for t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            yield t
        elif isinstance(t, dict):
            yield from _floating(t.values())
        elif isinstance(t, (list, tuple)):
            yield from _floating(t)


def _all_finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in _floating(tensors)]
    # one device for the stack: a gathered DDP state lives on the CPU, the model maybe not
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True


def _as_settings(config: TrainConfig | dict | None, overrides: dict[str, Any]) -> TrainConfig | dict:
    """A complete TrainConfig, or a dict of the settings given (the rest: defaults, or on resume the run's)."""
    if config is None:
        config = {}
    if isinstance(config, dict):
        return {**config, **overrides}
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, a dict or None, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config


def _resume_config(given: TrainConfig | dict, state: dict, run: RunDir) -> TrainConfig:
    """The resumed run's config: the checkpoint's, changed only where RESUMABLE allows."""
    try:
        saved = TrainConfig.from_dict(state["config"]).resolved()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {run.checkpoint} holds a config this version cannot use ({err})") from None
    completed = int(state["epoch"]) * replays_per_batch(saved)  # passes -> epochs (free replays each batch)
    settings = dataclasses.asdict(given) if isinstance(given, TrainConfig) else dict(given)
    if not settings.get("schedule_extensions"):
        settings.pop("schedule_extensions", None)  # the run's record, whoever omits it
    merged = merge(saved.to_dict(), settings)  # the opnorm section key by key
    epochs = merged.get("epochs")
    if isinstance(epochs, int) and epochs != saved.epochs and epochs <= completed:
        raise ValueError(
            f"{run.path} has completed {completed} epochs; to extend it pass --epochs larger than that (got {epochs})"
        )
    try:
        cfg = TrainConfig.from_dict(merged).resolved()
    except ValueError:
        check_resume(saved.to_dict(), merged, str(run.path))  # a changed setting that the run ignores: name that
        raise
    check_resume(saved.to_dict(), cfg.to_dict(), str(run.path))
    return extended(cfg, saved, int(state["epoch"]))


def train(
    config: TrainConfig | dict | None = None,
    *,
    model: nn.Module | str | None = None,
    data: Dataset | None = None,
    test_data: Dataset | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    verbose: bool = False,
    log: Callable[[str], None] | None = None,
    force: bool = False,
    **overrides: Any,
) -> TrainResult:
    """Train a model as configured; the Python face of ``opnorm train``.

    Args:
        config: a :class:`TrainConfig` (complete), a dict of some of its fields (the others:
            defaults, or with ``resume`` the run's own), or None.
        model: a registry name (``config.model``) or your ``nn.Module``, trained in place
            (recorded as ``"custom:<class name>"``; a resume needs a module of that class).
        data: None (the named ``config.dataset``) or your map-style Dataset of ``(x, y)`` or
            ``(x, y, index)`` items, x in [0, 1]; read into memory once, fingerprinted (a resume
            needs the same data). eps has no default for it. See :mod:`opnorm.training.inputs`.
        test_data: with ``data``, a Dataset like it for the per-epoch check; None skips the
            check (with a warning: the metrics then hold no accuracy).
        resume: continue the run in ``config.out`` from its ``checkpoint.pt`` (same batches,
            RNG states and optimizer state: on CPU the result is bit-identical to an
            uninterrupted run). Only the settings in ``config.RESUMABLE`` may differ from the
            run's; a larger ``epochs`` extends the run with a learning rate that goes on
            falling (see :mod:`opnorm.training.schedule`).
        stop_after: return after this many epochs of this call (e.g. to split a run
            across jobs; resume it later). None: run to ``config.epochs``.
        verbose: print one line per epoch (rank 0) through ``log`` (default: print).
        force: let a new run write into a directory that holds files of something else
            (never over another run's checkpoint).
        **overrides: config fields replacing those of ``config``.

    Returns:
        :class:`TrainResult` (model, final metrics, history, resolved config, run_dir).

    Raises:
        ValueError / TypeError: invalid config, a changed trajectory setting, world size or
            training data on resume, an occupied run directory, or a symbolic link in place of
            one of the run's files (one-line messages).
        DatasetNotFoundError: the dataset files are missing.
        FileNotFoundError / CheckpointError: ``resume`` without a readable, intact checkpoint.
        RunLockedError: another process is writing the run directory.
        TrainingDiverged: a non-finite loss or weights (``on_nan="stop"``).
        EpochCheckFailed: the per-epoch check failed; the epoch is saved (resume it).

    Example (trains on digits)::

        res = train(method="pgd-at", dataset="digits", model="cnn", epochs=2, eps=0.1, p="inf", out="runs/a")
        res.metrics["accuracy"], res.metrics["robust_accuracy"]
        train(out="runs/a", epochs=4, resume=True)  # the run of runs/a, extended to 4 epochs
        train(model=MyNet(), data=TensorDataset(x, y), test_data=TensorDataset(xt, yt), eps=0.1, out="runs/b")
    """
    inputs = train_inputs(model, data, test_data)
    given = _as_settings(config, {**overrides, **inputs.settings()})
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
    say = log or print
    out = given.out if isinstance(given, TrainConfig) else given.get("out")
    run = RunDir(out) if out is not None else None
    writer = int(os.environ.get("RANK", "0")) == 0  # rank 0 alone writes (and locks) the run
    with contextlib.ExitStack() as stack:
        state = None
        if resume:
            if run is None:
                raise ValueError("resume needs the run directory: pass out (--out DIR)")
            run.exists_for_resume()
            if writer:
                stack.enter_context(run.lock())
            state = run.load_for_resume()
            saved = flat_settings(state["config"])  # the run's settings, read flat (config.json groups them)
            inputs.check_resume(saved, str(run.path))
            cfg = _resume_config(given, state, run)
            if verbose and len(cfg.schedule_extensions) > len(saved.get("schedule_extensions", [])):
                say(
                    f"extending the run from {saved['epochs']} to {cfg.epochs} epochs: the learning rate "
                    f"goes on falling from epoch {state['epoch']} on (recorded in {CONFIG} as schedule_extensions)"
                )
        else:
            cfg = (given if isinstance(given, TrainConfig) else TrainConfig.from_dict(given)).resolved()
            if run is not None:
                run.refuse_existing(force)
        inputs.check(cfg)
        if inputs.train is not None and inputs.test is None:
            warnings.warn(
                "train(data=...) without test_data=: the per-epoch check (accuracy, robust accuracy, operator norm) "
                "is skipped; pass test_data= to measure them",
                stacklevel=2,
            )
        ctx = D.setup(cfg.device)
        try:
            splits = inputs.splits(cfg)
            if run is not None and writer:
                if not resume:  # locked only now, so that a config or data error leaves no directory
                    stack.enter_context(run.lock())
                    run.refuse_existing(force)
                run.remove_stale_files()
            return _run(cfg, ctx, inputs, splits, state, run if writer else None, stop_after, verbose, say)
        finally:
            D.cleanup(ctx)


def _check_same_run(state: dict, facts: dict, cfg: TrainConfig, where: str) -> None:
    """Refuse a resume whose world size or training data differ from the run's (checkpoints
    written before these were recorded lack them and are not checked)."""
    old = state.get("world_size", facts["world_size"])
    if old != facts["world_size"]:
        new = facts["world_size"]
        how = f"torchrun --nproc_per_node={old}" if old > 1 else "one process (without torchrun)"
        raise ValueError(
            f"cannot resume {where}: it was trained in {old} process(es), a global batch of "
            f"{old * cfg.batch_size}, and this resume runs in {new} "
            f"(global batch {new * cfg.batch_size}); "
            f"the global batch (--batch-size x processes) shapes the training: resume in {how}"
        )
    if state.get("data", facts["data"]) != facts["data"]:
        given = f" (--data-dir {cfg.data_dir})" if cfg.data_dir else ""
        raise ValueError(
            f"cannot resume {where}: the {cfg.dataset} training data{given} differ from the run's "
            f"(sha256 {facts['data'][:12]}..., the run's {str(state['data'])[:12]}...); point --data-dir "
            f"at the data the run was trained on, or start a new run"
        )


def _restore(state: dict, model, optimizer, objective, scaler, where: str) -> tuple[int, list]:
    """Load a checkpoint's entries; a damaged one is a CheckpointError naming it."""

    def load(key: str, into: Callable[[Any], Any]) -> None:
        try:
            into(state[key])
        except Exception as err:  # a crafted entry: any error of the loaders means the same
            raise CheckpointError(
                f"{where} has a damaged {key!r} entry ({one_line(err)}); it was not written by "
                f"opnorm train for this run: resume from another checkpoint or start a new run"
            ) from None

    load("model", model.load_state_dict)
    load("optimizer", optimizer.load_state_dict)
    if "objective" in state:
        load("objective", objective.load_state_dict)
    if scaler is not None and state.get("scaler"):
        load("scaler", scaler.load_state_dict)
    load("rng", set_rng_state)
    return state["epoch"], [dict(m) for m in state["history"]]  # both checked by RunDir.load_for_resume


_CHECKED = "accuracy"  # an entry due for the check without it: an epoch saved whose check did not finish


def _check(model, splits, cfg: TrainConfig, epoch: int, device, show: bool, run: RunDir | None) -> dict[str, Any]:
    """The per-epoch check of ``epoch`` (0-based), after its checkpoint: its metrics, or
    EpochCheckFailed in one line. It draws from no training RNG (restored afterwards), so a
    resumed run that checks the epoch again goes on exactly as one that was not interrupted."""
    saved = rng_state()
    t1 = time.perf_counter()
    try:
        out = evaluate_epoch(model, splits, cfg, epoch, device, show)
    except Exception as err:
        kept = f"{run.checkpoint} holds epoch {epoch + 1}" if run is not None else "no run directory was written"
        raise EpochCheckFailed(
            f"the check after epoch {epoch + 1} (clean and robust accuracy, operator norm) failed: "
            f"{one_line(err)}; {kept}: fix the cause and continue with --resume, which checks the "
            f"epoch again (--debug shows the traceback)"
        ) from err
    finally:
        set_rng_state(saved)
    out["eval_seconds"] = time.perf_counter() - t1
    return out


def _run(
    cfg: TrainConfig,
    ctx: D.DistContext,
    inputs: TrainInputs,
    splits,
    state: dict | None,
    run: RunDir | None,
    stop_after: int | None,
    verbose: bool,
    say: Callable[[str], None],
) -> TrainResult:
    device = ctx.device
    _seed_everything(cfg.seed)  # identical initial weights on every rank
    model = inputs.model(cfg, splits).to(device)
    objective = build_objective(cfg, model, num_examples=len(splits.train)).to(device)
    optimizer = _build_optimizer(cfg, model)
    use_scaler = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if use_scaler else None
    facts = {"world_size": ctx.world_size, "data": data_fingerprint(splits.train)}
    where = f"checkpoint {Path(cfg.out) / CHECKPOINT}" if cfg.out is not None else "the checkpoint"
    if state is not None:
        _check_same_run(state, facts, cfg, where)
    start_epoch, history = _restore(state, model, optimizer, objective, scaler, where) if state is not None else (0, [])
    if cfg.p not in PGD_ORDERS and verbose and ctx.is_main:
        say(
            f"the per-epoch check measures no robust accuracy: PGD needs p in 1, 2, inf (got p {cfg.p:g}); "
            f"it measures accuracy and the operator norm"
        )
    if ctx.distributed and ctx.rank > 0:
        # per-rank streams for random starts; rank 0 keeps the single-process stream
        torch.manual_seed(cfg.seed * 7919 + ctx.rank + start_epoch * 104729)
    net = D.wrap(model, ctx)
    if cfg.compile is not False:  # attacks and power iterations use the plain module (unwrap)
        net = _compiled(net, cfg.compile)
    if history and history[-1].get("evaluated", True) and _CHECKED not in history[-1] and ctx.is_main:
        history[-1].update(_check(model, splits, cfg, start_epoch - 1, device, _progress(cfg, ctx), run))
    if run is not None:
        run.write_config(cfg)
        run.write_metrics(history)  # drops lines of epochs past the checkpoint
    D.barrier(ctx)

    step = _Stepper(cfg, ctx, net, model, objective, optimizer, scaler)
    sampler = D.sampler(splits.train, ctx, seed=cfg.seed)
    passes = data_passes(cfg)  # cfg.epochs, except free: epochs / replays (see opnorm.fast_at)
    for done_now, epoch in enumerate(range(start_epoch, passes), 1):
        t0 = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = make_loader(
            splits.train,
            cfg.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            seed=cfg.seed,
            epoch=epoch,
            num_workers=cfg.num_workers,
        )
        lr = learning_rate(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            sums, steps, skipped = step.epoch(loader, epoch)
            objective.sync()  # every rank: the store's last updates, before the checkpoint
            if not _all_finite([*model.state_dict().values(), *objective.state_dict().values()]):
                raise _NonFinite(steps + skipped, "the model's or the regularizer's state")
        except _NonFinite as err:
            raise TrainingDiverged(_diverged(cfg, objective, epoch, err, start_epoch + done_now - 1, run)) from None
        keys = sorted(sums)
        means = D.all_reduce_mean([sums[k] / max(1, steps) for k in keys], ctx)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            **dict(zip(keys, means)),
            "lr": lr,
            "lr_schedule": describe(cfg, epoch),
            "seconds": time.perf_counter() - t0,
        }
        if cfg.on_nan == "skip":
            metrics["skipped_batches"] = skipped
        # saved with the epoch, so that a resume knows whether its check is still to run
        metrics["evaluated"] = splits.test is not None and _evaluates(
            cfg, epoch, passes, stopping=stop_after is not None and done_now >= stop_after
        )
        history.append(metrics)
        if run is not None:  # the epoch is saved before its check, which may fail
            run.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "objective": objective.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "epoch": epoch + 1,
                    "rng": rng_state(),
                    "config": cfg.to_dict(),
                    "history": history,
                    **facts,
                }
            )
        if ctx.is_main and metrics["evaluated"]:
            metrics.update(_check(model, splits, cfg, epoch, device, step.show, run))
        if run is not None:
            run.write_metrics(history)
        if verbose and ctx.is_main:
            say(_epoch_line(metrics, cfg))
        D.barrier(ctx)
        if stop_after is not None and done_now >= stop_after and epoch + 1 < passes:
            return TrainResult(model, history[-1], history, cfg, run.path if run else _out(cfg), completed=False)

    if run is not None:
        run.export(model, cfg)
    D.barrier(ctx)
    return TrainResult(
        model, history[-1] if history else {}, history, cfg, run.path if run else _out(cfg), completed=True
    )


def _compiled(net: nn.Module, backend) -> nn.Module:
    if backend is True:
        return torch.compile(net)
    try:
        return torch.compile(net, backend=backend)
    except RuntimeError as err:
        if type(err).__name__ != "InvalidBackend":
            raise
        from torch import _dynamo  # only here: importing it costs seconds

        raise ValueError(
            f"compile backend {backend!r} is not one torch knows; valid: "
            f"{', '.join(_dynamo.list_backends(exclude_tags=()))} (or --compile alone)"
        ) from None


def _out(cfg: TrainConfig) -> Path | None:
    return Path(cfg.out) if cfg.out is not None else None


def _diverged(
    cfg: TrainConfig, objective: Objective, epoch: int, err: _NonFinite, last_saved: int, run: RunDir | None
) -> str:
    if run is None:
        kept = "no run directory was written"
    elif last_saved > 0:
        kept = f"{run.checkpoint} still holds epoch {last_saved}"
    else:
        kept = f"no checkpoint was written to {run.path}"
    hint = "lower --lr" + ("" if cfg.on_nan == "skip" else ", or pass --on-nan skip to skip such batches")
    if objective.divergence_hint:
        hint = f"{objective.divergence_hint} or {hint}"
    return (
        f"training diverged (NaN/inf) at epoch {epoch + 1}, step {err.step}: {err.what} became non-finite; "
        f"{kept}; {hint}"
    )


class _Stepper:
    """One epoch of optimizer steps, with the non-finite checks of ``cfg.on_nan``."""

    def __init__(self, cfg: TrainConfig, ctx: D.DistContext, net, model, objective, optimizer, scaler) -> None:
        self.cfg, self.ctx, self.net, self.model = cfg, ctx, net, model
        self.objective, self.optimizer, self.scaler = objective, optimizer, scaler
        self.show = _progress(cfg, ctx)
        amp_dtype = torch.bfloat16 if ctx.device.type == "cpu" else torch.float16
        self.autocast = (
            (lambda: torch.autocast(ctx.device.type, dtype=amp_dtype)) if cfg.amp else contextlib.nullcontext
        )

    def _agreed(self, bad: bool) -> bool:
        # every rank must take the same branch (a skipped backward skips DDP's all-reduce)
        if not self.ctx.distributed:
            return bad
        return D.all_reduce_mean([float(bad)], self.ctx)[0] > 0

    def epoch(self, loader, epoch: int) -> tuple[dict[str, float], int, int]:
        """(sums of the logged values, steps taken, batches skipped); raises _NonFinite."""
        device, opt, scaler = self.ctx.device, self.optimizer, self.scaler
        sums: dict[str, float] = {}
        steps = skipped = 0
        bar = progress_bar(
            Replayed(loader, replays_per_batch(self.cfg)), self.show, f"epoch {epoch + 1}/{data_passes(self.cfg)}"
        )
        for n, (x, y, index) in enumerate(bar, 1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with self.autocast():
                loss, logs = self.objective(self.net, x, y, index)
            value = float(loss.detach())
            opt.zero_grad(set_to_none=True)
            if self._agreed(not math.isfinite(value)):
                if self.cfg.on_nan == "stop":
                    raise _NonFinite(n, f"the loss ({value})")
                skipped += 1
                continue
            if scaler is not None:  # the scaler skips steps with non-finite gradients itself
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                if self.cfg.on_nan == "skip" and not _all_finite(
                    [p.grad for p in self.model.parameters() if p.grad is not None]
                ):
                    skipped += 1
                    continue
                opt.step()
            if not _all_finite(list(self.model.parameters())):
                raise _NonFinite(n, "the weights")
            steps += 1
            for k, v in {"loss": value, **logs}.items():
                sums[k] = sums.get(k, 0.0) + v
            if self.show:
                bar.set_postfix(loss=f"{sums['loss'] / steps:.4f}")
        if steps == 0 and skipped:
            raise _NonFinite(skipped, f"every one of the epoch's {skipped} batches")
        return sums, steps, skipped


def _evaluates(cfg: TrainConfig, epoch: int, passes: int, stopping: bool) -> bool:
    """Whether epoch (0-based) ends with the evaluation: every ``eval_every`` epochs, the last
    one, and the last of an invocation that stops early (its result carries the metrics)."""
    last = epoch + 1 == passes
    return last or stopping or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0)


def _epoch_line(m: dict[str, Any], cfg: TrainConfig) -> str:
    p, q = order_text(cfg.p), order_text(cfg.q)
    line = f"epoch {m['epoch']}/{data_passes(cfg)}  loss {m['loss']:.4f}  "
    if "eval_seconds" not in m:  # an epoch without the evaluation (eval_every)
        return line + f"train {m['seconds']:.1f}s"
    robust = "n/a" if m["robust_accuracy"] is None else f"{m['robust_accuracy']:.4f}"
    return line + (
        f"acc {m['accuracy']:.4f}  robust(l{p}, eps={cfg.eps:g}) {robust}  "
        f"||J||_({p},{q}) {m['operator_norm']:.3f}  train {m['seconds']:.1f}s  eval {m['eval_seconds']:.1f}s"
    )
