"""The training configuration: one dataclass, dataset-dependent defaults, validation.

A :class:`TrainConfig` is what ``opnorm train`` parses its flags into and what a run
directory's ``config.json`` holds (resolved: every default filled in, so the file re-runs
the same experiment with ``opnorm train --config config.json``).

Example:
    >>> from opnorm.training.config import TrainConfig
    >>> cfg = TrainConfig(dataset="digits", model="cnn", method="opnorm", epochs=3).resolved()
    >>> cfg.eps, cfg.lam  # filled in from the dataset / method defaults
    (0.5, 0.02)
    >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from opnorm.norms import norm_order, order_json, order_text
from opnorm.training.data import canonical_dataset
from opnorm.training.models import MODELS
from opnorm.training.objectives import METHODS
from opnorm.validation import integer as _integer
from opnorm.validation import number as _number
from opnorm.validation import one_of

__all__ = [
    "SECTIONS",
    "flat_settings",
    "sectioned",
    "METHODS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "ON_NAN",
    "RESUMABLE",
    "TrainConfig",
    "OpnormConfig",
    "default_eps",
    "METHOD_OPTIONS",
    "method_settings",
    "refuse_ignored",
    "replays_per_batch",
    "data_passes",
    "migrate",
    "merge",
    "check_resume",
    "defaults_used",
    "defaults_line",
    "CUSTOM",
    "is_custom",
]

OPTIMIZERS = ("sgd", "adam", "rmsprop")
SCHEDULERS = ("cosine", "none")
ON_NAN = ("stop", "skip")
PENALTIES = ("fd", "exact")
OPNORM_MODES = ("fast", "paper")
OPNORM_OUTPUTS = ("logits", "kl")
OPNORM_TASKS = ("clean", "perturbed")
TRAIN_LOSSES = ("ce", "multi-margin")

# Radius of the threat model per (dataset, p) for pixels in [0, 1]. Digits has 8x8 pixels
# with 17 gray levels, so its l_inf radius is large in pixel units.
_EPS = {
    "digits": {math.inf: 0.1, 2.0: 0.5, 1.0: 2.0},
    "mnist": {math.inf: 0.3, 2.0: 2.0, 1.0: 10.0},
    "fashion-mnist": {math.inf: 0.1, 2.0: 1.0, 1.0: 10.0},
    "cifar10": {math.inf: 8 / 255, 2.0: 0.5, 1.0: 12.0},
}

PAPER_ITERS = 10  # the paper: 10 power iterations per batch, from random starts
FAST_COLD_ITERS = 3  # fast mode: explicit iterations on an example's first visit
FAST_WARM_ITERS = 1  # fast mode: explicit iterations on later visits (plus the free step)


# prefix of the model / dataset name of a run trained on objects passed to opnorm.train (model=
# an nn.Module, data= a Dataset; see opnorm.training.inputs); names without it are the registry's
CUSTOM = "custom:"


def is_custom(name: Any) -> bool:
    """Whether a config's ``model`` or ``dataset`` names an object passed to ``opnorm.train``."""
    return isinstance(name, str) and name.startswith(CUSTOM)


