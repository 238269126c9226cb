"""BatchNorm models under the operator-norm penalty: why they failed and what they reach now.

Three parts, written to benchmarks/results/batchnorm.json (a part's key is replaced, the
others kept, so parts can be rerun one at a time):

* ``mechanism``: the Conv(1,16,3)-BatchNorm2d-ReLU-Flatten-Linear net at initialization on
  one batch of 64 digits, written out by hand (independent of the library): how far the
  batch statistics of ``[x; x + eps v]`` are from the clean batch's, how far the running
  statistics are, and the top (inf, 2) norm of the per-example Jacobian of the three
  functions involved (running statistics: what the solver used to linearize; the clean
  batch's statistics: what the penalty now measures; no BatchNorm at all: the same net's
  scale without it).
* ``digits``: the README's loop (SGD lr 0.05, momentum 0.9, batch 64, 2 epochs, the first
  1500 digits as training set, the rest as test set), seeds 1 and 2: plain cross-entropy,
  ``paper(p="inf", q=2, eps=0.1, lam=0.02)``, ``fast("inf", 2, eps=0.1, lam=0.02)``,
  ``fast_robust("inf", eps=0.1, lam=0.06)`` (CE at x + eps v). Clean test accuracy in eval
  mode. ``--label before`` with ``PYTHONPATH`` at an older checkout stores that code's
  numbers beside.
* ``gradients``: torchvision's resnet18 at initialization on one batch of 64 upsampled digits:
  the weight-gradient norms of cross-entropy and of ``fast(p="inf", q=2, eps=0.1, lam=0.02)``'s
  penalty, per parameter (the largest twelve), beside the parameter norms. A conv followed by
  BatchNorm is scale-invariant, so a step of size lr * |grad| much larger than |w| turns the
  kernel to a new direction in one step.
* ``stability``: the digits net with affine BatchNorm and with ``affine=False`` under the paper
  configuration, by optimizer, warm-up and lam (seeds 1 and 2): which loops the penalty's
  curvature destabilizes, and whether the regularizer's divergence warning fires.
* ``resnet18``: torchvision's resnet18 (num_classes=10) on the digits upsampled to 32x32 and
  repeated to 3 channels, the same loop, plain against the fast configuration
  (``--optimizer adam``: the loop with Adam at lr 1e-3 for both).

Run (from the repository root)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/batchnorm.py --parts mechanism digits
    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/batchnorm.py --parts resnet18 --train-limit 256 --seeds 1
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/batchnorm.py --parts resnet18 --epochs 3 --seeds 1 2 \
        --kinds plain fast --optimizer adam --label adam-3-epochs
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from opnorm import OperatorNormRegularizer as ONR

RESULTS = Path(__file__).parent / "results" / "batchnorm.json"
TRAIN = 1500


def digits(size: int = 8, channels: int = 1):
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x.repeat(1, channels, 1, 1)
    y = torch.tensor(d.target)
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


def small_net(bn: bool = True, affine: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.BatchNorm2d(16, affine=affine) if bn else nn.Identity(),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 36, 10),
    )


def resnet18() -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18  # optional dependency: only this part needs it

    return tv_resnet18(num_classes=10)


def regularizer(kind: str, n: int, warmup: int | None = None, lam: float | None = None):
    return {
        "plain": lambda: None,
        "paper": lambda: ONR.paper(p="inf", q=2, eps=0.1, lam=0.02 if lam is None else lam, warmup=warmup),
        "fast": lambda: ONR.fast("inf", 2, eps=0.1, lam=0.02 if lam is None else lam, num_examples=n, warmup=warmup),
        "fast_robust": lambda: ONR.fast_robust(
            "inf", eps=0.1, lam=0.06 if lam is None else lam, num_examples=n, warmup=warmup
        ),
    }[kind]()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = sum(int((model(x[i : i + 256]).argmax(1) == y[i : i + 256]).sum()) for i in range(0, len(x), 256)) / len(
            x
        )
    model.train()
    return acc


def optimizer(name: str, params) -> torch.optim.Optimizer:
    """``sgd``: the README's SGD (lr 0.05, momentum 0.9); ``sgd-lr0.01``: the same at lr 0.01;
    ``adam``: Adam at lr 1e-3, whose step does not grow with the gradient's norm."""
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.SGD(params, lr=0.01 if name == "sgd-lr0.01" else 0.05, momentum=0.9)


