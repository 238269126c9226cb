"""The training loop behind ``opnorm train`` and ``opnorm.train(config)``.

One epoch: a loader seeded by ``(seed, epoch)`` (so a resumed run sees the same batches),
one objective per method (see :class:`Objective`), then evaluation on rank 0 and an
atomic checkpoint. The run directory (``config.out``) holds:

* ``config.json``: the resolved :class:`~opnorm.training.config.TrainConfig`
  (re-run with ``opnorm train --config config.json``);
* ``metrics.jsonl``: one line per epoch: ``epoch, loss, lr, accuracy`` (clean, whole test
  split), ``robust_accuracy`` (PGD at the training eps and p, first ``eval_points`` test
  points), ``operator_norm`` (mean ``||J(x)||_{p->q}`` on those points, via
  :func:`opnorm.power.operator_norm`), ``seconds`` (training) and ``eval_seconds``;
* ``checkpoint.pt``: model, optimizer, scheduler, objective (e.g. spectral-norm vectors),
  AMP scaler, completed epochs, RNG states, config and history, rewritten atomically
  after every epoch; ``model.safetensors``: the final weights.

Example::

    >>> from opnorm import train, TrainConfig
    >>> result = train(TrainConfig(method="opnorm", epochs=3, out="runs/dd-snr"))
    >>> result.metrics["robust_accuracy"], result.model
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from opnorm.fast_at import FAST_AT_METHODS, Replayed, data_passes, fast_at_loss, replays_per_batch
from opnorm.jacobian import eval_mode, forward, unwrap
from opnorm.regularizers import AdversarialTrainingLoss, GlobalSpectralNormRegularizer, OperatorNormRegularizer
from opnorm.training import distributed as D
from opnorm.training.checkpoint import (
    CheckpointError,
    export_weights,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from opnorm.training.config import TrainConfig
from opnorm.training.objectives import opnorm_regularizer
from opnorm.training.data import load_dataset, make_loader
from opnorm.training.models import build_model

__all__ = [
    "TrainResult",
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

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


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
    run_dir: Optional[Path] = None
    completed: bool = True


# ----------------------------------------------------------------------------- objectives


class Objective(nn.Module):
    """The per-batch training loss of one method.

    ``objective(net, x, y, index) -> (loss, logs)`` where ``net`` is the model as trained
    (DDP / compiled wrappers included) and ``logs`` holds floats to average over the epoch.
    Each method does exactly one forward through ``net``:

    * clean: ``CE(f(x), y)``;
    * opnorm: ``CE(f(x), y) + lam * mean sigma^(1|2)`` from one forward of ``[x; x + eps v]``
      (:meth:`OperatorNormRegularizer.joint`, given the batch's dataset ``index``: in fast mode
      the backward of this loss also advances each example's stored direction); with
      ``opnorm_task="perturbed"`` the CE is taken at ``x + eps v`` instead;
    * global-snr: ``CE(f(x), y) + lam * sum_l sigma(W_l)^2``;
    * pgd-at / logit-at / trades: :class:`AdversarialTrainingLoss` with kind ce / logit / trades;
    * fgsm-rs / n-fgsm / free: the single-step losses of :mod:`opnorm.fast_at` (free: the loop
      replays each batch ``cfg.replays`` times).
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, num_examples: Optional[int] = None) -> None:
        super().__init__()
        self.method = cfg.method
        self.reg: Optional[nn.Module] = None
        self.at: Optional[nn.Module] = None
        self.task = cfg.opnorm.task
        if cfg.method == "opnorm":
            # fast mode keeps a store of directions by dataset index (in state_dict: checkpoints
            # resume exactly); the batch's index reaches it through joint()
            self.reg = opnorm_regularizer(cfg, num_examples)
        elif cfg.method == "global-snr":
            self.reg = GlobalSpectralNormRegularizer(model, iters=cfg.iters, lam=cfg.lam, seed=cfg.seed)
        elif cfg.method in ("pgd-at", "logit-at", "trades"):
            kind = {"pgd-at": "ce", "logit-at": "logit", "trades": "trades"}[cfg.method]
            self.at = AdversarialTrainingLoss(
                kind, cfg.eps, cfg.p, steps=cfg.steps, step_size=cfg.step_size, q=cfg.q,
                lam=cfg.beta if kind == "trades" else cfg.lam, squared=cfg.squared, adv_fraction=cfg.adv_fraction,
            )
        elif cfg.method in FAST_AT_METHODS:
            self.at = fast_at_loss(cfg)

    def sync(self) -> None:
        """Share state across DDP ranks (the regularizer's direction store); every rank calls it."""
        if isinstance(self.reg, OperatorNormRegularizer):
            self.reg.sync()

    def forward(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor] = None):
        logs: dict[str, float] = {}
        if self.at is not None:
            return self.at(net, x, y, index), logs
        if isinstance(self.reg, OperatorNormRegularizer):
            if self.task == "perturbed":  # CE where the penalty looks: f(x + eps v) from the same forward
                _, pen, logits = self.reg.joint(net, x, index, perturbed=True)
            else:
                logits, pen = self.reg.joint(net, x, index)
            logs["penalty"] = float(pen.detach())
            logs["train_sigma"] = float(self.reg.last_sigma.mean())
            return F.cross_entropy(logits.float(), y) + pen, logs
        logits = forward(net, x)
        loss = F.cross_entropy(logits.float(), y)
        if isinstance(self.reg, GlobalSpectralNormRegularizer):
            pen = self.reg()
            logs["penalty"] = float(pen.detach())
            loss = loss + pen
        return loss, logs