def default_eps(dataset: str, p: float) -> float:
    """The default radius for ``dataset`` and norm order p (defined for p in {1, 2, inf})."""
    if is_custom(dataset):
        raise ValueError(f"no default eps for data passed as data= ({dataset}): pass eps, the radius in its units")
    table = _EPS.get(dataset, {})
    if p not in table:
        raise ValueError(f"no default eps for p={order_text(p)} on {dataset}; pass eps (--eps)")
    return table[p]


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A config field whose help text is its CLI flag's (flags are derived from the fields)."""
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclass
class OpnormConfig:
    """The d.d. operator norm regularizer's options (``TrainConfig.opnorm``, ``--opnorm-*`` flags).

    ``mode`` is a preset: ``resolved`` fills the unset iters, warm_iters, clip and free_update
    from it (fast: 3, 1, true, true; paper: 10, 10, false, false) and config.json records them.
    Paper mode keeps no directions, so it refuses a warm_iters other than iters and free_update true.
    See :class:`opnorm.regularizers.OperatorNormRegularizer` for the parts they build.
    """

    mode: str = _f("fast", "fast (a store of directions, free step) | paper (10 iterations per batch, nothing kept)")
    output: str = _f("logits", "logits (l_q norm of the logit change) | kl (softmax KL, Fisher metric; q = 2)")
    iters: int | None = _f(None, "iterations on an example's first visit (fast 3, paper 10)")
    warm_iters: int | None = _f(None, "iterations on later visits (fast 1, paper = iters)")
    step: float | None = _f(None, "direction step as a fraction of eps (default inf: the power method; finite: PGA)")
    dynamic: bool = _f(False, "linearize each iteration at x + eps v instead of at x")
    penalty: str = _f("fd", "fd (finite difference, the paper's) | exact (<u, J v> by double backward)")
    scale_by_eps: bool = _f(False, "penalize (eps sigma)^(2|1), the logit-loss scale of logit-at")
    clip: bool | None = _f(None, "keep x + eps v in the pixel box [0, 1] (fast: on, paper: off)")
    free_update: bool | None = _f(None, "advance stored directions from the training backward (fast: on)")
    task: str = _f("clean", "clean (CE at x) | perturbed (CE at x + eps v, the penalty's point)")
    warmup: int | None = _f(
        None, "steps over which lam ramps up linearly (default: 24 on BatchNorm models, 0 otherwise; 0: none)"
    )

    def resolved(self) -> OpnormConfig:
        c = dataclasses.replace(self)
        c.mode = one_of(c.mode, OPNORM_MODES, "opnorm.mode")
        c.output = one_of(c.output, OPNORM_OUTPUTS, "opnorm.output")
        c.penalty = one_of(c.penalty, PENALTIES, "opnorm.penalty")
        c.task = one_of(c.task, OPNORM_TASKS, "opnorm.task")
        c.warmup = None if c.warmup is None else _integer(c.warmup, "opnorm.warmup", lo=0)
        fast = c.mode == "fast"
        c.iters = _integer(
            c.iters if c.iters is not None else (FAST_COLD_ITERS if fast else PAPER_ITERS), "opnorm.iters", lo=1
        )
        if not fast and c.warm_iters not in (None, c.iters):
            raise ValueError(
                f"opnorm.warm_iters={c.warm_iters!r} is ignored by opnorm.mode paper, which keeps no directions "
                "(every batch runs opnorm.iters from random starts): drop opnorm.warm_iters or use opnorm.mode fast"
            )
        if not fast and c.free_update not in (None, False):
            raise ValueError(
                f"opnorm.free_update={c.free_update!r} is ignored by opnorm.mode paper, which keeps no directions to "
                "advance: drop opnorm.free_update or use opnorm.mode fast"
            )
        c.warm_iters = _integer(
            c.warm_iters if c.warm_iters is not None else (FAST_WARM_ITERS if fast else c.iters),
            "opnorm.warm_iters",
            lo=0,
        )
        c.clip = fast if c.clip is None else c.clip
        c.free_update = fast if c.free_update is None else c.free_update
        if c.step is not None:
            c.step = _number(c.step, "opnorm.step", lo=0.0, strict=True, finite=False)
        for name in ("dynamic", "scale_by_eps", "clip", "free_update"):
            if not isinstance(getattr(c, name), bool):
                raise TypeError(f"opnorm.{name} must be true or false, got {getattr(c, name)!r}")
        if c.output == "kl" and c.penalty != "fd":
            raise ValueError("opnorm.output kl is evaluated by finite differences: use opnorm.penalty fd")
        if c.task == "perturbed" and c.penalty != "fd":
            raise ValueError(
                "opnorm.task perturbed takes the cross-entropy at the fd point x + eps v: use opnorm.penalty fd"
            )
        return c


# The config's sections: config.json groups the fields by them (``method`` stays on top, and
# ``opnorm``, the regularizer's own dataclass, is its section); code reads the fields flat
# (``cfg.lr``), and config files in the flat form of earlier versions still load.
SECTIONS: dict[str, tuple[str, ...]] = {
    "data": ("dataset", "data_dir", "download", "limit_train", "limit_test", "num_workers"),
    "network": ("model", "width"),
    "optimization": (
        "epochs",
        "batch_size",
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "scheduler",
        "schedule_extensions",
    ),
    "attack": ("p", "q", "eps", "steps", "step_size", "adv_fraction"),
    "regularizer": ("lam", "squared", "iters", "beta"),
    "single_step": ("fgsm_step", "fgsm_start", "replays"),
    "paper": ("train_loss", "adv_append", "input_range"),
    "runtime": (
        "seed",
        "on_nan",
        "eval_points",
        "eval_steps",
        "eval_every",
        "norm_iters",
        "out",
        "device",
        "amp",
        "compile",
        "progress",
    ),
}
SECTION_OF = {name: section for section, names in SECTIONS.items() for name in names}