def train(
    make,
    kind: str,
    seed: int,
    data,
    epochs: int,
    max_steps: int = 0,
    warmup: int | None = None,
    lam: float | None = None,
    opt_name: str = "sgd",
) -> dict:
    """The README's loop (at most ``max_steps`` steps when > 0; ``opt_name`` picks the
    :func:`optimizer`); returns clean test accuracy (eval mode), the first five and the last
    penalty, and seconds."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = make()
    opt = optimizer(opt_name, model.parameters())
    reg = regularizer(kind, len(xtr), warmup, lam)
    g = torch.Generator().manual_seed(seed)
    pen, penalties, losses, steps, scales = torch.zeros(()), [], [], 0, []
    bn = next((m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine), None)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs if max_steps <= 0 else 10**9):
        if 0 < max_steps <= steps:
            break
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            index = perm[i : i + 64]
            x, y = xtr[index], ytr[index]
            if reg is None:
                logits = model(x)
            elif kind == "fast_robust":
                _, pen, logits = reg.joint(model, x, index, perturbed=True)
            else:
                logits, pen = reg.joint(model, x, index)
            ce = F.cross_entropy(logits, y)
            loss = ce + pen
            opt.zero_grad()
            loss.backward()
            opt.step()
            penalties.append(float(pen.detach()))
            losses.append(float(ce.detach()))
            steps += 1
            if bn is not None and steps % 4 == 0:  # the first BatchNorm's mean scale: the cheapest way to a small J
                scales.append(round(float(bn.weight.detach().mean()), 3))
            if steps == max_steps:
                break
    seconds = time.perf_counter() - start
    return {
        "test_accuracy": accuracy(model, xte, yte),
        "steps": steps,
        "first_penalties": penalties[:5],
        "first_cross_entropies": losses[:5],
        "first_batchnorm_mean_scale_every_4_steps": scales[:12],
        "last_penalty": float(pen.detach()),
        "train_seconds": round(seconds, 1),
    }


def stability(seeds: list[int]) -> list[dict]:
    """The digits net with affine BatchNorm and with BatchNorm(affine=False) (the paper's cnn7
    style) under ``paper("inf", 2, eps=0.1, lam=0.02)``: the step size against the penalty's
    curvature. Each row: the loop's optimizer, warm-up and lam, clean test accuracy per seed, and
    whether the regularizer's divergence warning fired."""
    cases = [
        ("plain", "sgd", 0, None),
        ("paper", "sgd", 0, None),
        ("paper", "sgd", None, None),
        ("paper", "sgd-lr0.01", 0, None),
        ("paper", "adam", 0, None),
        ("paper", "sgd", 0, 0.002),
    ]
    data = digits()
    rows = []
    for affine in (True, False):
        for kind, opt, warmup, lam in cases:
            row = {"affine": affine, "kind": kind, "optimizer": opt, "warmup": warmup, "lam": lam, "seeds": {}}
            for seed in seeds:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", RuntimeWarning)
                    r = train(functools.partial(small_net, affine=affine), kind, seed, data, 2, 0, warmup, lam, opt)
                warned = any("diverging" in str(w.message) for w in caught)
                row["seeds"][str(seed)] = {"test_accuracy": r["test_accuracy"], "warned": warned}
            print("stability", json.dumps(row), flush=True)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- mechanism, by hand


def top_inf2(f, x: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """(B,) ||J_f(x_b)||_{inf -> 2} lower bounds from the (inf, 2) power method on explicit Jacobians."""
    from torch.autograd.functional import jacobian

    J = torch.stack([jacobian(lambda r: f(r[None])[0], x[b]).reshape(10, -1) for b in range(x.shape[0])])
    best = torch.zeros(x.shape[0])
    for start in range(4):  # a few sign starts; keep the best
        v = torch.sign(torch.randn(J.shape[0], J.shape[2], generator=torch.Generator().manual_seed(start)))
        for _ in range(iters):
            u = torch.einsum("bdn,bn->bd", J, v)
            v = torch.sign(torch.einsum("bdn,bd->bn", J, u / u.norm(dim=1, keepdim=True)))
        best = torch.maximum(best, torch.einsum("bdn,bn->bd", J, v).norm(dim=1))
    return best, v


def bn_function(net: nn.Sequential, mean: torch.Tensor, var: torch.Tensor):
    conv, bn, lin = net[0], net[1], net[4]
    shape = (1, -1, 1, 1)

    def f(r):
        h = (conv(r) - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + bn.eps)
        return lin(F.relu(h * bn.weight.reshape(shape) + bn.bias.reshape(shape)).flatten(1))

    return f


def moments(h: torch.Tensor):
    return h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)


