"""Command line: ``opnorm train | eval | demo | reproduce``.

The CLI only parses arguments into a :class:`~opnorm.training.config.TrainConfig` (or
evaluation settings) and calls the library. Every error ends the program with one line
``opnorm: error: ...`` on stderr and exit status 1 (2 for malformed command lines, 130 on
Ctrl-C); ``--debug`` (or the environment variable ``OPNORM_DEBUG=1``) shows the traceback.

Examples::

    opnorm demo
    opnorm train --dataset digits --model cnn --method opnorm --p inf --q 2 --eps 0.1 --epochs 5 --out runs/dd
    opnorm train --out runs/dd --resume --epochs 10          # continue a run, extended to 10 epochs
    opnorm train --config runs/dd/config.json --seed 1 --out runs/dd-seed1
    opnorm eval --checkpoint runs/dd/checkpoint.pt --attack pgd --p inf --eps 0,0.05,0.1,0.2
    torchrun --nproc_per_node=2 -m opnorm train --method pgd-at --out runs/ddp
"""

from __future__ import annotations

import argparse
import dataclasses
import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from opnorm.attacks import SCHEDULES  # loaded with the package anyway

__all__ = ["main", "build_parser"]

PROG = "opnorm"
DEBUG_ENV = "OPNORM_DEBUG"


class CLIError(Exception):
    """A user error found by the CLI itself (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``opnorm: error: ...`` and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{PROG}: error: {_one_line(message)} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _flag_type(f) -> Any:
    """argparse type of a config field: its default's type, str for the orders p and q."""
    text = str(f.type)
    if "bool" in text:
        return bool
    for name, typ in (("int", int), ("float", float)):
        if name in text:
            return typ
    return str