def flat_settings(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict with its sections lifted to the top (``opnorm`` stays nested), the form
    code reads; a dict already flat is returned as a copy.

    Example:
        >>> from opnorm.training.config import flat_settings
        >>> flat_settings({"method": "clean", "optimization": {"lr": 0.1}, "runtime": {"seed": 3}})
        {'method': 'clean', 'lr': 0.1, 'seed': 3}
    """
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key not in SECTIONS or not isinstance(value, dict):
            if key in out:
                raise ValueError(f"config field {key} is given twice (flat and in section {SECTION_OF[key]})")
            out[key] = value
            continue
        for name, v in value.items():
            if SECTION_OF.get(name) != key:
                where = f"it belongs to section {SECTION_OF[name]}" if name in SECTION_OF else "no such field"
                raise ValueError(f"config section {key} has no field {name!r} ({where})")
            if name in out:
                raise ValueError(f"config field {name} is given twice (flat and in section {key})")
            out[name] = v
    return out


def sectioned(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flat_settings`: ``method`` first, then each non-empty section,
    then ``opnorm`` and any key outside the sections, as config.json writes them.

    Example:
        >>> from opnorm.training.config import sectioned
        >>> sectioned({"lr": 0.1, "method": "clean", "seed": 3})
        {'method': 'clean', 'optimization': {'lr': 0.1}, 'runtime': {'seed': 3}}
    """
    out: dict[str, Any] = {"method": flat["method"]} if "method" in flat else {}
    for section, names in SECTIONS.items():
        part = {name: flat[name] for name in names if name in flat}
        if part:
            out[section] = part
    out.update({k: v for k, v in flat.items() if k not in SECTION_OF and k != "method"})
    return out


@dataclass
class TrainConfig:
    """Everything a training run needs. ``None`` fields are filled by :meth:`resolved`.

    Each field's help text (its metadata) is also its ``opnorm train`` flag's: ``--batch-size``
    for ``batch_size``, ``--opnorm-step`` for ``opnorm.step``. Methods: clean, pgd-at (Madry,
    CE attack), logit-at (CE + lam * the l_q logit loss at its PGD maximizer: the theorem's AT
    objective), opnorm (d.d. (p, q) operator norm regularization; options in :attr:`opnorm`),
    global-snr (Yoshida & Miyato), trades, and the single-step methods of :mod:`opnorm.fast_at`:
    fgsm-rs (random start, one FGSM step), free (minibatch replays), n-fgsm (noise, unprojected
    step). Each method reads some of the method options (:data:`METHOD_OPTIONS`, see
    :data:`opnorm.training.objectives.METHODS`); :meth:`resolved` refuses one that is set (not
    its default) for a method that would ignore it. For free, ``epochs`` counts optimizer steps
    in epochs as for every other method: it
    makes ``epochs / replays`` passes over the data (a multiple is required; the run's metrics
    have one line per pass). ``batch_size`` is per process (the global batch is
    batch_size * world size under torchrun).

    The paper's own training setup (defaults leave every other run unchanged): ``train_loss``
    "multi-margin" (``nn.MultiMarginLoss``, margin 1, as the paper's code) is the task term of
    clean, opnorm, global-snr and pgd-at with ``adv_append`` (attacks keep the cross-entropy);
    ``adv_append`` (pgd-at only) appends the PGD-CE versions of a share of each batch to it, as the paper's
    code does with 0.75, instead of replacing examples (``adv_fraction``); ``input_range``
    [lo, hi] makes the model's first layer map pixels in [0, 1] onto [lo, hi] instead of
    standardizing with the data's statistics. Radii stay in pixel units: an l_p ball of
    radius eps on [0, 1] is the ball of radius (hi - lo) eps on [lo, hi].
    """

    dataset: str = _f("digits", "digits | fashion-mnist | mnist | cifar10")
    model: str = _f("cnn", "mlp | cnn | cnn-bn | vgg | cnn7 | resnet18 | wrn-28-10")
    method: str = _f("clean", " | ".join(METHODS))
    p: Any = _f(2.0, "threat model l_p (1, 2, inf; any real >= 1 for opnorm)")
    q: Any = _f(2.0, "logit norm l_q of the (p, q) operator norm / logit loss")
    eps: float | None = _f(None, "radius (default: per dataset and p)")
    lam: float | None = _f(None, "penalty weight (opnorm, global-snr, logit-at)")
    iters: int | None = _f(None, "global-snr: power iterations per step (default 1)")
    squared: bool = _f(True, "opnorm / logit-at: penalize sigma^2 / the squared logit distance")
    opnorm: OpnormConfig = _f(OpnormConfig, "the d.d. operator norm regularizer's options")
    steps: int = _f(10, "PGD steps of training attacks")
    step_size: float | None = _f(None, "PGD step length (default 2.5 eps / steps)")
    adv_fraction: float = _f(1.0, "share of each batch replaced by adversarial examples")
    beta: float = _f(6.0, "TRADES weight")
    fgsm_step: float | None = _f(
        None, "fgsm-rs / n-fgsm / free: attack step as a fraction of eps (default 1.25 / 1 / 1)"
    )
    fgsm_start: float | None = _f(None, "fgsm-rs / n-fgsm: random start radius as a fraction of eps (default 1 / 2)")
    replays: int | None = _f(
        None, "free: optimizer steps per minibatch (default 4); free makes epochs / replays passes"
    )
    epochs: int = _f(10, "epochs")
    batch_size: int = _f(64, "batch size per process")
    lr: float | None = _f(None, "learning rate (default: sgd 0.05, adam 1e-3)")
    optimizer: str = _f("sgd", "sgd | adam | rmsprop (torch's defaults: alpha 0.99, no momentum)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "weight decay")
    scheduler: str = _f("cosine", "cosine | none")
    seed: int = _f(0, "seed")
    # written by a resume that changed epochs, one {"epoch": E, "replaced_epochs": H} each (E: epochs done then,
    # H: the horizon replaced); from epoch E the learning rate falls on from its last value (training.schedule)
    schedule_extensions: list = dataclasses.field(default_factory=list, metadata={"flag": False})
    on_nan: str = _f(
        "stop",
        "a non-finite loss or gradients: stop the run at once | skip the batch (counted in the "
        "metrics; non-finite weights still stop it)",
    )
    eval_points: int = _f(200, "test points for the per-epoch PGD and operator-norm metrics")
    eval_steps: int = _f(20, "PGD steps of the per-epoch robustness metric")
    eval_every: int = _f(
        1, "evaluate (accuracy, PGD, operator norm) every N epochs and after the last one; 0: only after the last epoch"
    )
    norm_iters: int | None = _f(None, "power iterations of the per-epoch operator-norm metric")
    out: str | None = _f(None, "run directory")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    data_dir: str | None = _f(None, "dataset directory")
    download: bool = _f(False, "download missing datasets (needs torchvision)")
    limit_train: int | None = _f(None, "use only the first N training examples")
    limit_test: int | None = _f(None, "use only the first N test examples")
    width: int | None = _f(None, "model width (default: the model's)")
    amp: bool = _f(False, "mixed precision (bf16 on CPU, fp16 + GradScaler on CUDA)")
    compile: Any = _f(False, "torch.compile the model (true, or a backend name such as aot_eager)", flag="compile")
    num_workers: int = _f(0, "data loader workers")
    progress: bool | None = _f(None, "progress bars (default: when stderr is a terminal)")
    # the paper's own training setup (see the class docstring)
    train_loss: str = _f("ce", "ce | multi-margin (nn.MultiMarginLoss, the paper's code)")
    adv_append: float = _f(0.0, "pgd-at: share of the batch whose adversarial versions are appended (paper: 0.75)")
    input_range: list | None = _f(None, "lo,hi: the model maps pixels [0, 1] onto [lo, hi] (paper: -1,1)")

    # -- conversion ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict in sections (:data:`SECTIONS`; infinite orders as the string "inf")."""
        d = dataclasses.asdict(self)
        for k in ("p", "q"):
            d[k] = order_json(norm_order(d[k], k))
        return sectioned(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a parsed config.json, nested or in the older flat form, see
        :func:`migrate`); unknown keys are an error."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict of field: value, got {type(d).__name__}")
        d = migrate(d)
        _check_keys(d, cls, "")
        section = d.get("opnorm", {})
        if not isinstance(section, (dict, OpnormConfig)):
            raise TypeError(f"config field opnorm must be an object of regularizer options, got {section!r}")
        if isinstance(section, dict):
            _check_keys(section, OpnormConfig, "opnorm.")
            section = OpnormConfig(**section)
        return cls(**{**d, "opnorm": section})

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # -- validation and defaults ----------------------------------------------------------

    def resolved(self) -> TrainConfig:
        """A validated copy with every ``None`` default filled in; raises ValueError/TypeError."""
        c = dataclasses.replace(self)
        section = c.opnorm if isinstance(c.opnorm, OpnormConfig) else TrainConfig.from_dict({"opnorm": c.opnorm}).opnorm
        c.opnorm = dataclasses.replace(section)
        _resolve_choices(c)
        if c.eps is None:
            c.eps = default_eps(c.dataset, c.p)
        c.eps = _number(c.eps, "eps", lo=0.0)
        if c.lr is None:
            c.lr = 0.05 if c.optimizer == "sgd" else 1e-3
        c.lr = _number(c.lr, "lr", lo=0.0, strict=True)
        _resolve_numbers(c)
        _resolve_options(c)
        method = METHODS[c.method]
        refuse_ignored(c, method.reads, method.notes)
        method.resolve(c)
        return c


# Settings that only some methods read (METHODS[m].reads); "opnorm" stands for every field of
# the opnorm section. A value other than the field's default for a method that does not read it
# is refused by resolved().
METHOD_OPTIONS = (
    "lam",
    "squared",
    "beta",
    "iters",
    "steps",
    "step_size",
    "adv_fraction",
    "fgsm_step",
    "fgsm_start",
    "replays",
    "adv_append",
    "train_loss",
    "opnorm",
)


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls) if f.default is not dataclasses.MISSING}


