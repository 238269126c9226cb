"""Error against the exact route and cost of every route to the (2, 2) operator norm of J(x),
on trained weights.

Models (float32, eval mode; ``runs/opnorm-trained/`` caches them, ``--retrain`` rebuilds):
  * the registry CNN of ``opnorm reproduce`` trained with ``opnorm train`` (commands in
    ``TRAIN_COMMANDS``, recorded in the JSON): clean, PGD-AT and d.d.-regularized (l_inf eps
    0.1, (inf, 2)), 4 epochs on digits and 3 epochs on Fashion-MNIST (10,000 training images
    clean, 2,000 for the two robust ones);
  * the registry's CIFAR ResNet-18 (BatchNorm, 1x32x32 input) trained ``--resnet-epochs``
    epochs (SGD lr 0.05, momentum 0.9, batch 64) on the first 1,500 digits upsampled to 32x32.

For each model, a batch of test images (128; 16 for ResNet-18): the reference is the top
singular value of J formed by autograd in float64 (the model cast to float64); error =
|sigma - ref| / ref per example, reported as median, p90 and max, and as the max over the
examples the result calls ``exact``. The float32 model can differ from its float64 copy at a
ReLU or max-pool that is nearly tied at x (its J is then another one), so the error against
the exact route on the float32 model (the same J every route sees) is reported too. Time: each route
alternates with one clean training step (``operator_norm.time_against_clean``), ratio = median
over rounds of route time / clean-step time of that round. The load average of the machine
is recorded at the start and the end of each model.

Writes ``benchmarks/results/operator_norm_trained.json`` and ``.md``.

    python benchmarks/operator_norm_trained.py [--rounds 3] [--threads 1] [--models digits-clean,...,resnet18]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from operator_norm import (  # noqa: E402
    clean_sgd_step,
    naive_func_jvp_power,
    rel_errors,
    time_against_clean,
    write_results,
)

from opnorm.jacobian import jacobian  # noqa: E402
from opnorm.power import operator_norm  # noqa: E402
from opnorm.training.checkpoint import load_checkpoint  # noqa: E402
from opnorm.training.config import TrainConfig  # noqa: E402
from opnorm.training.data import load_dataset  # noqa: E402
from opnorm.training.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "runs" / "opnorm-trained"
FMNIST = "/usr/share/datasets/fashion-mnist"
ROBUST = ["--p", "inf", "--q", "2", "--eps", "0.1"]
COMMON = ["--model", "cnn", "--seed", "0", "--eval-steps", "5", "--device", "cpu"]
DIGITS = ["--dataset", "digits", "--epochs", "4", "--eval-points", "64"]
FM = ["--dataset", "fashion-mnist", "--data-dir", FMNIST, "--epochs", "3", "--batch-size", "128", "--lr", "0.05"]
TRAIN_COMMANDS = {
    "digits-clean": DIGITS + ["--method", "clean"],
    "digits-pgd-at": DIGITS + ["--method", "pgd-at"] + ROBUST,
    "digits-opnorm": DIGITS + ["--method", "opnorm"] + ROBUST,
    "fmnist-clean": FM + ["--limit-train", "10000", "--eval-points", "64", "--method", "clean"],
    "fmnist-pgd-at": FM + ["--limit-train", "2000", "--eval-points", "32", "--method", "pgd-at"] + ROBUST,
    "fmnist-opnorm": FM + ["--limit-train", "2000", "--eval-points", "32", "--method", "opnorm"] + ROBUST,
}
MODELS = list(TRAIN_COMMANDS) + ["resnet18"]


def trained_cnn(name: str, retrain: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
    """(model, test x, test y, info) of a small CNN trained by ``opnorm train`` (run here if absent)."""
    out = CACHE / name
    ckpt = out / "checkpoint.pt"
    cmd = [sys.executable, "-m", "opnorm", "train", *TRAIN_COMMANDS[name], *COMMON, "--quiet", "--out", str(out)]
    if retrain or not ckpt.exists():
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    state = load_checkpoint(ckpt)
    cfg = TrainConfig.from_dict(state["config"]).resolved()
    splits = load_dataset(cfg.dataset, cfg.data_dir)
    model = build_model(
        cfg.model,
        input_shape=splits.input_shape,
        num_classes=splits.num_classes,
        mean=splits.mean,
        std=splits.std,
        width=cfg.width,
    )
    model.load_state_dict(state["model"])
    info = dict(
        command="opnorm train " + " ".join(cmd[4:-2]), dataset=cfg.dataset, method=cfg.method, epochs=cfg.epochs
    )
    return model.eval(), splits.test.x, splits.test.y, info


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)


def trained_resnet18(epochs: int, retrain: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
    """The registry ResNet-18 trained on digits upsampled to 32x32 (cached state dict)."""
    splits = load_dataset("digits")
    xs, ys = upsample(splits.train.x[:1500]), splits.train.y[:1500]
    xt, yt = upsample(splits.test.x), splits.test.y
    torch.manual_seed(0)
    model = build_model("resnet18", input_shape=(1, 32, 32), num_classes=10)
    path = CACHE / f"resnet18-digits32-{epochs}ep.pt"
    info = dict(
        command=f"SGD lr 0.05 momentum 0.9 batch 64, {epochs} epochs, first 1500 digits upsampled to 32x32",
        dataset="digits 32x32",
        method="clean",
        epochs=epochs,
    )
    if path.exists() and not retrain:
        saved = torch.load(path)
        model.load_state_dict(saved["model"])
        info.update(saved["info"])
        return model.eval(), xt, yt, info
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
        print(f"resnet18 epoch {epoch + 1}/{epochs}: {time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    info.update(train_seconds=time.perf_counter() - start, test_accuracy=acc)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(dict(model=model.state_dict(), info=info), path)
    return model, xt, yt, info


def routes() -> list[dict]:
    """Every timed route: label, the call (model, x) -> result-like (sigma, exact, method)."""
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    R = []

    def add(label, heavy=False, small_only=False, **kw):
        R.append(dict(label=label, kw=kw, heavy=heavy, small_only=small_only))

    add("exact (auto route)", method="exact")
    add("exact, autograd", small_only=True, method="exact", route="autograd")
    add("power, 10 iterations", heavy=True, method="power", iters=10, rtol_change=0)
    for k in (2, 3, 5):
        add(f"lanczos, {k} iterations", method="lanczos", iters=k, rtol_change=0)
    for t in (1e-2, 1e-3):
        add(f"lanczos, iters 10, rtol_change {t:g}", small_only=t > 1e-3, method="lanczos", iters=10, rtol_change=t)
    add("lanczos, d iterations", method="lanczos", iters=10, rtol_change=0)
    add("auto (defaults)", small_only=True)
    add("auto, iters=3", iters=3)
    for r in R:
        r["fn"] = lambda m, x, kw=r["kw"]: operator_norm(m, x, generator=gen(), **kw)
    R.append(
        dict(
            label="naive torch.func.jvp power, 10 iterations",
            kw={},
            heavy=True,
            small_only=True,
            fn=lambda m, x: naive_func_jvp_power(m, x, 10, gen()),
        )
    )
    return R


def bench(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, info: dict, rounds: int, large: bool) -> dict:
    """Error and time of every route on one model; ``large``: the slow routes (10 power
    iterations, ~20x a clean step) get one timed round, and the naive baseline (the same iterates
    as "power, 10 iterations"), the autograd exact route, rtol_change 0.01 and auto's defaults
    (the same call as auto with iters=3) are left out."""
    load_start = [round(v, 2) for v in os.getloadavg()]
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    m64 = copy.deepcopy(model).double()
    ref = torch.linalg.svdvals(jacobian(m64, x.double(), route="autograd").reshape(x.shape[0], -1, x[0].numel()))
    gap = ref[:, 1] / ref[:, 0]
    ref = ref[:, 0]
    clean = clean_sgd_step(model, x, y, lr=0.05)
    rows = []
    ref32 = None  # the exact route on the float32 model: the same J as every other route
    for spec in routes():
        if large and spec.get("small_only"):
            continue
        last = {}  # the timed calls' result (seeded: every call gives the same)
        timing = time_against_clean(
            lambda last=last, spec=spec: last.update(res=spec["fn"](model, x)),
            clean,
            1 if large and spec["heavy"] else rounds,
        )
        res = last["res"]
        sigma = res if isinstance(res, torch.Tensor) else res.sigma
        exact = torch.zeros_like(sigma, dtype=torch.bool) if isinstance(res, torch.Tensor) else res.exact
        err = ((sigma.detach().double() - ref) / ref).abs()
        ref32 = sigma.detach().double() if ref32 is None else ref32  # routes() starts with the exact route
        row = dict(
            label=spec["label"],
            args={k: v for k, v in spec["kw"].items()},
            method=None if isinstance(res, torch.Tensor) else res.method,
            route=None if isinstance(res, torch.Tensor) else res.route,
            iterations=None if isinstance(res, torch.Tensor) else res.iterations,
            exact_fraction=float(exact.float().mean()),
            timed_rounds=1 if large and spec["heavy"] else rounds,
            err=rel_errors(sigma, ref),
            err_vs_exact32=rel_errors(sigma, ref32),
            err_max_where_exact=float(err[exact].max()) if exact.any() else None,
            **timing,
        )
        rows.append(row)
        print(
            f"{name:14s} {row['label']:42s} {str(row['method']):8s} {row['ratio']:6.2f}x  err median "
            f"{row['err']['median']:.1e} p90 {row['err']['p90']:.1e} max {row['err']['max']:.1e}  exact "
            f"{row['exact_fraction']:.2f}",
            flush=True,
        )
    return dict(
        model=name,
        **info,
        measured=time.strftime("%Y-%m-%d %H:%M:%S"),
        batch=x.shape[0],
        input=list(x.shape[1:]),
        batch_accuracy=acc,
        sigma_ref_median=float(ref.median()),
        sigma2_over_sigma1_median=float(gap.median()),
        sigma2_over_sigma1_max=float(gap.max()),
        clean_ms=statistics.median(r["clean_ms"] for r in rows),
        loadavg_start=load_start,
        loadavg_end=[round(v, 2) for v in os.getloadavg()],
        rows=rows,
    )


def fmt(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        "# (2, 2) operator norm of J(x) on trained weights: error against the exact route and time per route",
        "",
        f"torch {meta['torch']}, {meta['threads']} thread(s), {meta['cpus']} CPUs shared with other jobs, "
        f"{meta['rounds']} alternating rounds per route (`benchmarks/operator_norm_trained.py`).",
        "",
        "**time / clean step**: median over rounds of (route time / one clean training step of the same model and "
        "batch). **error**: |sigma - sigma_ref| / sigma_ref per example, sigma_ref the top singular value of the "
        "Jacobian formed by autograd in float64 (the model cast to float64). **max vs exact float32**: the largest "
        'error against `method="exact"` on the float32 model itself; the two references differ where the float32 '
        "model's ReLU or max-pool "
        "pattern at x differs from the float64 copy's (a nearly tied activation). **exact**: fraction of examples the "
        "result calls proven (`result.exact`, = `converged`); **max where exact**: the largest error against the "
        "float64 reference among them. Lanczos' `rtol_change` stops when the estimate moves by <= rtol_change in one "
        "iteration: a stopping rule, not an error bound.",
        "",
    ]
    for res in results:
        lines += [
            f"## {res['model']}: {res['method']} on {res['dataset']}, {res['epochs']} epochs "
            f"(batch {res['batch']}, accuracy on it {res['batch_accuracy']:.3f}, "
            f"clean step {res['clean_ms']:.0f} ms, "
            f"sigma_2/sigma_1 median {res['sigma2_over_sigma1_median']:.2f}, "
            f"max {res['sigma2_over_sigma1_max']:.2f}; "
            f"load average {res['loadavg_start']} -> {res['loadavg_end']})",
            "",
            f"`{res['command']}`",
            "",
            "| route | method used | time / clean step (q1-q3) | error median | p90 | max "
            "| max vs exact float32 | exact "
            "| max where exact |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            spread = f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}" if r["timed_rounds"] > 1 else "1 round"
            lines.append(
                f"| {r['label']} | {r['method'] or '-'} | {r['ratio']:.2f} ({spread}) | "
                f"{fmt(r['err']['median'])} | {fmt(r['err']['p90'])} | {fmt(r['err']['max'])} | "
                f"{fmt(r['err_vs_exact32']['max']) if 'err_vs_exact32' in r else '-'} | "
                f"{r['exact_fraction']:.2f} | {fmt(r['err_max_where_exact'])} |"
            )
        lines.append("")
    lines += [
        "## Summary: worst error and time over the models",
        "",
        "| route | max error, all models | time / clean step, min-max over models |",
        "|---|---|---|",
    ]
    for label in dict.fromkeys(r["label"] for res in results for r in res["rows"]):
        found = [r for res in results for r in res["rows"] if r["label"] == label]
        errs, ratios = [r["err"]["max"] for r in found], [r["ratio"] for r in found]
        lines.append(f"| {label} ({len(found)} models) | {max(errs):.1e} | {min(ratios):.2f}-{max(ratios):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--resnet-rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128, help="test images per small-CNN batch")
    ap.add_argument("--resnet-epochs", type=int, default=2)
    ap.add_argument("--resnet-batch", type=int, default=16)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--retrain", action="store_true", help="train again even if runs/opnorm-trained/ has the model")
    ap.add_argument(
        "--out",
        default=str(Path(__file__).parent / "results" / "operator_norm_trained.json"),
        help="JSON (and .md) to write; models not rerun keep their results in it",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = dict(
        rounds=args.rounds,
        resnet_rounds=args.resnet_rounds,
        threads=args.threads,
        torch=torch.__version__,
        python=platform.python_version(),
        cpus=os.cpu_count(),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    out = Path(args.out)
    for name in args.models.split(","):
        if name == "resnet18":
            model, x, y, info = trained_resnet18(args.resnet_epochs, args.retrain)
            b = args.resnet_batch
            result = bench(name, model, x[:b], y[:b], info, args.resnet_rounds, large=True)
        else:
            model, x, y, info = trained_cnn(name, args.retrain)
            result = bench(name, model, x[: args.batch], y[: args.batch], info, args.rounds, large=False)
        write(out, meta, result)


def write(out: Path, meta: dict, result: dict) -> None:
    """Put one model's result into the JSON (replacing an earlier one of that model) and rewrite the .md."""
    results = json.loads(out.read_text())["results"] if out.exists() else []
    results = [r for r in results if r["model"] != result["model"]] + [result]
    results.sort(key=lambda r: MODELS.index(r["model"]))
    write_results(out, dict(meta=meta, results=results), markdown(meta, results))


if __name__ == "__main__":
    main()
