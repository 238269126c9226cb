"""Seconds per training step of the fast d.d. operator norm regularizer against PGD-10 AT.

The issue's acceptance measurement: on the small CNN
(``build_model("cnn", input_shape=(1, 28, 28), num_classes=10)``) with batches of 128 real
Fashion-MNIST training images, the time of a training step (loss + backward + SGD step)
with the default ``OperatorNormRegularizer`` divided by that of a PGD-10 adversarial
training step (``AdversarialTrainingLoss("ce", eps=0.1, p=inf, steps=10)``, which calls
``opnorm.pgd``), and divided by a clean step (the floor of any penalty on J(x) is about 2).

Every case has its own copy of the same initial model and its own SGD optimizer; all cases
cycle over the same fixed ``--batches`` batches with their dataset indices, after warm-up
cycles, so the direction stores are warm and the measured steps are steady state (in a real
epoch each example is visited once; the first epoch's cold visits are timed separately as
``fast-cold``). Steps run interleaved (one of each case per repetition, rotating order),
so drifts in machine load hit all alike; times are medians. Besides the default (fast)
and the paper configuration, the other routes of the issue are measured as alternatives:

* ``fast``: the default: warm store, one explicit eval-mode iteration (pattern route) from
  the stored direction, one forward of ``[x; x + eps v]`` (the shared clean forward), and
  the free power iteration from the training backward;
* ``fast-kl``: the default solver with ``metric=FisherKL()`` (the softmax's Fisher metric; the
  configuration of docs/results/fast-regularizer);
* ``fast-kl-dynamic``: ``fast-kl`` with ``PGASolver(dynamic=True)``: the explicit iteration
  linearizes at x + eps v (a gradient step of the penalty at its own point) instead of at x;
* ``fast-kl-pga-perturbed``: ``fast-kl-dynamic`` with finite PGA steps of eps/4 (``step=0.25``,
  the iterate kept in the store) and the cross-entropy at the PGA point (``joint(perturbed=True)``);
* ``fast-kl-pga-perturbed-cold``: the same, every example cold (3 explicit iterations, a
  first-epoch step); ``fast-kl-pga-perturbed-w2`` / ``-c1-cold``: the same with 2 explicit
  iterations on later visits and 1 on the first (``iters=1, warm_iters=2``), warm / cold. A
  3-epoch run takes one cold and two warm steps per batch; their mean over a PGD-10 AT step
  is reported for both spreads;
* ``fast-cold``: the default, every example cold (3 explicit iterations): a first-epoch step;
* ``free-only``: warm store, no explicit iteration, only the free update (``warm_iters=0``):
  the floor, one forward of 2B examples and one backward;
* ``fast-no-free``: the default without the free update (the BatchNorm fallback);
* ``fast-separate``: the default with separate forwards of x and x + eps v (no sharing);
* ``exact-jacobian``: J formed with d = 10 VJPs (batched, ``opnorm.jacobian``), 10 power
  iterations on the explicit J, then the fd step;
* ``paper``: 10 power iterations from random starts per step (``OperatorNormRegularizer.paper``; pattern
  route); ``paper-autograd``: the same on the autograd route (the previous implementation).

Also measured, on the warm batches at the end: how good the default's stored directions
are, as the logit loss ``||f(clip(x + eps v)) - f(x)||_2`` they reach over that of PGA on
the same loss (``opnorm.pgd``, infinite step size: the box-constrained (inf, 2) power
method) with 1 and 10 steps from random starts.

    python benchmarks/fast_regularizer.py [--reps 25] [--batch 128] [--threads 2] [--batches 4]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from opnorm.attacks import pgd
from opnorm.jacobian import eval_mode, jacobian
from opnorm.norms import lp_norm
from opnorm.power import power_iteration
from opnorm.regularizers import AdversarialTrainingLoss, FisherKL, LogitNorm, OperatorNormRegularizer, PGASolver
from opnorm.training.config import TrainConfig
from opnorm.training.data import load_dataset
from opnorm.training.models import build_model
from opnorm.training.objectives import build_objective

INF = math.inf
KL_LAM = 0.06


def exact_jacobian_objective(reg: OperatorNormRegularizer, iters: int = 10) -> Callable:
    """CE + the fd penalty with v from `iters` power iterations on the explicit J (d VJPs)."""

    def loss(model, x, y, index):
        with torch.no_grad(), eval_mode(model):
            J = jacobian(model, x).reshape(x.shape[0], -1, x[0].numel())  # (B, d, n), d VJPs batched
        v = torch.sign(torch.randn_like(x)).reshape(x.shape[0], -1)
        v = power_iteration(
            lambda t: torch.bmm(J, t.unsqueeze(2)).squeeze(2),
            lambda u: torch.bmm(J.transpose(1, 2), u.unsqueeze(2)).squeeze(2),
            v,
            reg.p,
            reg.q,
            iters=iters,
        ).v
        x_p = (x + reg.eps * v.reshape(x.shape)).clamp(0, 1)
        out = model(torch.cat([x, x_p]))
        B = x.shape[0]
        return F.cross_entropy(out[:B], y) + reg.fd_value(out[:B], out[B:])

    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=4, help="fixed batches cycled over (steady-state stores)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup-cycles", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fast_regularizer.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    splits = load_dataset("fashion-mnist", limit_test=1)
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(splits.train.x.shape[0], generator=g)[: args.batch * args.batches]
    batches = [(splits.train.x[i], splits.train.y[i], i) for i in pick.split(args.batch)]

    # the trainer's defaults for opnorm on Fashion-MNIST, l_inf eps = 0.1, (inf, 2)
    cfg = TrainConfig(dataset="fashion-mnist", model="cnn", method="opnorm", p="inf", q=2, eps=0.1).resolved()
    torch.manual_seed(0)
    base = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, mean=splits.mean, std=splits.std)

    def opnorm_loss(
        reg: OperatorNormRegularizer, shared: bool = True, perturbed: bool = False, wipe: bool = False
    ) -> Callable:
        """CE (at x, or at the penalty's point with ``perturbed``) + penalty; ``wipe``: every example cold."""

        def loss(model, x, y, index):
            if wipe:
                reg.store.seen.zero_()
            if perturbed:
                _, pen, logits = reg.joint(model, x, index, perturbed=True)
            elif shared:
                logits, pen = reg.joint(model, x, index)
            else:
                logits = model(x)
                pen = reg(model, x, index, logits=logits)
            return F.cross_entropy(logits, y) + pen

        return loss

    at = AdversarialTrainingLoss("ce", eps=0.1, p=INF, steps=10)
    n = splits.train.x.shape[0]  # the stores hold one direction per training example
    fast_objective = build_objective(cfg, base, num_examples=n)  # the trainer's default regularizer
    fast = fast_objective.reg

    def fast_reg(iters: int = 3, warm_iters: int = 1, *, kl: bool = False, **solver) -> OperatorNormRegularizer:
        """The fast configuration in the box: a store, ``iters`` / ``warm_iters`` explicit iterations."""
        return OperatorNormRegularizer.fast(
            INF,
            2,
            0.1,
            KL_LAM if kl else cfg.lam,
            num_examples=n,
            clip=(0.0, 1.0),
            metric=FisherKL() if kl else LogitNorm(2),
            solver=PGASolver(iters, warm_iters, **{"free_update": True, **solver}),
        )

    cold = fast_reg()  # its store is wiped before every step
    free_only = fast_reg(warm_iters=0)
    no_free = fast_reg(free_update=False)
    separate = fast_reg()
    # the Fisher-metric output that reached PGD-10 AT's robustness (docs/results/fast-regularizer)
    fast_kl = fast_reg(kl=True)
    # the same with its explicit iteration linearized at x + eps v (dynamic): a gradient step of the penalty
    fast_kl_dynamic = fast_reg(kl=True, dynamic=True)
    # finite PGA steps (eps/4) kept in the store, the cross-entropy taken at the PGA point x + delta
    pga_kw = dict(kl=True, dynamic=True, step=0.25)
    fast_kl_pga = fast_reg(**pga_kw)
    # its cost spread the other way: 1 explicit iteration on the first visit, 2 on later ones
    fast_kl_pga_w2 = fast_reg(1, 2, **pga_kw)
    # first visits of either spread (stores wiped before every step)
    pga_cold = {k: fast_reg(k, **pga_kw) for k in (1, 3)}

    paper = OperatorNormRegularizer.paper(INF, 2, 0.1, cfg.lam)
    paper_ag = OperatorNormRegularizer.paper(INF, 2, 0.1, cfg.lam, solver=PGASolver(10, route="autograd"))
    exact_reg = OperatorNormRegularizer.paper(INF, 2, 0.1, cfg.lam)

    losses: dict[str, Callable] = {
        "clean": lambda model, x, y, index: F.cross_entropy(model(x), y),
        "pgd-at": lambda model, x, y, index: at(model, x, y, index),
        "fast": lambda model, x, y, index: fast_objective(model, x, y, index)[0],
        "fast-kl": opnorm_loss(fast_kl),
        "fast-kl-dynamic": opnorm_loss(fast_kl_dynamic),
        "fast-kl-pga-perturbed": opnorm_loss(fast_kl_pga, perturbed=True),
        "fast-kl-pga-perturbed-cold": opnorm_loss(pga_cold[3], perturbed=True, wipe=True),
        "fast-kl-pga-perturbed-w2": opnorm_loss(fast_kl_pga_w2, perturbed=True),
        "fast-kl-pga-perturbed-c1-cold": opnorm_loss(pga_cold[1], perturbed=True, wipe=True),
        "fast-cold": opnorm_loss(cold, wipe=True),
        "free-only": opnorm_loss(free_only),
        "fast-no-free": opnorm_loss(no_free),
        "fast-separate": opnorm_loss(separate, shared=False),
        "exact-jacobian": exact_jacobian_objective(exact_reg),
        "paper": opnorm_loss(paper),
        "paper-autograd": opnorm_loss(paper_ag),
    }
    cases = {}
    for name in losses:
        model = copy.deepcopy(base).train()
        cases[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    position = {name: 0 for name in losses}

    def step(name: str) -> float:
        model, opt = cases[name]
        x, y, index = batches[position[name] % len(batches)]
        position[name] += 1
        start = time.perf_counter()
        loss = losses[name](model, x, y, index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    names = list(losses)
    for _ in range(args.warmup_cycles * len(batches)):  # warm-up: the stores see every batch
        for name in names:
            step(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            times[name].append(step(name))

    med = {n: statistics.median(t) for n, t in times.items()}
    rows = {
        n: {
            "seconds_per_step": round(med[n], 5),
            "ratio_to_pgd10_at": round(med[n] / med["pgd-at"], 3),
            "ratio_to_clean": round(med[n] / med["clean"], 3),
            "ratio_of_minima_to_pgd10_at": round(min(times[n]) / min(times["pgd-at"]), 3),
            "all_seconds": [round(t, 5) for t in times[n]],
        }
        for n in names
    }

    # quality of the stored directions of the default regularizer, at its current weights
    model = cases["fast"][0]
    ratios = {1: [], 10: []}
    for x, _, index in batches:
        v = fast.initial_vectors(x, index)
        with torch.no_grad(), eval_mode(model):
            clean = model(x)
            banked = lp_norm(model((x + 0.1 * v).clamp(0, 1)) - clean, 2)
        for k in ratios:
            adv = pgd(
                model,
                x,
                eps=0.1,
                p=INF,
                loss="logit",
                steps=k,
                step_size=float("inf"),
                random_start=torch.Generator().manual_seed(k),
            )
            with torch.no_grad(), eval_mode(model):
                ratios[k].append(banked / lp_norm(model(adv) - clean, 2))
    q1, q10 = torch.cat(ratios[1]), torch.cat(ratios[10])

    result = {
        "benchmark": "seconds per training step (loss + backward + SGD step), median over interleaved repetitions",
        "model": "build_model('cnn', input_shape=(1, 28, 28), num_classes=10)",
        "data": f"fashion-mnist train, {args.batches} fixed batches of {args.batch} cycled (steady-state stores)",
        "default_regularizer": fast.extra_repr(),
        "pgd10_at": at.extra_repr(),
        "threads": args.threads,
        "reps": args.reps,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "goal": "fast / pgd-at <= 0.5; fast / clean near the floor of about 2",
        "fast_over_pgd10_at": rows["fast"]["ratio_to_pgd10_at"],
        "fast_over_clean": rows["fast"]["ratio_to_clean"],
        "fast_kl": fast_kl.extra_repr(),
        "fast_kl_over_pgd10_at": rows["fast-kl"]["ratio_to_pgd10_at"],
        "fast_kl_over_clean": rows["fast-kl"]["ratio_to_clean"],
        "fast_kl_dynamic_over_pgd10_at": rows["fast-kl-dynamic"]["ratio_to_pgd10_at"],
        "fast_kl_dynamic_over_clean": rows["fast-kl-dynamic"]["ratio_to_clean"],
        "fast_kl_pga_perturbed": fast_kl_pga.extra_repr(),
        "fast_kl_pga_perturbed_over_pgd10_at": rows["fast-kl-pga-perturbed"]["ratio_to_pgd10_at"],
        "fast_kl_pga_perturbed_over_clean": rows["fast-kl-pga-perturbed"]["ratio_to_clean"],
        # a 3-epoch run visits every example once cold and twice warm
        "fast_kl_pga_perturbed_3_epochs_over_pgd10_at": round(
            (med["fast-kl-pga-perturbed-cold"] + 2 * med["fast-kl-pga-perturbed"]) / (3 * med["pgd-at"]), 3
        ),
        "fast_kl_pga_perturbed_c1w2": fast_kl_pga_w2.extra_repr(),
        "fast_kl_pga_perturbed_c1w2_3_epochs_over_pgd10_at": round(
            (med["fast-kl-pga-perturbed-c1-cold"] + 2 * med["fast-kl-pga-perturbed-w2"]) / (3 * med["pgd-at"]), 3
        ),
        "cases": rows,
        "banked_direction_quality": {
            "what": "||f(clip(x + eps v_bank)) - f(x)||_2 over the same loss after k PGA steps with infinite step "
            "size from a random start (opnorm.pgd, loss='logit'), at the fast case's final weights, "
            "per example of the cycled batches",
            "vs_pga1_median": round(float(q1.median()), 4),
            "vs_pga10_median": round(float(q10.median()), 4),
            "vs_pga10_p10": round(float(q10.quantile(0.1)), 4),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'case':16} {'s/step':>9} {'/ PGD-10 AT':>12} {'/ clean':>8}")
    for n, r in rows.items():
        print(f"{n:16} {r['seconds_per_step']:9.4f} {r['ratio_to_pgd10_at']:12.3f} {r['ratio_to_clean']:8.2f}")
    print(
        f"banked direction quality (median logit loss over PGA-10's): "
        f"{result['banked_direction_quality']['vs_pga10_median']:.3f}"
    )
    print(
        f"(torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.reps} interleaved reps; "
        f"written to {args.out})"
    )


if __name__ == "__main__":
    main()