def _set_options(c: TrainConfig, name: str) -> list[tuple[str, Any]]:
    """(field, value) of option ``name`` where c differs from the default ("opnorm": per field)."""
    if name == "opnorm":
        return [(f"opnorm.{k}", v) for k, v in dataclasses.asdict(c.opnorm).items() if v != _defaults(OpnormConfig)[k]]
    value = getattr(c, name)
    return [(name, value)] if value != _defaults(TrainConfig)[name] else []


def _methods_text(names: list[str]) -> str:
    if len(names) == 1:
        return f"method {names[0]}"
    return f"methods {', '.join(names[:-1])} and {names[-1]}"


def refuse_ignored(c: TrainConfig, reads: tuple[str, ...], notes: dict[str, str]) -> None:
    """Raise a one-line ValueError for the first method option (:data:`METHOD_OPTIONS`) set in ``c``
    (a value other than its default) that ``c.method``, reading only ``reads``, would ignore;
    ``notes``: the reason for an option, where "applies to <the methods that read it> only" needs more.

    Example::

        >>> refuse_ignored(TrainConfig(method="pgd-at", beta=3.0), ("steps",), {})
        Traceback (most recent call last):
        ValueError: beta=3.0 is ignored: beta applies to method trades only, not pgd-at; drop it
    """
    for name in METHOD_OPTIONS:
        if name in reads:
            continue
        for shown, value in _set_options(c, name):
            users = [m for m, spec in METHODS.items() if name in spec.reads]
            why = notes.get(name) or f"{shown} applies to {_methods_text(users)} only, not {c.method}"
            raise ValueError(f"{shown}={value!r} is ignored: {why}; drop it")


