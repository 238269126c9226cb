"""Cost and accuracy of the routes to the (2, 2) operator norm of J(x) on a residual
network and a vision transformer.

Models (float32, batch 32 of 3x32x32 inputs): the registry's CIFAR ResNet-18
(``opnorm.training.models.build_model("resnet18")``, 10 classes) and a small torchvision
VisionTransformer (patch 4, 4 layers, 4 heads, width 64, MLP 128, 10 classes; SDPA
attention; its zero-initialized head re-initialized). Each is trained ``--steps`` SGD steps
on Fashion-MNIST images resized to 32x32 and repeated over 3 channels (uniform noise if the
files are absent), so its spectra are not those of random init.

Time and error as in ``benchmarks/operator_norm.py`` (``time_against_clean``: each route
alternates with one clean training step, ratio = median over rounds of route time / clean
time of that round; error against the float64 SVD of the float64 Jacobian formed by
autograd).

Writes ``benchmarks/results/operator_norm_zoo.json`` and ``.md``.

    python benchmarks/operator_norm_zoo.py [--rounds 3] [--steps 20] [--threads 1] [--models resnet18,vit]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from operator_norm import (  # noqa: E402
    GOAL_ERR,
    GOAL_RATIO,
    clean_sgd_step,
    load_data,
    rel_errors,
    time_against_clean,
    write_results,
)

from opnorm.jacobian import jacobian  # noqa: E402
from opnorm.power import operator_norm  # noqa: E402

BATCH = 32


def resnet18() -> nn.Module:
    from opnorm.training.models import build_model

    return build_model("resnet18", input_shape=(3, 32, 32), num_classes=10)


def vit() -> nn.Module:
    import torchvision

    m = torchvision.models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    nn.init.normal_(m.heads.head.weight, std=0.02)  # torchvision zero-initializes the head (J = 0)
    return m


def routes(name: str) -> list[dict]:
    """(label, route, method, iters, tol) of every timed route."""
    R = [("exact", "autograd", "exact", None, None), ("exact", "auto", "exact", None, None)]
    for r in ("autograd", "forward"):
        R.append(("lanczos", r, "lanczos", 3, 0.0))
    if name == "resnet18":
        R += [("lanczos", "pattern", "lanczos", k, 0.0) for k in (2, 4)]
        R.append(("lanczos, rtol_change=0.001", "pattern", "lanczos", 10, 1e-3))
    else:
        R.append(("lanczos", "autograd", "lanczos", 5, 0.0))
        R.append(("lanczos, rtol_change=0.001", "autograd", "lanczos", 10, 1e-3))
    R += [("auto (defaults)", "auto", "auto", None, None), ("auto, iters=3", "auto", "auto", 3, None)]
    return [dict(label=a, route=b, method=c, iters=d, tol=e) for a, b, c, d, e in R]


def run(model, x, spec) -> tuple[torch.Tensor, str, str]:
    res = operator_norm(
        model,
        x,
        method=spec["method"],
        iters=spec["iters"],
        rtol_change=spec["tol"],
        route=spec["route"],
        generator=torch.Generator().manual_seed(0),
    )
    return res.sigma, res.method, res.route


def train_briefly(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (BATCH,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(xs[idx]), ys[idx]).backward()
        opt.step()
    model.eval()
    return time.perf_counter() - start


def to_rgb32(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)


def bench_model(name: str, make, data, args) -> dict:
    xs, ys, x, y = data
    torch.manual_seed(0)
    model = make()
    train_s = train_briefly(model, xs, ys, args.steps)
    ref = torch.linalg.svdvals(
        jacobian(copy.deepcopy(model).double(), x.double(), route="autograd").reshape(BATCH, 10, -1)
    )[:, 0]
    clean_step = clean_sgd_step(model, x, y, lr=0.02)

    rows = []
    for spec in routes(name):
        sigma, method, route = run(model, x, spec)
        timing = time_against_clean(lambda spec=spec: run(model, x, spec), clean_step, args.rounds)
        row = dict(spec, chosen_method=method, route_used=route, **timing, err=rel_errors(sigma, ref))
        rows.append(row)
        print(
            f"{name:9s} {spec['label']:20s} {spec['route']:8s}->{route:8s} {method:8s} "
            f"{str(spec['iters'] or '-'):>3s} {row['ms']:8.0f} ms {row['ratio']:5.2f}x  "
            f"err median {row['err']['median']:.1e} max {row['err']['max']:.1e}",
            flush=True,
        )
    return dict(
        model=name,
        train_steps=args.steps,
        train_seconds=train_s,
        clean_ms=statistics.median(r["clean_ms"] for r in rows),
        sigma_ref_median=float(ref.median()),
        rows=rows,
    )


def markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        "# (2, 2) operator norm of J(x) on ResNet-18 and a small ViT: time and accuracy per route",
        "",
        f"float32, batch {BATCH} of 3x32x32 {meta['data']} images, models trained {meta['steps']} SGD steps; "
        f"torch {meta['torch']}, {meta['threads']} thread(s), load average {meta['loadavg_start']} at start, "
        f"{meta['loadavg_end']} at end ({meta['cpus']} CPUs shared with other jobs).",
        "",
        f"**time / clean step**: median over {meta['rounds']} alternating rounds of (route time / one clean training "
        "step); **error**: |sigma - sigma_ref| / sigma_ref per example against the float64 SVD of the float64 autograd "
        "Jacobian. route: requested -> used (pattern: graph replay; autograd: J v by double backward; forward: J v by "
        "forward-mode AD).",
        "",
    ]
    for res in results:
        lines += [
            f"## {res['model']} (clean step {res['clean_ms']:.0f} ms)",
            "",
            "| route | requested -> used | method | iters | ms | time / clean step (q1-q3) | error median "
            "| error max |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            lines.append(
                f"| {r['label']} | {r['route']} -> {r['route_used']} | {r['chosen_method']} | {r['iters'] or '-'} | "
                f"{r['ms']:.0f} | {r['ratio']:.2f} ({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}) | "
                f"{r['err']['median']:.1e} | {r['err']['max']:.1e} |"
            )
        for key in ("median", "max"):
            ok = [r for r in res["rows"] if r["err"][key] <= GOAL_ERR]
            best = min(ok, key=lambda r: r["ratio"]) if ok else None
            lines.append("")
            lines.append(
                f"* {key} error <= {GOAL_ERR:g}: "
                + (
                    f"fastest is **{best['label']} ({best['route_used']}, iters {best['iters'] or '-'})** "
                    f"at **{best['ratio']:.2f}x** "
                    f"(goal <= {GOAL_RATIO:g}x: {'met' if best['ratio'] <= GOAL_RATIO else 'not met'})"
                    if best
                    else "no route reached it"
                )
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="SGD steps of the brief training")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="resnet18,vit")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "operator_norm_zoo.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    xs, ys, x, y, source = load_data(BATCH)
    data = (to_rgb32(xs[:2000]), ys[:2000], to_rgb32(x), y)
    makers = dict(resnet18=resnet18, vit=vit)
    results = [bench_model(n, makers[n], data, args) for n in args.models.split(",")]
    meta = dict(
        data=source,
        steps=args.steps,
        rounds=args.rounds,
        threads=args.threads,
        torch=torch.__version__,
        python=platform.python_version(),
        cpus=os.cpu_count(),
        loadavg_start=[round(v, 2) for v in load_start],
        loadavg_end=[round(v, 2) for v in os.getloadavg()],
        goal=dict(max_relative_error=GOAL_ERR, max_time_ratio=GOAL_RATIO),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    write_results(Path(args.out), dict(meta=meta, results=results), markdown(meta, results))


if __name__ == "__main__":
    main()
