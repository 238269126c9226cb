"""One robustness evaluation: clean accuracy, robust accuracy per attack and radius, and the
per-example worst case over a suite of attacks, with a binomial confidence interval.

An example counts as robust at a radius only if it is classified correctly clean and under
every attack of the suite (the worst case that AutoAttack reports). Each attack is one small
object with one call, ``attack(model, x, y, eps=, p=, todo=) -> (B,) bool`` (True: the
attacked input is still classified correctly), and :func:`evaluate` composes them:

* :class:`PGDAttack`: opnorm's :class:`~opnorm.attacks.EvalPGD` (any loss, random start, restarts,
  best iterate, the halving schedule);
* :class:`APGDAttack`: torchattacks' APGD-CE / APGD-DLR, or the targeted APGD-T (DLR loss);
* :class:`SquareAttack`: torchattacks' black-box Square attack (gradient masking shows up as
  Square beating the gradient attacks);
* :class:`AutoAttack`: torchattacks' standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square with
  5000 queries), the number papers compare.

By default a later attack runs only on the examples still robust, as AutoAttack does. The
randomness of an attack never depends on which examples it is given, so the worst case is
identical to attacking every example with every attack: :class:`PGDAttack` draws the random
starts of every example in fixed chunks, and the torchattacks attacks (which reseed on every
call) run a fixed chunk whole as soon as one of its examples is still robust.

torchattacks is imported only by the attacks that need it (an optional dependency).

Example (``attacks="pgd,apgd-ce,square"`` adds torchattacks' attacks):
    >>> import torch, opnorm
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
    >>> res = opnorm.evaluate(model, x, y, eps=[0.05, 0.1], p="inf", attacks="pgd")
    >>> res.worst.shape  # (radii, N) bool: robust at each radius
    torch.Size([2, 4])
    >>> res.worst_case(0.1) <= res.worst_case(0.05) <= res.clean_accuracy
    True
    >>> low, high = res.interval(0.1)  # the Wilson interval of the worst case
    >>> 0 <= low <= res.worst_case(0.1) <= high <= 1
    True
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from opnorm.attacks import EvalPGD, Loss, random_in_ball
from opnorm.jacobian import check_autograd, check_label_range, eval_mode, unwrap
from opnorm.norms import norm_order, order_json

__all__ = [
    "evaluate",
    "Evaluation",
    "Attack",
    "PGDAttack",
    "APGDAttack",
    "SquareAttack",
    "AutoAttack",
    "ATTACKS",
    "SUITES",
    "attack_names",
    "named_attack",
    "wilson_interval",
    "clean_correct",
    "progress_bar",
]

ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square", "autoattack")
SUITES = {"all": ATTACKS}
NOT_ATTACKED = -1  # in Evaluation.correct: the example was already fooled, so this attack skipped it


class Attack(Protocol):
    """One attack: ``attack(model, x, y, eps=, p=, todo=, progress=) -> (B,) bool`` on the CPU,
    True where the attacked input is still classified correctly. Only the examples with
    ``todo`` True need an answer; an attack may attack more (a whole chunk), never fewer."""

    name: str

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float,
        p: float,
        todo: torch.Tensor,
        progress: bool = False,
    ) -> torch.Tensor: ...


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def progress_bar(items, show: bool, desc: str):
    """``items``, wrapped in a progress bar on stderr when ``show`` (the one bar of evaluations and
    training epochs).

    Example:
        >>> import sys
        >>> from opnorm.evaluation import progress_bar
        >>> [2 * s for s in progress_bar(range(3), sys.stderr.isatty(), "pgd eps=0.1")]
        [0, 2, 4]
    """
    if not show:
        return items
    return tqdm(items, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def _device(net: nn.Module) -> torch.device:
    param = next(net.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_batch_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {value!r}")
    return value


class PGDAttack:
    """opnorm's evaluation attack :class:`~opnorm.attacks.EvalPGD` in :func:`evaluate`: random start,
    ``restarts`` runs, an example is fooled if any point of any run's path fools it
    (``best_iterate``); a fooled example is not attacked by the later restarts.

    Args:
        steps, loss, step_size, schedule, clip, best_iterate: as in :class:`~opnorm.attacks.EvalPGD`
            (loss "ce", "cw", "logit", "kl" or a loss object; schedule "constant" or "halving").
        restarts: runs from independent random starts (>= 1).
        seed: a fresh ``torch.Generator`` seeded so draws the starts of each call (each radius);
            None (and no generator): torch's global generator.
        generator: instead of ``seed``, one generator whose stream goes on across calls.
        batch_size: examples per chunk; the starts of a chunk are drawn for all its examples
            (restart after restart), whichever of them are attacked.

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> from opnorm.evaluation import PGDAttack
        >>> todo = torch.tensor([True, True, False, True])  # the examples to attack
        >>> PGDAttack(steps=20, restarts=2, loss="cw", seed=0)(model, x, y, eps=0.1, p="inf", todo=todo).shape
        torch.Size([4])
    """

    name = "pgd"

    def __init__(
        self,
        *,
        steps: int = 20,
        restarts: int = 1,
        loss: Loss = "ce",
        step_size: float | None = None,
        schedule: str = "constant",
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
        clip: tuple[float, float] | None = (0.0, 1.0),
        best_iterate: bool = True,
    ) -> None:
        for what, value in (("steps", steps), ("restarts", restarts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
        self.steps, self.restarts, self.loss, self.step_size = steps, restarts, loss, step_size
        self.schedule, self.seed, self.generator, self.clip = schedule, seed, generator, clip
        self.batch_size, self.best_iterate = _check_batch_size(batch_size), best_iterate
        # one run per start: the restarts are this class's own (fooled examples leave the batch)
        self.attack = EvalPGD(
            loss=loss, steps=steps, step_size=step_size, best_iterate=best_iterate, schedule=schedule, clip=clip
        )

    def describe(self) -> str:
        restarts = f", {self.restarts} restarts" if self.restarts > 1 else ""
        loss = self.loss if isinstance(self.loss, str) else getattr(self.loss, "name", "callable")
        return f"PGD-{self.steps} (loss {loss}, {self.schedule} step{restarts})"

    def __call__(self, model, x, y, *, eps, p, todo, progress=False):
        net = unwrap(model)
        device = _device(net)
        gen = self.generator
        if gen is None and self.seed is not None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
        out = torch.zeros(x.shape[0], dtype=torch.bool)
        for s in progress_bar(_chunks(x.shape[0], self.batch_size), progress, f"pgd eps={eps:g}"):
            xb, yb = x[s].to(device), y[s].to(device)
            # every example's starts are drawn, attacked or not: its start never depends on the others
            starts = [random_in_ball(xb, p, eps, gen) for _ in range(self.restarts)]
            rows = todo[s].nonzero().flatten().to(device)
            robust = torch.ones(len(rows), dtype=torch.bool, device=device)
            for start in starts:
                left = rows[robust]  # a fooled example stays fooled: later restarts skip it
                if len(left) == 0:
                    break
                adv = self.attack(net, xb[left], yb[left], eps=eps, p=p, delta0=start[left])
                with torch.no_grad(), eval_mode(net):
                    still = net(adv).argmax(1) == yb[left]
                robust[robust.clone()] = still
            out[torch.arange(s.start, s.stop)[rows.cpu()]] = robust.cpu()
        return out


def _torchattacks():
    try:
        import torchattacks
    except ImportError:
        raise ImportError(
            "this attack needs torchattacks: pip install 'opnorm[eval]' (or pip install torchattacks)"
        ) from None
    return torchattacks


def _ta_norm(p: float) -> str:
    if p == math.inf:
        return "Linf"
    if p == 2:
        return "L2"
    raise ValueError(f"torchattacks' attacks support p = inf or 2, got p = {p:g}; use the pgd attack for l_1")


class _TorchAttacks:
    """The chunk loop shared by the torchattacks attacks: a chunk runs whole if one of its
    examples is to be attacked (torchattacks reseeds per call: results depend on the chunk only)."""

    name = ""

    def __init__(self, seed: int, batch_size: int) -> None:
        self.seed, self.batch_size = seed, _check_batch_size(batch_size)

    def make(self, ta, net: nn.Module, eps: float, norm: str, num_classes: int):
        raise NotImplementedError

    def __call__(self, model, x, y, *, eps, p, todo, progress=False):
        norm = _ta_norm(p)
        ta = _torchattacks()
        net = unwrap(model)
        device = _device(net)
        out = torch.zeros(x.shape[0], dtype=torch.bool)
        chunks = [s for s in _chunks(x.shape[0], self.batch_size) if bool(todo[s].any())]
        if not chunks:
            return out
        with eval_mode(net):
            with torch.no_grad():
                num_classes = int(net(x[:1].to(device)).shape[1])
            atk = self.make(ta, net, eps, norm, num_classes)
            for s in progress_bar(chunks, progress, f"{self.name} eps={eps:g}"):
                xb, yb = x[s].to(device), y[s].to(device)
                adv = atk(xb, yb)
                with torch.no_grad():
                    out[s] = (net(adv).argmax(1) == yb).cpu()
        return out


class APGDAttack(_TorchAttacks):
    """torchattacks' APGD (Croce and Hein 2020): ``loss`` "ce", "dlr", or "t" for the targeted
    APGD-T (DLR loss, every other class as a target, as in AutoAttack).

    Example (needs torchattacks)::

        todo = torch.ones(len(x), dtype=torch.bool)  # attack every example
        robust = APGDAttack("ce", steps=100)(model, x, y, eps=0.1, p=math.inf, todo=todo)  # (B,) bool
    """

    def __init__(
        self, loss: str = "ce", *, steps: int = 100, restarts: int = 1, seed: int = 0, batch_size: int = 250
    ) -> None:
        if loss not in ("ce", "dlr", "t"):
            raise ValueError(f"APGD loss must be 'ce', 'dlr' or 't' (targeted), got {loss!r}")
        super().__init__(seed, batch_size)
        self.loss, self.steps, self.restarts = loss, steps, restarts
        self.name = f"apgd-{loss}"

    def describe(self) -> str:
        return f"APGD-{self.loss.upper()} ({self.steps} steps, torchattacks)"

    def make(self, ta, net, eps, norm, num_classes):
        if self.loss == "t":
            return ta.APGDT(
                net,
                norm=norm,
                eps=eps,
                steps=self.steps,
                n_restarts=self.restarts,
                seed=self.seed,
                n_classes=num_classes,
            )
        return ta.APGD(
            net, norm=norm, eps=eps, steps=self.steps, n_restarts=self.restarts, seed=self.seed, loss=self.loss
        )


class SquareAttack(_TorchAttacks):
    """torchattacks' Square attack (Andriushchenko et al. 2020): black box, ``queries`` queries, margin loss."""

    name = "square"

    def __init__(self, *, queries: int = 5000, seed: int = 0, batch_size: int = 250) -> None:
        super().__init__(seed, batch_size)
        self.queries = queries

    def describe(self) -> str:
        return f"Square ({self.queries} queries, torchattacks)"

    def make(self, ta, net, eps, norm, num_classes):
        return ta.Square(net, norm=norm, eps=eps, n_queries=self.queries, n_restarts=1, seed=self.seed)