def method_settings(shared: dict[str, Any], method: str) -> dict[str, Any]:
    """The settings of ``shared`` (config fields, nested form) that ``method`` reads: the method
    options it does not read are left out, for studies that train several methods from one config.

    Example:
        >>> method_settings({"lr": 0.1, "adv_append": 0.75, "train_loss": "multi-margin"}, "clean")
        {'lr': 0.1, 'train_loss': 'multi-margin'}
    """
    reads = METHODS[one_of(method, tuple(METHODS), "method")].reads
    return {k: v for k, v in migrate(shared).items() if k not in METHOD_OPTIONS or k in reads}


def replays_per_batch(cfg: TrainConfig) -> int:
    """How many optimizer steps the trainer takes on each minibatch of a resolved config:
    ``replays`` (set for free only), else 1."""
    return 1 if cfg.replays is None else cfg.replays


def data_passes(cfg: TrainConfig) -> int:
    """The passes over the data of a resolved config: ``epochs / replays`` for free, else ``epochs``."""
    return cfg.epochs // replays_per_batch(cfg)


def _check_keys(d: dict, cls: type, prefix: str) -> None:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        shown = ", ".join(prefix + k for k in unknown)
        raise ValueError(
            f"unknown config field(s) {shown}; valid fields: {', '.join(prefix + n for n in sorted(names))}"
        )


