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
    opnorm eval --checkpoint runs/dd --attack autoattack --eps 0.1 --limit 1000  # the number papers compare
    torchrun --nproc_per_node=2 -m opnorm train --method pgd-at --out runs/ddp
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from opnorm.attacks import SCHEDULES
from opnorm.evaluation import (
    ATTACKS,
    SUITES,
    APGDAttack,
    PGDAttack,
    SquareAttack,
    attack_names,
    evaluate,
    named_attack,
)
from opnorm.experiments.arms import load_arm, render_arms
from opnorm.experiments.reproduce import run_reproduce
from opnorm.experiments.study import parse_seeds
from opnorm.norms import norm_order, order_text
from opnorm.power import operator_norm
from opnorm.training.checkpoint import CheckpointError, load_checkpoint
from opnorm.training.config import SECTION_OF, TrainConfig, defaults_line, is_custom, merge, method_settings, migrate
from opnorm.training.data import canonical_dataset, load_dataset
from opnorm.training.distributed import resolve_device
from opnorm.training.files import RunLockedError, fold_lines, read_json_object, refuse_link, write_text_atomic
from opnorm.training.inputs import registry_model
from opnorm.training.run_dir import CHECKPOINT
from opnorm.training.trainer import EpochCheckFailed, TrainingDiverged, train

__all__ = ["main", "build_parser"]

PROG = "opnorm"
DEBUG_ENV = "OPNORM_DEBUG"


