"""What a reproduction study is: :class:`StudyConfig`, the dataset presets, the methods and
the lambda sweeps that match clean accuracy.

Example:
    >>> from opnorm.experiments.study import method_table, study_config, sweep_key, sweep_lambdas
    >>> cfg = study_config("digits", seeds=[0, 1])
    >>> [key for key, *_ in method_table(cfg)]
    ['clean', 'pgd-at-linf', 'pgd-at-l2', 'logit-at', 'opnorm', 'global-snr']
    >>> sweep_lambdas(cfg, "opnorm"), sweep_key(cfg, "opnorm", 0.4)
    ([0.1, 0.4], 'opnorm-lam0.4')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from opnorm.experiments.matching import round_lambda
from opnorm.training.config import METHOD_OPTIONS, TrainConfig, method_settings, migrate

INF = math.inf


@dataclass
class StudyConfig:
    """Everything that defines a study; saved in results.json["config"].

    ``train`` holds TrainConfig fields shared by every method (``opnorm reproduce --config``
    puts a training config file's fields there); the method table overrides method, radii,
    lambdas and iterations on top of them.
    """

    dataset: str = "digits"
    model: str = "cnn"
    quick: bool = False
    seeds: list = field(default_factory=lambda: [0])
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    limit_train: int | None = None
    train: dict = field(default_factory=dict)
    eps_linf: float = 0.1  # training radius of l_inf PGD-AT
    eps_l2: float = 0.5  # training radius of l_2 PGD-AT, logit AT and d.d. regularization
    # shared by logit AT and d.d. regularization: both penalize lam * ||f(x + delta) - f(x)||_2^2,
    # delta the PGA maximizer resp. eps * v_1 (= lam * eps^2 * sigma^2 in the linear region)
    lam: float = 0.1
    lam_snr: float = 0.01
    # lambda sweeps (multiples of lam and lam_snr) from which the matched-clean-accuracy lambda is picked;
    # the bracketing search then adds up to match_points lambdas per family (factor 10 outwards, then
    # bisection in log-lambda) until two bracket PGD-AT's clean accuracy, one within match_tol of it
    sweep_dd: list = field(default_factory=lambda: [1.0, 3.0, 10.0])
    sweep_snr: list = field(default_factory=lambda: [1.0, 10.0, 100.0])
    match_points: int = 3
    match_tol: float = 0.01
    train_steps: int = 10
    step_size: float | None = None  # training PGA step (None: 2.5 eps / steps)
    power_iters: int = 10
    fast_method: bool = True  # also train the fast d.d. regularizer
    eval_points: int = 360
    eval_steps: int = 20
    eval_restarts: int = 2
    # the evaluation PGD's step size: "halving" (eps, halved at 1/4, 1/2, 3/4 of the steps, from
    # the best point so far) found points that 2.5 eps / steps missed, against APGD on Fashion-MNIST
    eval_schedule: str = "halving"
    # robust accuracy is the per-example worst case over CE-PGD and then APGD-DLR (a scale-invariant
    # loss; CE-PGD alone flatters models that saturate the softmax); CE-PGD is reported beside it
    dlr_steps: int = 50
    # examples per APGD-DLR call: a call runs its whole chunk when one example in it is still
    # robust (so the randomness never depends on which are); larger chunks save per-call overhead
    # but attack more examples already fooled (the trade, measured: docs/results/README.md)
    dlr_batch: int = 50
    # the evaluation-strength arm: the paper's code's attack (10 steps, targeted at (y + 1) mod C)
    paper_attack_steps: int = 10
    # the black-box check: Square with this many queries on the suite's survivors (first seed,
    # the matched comparison's models, the first square_points test points)
    square_queries: int = 1000
    square_points: int = 200
    eps_grid_linf: list = field(default_factory=lambda: [0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2])
    eps_grid_l2: list = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    align_points: int = 100
    align_eps: list = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    align_steps: int = 20
    rank_k: int = 10  # singular vectors of the alignment-by-rank figure (at most the number of classes)
    linearity_radii: list = field(default_factory=lambda: [0.03, 0.1, 0.3, 0.5, 1.0, 2.0])
    theorem_steps: int = 10
    theorem_eps: list = field(default_factory=lambda: [1e-5, 0.3])
    # Images with constant backgrounds (digits, MNIST, Fashion-MNIST) give exact ties inside
    # max-pool windows, so each such image sits on a boundary between linear regions: no
    # eps-ball around it is linear. Alignment, linearity, agreement and the theorem are measured
    # at the test points plus N(0, jitter^2) pixel noise (inside a region almost surely);
    # alignment and agreement are also reported at the points as they are. 0 turns it off.
    analysis_jitter: float = 1e-2
    spectrum_k: int = 10
    noise_points: float = 1.0  # tolerance of the sanity checks, in accuracy points
    data_dir: str | None = None
    command: str = ""

    @property
    def reference_eps(self) -> dict:
        return {"linf": self.eps_linf, "l2": self.eps_l2}


PRESETS: dict[str, dict[str, Any]] = {
    # sized for 2 cores: three seeds, a two-point sweep per family, the fast regularizer left out
    "digits": dict(
        seeds=[0, 1, 2],
        epochs=4,
        eval_points=200,
        align_points=48,
        eps_grid_linf=[0.0, 0.05, 0.1, 0.2],
        eps_grid_l2=[0.0, 0.25, 0.5, 1.0, 2.0],
        align_eps=[0.01, 0.1, 0.3, 1.0, 3.0],
        linearity_radii=[0.03, 0.1, 0.3, 1.0, 2.0],
        sweep_dd=[1.0, 4.0],
        sweep_snr=[1.0, 100.0],
        match_points=2,  # at most two added lambdas per family: the run stays within about 4 minutes
        fast_method=False,
        # the suite's second attack stands in for a second CE restart; Square on the first 100 points
        eval_restarts=1,
        dlr_steps=25,
        dlr_batch=200,  # the 200 test points in one call
        square_points=100,
        square_queries=500,
    ),
    # sized for 2 cores, both arms side by side (what it cost: docs/results/README.md): 3000
    # training images, 200 test points
    "fashion-mnist": dict(
        epochs=3,
        limit_train=3000,
        batch_size=128,
        lr=0.05,
        eps_linf=0.1,
        eps_l2=1.0,
        lam=0.05,
        eval_points=200,
        fast_method=False,
        seeds=[0, 1, 2],
        eps_grid_linf=[0.0, 0.05, 0.1, 0.2],
        eps_grid_l2=[0.0, 0.5, 1.0, 2.0],
        eval_restarts=1,  # the suite's APGD-DLR stands in for a second CE restart
        dlr_steps=25,
        align_points=32,
        align_eps=[0.01, 0.1, 0.3, 1.0, 3.0],
        theorem_eps=[1e-5, 1.0],
        linearity_radii=[0.1, 0.3, 1.0, 2.0, 3.0],
        sweep_dd=[1.0, 10.0],
        sweep_snr=[1.0, 100.0],
        match_points=2,
    ),
    "mnist": dict(
        epochs=8,
        batch_size=128,
        lr=0.05,
        eps_linf=0.3,
        eps_l2=2.0,
        lam=0.02,
        eval_points=1000,
        eps_grid_linf=[0.0, 0.05, 0.1, 0.2, 0.3, 0.4],
        eps_grid_l2=[0.0, 0.5, 1.0, 2.0, 3.0, 4.0],
        align_points=200,
        theorem_eps=[1e-5, 1.0],
        linearity_radii=[0.1, 0.3, 1.0, 2.0, 4.0],
    ),
    # lam_snr: the paper's global SNR lambda on CIFAR-10; the rest is a small VGG unless --config
    "cifar10": dict(
        model="vgg",
        epochs=10,
        batch_size=128,
        lr=0.05,
        eps_linf=8 / 255,
        eps_l2=0.5,
        lam=0.02,
        lam_snr=3e-4,
        eval_points=500,
        eps_grid_linf=[0.0, 2 / 255, 4 / 255, 8 / 255, 12 / 255, 16 / 255],
        eps_grid_l2=[0.0, 0.25, 0.5, 1.0, 1.5, 2.0],
        align_points=100,
        align_eps=[0.01, 0.03, 0.1, 0.3, 1.0],
        theorem_eps=[1e-5, 0.5],
        linearity_radii=[0.1, 0.25, 0.5, 1.0, 2.0],
    ),
}

QUICK = dict(
    seeds=[0],
    epochs=2,
    limit_train=400,
    eval_points=48,
    eval_steps=20,
    eval_restarts=2,
    align_points=16,
    align_eps=[0.03, 0.3],
    eps_grid_linf=[0.0, 0.1],
    eps_grid_l2=[0.0, 0.5],
    theorem_steps=4,
    spectrum_k=4,
    rank_k=4,
    linearity_radii=[0.1, 1.0],
    sweep_dd=[1.0],
    sweep_snr=[1.0],
    match_points=0,
    fast_method=False,  # no sweep: the main lambdas
    dlr_steps=10,
    square_points=32,
    square_queries=100,
)

# fields a training config file (opnorm reproduce --config) sets on the study, by TrainConfig name
_FROM_TRAIN = {
    "dataset": "dataset",
    "model": "model",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "limit_train": "limit_train",
    "eps": "eps_l2",
    "lam": "lam",
    "steps": "train_steps",
    "step_size": "step_size",
    "data_dir": "data_dir",
}
# TrainConfig fields the study sets per method: a config file's values of these are not shared
_PER_METHOD = (
    "method",
    "p",
    "q",
    "eps",
    "lam",
    "iters",
    "opnorm",
    "out",
    "seed",
    "progress",
    "eval_points",
    "eval_steps",
)


def study_config(
    dataset: str = "digits", quick: bool = False, train_config: dict | None = None, **overrides: Any
) -> StudyConfig:
    """The study for ``dataset`` (its preset, then QUICK, then a training config file's fields,
    then ``overrides``; None values are ignored).

    ``train_config``: TrainConfig fields (e.g. configs/paper-cifar10.json). Its dataset, model,
    epochs, batch size, lr, eps (the l_2 radius; p must be 2), lam (d.d.), opnorm.iters (power
    iterations), steps and step_size set the study's; every other field is shared by all
    methods (optimizer, train_loss, adv_append, input_range, width, ...); the rest of the
    regularizer's section is the study's own (paper mode for d.d., fast mode for the fast one).
    """
    if train_config is not None:
        dataset = str(train_config.get("dataset", dataset))
    if dataset not in PRESETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(PRESETS)}")
    cfg = replace(StudyConfig(dataset=dataset, quick=quick), **PRESETS[dataset])
    if quick:
        cfg = replace(cfg, **QUICK)
    if train_config is not None:
        cfg = _with_train_config(cfg, train_config)
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    _check(cfg)
    return cfg


def _with_train_config(cfg: StudyConfig, tc: dict) -> StudyConfig:
    tc = migrate(dict(tc))  # the nested form: the regularizer's options in tc["opnorm"]
    # one-line errors for a bad file; the method options that its method ignores are the AT methods
    resolved = TrainConfig.from_dict(method_settings(tc, tc.get("method", "clean"))).resolved()
    if resolved.p != 2.0 or resolved.q != 2.0:
        raise ValueError(
            "opnorm reproduce --config needs p 2 and q 2: the study's d.d. regularizer and its matched "
            f"AT are l_2 with the (2, 2) norm, got p {tc.get('p')} q {tc.get('q')}"
        )
    # steps and step_size: the AT methods' (the file's method may not read them)
    study = {
        name: tc[key] if key in ("steps", "step_size") else getattr(resolved, key)
        for key, name in _FROM_TRAIN.items()
        if key in tc
    }
    if "iters" in tc.get("opnorm", {}):
        study["power_iters"] = resolved.opnorm.iters
    shared = {k: v for k, v in tc.items() if k not in _FROM_TRAIN and k not in _PER_METHOD}
    return replace(cfg, **study, train=shared)


def _check(cfg: StudyConfig) -> None:
    seeds = cfg.seeds
    if not isinstance(seeds, (list, tuple)) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds!r}")
    for name in ("sweep_dd", "sweep_snr"):
        vals = getattr(cfg, name)
        if not vals or 1.0 not in vals or any(not (v > 0) for v in vals):
            raise ValueError(f"{name} must be positive multiples of lambda that include 1.0, got {vals!r}")
    if isinstance(cfg.match_points, bool) or not isinstance(cfg.match_points, int) or cfg.match_points < 0:
        raise ValueError(f"match_points must be an int >= 0, got {cfg.match_points!r}")
    if isinstance(cfg.dlr_batch, bool) or not isinstance(cfg.dlr_batch, int) or cfg.dlr_batch < 1:
        raise ValueError(f"dlr_batch must be an int >= 1 (examples per APGD-DLR call), got {cfg.dlr_batch!r}")
    if not (cfg.match_tol >= 0):
        raise ValueError(f"match_tol must be >= 0 (a clean-accuracy fraction), got {cfg.match_tol!r}")
    if cfg.rank_k < 1 or cfg.spectrum_k < 1:
        raise ValueError("rank_k and spectrum_k must be >= 1")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2] (a one-line ValueError otherwise)."""
    try:
        seeds = [int(tok) for tok in str(text).split(",") if tok.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must be comma-separated integers >= 0 such as 0,1,2, got {text!r}")
    return seeds


def _dd(cfg: StudyConfig, lam: float) -> dict:
    return dict(
        method="opnorm",
        p=2,
        q=2,
        eps=cfg.eps_l2,
        lam=lam,
        opnorm=dict(mode="paper", iters=cfg.power_iters, scale_by_eps=True),
    )


def method_table(cfg: StudyConfig) -> list[tuple[str, str, str, dict]]:
    """(key, label, settings text, TrainConfig overrides) for every method of the study."""
    at = dict(steps=cfg.train_steps, step_size=cfg.step_size)
    rows = [
        ("clean", "Clean", "-", dict(method="clean", p=2)),
        (
            "pgd-at-linf",
            "PGD-AT l_inf (CE)",
            f"eps={cfg.eps_linf:g}, {cfg.train_steps} steps",
            dict(method="pgd-at", p=INF, eps=cfg.eps_linf, steps=cfg.train_steps),
        ),
        (
            "pgd-at-l2",
            "PGD-AT l_2 (CE)",
            f"eps={cfg.eps_l2:g}, {cfg.train_steps} steps",
            dict(method="pgd-at", p=2, eps=cfg.eps_l2, **at),
        ),
        (
            "logit-at",
            "l_2-logit AT",
            f"eps={cfg.eps_l2:g}, lam={cfg.lam:g}, {cfg.train_steps} steps",
            dict(method="logit-at", p=2, q=2, eps=cfg.eps_l2, lam=cfg.lam, **at),
        ),
        (
            "opnorm",
            "d.d. (2,2) op-norm reg.",
            f"eps={cfg.eps_l2:g}, lam={cfg.lam:g}, {cfg.power_iters} iters",
            _dd(cfg, cfg.lam),
        ),
        (
            "opnorm-fast",
            "d.d. (2,2) op-norm reg., fast",
            f"eps={cfg.eps_l2:g}, lam={cfg.lam:g}, warm-started",
            dict(method="opnorm", p=2, q=2, eps=cfg.eps_l2, lam=cfg.lam, opnorm=dict(mode="fast", scale_by_eps=True)),
        ),
        ("global-snr", "Global SNR", f"lam={cfg.lam_snr:g}", dict(method="global-snr", lam=cfg.lam_snr)),
    ]
    if cfg.train.get("train_loss", "ce") != "ce":  # logit AT's loss is the cross-entropy only
        rows = [r for r in rows if r[0] != "logit-at"]
    if not cfg.fast_method:
        rows = [r for r in rows if r[0] != "opnorm-fast"]
    return rows


FAMILIES = ("opnorm", "global-snr")


def family_lambda(cfg: StudyConfig, family: str) -> float:
    """The main lambda of a sweep family ("opnorm": d.d. regularization, "global-snr")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown sweep family {family!r}; valid: {', '.join(FAMILIES)}")
    return cfg.lam if family == "opnorm" else cfg.lam_snr


def sweep_key(cfg: StudyConfig, family: str, lam: float) -> str:
    """The run key of a family's model at ``lam``: named by its own lambda (the family's main
    lambda is the main method itself), so a run is found again whatever sweep it came from."""
    return family if lam == family_lambda(cfg, family) else f"{family}-lam{lam:g}"


def sweep_overrides(cfg: StudyConfig, family: str, lam: float) -> dict:
    """TrainConfig overrides of a family's model at ``lam``."""
    return _dd(cfg, lam) if family == "opnorm" else dict(method="global-snr", lam=lam)


def sweep_lambdas(cfg: StudyConfig, family: str) -> list[float]:
    """The initial sweep of a family: its main lambda times each factor, sorted."""
    factors = cfg.sweep_dd if family == "opnorm" else cfg.sweep_snr
    lam = family_lambda(cfg, family)
    return sorted(lam if f == 1.0 else round_lambda(lam * f) for f in factors)


def fingerprint(cfg: StudyConfig) -> dict:
    """The fields that decide what a trained run is (a runs directory must match them to be reused).

    The sweeps and the bracketing search are left out: a sweep's runs are named by their own
    lambda, so a longer sweep or search reuses every finished run."""
    skip = {
        "seeds",
        "command",
        "quick",
        "data_dir",
        "noise_points",
        "sweep_dd",
        "sweep_snr",
        "match_points",
        "match_tol",
    }
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in skip}


def base_config(cfg: StudyConfig) -> TrainConfig:
    """The TrainConfig every model of the study starts from (the method table overrides it)."""
    # the shared settings; a method option of the config file goes to the methods that read it
    return TrainConfig(**{k: v for k, v in cfg.train.items() if k not in METHOD_OPTIONS}).replace(
        dataset=cfg.dataset,
        model=cfg.model,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        data_dir=cfg.data_dir,
        limit_train=cfg.limit_train,
        eval_points=min(64, cfg.eval_points),
        eval_steps=5,
        progress=None,
        device="cpu" if not torch.cuda.is_available() else cfg.train.get("device", "auto"),
    )