def _config_flags(t: argparse.ArgumentParser, cls: Any = None, prefix: str = "") -> None:
    """One flag per config field (``--batch-size``; ``--opnorm-step`` for the nested section),
    with the field's help text; dest is the dotted field path."""
    from opnorm.training.config import TrainConfig

    for f in dataclasses.fields(cls or TrainConfig):
        if f.name == "opnorm":
            _config_flags(t, type(f.default_factory()), "opnorm.")
            continue
        if f.metadata.get("flag") is False:  # written by opnorm itself (e.g. schedule_extensions)
            continue
        flag = "--" + (prefix + f.name).replace(".", "-").replace("_", "-")
        dest, help, metavar = prefix + f.name, f.metadata.get("help"), f.name.upper()
        if f.name == "compile" and not prefix:
            t.add_argument(flag, dest=dest, nargs="?", const=True, metavar="BACKEND", help=help)
        elif _flag_type(f) is bool:
            t.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=help)
        else:
            t.add_argument(flag, dest=dest, type=_flag_type(f), metavar=metavar, help=help)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog=PROG, description="Data-dependent operator norms, attacks and robust training.")
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks of errors (or set {DEBUG_ENV}=1)")
    common = argparse.ArgumentParser(add_help=False)  # --debug after the subcommand too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{train,eval,demo,reproduce}")
    sub.required = True

    # train: every option defaults to "absent" so config files can fill what flags do not set
    t = sub.add_parser("train", help="train a model", parents=[common], argument_default=argparse.SUPPRESS,
                       description="Train a model; flags override values from --config (with --resume: the "
                                   "run's own settings, of which only those that do not shape training may change). "
                                   "--batch-size is per process: under torchrun "
                                   "the global batch is batch size * number of processes.")
    t.add_argument("--config", help="JSON config (e.g. a run's config.json); flags override its values")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--stop-after", type=int, help="stop after this many epochs of this invocation (resume later)")
    t.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    t.add_argument("--force", action="store_true",
                   help="let a new run write into a --out directory that holds files of something else")
    _config_flags(t)

    e = sub.add_parser("eval", help="robust accuracy of a checkpoint", parents=[common])
    e.add_argument("--checkpoint", required=True, help="checkpoint.pt (or its run directory)")
    e.add_argument("--attack", default="pgd", help="attack: pgd")
    e.add_argument("--p", default=None, help="threat model (default: the run's p)")
    e.add_argument("--eps", default=None, help="comma-separated radii (default: 0 and the run's eps)")
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--restarts", type=int, default=1)
    e.add_argument("--step-size", type=float, default=None, help="step length (default 2.5 eps / steps; halving: eps)")
    e.add_argument("--schedule", default="halving", choices=SCHEDULES,
                   help="step-size schedule: halving (default; large steps halved at 1/4, 1/2, 3/4 of the steps, "
                        "each halving from the strongest point so far) | constant")
    e.add_argument("--loss", default="ce", help="attack loss: ce | cw | logit | kl")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N test points (default all)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--data-dir", default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default=None, help="output prefix (default: <run dir>/eval-<attack>-p<p>); writes .json and .csv")

    d = sub.add_parser("demo", help="train a small CNN on digits and print per-example operator norms", parents=[common])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epochs", type=int, default=3)

    r = sub.add_parser("reproduce", help="run the paper's study on a dataset", parents=[common])
    r.add_argument("--dataset", default="digits")
    r.add_argument("--quick", action="store_true", help="a small, fast version")
    r.add_argument("--out", default=None, help="report directory (default reports/<dataset>)")
    r.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (default: the preset's)")
    r.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    r.add_argument("--config", default=None, help="a training config file (e.g. configs/paper-cifar10.json) defining the study")
    r.add_argument("--runs", default=None, help="runs directory: trained models and measurements, reused by a rerun (default <out>/runs)")
    r.add_argument("--data-dir", default=None)
    r.add_argument("--limit-train", type=int, default=None, help="use only the first N training examples")
    r.add_argument("--eval-points", type=int, default=None, help="test points of the measurements")
    return parser


# ----------------------------------------------------------------------------- train


_CLI_ONLY = ("config", "resume", "stop_after", "quiet", "force", "command", "debug")


def _read_json(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found") from None
    except OSError as err:
        raise FileNotFoundError(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object of config fields")
    return data


def train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given: --config's, overridden by the flags set (nested like a config file)."""
    from opnorm.training.config import merge

    flags: dict[str, Any] = {}
    for k, v in vars(args).items():
        if k not in _CLI_ONLY:
            section, _, name = k.rpartition(".")
            (flags.setdefault(section, {}) if section else flags)[name or k] = v
    from_file = _read_json(Path(args.config), "config file") if "config" in args else {}
    return merge(from_file, flags)


def train_config_from_args(args: argparse.Namespace):
    """(config, resume, stop_after): for a new run a resolved TrainConfig (defaults < --config <
    flags); with --resume the dict of the settings given (--config < flags), which the trainer
    applies to the run's own config from its checkpoint (refusing trajectory changes)."""
    from opnorm.training.config import TrainConfig

    settings = train_settings(args)
    stop_after = getattr(args, "stop_after", None)
    if getattr(args, "resume", False):
        if settings.get("out") is None:
            raise CLIError("--resume needs the run directory: pass --out DIR")
        return settings, True, stop_after
    return TrainConfig.from_dict(settings).resolved(), False, stop_after


def cmd_train(args: argparse.Namespace) -> int:
    from opnorm.training.config import defaults_line
    from opnorm.training.trainer import train

    config, resume, stop_after = train_config_from_args(args)
    quiet = bool(getattr(args, "quiet", False))
    if not resume and not quiet and int(os.environ.get("RANK", "0")) == 0:
        print(defaults_line(train_settings(args), config))  # the run's first line names what defaults filled in
    result = train(config, resume=resume, stop_after=stop_after, verbose=not quiet,
                   force=bool(getattr(args, "force", False)))
    if int(os.environ.get("RANK", "0")) == 0 and not quiet:
        state = "finished" if result.completed else f"stopped after epoch {result.metrics.get('epoch')}"
        where = f"; run directory {result.run_dir}" if result.run_dir is not None else ""
        print(f"training {state}{where}")
    return 0


# ----------------------------------------------------------------------------- eval


def _parse_eps_list(text: str) -> list[float]:
    try:
        values = [float(tok) for tok in text.split(",") if tok.strip() != ""]
    except ValueError:
        raise ValueError(f"--eps must be comma-separated numbers, e.g. 0,0.05,0.1; got {text!r}") from None
    if not values:
        raise ValueError("--eps needs at least one radius")
    if any(math.isnan(v) or v < 0 for v in values):
        raise ValueError(f"every eps must be >= 0, got {text!r}")
    return values


def _fmt(p: float) -> str:
    return "inf" if p == math.inf else f"{p:g}"


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from opnorm.norms import norm_order
    from opnorm.training.checkpoint import CheckpointError, load_checkpoint
    from opnorm.training.config import TrainConfig
    from opnorm.training.data import load_dataset
    from opnorm.training.distributed import resolve_device
    from opnorm.training.files import write_text_atomic
    from opnorm.training.models import build_model
    from opnorm.training.trainer import CHECKPOINT, accuracy, robust_accuracy

    if args.attack != "pgd":
        raise ValueError(f"unknown attack {args.attack!r}; valid: pgd")
    for name in ("steps", "restarts", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT
    state = load_checkpoint(path)
    if "config" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of opnorm train (no config or model)")
    cfg = TrainConfig.from_dict(state["config"]).resolved()
    p = norm_order(args.p if args.p is not None else cfg.p, "p")
    eps_list = _parse_eps_list(args.eps) if args.eps is not None else [0.0, cfg.eps]
    device = resolve_device(args.device)
    splits = load_dataset(cfg.dataset, args.data_dir if args.data_dir is not None else cfg.data_dir)
    model = build_model(cfg.model, input_shape=splits.input_shape, num_classes=splits.num_classes,
                        mean=splits.mean, std=splits.std, width=cfg.width)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"weights in {path} do not fit model {cfg.model}: {_one_line(err)[:200]}") from None
    model.to(device).eval()
    n = splits.test.x.shape[0] if args.limit is None else min(args.limit, splits.test.x.shape[0])
    x, y = splits.test.x[:n], splits.test.y[:n]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    rows = []
    clean = accuracy(model, x, y, batch_size=args.batch_size)
    for eps in eps_list:
        t0 = time.perf_counter()
        acc = clean if eps == 0 else robust_accuracy(
            model, x, y, eps=eps, p=p, steps=args.steps, restarts=args.restarts, loss=args.loss,
            step_size=args.step_size, schedule=args.schedule, generator=gen, batch_size=args.batch_size,
            progress=sys.stderr.isatty())
        rows.append({"eps": eps, "robust_accuracy": acc, "seconds": time.perf_counter() - t0})

    print(f"{cfg.model} on {cfg.dataset} trained with {cfg.method}; PGD-{args.steps} (l_{_fmt(p)}, loss {args.loss}, "
          f"{args.schedule} step, restarts {args.restarts}) on {n} test points; clean accuracy {clean:.4f}")
    print(f"{'eps':>10}  {'robust accuracy':>15}")
    for r in rows:
        print(f"{r['eps']:>10g}  {r['robust_accuracy']:>15.4f}")
    prefix = Path(args.out) if args.out is not None else path.parent / f"eval-{args.attack}-p{_fmt(p)}"
    report = {
        "checkpoint": str(path), "dataset": cfg.dataset, "model": cfg.model, "method": cfg.method,
        "attack": args.attack, "p": _fmt(p), "steps": args.steps, "restarts": args.restarts, "loss": args.loss,
        "step_size": args.step_size, "schedule": args.schedule, "n": n, "seed": args.seed, "clean_accuracy": clean, "results": rows,
    }
    json_path, csv_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".csv")
    write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
    table = io.StringIO(newline="")
    w = csv.writer(table)
    w.writerow(["eps", "robust_accuracy"])
    for r in rows:
        w.writerow([r["eps"], r["robust_accuracy"]])
    write_text_atomic(csv_path, table.getvalue())
    print(f"wrote {json_path} and {csv_path}")
    return 0


# ----------------------------------------------------------------------------- demo


DEMO_PAIRS = ((2, 2), (math.inf, 2), (math.inf, math.inf), (2, 1), (math.inf, 1))


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from opnorm.power import operator_norm
    from opnorm.training.data import load_dataset
    from opnorm.training.trainer import train

    t0 = time.perf_counter()
    res = train(dataset="digits", model="cnn", method="clean", epochs=args.epochs, seed=args.seed,
                eval_points=50, eval_steps=10, device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    m = res.metrics
    print(f"Trained a small CNN on the 8x8 digits ({args.epochs} epochs, clean, {seconds:.1f} s): "
          f"test accuracy {m['accuracy']:.3f}")
    x = load_dataset("digits").test.x[:5]
    gen = torch.Generator().manual_seed(args.seed)
    print("\nPer-example operator norms ||J(x)||_{p->q} of the logits' Jacobian J(x) (10 x 64) at 5 test points:")
    head = f"{'(p, q)':<12}" + "".join(f"{f'x[{i}]':>10}" for i in range(x.shape[0])) + "   method"
    print(head)
    print("-" * len(head))
    for p, q in DEMO_PAIRS:
        r = operator_norm(res.model, x, p, q, generator=gen)
        if r.method == "power":
            how = f"power method, {r.iterations} iterations (lower bound)"
        elif bool(r.exact.all()):
            how = "exact, from the formed J"
        else:
            how = "power restarts on the formed J (lower bound)"
        print(f"{f'({_fmt(p)}, {_fmt(q)})':<12}" + "".join(f"{float(s):>10.3f}" for s in r.sigma) + f"   {how}")
    print("\n(2,2): top singular value; (inf,inf): largest row l1 norm; (2,1), (inf,1): enumeration of sign "
          "vectors; (inf,2) is NP-hard in general, so only a lower bound.")
    return 0


# ----------------------------------------------------------------------------- reproduce


def cmd_reproduce(args: argparse.Namespace) -> int:
    try:
        from opnorm.experiments.reproduce import run_reproduce
    except ImportError as err:
        raise CLIError(f"the reproduce study is not available ({_one_line(err)})") from None
    from opnorm.experiments.study import parse_seeds
    from opnorm.training.data import canonical_dataset

    if args.seeds is not None and args.seed is not None:
        raise CLIError("give --seeds or --seed, not both")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else ([args.seed] if args.seed is not None else None)
    dataset = canonical_dataset(args.dataset)  # the spelling train and eval accept
    out = args.out if args.out is not None else str(Path("reports") / dataset)
    kw = {k: v for k, v in (("limit_train", args.limit_train), ("eval_points", args.eval_points)) if v is not None}
    run_reproduce(dataset=dataset, quick=args.quick, out=out, seeds=seeds, data_dir=args.data_dir, config=args.config,
                  runs=args.runs, **kw)
    return 0


# ----------------------------------------------------------------------------- entry point


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (``opnorm`` exits with it)."""
    args = build_parser().parse_args(argv)
    handler = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "reproduce": cmd_reproduce}[args.command]
    debug = bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return handler(args)
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as err:  # every error is one line; the traceback only on request
        if debug:
            raise
        sys.stderr.write(f"{PROG}: error: {_error_line(err)}\n")
        return 1


def _error_line(err: Exception) -> str:
    from opnorm.training.checkpoint import CheckpointError
    from opnorm.training.files import RunLockedError
    from opnorm.training.trainer import EpochCheckFailed, TrainingDiverged

    expected = (CLIError, CheckpointError, ValueError, TypeError, OSError, RunLockedError, TrainingDiverged,
                EpochCheckFailed)
    if isinstance(err, expected):
        text = _one_line(err) if str(err) else type(err).__name__
        if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
            text = f"{text}: {err.filename}"
        return text
    return f"{type(err).__name__}: {_one_line(err)} (unexpected; rerun with --debug for the traceback)"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