class CLIError(Exception):
    """A user error found by the CLI itself (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``opnorm: error: ...`` and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{PROG}: error: {fold_lines(message)} (see {self.prog} --help)\n")
        raise SystemExit(2)


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
    with the field's help text, listed under its config section; dest is the dotted field path."""
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls or TrainConfig):
        if f.name == "opnorm":
            _config_flags(t.add_argument_group("config section opnorm"), type(f.default_factory()), "opnorm.")
            continue
        section = SECTION_OF.get(f.name) if not prefix else None
        g = groups.setdefault(section, t.add_argument_group(f"config section {section}")) if section else t
        if f.metadata.get("flag") is False:  # written by opnorm itself (e.g. schedule_extensions)
            continue
        flag = "--" + (prefix + f.name).replace(".", "-").replace("_", "-")
        dest, help, metavar = prefix + f.name, f.metadata.get("help"), f.name.upper()
        if f.name == "compile" and not prefix:
            g.add_argument(flag, dest=dest, nargs="?", const=True, metavar="BACKEND", help=help)
        elif _flag_type(f) is bool:
            g.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=help)
        else:
            g.add_argument(flag, dest=dest, type=_flag_type(f), metavar=metavar, help=help)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog=PROG, description="Data-dependent operator norms, attacks and robust training.")
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks of errors (or set {DEBUG_ENV}=1)")
    common = argparse.ArgumentParser(add_help=False)  # --debug after the subcommand too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{train,eval,demo,reproduce}")
    sub.required = True

    # train: every option defaults to "absent" so config files can fill what flags do not set
    t = sub.add_parser(
        "train",
        help="train a model",
        parents=[common],
        argument_default=argparse.SUPPRESS,
        description="Train a model; flags override values from --config (with --resume: the "
        "run's own settings, of which only those that do not shape training may change). "
        "--batch-size is per process: under torchrun "
        "the global batch is batch size * number of processes.",
    )
    t.add_argument("--config", help="JSON config (e.g. a run's config.json); flags override its values")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--stop-after", type=int, help="stop after this many epochs of this invocation (resume later)")
    t.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    t.add_argument(
        "--force",
        action="store_true",
        help="let a new run write into a --out directory that holds files of something else",
    )
    _config_flags(t)

    e = sub.add_parser(
        "eval",
        help="robust accuracy of a checkpoint: attacks, worst case, interval",
        parents=[common],
        description="Clean accuracy and robust accuracy per attack and radius, with the per-example "
        "worst case (correct clean and under every attack) and its 95%% Wilson interval. "
        "Writes a JSON summary and a per-example CSV named by the settings, never "
        "overwriting an earlier evaluation.",
    )
    e.add_argument("--checkpoint", required=True, help="checkpoint.pt (or its run directory)")
    e.add_argument(
        "--attack",
        default="pgd",
        help=f"attack, suite or comma-separated list: {' | '.join(ATTACKS + tuple(SUITES))} (default pgd; "
        "autoattack: torchattacks' standard AutoAttack; all: every attack)",
    )
    e.add_argument("--p", default=None, help="threat model (default: the run's p)")
    e.add_argument("--eps", default=None, help="comma-separated radii (default: 0 and the run's eps)")
    e.add_argument(
        "--every-example",
        action="store_true",
        help="run every attack on every example (each attack's accuracy alone; slower). Default: a later "
        "attack runs only on the examples still robust (same worst case)",
    )
    g = e.add_argument_group("the pgd attack (opnorm.EvalPGD)")
    g.add_argument("--steps", type=int, default=None, help="steps (default 20)")
    g.add_argument("--restarts", type=int, default=None, help="random restarts (default 1)")
    g.add_argument("--step-size", type=float, default=None, help="step length (default 2.5 eps / steps; halving: eps)")
    g.add_argument(
        "--schedule",
        default=None,
        choices=SCHEDULES,
        help="step-size schedule: halving (default; large steps halved at 1/4, 1/2, 3/4 of the steps, "
        "each halving from the strongest point so far) | constant",
    )
    g.add_argument("--loss", default=None, help="attack loss: ce (default) | cw | logit | kl")
    t_ = e.add_argument_group("the torchattacks attacks")
    t_.add_argument("--apgd-steps", type=int, default=100, help="steps of apgd-ce, apgd-dlr, apgd-t (default 100)")
    t_.add_argument("--square-queries", type=int, default=5000, help="queries of square (default 5000)")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N test points (default all)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--data-dir", default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--out",
        default=None,
        help="output prefix (default: <run dir>/eval-<attack>-p<p>-eps<eps>-loss<loss>-n<points>-"
        "seed<seed>); writes .json and .csv, with a -2, -3, ... suffix when that pair exists",
    )

    d = sub.add_parser(
        "demo", help="train a small CNN on digits and print per-example operator norms", parents=[common]
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epochs", type=int, default=3)

    r = sub.add_parser("reproduce", help="run the paper's study on a dataset", parents=[common])
    r.add_argument("--dataset", default="digits")
    r.add_argument("--quick", action="store_true", help="a small, fast version")
    r.add_argument("--out", default=None, help="report directory (default reports/<dataset>)")
    r.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (default: the preset's)")
    r.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    r.add_argument(
        "--config", default=None, help="a training config file (e.g. configs/paper-cifar10.json) defining the study"
    )
    r.add_argument(
        "--runs",
        default=None,
        help="runs directory: trained models and measurements, reused by a rerun (default <out>/runs)",
    )
    r.add_argument("--data-dir", default=None)
    r.add_argument("--limit-train", type=int, default=None, help="use only the first N training examples")
    r.add_argument("--eval-points", type=int, default=None, help="test points of the measurements")
    r.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes that train and measure side by side (default: the CPU cores, at most 4; 1 with a GPU)",
    )

    c = sub.add_parser(
        "compare", help="finished studies of one dataset side by side (which findings change with the protocol)"
    )
    c.add_argument("reports", nargs="+", help="report directories of `opnorm reproduce` (each with results.json)")
    c.add_argument("--out", required=True, help="the markdown file to write")
    return parser


# ----------------------------------------------------------------------------- train


_CLI_ONLY = ("config", "resume", "stop_after", "quiet", "force", "command", "debug")


def train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given: --config's, overridden by the flags set (nested like a config file)."""
    flags: dict[str, Any] = {}
    for k, v in vars(args).items():
        if k not in _CLI_ONLY:
            section, _, name = k.rpartition(".")
            (flags.setdefault(section, {}) if section else flags)[name or k] = v
    from_file = read_json_object(args.config, "config file") if "config" in args else {}
    if from_file:
        # a config file may describe a study (configs/paper-cifar10.json): the method options its
        # other methods read are left out for this run's method, and said; a flag is never left out
        method = flags.get("method") or from_file.get("method") or "clean"
        kept, given, default = method_settings(from_file, method), migrate(from_file), migrate(TrainConfig().to_dict())
        dropped = sorted(  # a flag of the same name speaks for itself
            k for k, v in given.items() if k not in kept and v != default.get(k) and flags.get(k) is None
        )
        if dropped:
            print(f"note: {args.config}: {', '.join(dropped)} not used by method {method}", file=sys.stderr)
        from_file = kept
    return merge(from_file, flags)


def train_config_from_args(args: argparse.Namespace):
    """(config, resume, stop_after): for a new run a resolved TrainConfig (defaults < --config <
    flags); with --resume the dict of the settings given (--config < flags), which the trainer
    applies to the run's own config from its checkpoint (refusing trajectory changes)."""
    settings = train_settings(args)
    stop_after = getattr(args, "stop_after", None)
    if getattr(args, "resume", False):
        if settings.get("out") is None:
            raise CLIError("--resume needs the run directory: pass --out DIR")
        return settings, True, stop_after
    return TrainConfig.from_dict(settings).resolved(), False, stop_after


def cmd_train(args: argparse.Namespace) -> int:
    config, resume, stop_after = train_config_from_args(args)
    quiet = bool(getattr(args, "quiet", False))
    if not resume and not quiet and int(os.environ.get("RANK", "0")) == 0:
        print(defaults_line(train_settings(args), config))  # the run's first line names what defaults filled in
    result = train(
        config, resume=resume, stop_after=stop_after, verbose=not quiet, force=bool(getattr(args, "force", False))
    )
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


PGD_FLAGS = {"steps": 20, "restarts": 1, "step_size": None, "schedule": "halving", "loss": "ce"}


def _free_prefix(prefix: Path) -> Path:
    """prefix, or prefix-2, -3, ...: the first whose .json and .csv both do not exist; a symbolic
    link in the way is refused (UnsafePathError), never written through or stepped over."""
    k, candidate = 1, prefix
    while any(_taken(candidate.with_name(candidate.name + ext)) for ext in (".json", ".csv")):
        k += 1
        candidate = prefix.with_name(f"{prefix.name}-{k}")
    return candidate


def _taken(path: Path) -> bool:
    refuse_link(path)
    return path.exists()


def _write_new(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x", newline="") as f:  # "x": never overwrite, even if another process just wrote it
            f.write(text)
    except FileExistsError:
        raise CLIError(
            f"{path} appeared while evaluating; nothing was overwritten: rerun for the next free name"
        ) from None


def _eval_attacks(args: argparse.Namespace, names: list[str], gen) -> tuple[list, str]:
    given = [f"--{k.replace('_', '-')}" for k in PGD_FLAGS if getattr(args, k) is not None]
    if given and "pgd" not in names:
        raise CLIError(
            f"{', '.join(given)} set the pgd attack, which --attack {args.attack} does not run; "
            "add pgd to --attack or drop them"
        )
    pgd_kw = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in PGD_FLAGS.items()}
    attacks = []
    for name in names:
        if name == "pgd":
            attacks.append(PGDAttack(generator=gen, batch_size=args.batch_size, **pgd_kw))
        elif name.startswith("apgd-"):
            attacks.append(APGDAttack(name[5:], steps=args.apgd_steps, seed=args.seed, batch_size=args.batch_size))
        elif name == "square":
            attacks.append(SquareAttack(queries=args.square_queries, seed=args.seed, batch_size=args.batch_size))
        else:
            attacks.append(named_attack(name, seed=args.seed))
    return attacks, pgd_kw["loss"]


def cmd_eval(args: argparse.Namespace) -> int:
    names = attack_names(args.attack)
    for name in ("steps", "restarts", "batch_size", "apgd_steps", "square_queries"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT
    state = load_checkpoint(path)
    if "config" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of opnorm train (no config or model)")
    cfg = TrainConfig.from_dict(state["config"]).resolved()
    if is_custom(cfg.model) or is_custom(cfg.dataset):
        raise ValueError(
            f"{path} was trained by opnorm.train on a module or data passed in Python (model {cfg.model}, "
            f"dataset {cfg.dataset}), which the CLI cannot rebuild: load its weights into your module and call "
            f"opnorm.evaluate(model, x, y, eps=..., p=...)"
        )
    p = norm_order(args.p if args.p is not None else cfg.p, "p")
    eps_list = _parse_eps_list(args.eps) if args.eps is not None else [0.0, cfg.eps]
    device = resolve_device(args.device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    attacks, loss = _eval_attacks(args, names, gen)
    splits = load_dataset(cfg.dataset, args.data_dir if args.data_dir is not None else cfg.data_dir)
    model = registry_model(cfg.model, splits, input_range=cfg.input_range, width=cfg.width)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"weights in {path} do not fit model {cfg.model}: {fold_lines(err)[:200]}") from None
    model.to(device).eval()
    n = splits.test.x.shape[0] if args.limit is None else min(args.limit, splits.test.x.shape[0])
    x, y = splits.test.x[:n], splits.test.y[:n]
    res = evaluate(
        model, x, y, eps=eps_list, p=p, attacks=attacks, every_example=args.every_example, progress=sys.stderr.isatty()
    )

    lo, hi = res.interval()
    print(
        f"{cfg.model} on {cfg.dataset} trained with {cfg.method}; l_{order_text(p)} threat model, {n} test points, "
        f"seed {args.seed}; clean accuracy {res.clean_accuracy:.4f} [{lo:.4f}, {hi:.4f}]"
    )
    how = "each alone on every example" if res.every_example else "in turn, each on the examples still robust"
    print(f"attacks ({how}): " + "; ".join(f"{a}: {res.descriptions[a]}" for a in res.attacks))
    cols = res.attacks if res.every_example else [f"after {a}" for a in res.attacks]
    width = max(10, *(len(c) for c in cols))
    print(f"{'eps':>8}  " + "  ".join(f"{c:>{width}}" for c in cols) + f"  {'worst case':>10}  95% Wilson interval")
    for e in res.eps:
        vals = [res.accuracy(a, e) if res.every_example else res.after(a, e) for a in res.attacks]
        lo, hi = res.interval(e)
        print(
            f"{e:>8g}  " + "  ".join(f"{v:>{width}.4f}" for v in vals) + f"  {res.worst_case(e):>10.4f}  "
            f"[{lo:.4f}, {hi:.4f}]"
        )

    eps_tag = "_".join(f"{e:g}" for e in eps_list)
    spec = "+".join(t.strip() for t in args.attack.split(","))
    loss_tag = f"-loss{loss}" if "pgd" in names else ""
    default = path.parent / f"eval-{spec}-p{order_text(p)}-eps{eps_tag}{loss_tag}-n{n}-seed{args.seed}"
    prefix = _free_prefix(Path(args.out) if args.out is not None else default)
    report = {
        "checkpoint": str(path),
        "dataset": cfg.dataset,
        "model": cfg.model,
        "method": cfg.method,
        "attack": args.attack,
        "seed": args.seed,
        "pgd": {k: getattr(attacks[names.index("pgd")], k) for k in PGD_FLAGS} if "pgd" in names else None,
        **res.summary(),
    }
    json_path, csv_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".csv")
    rows = res.rows()
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else ["index", "eps", "label", "clean", "worst"])
    w.writeheader()
    w.writerows(rows)
    _write_new(csv_path, table.getvalue())
    _write_new(json_path, json.dumps(report, indent=2) + "\n")
    print(f"wrote {json_path} and {csv_path}")
    return 0