class AutoAttack(_TorchAttacks):
    """torchattacks' standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square with 5000 queries)."""

    name = "autoattack"

    def __init__(self, *, seed: int = 0, batch_size: int = 250) -> None:
        super().__init__(seed, batch_size)

    def describe(self) -> str:
        return "AutoAttack (standard, torchattacks)"

    def make(self, ta, net, eps, norm, num_classes):
        return ta.AutoAttack(net, norm=norm, eps=eps, version="standard", n_classes=num_classes, seed=self.seed)


def attack_names(spec: str | Sequence[str]) -> list[str]:
    """The attack names of ``spec``: a name of :data:`ATTACKS`, a suite of :data:`SUITES`
    ("all"), or a comma-separated list of them; in order, without repeats.

    Example:
        >>> from opnorm.evaluation import attack_names
        >>> attack_names("pgd,square"), attack_names("all")[:2]
        (['pgd', 'square'], ['pgd', 'apgd-ce'])
    """
    tokens = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for tok in tokens:
        if tok not in ATTACKS and tok not in SUITES:
            raise ValueError(
                f"unknown attack {tok!r}; valid: {', '.join(ATTACKS + tuple(SUITES))} (or a comma-separated list)"
            )
        names += [n for n in SUITES.get(tok, (tok,)) if n not in names]
    if not names:
        raise ValueError("no attack given; valid: " + ", ".join(ATTACKS + tuple(SUITES)))
    return names