# ----------------------------------------------------------------------------- evaluation


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> float:
    """Fraction of (x, y) classified correctly, in eval mode (x, y on any device; moved to the model's)."""
    net = unwrap(model)
    device = next(net.parameters()).device
    correct = 0
    with eval_mode(net):
        for s in _batches(x.shape[0], batch_size):
            correct += int((net(x[s].to(device)).argmax(1) == y[s].to(device)).sum())
    return correct / max(1, x.shape[0])


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    p: Any,
    steps: int = 20,
    restarts: int = 1,
    loss: str = "ce",
    step_size: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 256,
    progress: bool = False,
    best_iterate: bool = True,
    schedule: str = "constant",
) -> float:
    """Accuracy under :func:`opnorm.attacks.pgd` (eval mode), batched; eps = 0 gives clean accuracy.

    An example counts as robust only if no point of the attack's path fools the model
    (``best_iterate``, as APGD scores; False: only the last iterate of each run counts).
    ``schedule``: the step-size schedule of :func:`~opnorm.attacks.pgd` ("halving" is stronger).
    ``progress`` shows a bar over the batches (on stderr).
    """
    from opnorm.attacks import pgd

    net = unwrap(model)
    device = next(net.parameters()).device
    correct = 0
    for s in _bar(list(_batches(x.shape[0], batch_size)), progress, f"PGD eps={eps:g}"):
        xb, yb = x[s].to(device), y[s].to(device)
        if eps > 0:
            xb = pgd(net, xb, yb, eps=eps, p=p, loss=loss, steps=steps, step_size=step_size,
                     restarts=restarts, random_start=True, generator=generator, best_iterate=best_iterate,
                     schedule=schedule)
        with torch.no_grad(), eval_mode(net):
            correct += int((net(xb).argmax(1) == yb).sum())
    return correct / max(1, x.shape[0])


def mean_operator_norm(
    model: nn.Module, x: torch.Tensor, p: Any, q: Any, *, iters: Optional[int] = None,
    generator: Optional[torch.Generator] = None, batch_size: int = 256,
) -> float:
    """Mean over x of ``||J(x)||_{p->q}`` (:func:`opnorm.power.operator_norm`, method "auto")."""
    from opnorm.power import operator_norm

    net = unwrap(model)
    device = next(net.parameters()).device
    total = 0.0
    for s in _batches(x.shape[0], batch_size):
        res = operator_norm(net, x[s].to(device), p, q, iters=iters, generator=generator)
        total += float(res.sigma.sum())
    return total / max(1, x.shape[0])


def _evaluate(model: nn.Module, splits, cfg: TrainConfig, epoch: int, device: torch.device, show: bool = False) -> dict[str, float]:
    # Own generators: evaluation never draws from the training RNG streams.
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + epoch + 1)
    xs, ys = splits.test.x[: cfg.eval_points], splits.test.y[: cfg.eval_points]
    out = {"accuracy": accuracy(model, splits.test.x, splits.test.y)}
    out["robust_accuracy"] = robust_accuracy(model, xs, ys, eps=cfg.eps, p=cfg.p, steps=cfg.eval_steps, generator=gen,
                                             progress=show)
    out["operator_norm"] = mean_operator_norm(model, xs, cfg.p, cfg.q, iters=cfg.norm_iters, generator=gen)
    return out