def mechanism(seed: int = 1, eps: float = 0.1) -> dict:
    xtr, _, _, _ = digits()
    x = xtr[:64]
    torch.manual_seed(seed)
    net = small_net().train()
    with torch.no_grad():
        h = net[0](x)
        mean, var = moments(h)
        running = bn_function(net, net[1].running_mean, net[1].running_var)  # eval mode at initialization
        clean = bn_function(net, mean, var)
    s_run, v_run = top_inf2(running, x)
    s_clean, v_clean = top_inf2(clean, x)
    torch.manual_seed(seed)
    plain = small_net(bn=False)
    s_plain, _ = top_inf2(lambda r: plain(r), x)
    with torch.no_grad():
        x_p = x + eps * v_run.reshape(x.shape)  # the old penalty's point: the eval-mode direction
        mix_mean, mix_var = moments(net[0](torch.cat([x, x_p])))
        mixed = bn_function(net, mix_mean, mix_var)
        fd = lambda f, xp: (f(xp) - f(x)).norm(dim=1) / eps  # noqa: E731
        rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
        return {
            "batch": 64,
            "eps": eps,
            "seed": seed,
            "clean_batch_var_mean_over_channels": float(var.mean()),
            "running_var_at_init": float(net[1].running_var.mean()),
            "concatenated_vs_clean_mean_rel": rel(mix_mean, mean),
            "concatenated_vs_clean_var_rel": rel(mix_var, var),
            "sigma_inf2_running_statistics": float(s_run.mean()),
            "sigma_inf2_clean_statistics": float(s_clean.mean()),
            "sigma_inf2_without_batchnorm": float(s_plain.mean()),
            "old_penalty_fd_value_concatenated": float(fd(mixed, x_p).mean()),
            "fd_value_of_old_direction_on_clean_statistics": float(fd(clean, x_p).mean()),
            "fd_value_of_clean_direction_on_clean_statistics": float(
                fd(clean, x + eps * v_clean.reshape(x.shape)).mean()
            ),
        }


def gradients(seed: int = 1, lam: float = 0.02) -> dict:
    xtr, ytr, _, _ = digits(32, 3)
    torch.manual_seed(seed)
    model = resnet18().train()
    reg = ONR.fast("inf", 2, eps=0.1, lam=lam, num_examples=len(xtr))
    index = torch.arange(64)
    logits, pen = reg.joint(model, xtr[index], index)
    ce = F.cross_entropy(logits, ytr[index])
    params = list(model.parameters())
    g_ce = torch.autograd.grad(ce, params, retain_graph=True)
    g_pen = torch.autograd.grad(pen, params)
    rows = [
        {"parameter": name, "penalty_grad": float(gp.norm()), "ce_grad": float(gc.norm()), "weight": float(w.norm())}
        for (name, w), gc, gp in zip(model.named_parameters(), g_ce, g_pen)
    ]
    rows.sort(key=lambda r: -r["penalty_grad"])
    return {
        "seed": seed,
        "lam": lam,
        "ce": float(ce),
        "penalty": float(pen),
        "sigma_inf2_mean": float(reg.last_sigma.mean()),
        "ce_grad_total": float(torch.stack([g.norm() for g in g_ce]).norm()),
        "penalty_grad_total": float(torch.stack([g.norm() for g in g_pen]).norm()),
        "largest": rows[:12],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["mechanism", "digits"],
        choices=["mechanism", "gradients", "digits", "resnet18", "stability"],
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=["plain", "paper", "fast", "fast_robust"])
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    ap.add_argument("--train-limit", type=int, default=TRAIN, help="the first N training images (resnet18 on 2 cores)")
    ap.add_argument(
        "--optimizer",
        default="sgd",
        choices=["sgd", "sgd-lr0.01", "adam"],
        help="sgd: lr 0.05, momentum 0.9; sgd-lr0.01: lr 0.01; adam: lr 1e-3",
    )
    ap.add_argument("--lam", type=float, default=None, help="the weight (default: 0.02, fast_robust 0.06)")
    ap.add_argument(
        "--warmup", type=int, default=None, help="the regularizer's warm-up in steps (0: none; default: its own)"
    )
    ap.add_argument("--label", default="after", help="the key the digits / resnet18 numbers go under")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["environment"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if "mechanism" in args.parts:
        results["mechanism"] = mechanism()
        print(json.dumps(results["mechanism"], indent=1))
    if "gradients" in args.parts:
        results["gradients"] = gradients()
        print(json.dumps({k: v for k, v in results["gradients"].items() if k != "largest"}, indent=1))
    if "stability" in args.parts:
        results["stability"] = stability(args.seeds)
    for part in ("digits", "resnet18"):
        if part not in args.parts:
            continue
        data = digits() if part == "digits" else digits(32, 3)
        data = (data[0][: args.train_limit], data[1][: args.train_limit], *data[2:])
        make = small_net if part == "digits" else resnet18
        runs = results.setdefault(part, {}).setdefault(args.label, {})
        runs["epochs"], runs["train_images"], runs["max_steps"] = args.epochs, len(data[0]), args.max_steps
        runs["warmup"], runs["lam"], runs["optimizer"] = args.warmup, args.lam, args.optimizer
        for kind in args.kinds:
            for seed in args.seeds:
                r = train(make, kind, seed, data, args.epochs, args.max_steps, args.warmup, args.lam, args.optimizer)
                runs.setdefault(kind, {})[str(seed)] = r
                print(part, args.label, kind, seed, r, flush=True)
                args.out.write_text(json.dumps(results, indent=1) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