def named_attack(name: str, *, seed: int = 0) -> Attack:
    """The attack ``name`` of :data:`ATTACKS` with its standard settings (pgd: PGD-20, CE, halving;
    APGD: 100 steps; Square: 5000 queries), seeded with ``seed``."""
    if name == "pgd":
        return PGDAttack(steps=20, schedule="halving", seed=seed)
    if name.startswith("apgd-") and name in ATTACKS:
        return APGDAttack(name[5:], seed=seed)
    if name == "square":
        return SquareAttack(seed=seed)
    if name == "autoattack":
        return AutoAttack(seed=seed)
    raise ValueError(f"unknown attack {name!r}; valid: {', '.join(ATTACKS)}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``successes / n`` at ``confidence``.

    ``center +- half`` with ``z`` the normal quantile, ``center = (p + z^2 / 2n) / (1 + z^2 / n)``
    and ``half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)``; (0, 1) when n = 0.

    Example:
        >>> from opnorm.evaluation import wilson_interval
        >>> wilson_interval(80, 100)
        (0.7111..., 0.8666...)
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if n == 0:
        return 0.0, 1.0
    z = math.sqrt(2) * torch.special.erfinv(torch.tensor(confidence, dtype=torch.float64)).item()
    phat = successes / n
    denom = 1 + z * z / n
    center = (phat + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    # at k = 0 (k = n) the bound is exactly 0 (1); rounding would leave 1e-17 outside the estimate
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return lo, hi


@dataclass
class Evaluation:
    """What :func:`evaluate` returns (tensors on the CPU; R radii, N examples).

    Attributes:
        eps: the R radii; p: the threat model's norm order.
        attacks: the attack names, in the order they ran.
        labels: (N,) the labels; clean: (N,) bool, classified correctly without attack.
        correct: attack name -> (R, N) int8: 1 still correct under the attack, 0 fooled,
            -1 (:data:`NOT_ATTACKED`) skipped because an earlier attack or the clean input
            already fooled the model (never with ``every_example``).
        worst: (R, N) bool, the per-example worst case: correct clean and under every attack.
        every_example: every attack ran on every example (per-attack accuracies stand alone).
        seconds: attack name -> R wall-clock seconds.
        descriptions: attack name -> its settings in words.
        confidence: the level of :meth:`interval`.
    """

    eps: list[float]
    p: float
    attacks: list[str]
    labels: torch.Tensor
    clean: torch.Tensor
    correct: dict[str, torch.Tensor]
    worst: torch.Tensor
    every_example: bool
    seconds: dict[str, list[float]] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    confidence: float = 0.95

    @property
    def n(self) -> int:
        return int(self.clean.shape[0])

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean.double().mean()) if self.n else 0.0

    def _row(self, eps: float) -> int:
        for i, e in enumerate(self.eps):
            if e == eps:
                return i
        raise ValueError(f"eps {eps!r} was not evaluated; evaluated: {self.eps}")

    def accuracy(self, attack: str, eps: float) -> float:
        """Accuracy under ``attack`` alone at ``eps`` (needs ``every_example``)."""
        if not self.every_example:
            raise ValueError(
                "the accuracy of one attack alone needs every example attacked: evaluate with "
                "every_example=True, or use after() for the accuracy after each attack in turn"
            )
        return float((self.correct[attack][self._row(eps)] == 1).double().mean()) if self.n else 0.0

    def after(self, attack: str, eps: float) -> float:
        """Accuracy after the attacks up to ``attack`` in turn (clean correctness included)."""
        r, k = self._row(eps), self.attacks.index(attack)
        ok = self.clean.clone()
        for name in self.attacks[: k + 1]:
            ok &= self.correct[name][r] == 1
        return float(ok.double().mean()) if self.n else 0.0

    def worst_case(self, eps: float) -> float:
        """The per-example worst case at ``eps``: correct clean and under every attack."""
        return float(self.worst[self._row(eps)].double().mean()) if self.n else 0.0

    def interval(self, eps: float | None = None) -> tuple[float, float]:
        """The Wilson interval (:func:`wilson_interval`) of the worst case at ``eps`` (None: of clean accuracy)."""
        hits = self.clean if eps is None else self.worst[self._row(eps)]
        return wilson_interval(int(hits.sum()), self.n, self.confidence)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict: clean accuracy and, per radius, each attack and the worst case with its interval."""
        results = []
        for r, e in enumerate(self.eps):
            lo, hi = self.interval(e)
            row: dict[str, Any] = {
                "eps": e,
                "worst_case": self.worst_case(e),
                "interval": [lo, hi],
                "after": {a: self.after(a, e) for a in self.attacks},
                "seconds": {a: self.seconds.get(a, [0.0] * len(self.eps))[r] for a in self.attacks},
            }
            if self.every_example:
                row["alone"] = {a: self.accuracy(a, e) for a in self.attacks}
            results.append(row)
        lo, hi = self.interval()
        return {
            "p": order_json(self.p),
            "n": self.n,
            "attacks": list(self.attacks),
            "descriptions": dict(self.descriptions),
            "every_example": self.every_example,
            "clean_accuracy": self.clean_accuracy,
            "clean_interval": [lo, hi],
            "interval": f"Wilson score, {100 * self.confidence:g}%",
            "results": results,
        }

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (example, radius): index, eps, label, clean, each attack (1, 0 or -1) and worst (1 or 0)."""
        out = []
        for r, e in enumerate(self.eps):
            for i in range(self.n):
                row = {"index": i, "eps": e, "label": int(self.labels[i]), "clean": int(self.clean[i])}
                row.update({a: int(self.correct[a][r, i]) for a in self.attacks})
                row["worst"] = int(self.worst[r, i])
                out.append(row)
        return out