# ----------------------------------------------------------------------------- demo


DEMO_PAIRS = ((2, 2), (math.inf, 2), (math.inf, math.inf), (2, 1), (math.inf, 1))


def cmd_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    res = train(
        dataset="digits",
        model="cnn",
        method="clean",
        epochs=args.epochs,
        seed=args.seed,
        eval_points=50,
        eval_steps=10,
        device="cpu",
        progress=False,
    )
    seconds = time.perf_counter() - t0
    m = res.metrics
    print(
        f"Trained a small CNN on the 8x8 digits ({args.epochs} epochs, clean, {seconds:.1f} s): "
        f"test accuracy {m['accuracy']:.3f}"
    )
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
        print(
            f"{f'({order_text(p)}, {order_text(q)})':<12}"
            + "".join(f"{float(s):>10.3f}" for s in r.sigma)
            + f"   {how}"
        )
    print(
        "\n(2,2): top singular value; (inf,inf): largest row l1 norm; (2,1), (inf,1): enumeration of sign "
        "vectors; (inf,2) is NP-hard in general, so only a lower bound."
    )
    return 0


# ----------------------------------------------------------------------------- reproduce


def cmd_reproduce(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.seed is not None:
        raise CLIError("give --seeds or --seed, not both")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else ([args.seed] if args.seed is not None else None)
    dataset = canonical_dataset(args.dataset)  # the spelling train and eval accept
    out = args.out if args.out is not None else str(Path("reports") / dataset)
    kw = {k: v for k, v in (("limit_train", args.limit_train), ("eval_points", args.eval_points)) if v is not None}
    run_reproduce(
        dataset=dataset,
        quick=args.quick,
        out=out,
        seeds=seeds,
        data_dir=args.data_dir,
        config=args.config,
        runs=args.runs,
        jobs=args.jobs if args.jobs is not None else default_jobs(),
        **kw,
    )
    return 0


def default_jobs() -> int:
    """Worker processes of ``opnorm reproduce`` when --jobs is not given: the CPU cores (at most 4),
    or 1 when a GPU computes (one device, shared)."""
    if torch.cuda.is_available():
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def cmd_compare(args: argparse.Namespace) -> int:
    arms = {Path(d).name: load_arm(d) for d in args.reports}
    if len(arms) != len(args.reports):
        raise CLIError("the report directories must have different names (they label the arms)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, render_arms(arms) + "\n")
    print(f"[compare] {out}")
    return 0


# ----------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (``opnorm`` exits with it)."""
    args = build_parser().parse_args(argv)
    handler = {
        "train": cmd_train,
        "eval": cmd_eval,
        "demo": cmd_demo,
        "reproduce": cmd_reproduce,
        "compare": cmd_compare,
    }[args.command]
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
    expected = (
        CLIError,
        CheckpointError,
        ValueError,
        TypeError,
        OSError,
        RunLockedError,
        TrainingDiverged,
        EpochCheckFailed,
    )
    if isinstance(err, expected):
        text = fold_lines(err) if str(err) else type(err).__name__
        if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
            text = f"{text}: {err.filename}"
        return text
    return f"{type(err).__name__}: {fold_lines(err)} (unexpected; rerun with --debug for the traceback)"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