def _resolve_choices(c: TrainConfig) -> None:
    c.dataset = c.dataset if is_custom(c.dataset) else canonical_dataset(c.dataset)
    c.model = c.model if is_custom(c.model) else one_of(c.model, MODELS, "model")
    c.method = one_of(c.method, METHODS, "method")
    c.optimizer = one_of(c.optimizer, OPTIMIZERS, "optimizer")
    c.scheduler = one_of(c.scheduler, SCHEDULERS, "scheduler")
    c.on_nan = one_of(c.on_nan, ON_NAN, "on_nan")
    c.p = norm_order(c.p, "p")
    c.q = norm_order(c.q, "q")


MAX_SEED = 2**32 - 1  # numpy's limit; torch's generators take the seed times small factors (ranks, epochs)


def _resolve_numbers(c: TrainConfig) -> None:
    for name in ("steps", "epochs", "batch_size", "eval_points", "eval_steps"):
        setattr(c, name, _integer(getattr(c, name), name, lo=1))
    c.seed = _integer(c.seed, "seed", lo=0, hi=MAX_SEED)
    c.eval_every = _integer(c.eval_every, "eval_every", lo=0)
    c.schedule_extensions = _extensions(c.schedule_extensions, c.epochs)
    c.num_workers = _integer(c.num_workers, "num_workers", lo=0)
    for name in ("norm_iters", "limit_train", "limit_test", "width"):
        if getattr(c, name) is not None:
            setattr(c, name, _integer(getattr(c, name), name, lo=1))
    c.momentum = _number(c.momentum, "momentum", lo=0.0)
    c.weight_decay = _number(c.weight_decay, "weight_decay", lo=0.0)
    if not isinstance(c.compile, bool) and not (isinstance(c.compile, str) and c.compile.strip()):
        raise TypeError(f"compile must be true, false or a torch.compile backend name, got {c.compile!r}")
    for name in ("squared", "download", "amp"):
        if not isinstance(getattr(c, name), bool):
            raise TypeError(f"{name} must be true or false, got {getattr(c, name)!r}")
    if c.progress is not None and not isinstance(c.progress, bool):
        raise TypeError(f"progress must be true, false or null, got {c.progress!r}")
    if not isinstance(c.device, str) or not (c.device in ("auto", "cpu") or c.device.startswith("cuda")):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {c.device!r}")
    for name in ("out", "data_dir"):
        if getattr(c, name) is not None:
            setattr(c, name, str(getattr(c, name)))


def _resolve_options(c: TrainConfig) -> None:
    """Validate the method options' values in place (which method reads which: METHODS)."""
    if c.lam is not None:
        c.lam = _number(c.lam, "lam", lo=0.0)
    if c.iters is not None:
        c.iters = _integer(c.iters, "iters", lo=1)
    if c.step_size is not None:
        c.step_size = _number(c.step_size, "step_size", lo=0.0, strict=True, finite=False)
    c.adv_fraction = _number(c.adv_fraction, "adv_fraction", lo=0.0)
    if c.adv_fraction > 1:
        raise ValueError(f"adv_fraction must be in [0, 1], got {c.adv_fraction:g}")
    c.beta = _number(c.beta, "beta", lo=0.0)
    if c.fgsm_step is not None:
        c.fgsm_step = _number(c.fgsm_step, "fgsm_step", lo=0.0, strict=True)
    if c.fgsm_start is not None:
        c.fgsm_start = _number(c.fgsm_start, "fgsm_start", lo=0.0)
    if c.replays is not None:
        c.replays = _integer(c.replays, "replays", lo=1)
    c.train_loss = one_of(c.train_loss, TRAIN_LOSSES, "train_loss")
    c.adv_append = _number(c.adv_append, "adv_append", lo=0.0)
    if c.adv_append > 1:
        raise ValueError(f"adv_append must be in [0, 1], got {c.adv_append:g}")
    if c.input_range is not None:
        r = c.input_range.split(",") if isinstance(c.input_range, str) else c.input_range
        if not isinstance(r, (list, tuple)) or len(r) != 2:
            raise ValueError(f"input_range must be [lo, hi] (flag: --input-range=lo,hi), got {c.input_range!r}")
        lo, hi = (_number(v, "input_range", lo=-math.inf) for v in r)
        if not hi > lo:
            raise ValueError(f"input_range must be [lo, hi] with hi > lo, got {c.input_range!r}")
        c.input_range = [lo, hi]


# -- the older flat form -------------------------------------------------------------------