# ----------------------------------------------------------------------------- files


def write_text_atomic(path: Path, text: str) -> None:
    """Write text via a temp file in the same directory and os.replace: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}


def _save_config(run_dir: Path, cfg: TrainConfig) -> None:
    write_text_atomic(run_dir / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")


def _save_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    write_text_atomic(run_dir / METRICS, "".join(json.dumps(_jsonable(m)) + "\n" for m in history))


# ----------------------------------------------------------------------------- the loop


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
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=data_passes(cfg))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    return opt, sched


_RESUME_KEYS = ("dataset", "model", "width", "method", "optimizer", "limit_train")


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    for key in _RESUME_KEYS:
        if key in saved and saved[key] != getattr(cfg, key):
            raise ValueError(
                f"cannot resume {path}: it was trained with {key}={saved[key]!r} but the config says {getattr(cfg, key)!r}"
            )


def train(
    config: Union[TrainConfig, dict, None] = None,
    *,
    resume: bool = False,
    stop_after: Optional[int] = None,
    verbose: bool = False,
    log: Optional[Callable[[str], None]] = None,
    **overrides: Any,
) -> TrainResult:
    """Train a model as configured; the Python face of ``opnorm train``.

    Args:
        config: a :class:`TrainConfig`, a dict of its fields, or None (defaults).
        resume: continue the run in ``config.out`` from its ``checkpoint.pt`` (same batches,
            RNG states and optimizer state: on CPU the result is bit-identical to an
            uninterrupted run).
        stop_after: return after this many epochs of this call (e.g. to split a run
            across jobs; resume it later). None: run to ``config.epochs``.
        verbose: print one line per epoch (rank 0) through ``log`` (default: print).
        **overrides: config fields replacing those of ``config``.

    Returns:
        :class:`TrainResult` (model, final metrics, history, resolved config, run_dir).

    Raises:
        ValueError / TypeError: invalid config (one-line messages).
        DatasetNotFoundError: the dataset files are missing.
        FileNotFoundError / CheckpointError: ``resume`` without a readable checkpoint.

    Example:
        >>> res = train(method="pgd-at", dataset="digits", model="cnn", epochs=2, eps=0.1, p="inf")
        >>> res.metrics["accuracy"], res.metrics["robust_accuracy"]
    """
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    elif not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, a dict or None, got {type(config).__name__}")
    cfg = (config.replace(**overrides) if overrides else config).resolved()
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
    say = log or print

    run_dir = Path(cfg.out) if cfg.out is not None else None
    ckpt_path = run_dir / CHECKPOINT if run_dir is not None else None
    state = None
    if resume:
        if ckpt_path is None:
            raise ValueError("resume needs the run directory: pass out (--out DIR)")
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"no run to resume in {run_dir} (no {CHECKPOINT})")
        state = load_checkpoint(ckpt_path)  # before anything is written: a bad file changes nothing
        for key in ("model", "optimizer", "scheduler", "epoch", "rng", "history"):
            if key not in state:
                raise CheckpointError(f"checkpoint {ckpt_path} lacks {key!r}; it was not written by opnorm train")
        _check_resumable(state.get("config", {}), cfg, ckpt_path)
    elif ckpt_path is not None and ckpt_path.exists():
        raise ValueError(f"{run_dir} already holds a run ({CHECKPOINT}); pass --resume to continue it or choose another --out")

    ctx = D.setup(cfg.device)
    try:
        return _run(cfg, ctx, state, run_dir, stop_after, verbose, say)
    finally:
        D.cleanup(ctx)


def _run(
    cfg: TrainConfig, ctx: D.DistContext, state: Optional[dict], run_dir: Optional[Path],
    stop_after: Optional[int], verbose: bool, say: Callable[[str], None],
) -> TrainResult:
    device = ctx.device
    splits = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download,
                          limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    _seed_everything(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, input_shape=splits.input_shape, num_classes=splits.num_classes,
                        mean=splits.mean, std=splits.std, width=cfg.width).to(device)
    objective = Objective(cfg, model, num_examples=len(splits.train)).to(device)
    optimizer, scheduler = _build_optimizer(cfg, model)
    use_scaler = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if use_scaler else None

    start_epoch, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "objective" in state:
            objective.load_state_dict(state["objective"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        set_rng_state(state["rng"])
    if ctx.distributed:
        # per-rank streams for random starts; rank 0 keeps the single-process stream
        if ctx.rank > 0:
            torch.manual_seed(cfg.seed * 7919 + ctx.rank + start_epoch * 104729)
    net = D.wrap(model, ctx)
    if cfg.compile is not False:  # attacks and power iterations use the plain module (unwrap)
        net = torch.compile(net) if cfg.compile is True else torch.compile(net, backend=cfg.compile)

    if run_dir is not None and ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _save_config(run_dir, cfg)
        _save_metrics(run_dir, history)  # drops lines of epochs past the checkpoint
    D.barrier(ctx)

    amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if cfg.amp else contextlib.nullcontext
    show = _progress(cfg, ctx)
    sampler = D.sampler(splits.train, ctx, seed=cfg.seed)
    done_now = 0
    passes = data_passes(cfg)  # cfg.epochs, except free: epochs / replays (see opnorm.fast_at)
    for epoch in range(start_epoch, passes):
        t0 = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
            loader = make_loader(splits.train, cfg.batch_size, shuffle=False, sampler=sampler, seed=cfg.seed,
                                 epoch=epoch, num_workers=cfg.num_workers)
        else:
            loader = make_loader(splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                                 num_workers=cfg.num_workers)
        model.train()
        sums: dict[str, float] = {}
        steps = 0
        bar = _bar(Replayed(loader, replays_per_batch(cfg)), show, f"epoch {epoch + 1}/{passes}")
        for x, y, index in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                loss, logs = objective(net, x, y, index)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            steps += 1
            for k, v in {"loss": float(loss.detach()), **logs}.items():
                sums[k] = sums.get(k, 0.0) + v
            if show:
                bar.set_postfix(loss=f"{sums['loss'] / steps:.4f}")
        objective.sync()  # every rank: the store's last updates, before the checkpoint
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        keys = sorted(sums)
        means = D.all_reduce_mean([sums[k] / max(1, steps) for k in keys], ctx)
        metrics: dict[str, Any] = {"epoch": epoch + 1, **dict(zip(keys, means)), "lr": lr,
                                   "seconds": time.perf_counter() - t0}
        if ctx.is_main:
            t1 = time.perf_counter()
            metrics.update(_evaluate(model, splits, cfg, epoch, device, show))
            metrics["eval_seconds"] = time.perf_counter() - t1
        history.append(metrics)
        if ctx.is_main:
            if run_dir is not None:
                _save_metrics(run_dir, history)
                save_checkpoint(run_dir / CHECKPOINT, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "objective": objective.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {}, "epoch": epoch + 1,
                    "rng": rng_state(), "config": cfg.to_dict(), "history": history,
                })
            if verbose:
                say(_epoch_line(metrics, cfg))
        D.barrier(ctx)
        done_now += 1
        if stop_after is not None and done_now >= stop_after and epoch + 1 < passes:
            return TrainResult(model, history[-1], history, cfg, run_dir, completed=False)

    if run_dir is not None and ctx.is_main:
        export_weights(model, run_dir / WEIGHTS, {"model": cfg.model, "dataset": cfg.dataset, "method": cfg.method})
    D.barrier(ctx)
    return TrainResult(model, history[-1] if history else {}, history, cfg, run_dir, completed=True)


def _bar(loader, show: bool, desc: str):
    if not show:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def _epoch_line(m: dict[str, Any], cfg: TrainConfig) -> str:
    p = "inf" if cfg.p == math.inf else f"{cfg.p:g}"
    q = "inf" if cfg.q == math.inf else f"{cfg.q:g}"
    return (
        f"epoch {m['epoch']}/{data_passes(cfg)}  loss {m['loss']:.4f}  acc {m['accuracy']:.4f}  "
        f"robust(l{p}, eps={cfg.eps:g}) {m['robust_accuracy']:.4f}  ||J||_({p},{q}) {m['operator_norm']:.3f}  "
        f"{m['seconds']:.1f}s"
    )