def _as_attacks(attacks) -> list:
    if isinstance(attacks, str):
        return [named_attack(n) for n in attack_names(attacks)]
    objs = [named_attack(a) if isinstance(a, str) else a for a in attacks]
    names = [getattr(a, "name", None) for a in objs]
    if not objs or any(not isinstance(n, str) or not n for n in names) or not all(callable(a) for a in objs):
        raise TypeError(
            "attacks must be a name, a comma-separated list of names, or a list of names and attack "
            "objects (a callable with a name, e.g. PGDAttack())"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"attack names must differ, got {names}; an attack object's name can be set: atk.name = ...")
    return objs


@torch.no_grad()
def clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N,) bool on the CPU: example i of (x, y) is classified correctly, in eval mode, in chunks of
    ``batch_size`` (x, y on any device; moved to the model's). A label that no logit can match is
    an error, not a miss.

    Example:
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> from opnorm.evaluation import clean_correct
        >>> correct = clean_correct(model, x, y)
        >>> correct.dtype, correct.shape, bool(torch.equal(correct, model(x).argmax(1) == y))
        (torch.bool, torch.Size([4]), True)
    """
    net = unwrap(model)
    device = _device(net)
    out = []
    with eval_mode(net):
        for s in _chunks(x.shape[0], batch_size):
            logits = net(x[s].to(device))
            check_label_range(y[s], logits.shape[1])  # a label no logit can match is an error, not a miss
            out.append((logits.argmax(1) == y[s].to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float | Sequence[float],
    p: Any = math.inf,
    attacks: str | Sequence[Any] = "pgd",
    every_example: bool = False,
    confidence: float = 0.95,
    progress: bool = False,
) -> Evaluation:
    """Clean accuracy and robust accuracy of ``model`` on (x, y) at each radius: per attack and the
    per-example worst case, with a Wilson interval.

    Args:
        model: classifier ``(B, *in) -> (B, C)`` logits, inputs in [0, 1]; evaluated in eval mode.
        x: (N, *in) inputs; y: (N,) integer labels (any device; chunks go to the model's).
        eps: a radius or a list of radii (>= 0; at 0 every attack is skipped: robust = clean).
        p: the norm of the threat model (1, 2 or inf; torchattacks' attacks: 2 or inf).
        attacks: a name of :data:`ATTACKS` or :data:`SUITES` ("all"), a comma-separated list
            of them, or a list of names and attack objects (:class:`PGDAttack`, ...), run in order.
        every_example: run every attack on every example (each attack's accuracy alone,
            :meth:`Evaluation.accuracy`); False: a later attack runs only on the examples still
            robust (same worst case, less time).
        confidence: the level of the intervals.
        progress: progress bars on stderr.

    Returns:
        :class:`Evaluation`.

    Example (``"autoattack"`` in the list adds torchattacks' AutoAttack):
        >>> import torch, opnorm
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        >>> from opnorm.evaluation import PGDAttack, evaluate
        >>> cw = PGDAttack(loss="cw", seed=0)
        >>> cw.name = "pgd-cw"  # names must differ within a suite
        >>> res = evaluate(model, x, y, eps=[0.1], p="inf", attacks=[cw, "pgd"], every_example=True)
        >>> res.worst_case(0.1) <= min(res.accuracy("pgd-cw", 0.1), res.accuracy("pgd", 0.1))
        True
    """
    check_autograd(model)  # the attacks need gradients: inference mode is refused in one line
    if isinstance(x, torch.Tensor) and x.is_inference():
        raise RuntimeError(
            "evaluate() needs gradients, which tensors made under torch.inference_mode() cannot "
            "give: make x outside inference mode"
        )
    p = norm_order(p, "p", allowed=(1.0, 2.0, math.inf))
    eps_list = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    if not eps_list or any(not math.isfinite(e) or e < 0 for e in eps_list):
        raise ValueError(f"eps must be one or more finite radii >= 0, got {eps!r}")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
        raise ValueError(f"y must be a (N,) tensor of labels matching x's {x.shape[0]} examples")
    objs = _as_attacks(attacks)
    net = unwrap(model)
    clean = clean_correct(net, x, y)
    n, R = x.shape[0], len(eps_list)
    correct = {a.name: torch.full((R, n), NOT_ATTACKED, dtype=torch.int8) for a in objs}
    seconds = {a.name: [0.0] * R for a in objs}
    worst = torch.zeros(R, n, dtype=torch.bool)
    everything = torch.ones(n, dtype=torch.bool)
    for r, e in enumerate(eps_list):
        robust = clean.clone()
        for atk in objs:
            todo = everything if every_example else robust
            if e == 0:
                ok = clean  # no perturbation: the clean prediction
            else:
                t0 = time.perf_counter()
                ok = atk(net, x, y, eps=e, p=p, todo=todo.clone(), progress=progress)
                seconds[atk.name][r] = time.perf_counter() - t0
            correct[atk.name][r] = torch.where(todo, ok.to(torch.int8), torch.tensor(NOT_ATTACKED, dtype=torch.int8))
            robust = robust & ok
        worst[r] = robust
    desc = {a.name: a.describe() if hasattr(a, "describe") else repr(a) for a in objs}
    return Evaluation(
        eps_list,
        p,
        [a.name for a in objs],
        y.detach().cpu(),
        clean,
        correct,
        worst,
        every_example,
        seconds,
        desc,
        confidence,
    )