# flat key of configs written before the regularizer's options were nested -> opnorm.<name>
FLAT_KEYS = {
    "opnorm_mode": "mode",
    "opnorm_output": "output",
    "opnorm_task": "task",
    "opnorm_step": "step",
    "opnorm_clip": "clip",
    "warm_iters": "warm_iters",
    "free_update": "free_update",
    "penalty": "penalty",
    "dynamic": "dynamic",
    "scale_by_eps": "scale_by_eps",
}


# the opnorm section that config.json files recorded for every method before a method's
# unread options were refused (resolved as fast mode)
_LEGACY_OPNORM = {
    "mode": "fast",
    "output": "logits",
    "iters": 3,
    "warm_iters": 1,
    "step": None,
    "dynamic": False,
    "penalty": "fd",
    "scale_by_eps": False,
    "clip": True,
    "free_update": True,
    "task": "clean",
}


def _without_legacy_fill(d: dict[str, Any]) -> dict[str, Any]:
    """A config.json written by an earlier version (it holds schedule_extensions, which no flag sets)
    without the values that version filled into options the method does not read: lam 0 and
    the fast opnorm section."""
    method = d.get("method")
    if "schedule_extensions" not in d or method not in METHODS:
        return d
    reads = METHODS[method].reads
    out = dict(d)
    if "lam" not in reads and out.get("lam") == 0.0:
        del out["lam"]
    if "opnorm" not in reads and out.get("opnorm") == _LEGACY_OPNORM:
        del out["opnorm"]
    return out


def migrate(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict in the nested form: the older flat keys (``opnorm_mode``, ``warm_iters``,
    ``penalty``, ...; for method opnorm also ``iters``) move into the ``opnorm`` section.

    Example:
        >>> from opnorm.training.config import migrate
        >>> migrate({"method": "opnorm", "opnorm_mode": "paper", "iters": 5})
        {'method': 'opnorm', 'opnorm': {'mode': 'paper', 'iters': 5}}
    """
    d = _without_legacy_fill(flat_settings(d))
    flat = [k for k in d if k in FLAT_KEYS or k == "opnorm_iteration"]
    if not flat:
        return dict(d)
    out = {k: v for k, v in d.items() if k not in flat}
    section = dict(out.get("opnorm") or {})
    for k in flat:
        if k == "opnorm_iteration":
            if d[k] != "linear":
                raise ValueError(
                    f"opnorm_iteration {d[k]!r} was removed (it matched the linear iteration at a higher "
                    "cost); drop the key to use the linear iteration"
                )
            continue
        section[FLAT_KEYS[k]] = d[k]
    if d.get("method") == "opnorm" and "iters" in out:
        section.setdefault("iters", out.pop("iters"))
    out["opnorm"] = section
    return out


def defaults_used(given: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """The settings of ``cfg.method``'s training that ``given`` (the settings set by flags or a config
    file) left to defaults: field name -> the value :meth:`TrainConfig.resolved` filled in.

    Example:
        >>> from opnorm.training.config import TrainConfig, defaults_used
        >>> defaults_used({"method": "fgsm-rs"}, TrainConfig(method="fgsm-rs").resolved())
        {'p': 2.0, 'eps': 0.5, 'lr': 0.05, 'fgsm_step': 1.25, 'fgsm_start': 1.0}
    """
    # what the method reads beyond p, eps and lr that resolved() fills in when it is not given (and q)
    filled = [n for n in METHODS[cfg.method].reads if n == "q" or _defaults(TrainConfig).get(n, 0) is None]
    names = ("p", "eps", "lr", *filled)
    return {n: getattr(cfg, n) for n in names if given.get(n) is None}


def _default_text(name: str, value: Any) -> str:
    """A filled-in value as its flag shows it; a field left None (decided at run time, e.g. the
    step size from eps) by its help's ``default ...`` text."""
    if value is not None:
        return order_text(value)
    help_text = next(f.metadata["help"] for f in fields(TrainConfig) if f.name == name)
    match = re.search(r"\(default:? ([^)]*)\)", help_text)
    return f"({match.group(1)})" if match else "(automatic)"


def defaults_line(given: dict[str, Any], cfg: TrainConfig) -> str:
    """One line naming the method, data and model, and every setting filled from a default as its flag.

    Example:
        >>> from opnorm.training.config import TrainConfig, defaults_line
        >>> defaults_line({"method": "fgsm-rs"}, TrainConfig(method="fgsm-rs").resolved())
        'fgsm-rs on digits (cnn); not set, so from defaults: --p 2 --eps 0.5 --lr 0.05 --fgsm-step 1.25 --fgsm-start 1'
    """
    used = defaults_used(given, cfg)
    shown = " ".join(f"--{k.replace('_', '-')} {_default_text(k, v)}" for k, v in used.items())
    return f"{cfg.method} on {cfg.dataset} ({cfg.model}); " + (
        f"not set, so from defaults: {shown}" if used else "every setting of the method given"
    )


