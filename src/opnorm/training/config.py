"""The training configuration: one dataclass, dataset-dependent defaults, validation.

A :class:`TrainConfig` is what ``opnorm train`` parses its flags into and what a run
directory's ``config.json`` holds (resolved: every default filled in, so the file re-runs
the same experiment with ``opnorm train --config config.json``).

Example::

    >>> cfg = TrainConfig(dataset="digits", model="cnn", method="opnorm", epochs=3).resolved()
    >>> cfg.eps, cfg.lam            # filled in from the dataset / method defaults
    >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Optional

from opnorm.norms import norm_order

__all__ = ["METHODS", "OPTIMIZERS", "SCHEDULERS", "TrainConfig", "default_eps", "DEFAULT_LAM"]

METHODS = ("clean", "pgd-at", "logit-at", "opnorm", "global-snr", "trades")
OPTIMIZERS = ("sgd", "adam")
SCHEDULERS = ("cosine", "none")
PENALTIES = ("fd", "exact")
OPNORM_MODES = ("fast", "paper")
OPNORM_OUTPUTS = ("logits", "kl")
OPNORM_ITERATIONS = ("linear", "fd")
OPNORM_TASKS = ("clean", "perturbed")

# Radius of the threat model per (dataset, p) for pixels in [0, 1]. Digits has 8x8 pixels
# with 17 gray levels, so its l_inf radius is large in pixel units.
_EPS = {
    "digits": {math.inf: 0.1, 2.0: 0.5, 1.0: 2.0},
    "mnist": {math.inf: 0.3, 2.0: 2.0, 1.0: 10.0},
    "fashion-mnist": {math.inf: 0.1, 2.0: 1.0, 1.0: 10.0},
    "cifar10": {math.inf: 8 / 255, 2.0: 0.5, 1.0: 12.0},
}

# Penalty weights per method: opnorm multiplies sigma^2 (squared) or sigma; global-snr
# multiplies the sum of squared layer spectral norms.
# logit-at multiplies the (squared) logit distance ||f(x + delta) - f(x)||_q^(2|1), which is
# eps^(2|1) * sigma^(2|1) in the linear region (as opnorm with scale_by_eps).
DEFAULT_LAM = {"opnorm": {True: 0.02, False: 0.3}, "global-snr": 0.01, "logit-at": {True: 0.1, False: 0.3}}
DEFAULT_ITERS = {"opnorm": 10, "global-snr": 1}
# opnorm's fast mode (the default): explicit power iterations only on an example's first visit
# (later visits advance its stored direction by the free iteration of the training backward)
FAST_COLD_ITERS = 3
FAST_WARM_ITERS = 1


def default_eps(dataset: str, p: float) -> float:
    """The default radius for ``dataset`` and norm order p (defined for p in {1, 2, inf})."""
    table = _EPS.get(dataset, {})
    if p not in table:
        shown = "inf" if p == math.inf else f"{p:g}"
        raise ValueError(f"no default eps for p={shown} on {dataset}; pass eps (--eps)")
    return table[p]


def _fmt_order(p: float) -> Any:
    return "inf" if p == math.inf else p


def _one_of(value: Any, valid: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    return value.strip().lower()


@dataclass
class TrainConfig:
    """Everything a training run needs. ``None`` fields are filled by :meth:`resolved`.

    Data and model:
        dataset: one of ``opnorm.training.data.DATASETS`` ("digits" default).
        model: one of ``opnorm.training.models.MODELS`` ("cnn" default). width: model width
            (None: the model's default). data_dir / download / limit_train / limit_test:
            passed to ``load_dataset``.
    Method:
        method: clean, pgd-at (Madry, CE attack), logit-at (CE + lam * the l_q logit loss
            ||f(x + delta) - f(x)||_q^(2|1) at its PGD maximizer: the theorem's AT objective),
            opnorm (d.d. (p, q) operator norm regularization), global-snr (Yoshida & Miyato),
            trades.
        p, q: threat model l_p (attacks, opnorm's (p, q) pair, evaluation) and logit norm.
        eps: radius (None: per dataset and p, see ``_EPS``).
        lam: penalty weight for opnorm / global-snr (None: ``DEFAULT_LAM``).
        iters: power iterations per batch (global-snr: 1; opnorm paper mode: 10; opnorm fast
            mode: on an example's first visit only, 3).
        opnorm_mode: "fast" (default: a per-example bank of directions by dataset index,
            ``iters`` explicit iterations on the first visit, ``warm_iters`` on later ones, plus
            one free power iteration per visit from the training backward; see
            ``OperatorNormRegularizer``) or "paper" (``iters`` power iterations from scratch per
            batch, nothing kept).
        opnorm_output: how opnorm measures a logit change: "logits" (its l_q norm, the paper)
            or "kl" (the softmax's KL divergence, locally the Fisher metric; needs q = 2; see
            ``OperatorNormRegularizer``'s ``output``).
        opnorm_iteration: how opnorm's explicit power iterations get J v: "linear" (default:
            the linearization) or "fd" (the finite difference f(x + eps v) - f(x): a PGA step
            with infinite step size on the penalty, a forward and a backward per iteration; see
            ``OperatorNormRegularizer``'s ``iteration``).
        opnorm_task: where opnorm's cross-entropy is taken: "clean" (default: ``CE(f(x), y)``
            plus the penalty, the paper's d.d. regularization) or "perturbed" (``CE(f(x + eps v),
            y)`` plus the penalty, at the point the penalty already evaluates, so at no extra
            cost: adversarial training with the power method's direction next to the operator
            norm penalty; not the theorem's pairing, which holds for the logit loss).
        opnorm_step: the step size of opnorm's direction updates as a fraction of eps (None:
            infinite, the power method; finite: PGA steps whose iterate is kept in the bank
            between visits; see ``OperatorNormRegularizer``'s ``step``).
        warm_iters: opnorm's explicit iterations on later visits (None: 1 in fast mode,
            ``iters`` in paper mode).
        opnorm_clip: clamp opnorm's fd point ``x + eps v`` into the pixel box [0, 1] as the
            attacks do (None: true in fast mode, false in paper mode).
        free_update: opnorm fast mode: advance each stored direction by the free power
            iteration of the training backward (default true).
        steps / step_size: PGD steps and step length for training attacks (None: 2.5 eps / steps).
        adv_fraction: share of each batch replaced by adversarial examples (AT, TRADES).
        beta: TRADES weight. penalty / squared / dynamic / scale_by_eps: opnorm's variants
            (see ``OperatorNormRegularizer``; scale_by_eps=True penalizes (eps sigma)^(2|1),
            matching logit-at's lam). squared also applies to logit-at.
    Optimization:
        epochs, batch_size (per process; the global batch is batch_size * world size under
        torchrun), lr, optimizer (sgd with momentum / adam), momentum, weight_decay,
        scheduler (cosine per epoch / none), seed.
    Evaluation after each epoch (on the first ``eval_points`` test points):
        eval_steps: PGD steps of the robustness check; norm_iters: power iterations of the
        operator-norm metric (None: power's default).
    System:
        out: run directory (None: no files), device ("auto", "cpu", "cuda", "cuda:1"),
        amp (bf16 autocast on CPU, fp16 + GradScaler on CUDA), compile (torch.compile: True for
        the default backend, or a backend name such as "eager" / "aot_eager" for debugging),
        num_workers, progress (None: when stderr is a terminal).
    """

    dataset: str = "digits"
    model: str = "cnn"
    method: str = "clean"
    p: Any = 2.0
    q: Any = 2.0
    eps: Optional[float] = None
    lam: Optional[float] = None
    iters: Optional[int] = None
    opnorm_mode: str = "fast"
    opnorm_output: str = "logits"
    opnorm_iteration: str = "linear"
    opnorm_task: str = "clean"
    opnorm_step: Optional[float] = None
    warm_iters: Optional[int] = None
    opnorm_clip: Optional[bool] = None
    free_update: bool = True
    steps: int = 10
    step_size: Optional[float] = None
    adv_fraction: float = 1.0
    beta: float = 6.0
    penalty: str = "fd"
    squared: bool = True
    dynamic: bool = False
    scale_by_eps: bool = False
    epochs: int = 10
    batch_size: int = 64
    lr: Optional[float] = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    seed: int = 0
    eval_points: int = 200
    eval_steps: int = 20
    norm_iters: Optional[int] = None
    out: Optional[str] = None
    device: str = "auto"
    data_dir: Optional[str] = None
    download: bool = False
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    width: Optional[int] = None
    amp: bool = False
    compile: Any = False
    num_workers: int = 0
    progress: Optional[bool] = None

    # -- conversion ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (infinite orders as the string "inf")."""
        d = dataclasses.asdict(self)
        for k in ("p", "q"):
            d[k] = _fmt_order(norm_order(d[k], k))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a dict (e.g. a parsed config.json); unknown keys are an error."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict of field: value, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(names))}")
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # -- validation and defaults ----------------------------------------------------------

    def resolved(self) -> "TrainConfig":
        """A validated copy with every ``None`` default filled in; raises ValueError/TypeError."""
        from opnorm.training.data import DATASETS
        from opnorm.training.models import MODELS

        c = dataclasses.replace(self)
        c.dataset = _one_of(str(c.dataset).replace("_", "-") if isinstance(c.dataset, str) else c.dataset, DATASETS, "dataset")
        c.model = _one_of(c.model, MODELS, "model")
        c.method = _one_of(c.method, METHODS, "method")
        c.optimizer = _one_of(c.optimizer, OPTIMIZERS, "optimizer")
        c.scheduler = _one_of(c.scheduler, SCHEDULERS, "scheduler")
        c.penalty = _one_of(c.penalty, PENALTIES, "penalty")
        c.opnorm_mode = _one_of(c.opnorm_mode, OPNORM_MODES, "opnorm_mode")
        c.opnorm_output = _one_of(c.opnorm_output, OPNORM_OUTPUTS, "opnorm_output")
        c.opnorm_iteration = _one_of(c.opnorm_iteration, OPNORM_ITERATIONS, "opnorm_iteration")
        c.opnorm_task = _one_of(c.opnorm_task, OPNORM_TASKS, "opnorm_task")
        c.p = norm_order(c.p, "p")
        c.q = norm_order(c.q, "q")
        if c.eps is None:
            c.eps = default_eps(c.dataset, c.p)
        c.eps = _number(c.eps, "eps", lo=0.0)
        if c.lam is None:
            lam = DEFAULT_LAM.get(c.method, 0.0)
            c.lam = lam[bool(c.squared)] if isinstance(lam, dict) else lam
        c.lam = _number(c.lam, "lam", lo=0.0)
        fast = c.opnorm_mode == "fast"
        if c.iters is None:
            c.iters = FAST_COLD_ITERS if c.method == "opnorm" and fast else DEFAULT_ITERS.get(c.method, 10)
        c.iters = _integer(c.iters, "iters", lo=1)
        if c.warm_iters is None:
            c.warm_iters = FAST_WARM_ITERS if fast else c.iters
        c.warm_iters = _integer(c.warm_iters, "warm_iters", lo=0)
        if c.opnorm_clip is None:
            c.opnorm_clip = fast
        if c.lr is None:
            c.lr = 0.05 if c.optimizer == "sgd" else 1e-3
        c.lr = _number(c.lr, "lr", lo=0.0, strict=True)
        for name in ("iters", "steps", "epochs", "batch_size", "eval_points", "eval_steps"):
            setattr(c, name, _integer(getattr(c, name), name, lo=1))
        c.seed = _integer(c.seed, "seed", lo=0)
        c.num_workers = _integer(c.num_workers, "num_workers", lo=0)
        for name in ("norm_iters", "limit_train", "limit_test", "width"):
            if getattr(c, name) is not None:
                setattr(c, name, _integer(getattr(c, name), name, lo=1))
        if c.step_size is not None:
            c.step_size = _number(c.step_size, "step_size", lo=0.0, strict=True, finite=False)
        if c.opnorm_step is not None:
            c.opnorm_step = _number(c.opnorm_step, "opnorm_step", lo=0.0, strict=True, finite=False)
            if c.method == "opnorm" and c.opnorm_step != math.inf and c.p not in (1.0, 2.0, math.inf):
                raise ValueError(f"opnorm_step projects onto the l_p ball, implemented for p in 1, 2, inf; got p {c.p:g} "
                                 "(leave opnorm_step unset for the power method)")
        c.adv_fraction = _number(c.adv_fraction, "adv_fraction", lo=0.0)
        if c.adv_fraction > 1:
            raise ValueError(f"adv_fraction must be in [0, 1], got {c.adv_fraction:g}")
        c.beta = _number(c.beta, "beta", lo=0.0)
        c.momentum = _number(c.momentum, "momentum", lo=0.0)
        c.weight_decay = _number(c.weight_decay, "weight_decay", lo=0.0)
        if not isinstance(c.compile, bool) and not (isinstance(c.compile, str) and c.compile.strip()):
            raise TypeError(f"compile must be true, false or a torch.compile backend name, got {c.compile!r}")
        for name in ("squared", "dynamic", "scale_by_eps", "download", "amp", "opnorm_clip", "free_update"):
            if not isinstance(getattr(c, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(c, name)!r}")
        if c.progress is not None and not isinstance(c.progress, bool):
            raise TypeError(f"progress must be true, false or null, got {c.progress!r}")
        if c.method == "opnorm" and c.opnorm_output == "kl" and (c.q != 2 or c.penalty != "fd"):
            raise ValueError("opnorm_output 'kl' is a 2-norm (the softmax's Fisher metric): use q 2 and penalty fd")
        if c.method == "opnorm" and c.opnorm_iteration == "fd" and c.eps == 0:
            raise ValueError("opnorm_iteration fd takes finite differences of radius eps: use eps > 0 or --opnorm-iteration linear")
        if c.method == "opnorm" and c.penalty == "fd" and c.eps == 0:
            raise ValueError("method opnorm with penalty fd needs eps > 0 (it divides by eps); or use --penalty exact")
        if c.method == "opnorm" and c.opnorm_task == "perturbed" and c.penalty != "fd":
            raise ValueError("opnorm_task perturbed takes the cross-entropy at the fd point x + eps v: use penalty fd")
        if c.method == "opnorm" and c.penalty == "exact" and c.compile is not False:
            raise ValueError("penalty exact needs double backward, which torch.compile does not support; drop --compile or use --penalty fd")
        if c.method in ("pgd-at", "logit-at", "trades") and c.p not in (1.0, 2.0, math.inf):
            raise ValueError(f"adversarial training attacks need p in 1, 2, inf, got {c.p:g}")
        if not isinstance(c.device, str) or not (c.device in ("auto", "cpu") or c.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {c.device!r}")
        for name in ("out", "data_dir"):
            if getattr(c, name) is not None:
                setattr(c, name, str(getattr(c, name)))
        return c


def _number(value: Any, name: str, *, lo: float, strict: bool = False, finite: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(v) or (finite and math.isinf(v)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if v < lo or (strict and v == lo):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {lo:g}, got {v:g}")
    return v


def _integer(value: Any, name: str, *, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        v = int(value) if not isinstance(value, float) or value.is_integer() else None
    except ValueError:
        v = None
    if v is None:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v