def merge(*dicts: dict[str, Any]) -> dict[str, Any]:
    """Later dicts override earlier ones, the ``opnorm`` section key by key (each migrated first)."""
    out: dict[str, Any] = {}
    for d in dicts:
        d = migrate(d)
        section = {**(out.get("opnorm") or {}), **(d.get("opnorm") or {})}
        out.update(d)
        if section:
            out["opnorm"] = section
    return out


def _extensions(value: Any, epochs: int) -> list[dict[str, int]]:
    """Validate schedule_extensions: E strictly increasing, each E <= the horizon it replaced,
    the last E < epochs (the last horizon)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"schedule_extensions must be a list, got {value!r}")
    out: list[dict[str, int]] = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"epoch", "replaced_epochs"}:
            raise ValueError(f'each schedule_extensions entry is {{"epoch": E, "replaced_epochs": H}}, got {item!r}')
        e = _integer(item["epoch"], "schedule_extensions epoch", lo=1)
        h = _integer(item["replaced_epochs"], "schedule_extensions replaced_epochs", lo=e)
        if out and e <= out[-1]["epoch"]:
            raise ValueError(f"schedule_extensions epochs must increase, got {value!r}")
        out.append({"epoch": e, "replaced_epochs": h})
    if out and out[-1]["epoch"] >= epochs:
        raise ValueError(
            f"schedule_extensions end at epoch {out[-1]['epoch']} but epochs is {epochs}; "
            "drop schedule_extensions for a fresh schedule"
        )
    return out


# Settings a resumed run may change: where and how it runs and what it measures, never what it
# trains. epochs is special: a change extends (or shortens) the run, recorded in
# schedule_extensions. Every other key (dotted inside nested sections) defines the trajectory.
RESUMABLE = frozenset(
    {
        "epochs",
        "out",
        "device",
        "progress",
        "num_workers",
        "data_dir",
        "download",
        "eval_points",
        "eval_steps",
        "eval_every",
        "norm_iters",
        "limit_test",
        "on_nan",
    }
)

_ABSENT = object()


def _first_difference(old: Any, new: Any, key: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=lambda k: (k != "method", str(k))):  # a changed method first
            dotted = f"{key}.{k}" if key else str(k)
            if dotted in RESUMABLE:
                continue
            found = _first_difference(old.get(k, _ABSENT), new.get(k, _ABSENT), dotted)
            if found:
                return found
        return None
    return None if old == new else (key, old, new)


def check_resume(old: dict[str, Any], new: dict[str, Any], run: str) -> None:
    """Refuse a resume whose resolved config changes a setting that shapes the trajectory.

    Args:
        old: the run's resolved config (``TrainConfig.to_dict()``, as in its checkpoint).
        new: the resolved config of the resuming call.
        run: the run directory, for the message.

    Every key is compared, recursing into nested dicts, except those in ``RESUMABLE``.

    Raises:
        ValueError: one line naming the first differing setting (dotted for nested keys)
            and the two ways on: a new run, or ``--config <run>/config.json`` with a new --out.

    Example:
        >>> from opnorm.training.config import check_resume
        >>> check_resume({"lr": 0.05, "epochs": 2}, {"lr": 0.05, "epochs": 4}, "runs/a")  # fine
        >>> check_resume({"opnorm": {"step": None}}, {"opnorm": {"step": 0.5}}, "runs/a")
        Traceback (most recent call last):
        ValueError: cannot resume runs/a with opnorm.step=0.5: the run was trained with opnorm.step=None, ...
    """
    found = _first_difference(flat_settings(old), flat_settings(new))
    if found is None:
        return
    key, was, now = found
    show = lambda v: "(not set)" if v is _ABSENT else repr(v)  # noqa: E731
    raise ValueError(
        f"cannot resume {run} with {key}={show(now)}: the run was trained with {key}={show(was)}, and settings that "
        f"shape the training cannot change on resume (only {', '.join(sorted(RESUMABLE))} can); start a new run "
        f"with the new setting instead: opnorm train --config {run}/config.json --out NEW_DIR plus the changed flag"
    )
