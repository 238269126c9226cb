"""Cost and accuracy of the routes to the (2, 2) operator norm of J(x) on a small CNN.

Model: conv(1->32, 3x3, pad 1)-ReLU-maxpool2-conv(32->64, 3x3, pad 1)-ReLU-maxpool2-flatten-
linear(3136->128)-ReLU-linear(128->10), float32, batch 128 of Fashion-MNIST test images
(``/usr/share/datasets/fashion-mnist``; uniform noise if absent). The model is trained
briefly (``--steps`` SGD steps on the training set, or on noise) so that its spectra are
realistic; errors are also reported for the same architecture at random initialization.

Time: each route runs alternately with one clean training step (forward, cross-entropy,
backward, SGD step on a copy of the model): clean, route, route, clean, clean, route, ...
(the order flips every round so that neither side always runs on a warm cache), and the
reported ratio is the median over rounds of (route time / clean time of that round), so
drifts in machine load hit both sides alike. Error: |sigma - sigma_ref| / sigma_ref per
example, against the float64 SVD of the Jacobian formed explicitly in float64 by autograd.

Writes ``benchmarks/results/operator_norm.json`` and ``operator_norm.md`` and prints the table.

    python benchmarks/operator_norm.py [--rounds 15] [--steps 300] [--batch 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import opnorm
from opnorm.jacobian import Linearization, jacobian, jacobian_of, linearize
from opnorm.power import operator_norm, singular_values

DATA = Path("/usr/share/datasets/fashion-mnist")
GOAL_ERR, GOAL_RATIO = 1e-3, 2.0


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def load_data(n_eval: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(train x, train y, eval x, eval y, source): Fashion-MNIST in [0, 1], or noise."""
    names = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    if all((DATA / n).exists() for n in names):
        from opnorm.training.data import read_idx

        xs, ys, xt, yt = (torch.tensor(read_idx(DATA / n).copy()) for n in names)
        to_x = lambda a: (a.float() / 255.0).unsqueeze(1)  # noqa: E731
        return to_x(xs), ys.long(), to_x(xt)[:n_eval], yt.long()[:n_eval], "fashion-mnist"
    g = torch.Generator().manual_seed(0)
    return (
        torch.rand(6000, 1, 28, 28, generator=g),
        torch.randint(0, 10, (6000,), generator=g),
        torch.rand(n_eval, 1, 28, 28, generator=g),
        torch.randint(0, 10, (n_eval,), generator=g),
        "uniform noise",
    )


def train(model: nn.Module, xs, ys, steps: int, batch: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (batch,), generator=g)
        loss = F.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def reference_sigma(model: nn.Module, x: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Top-k singular values of J formed explicitly in float64 by autograd (B, k)."""
    m64 = copy.deepcopy(model).double()
    J = jacobian(m64, x.double(), route="autograd").reshape(x.shape[0], -1, x[0].numel())
    return torch.linalg.svdvals(J)[:, :k]


# ----------------------------------------------------------------------------- baselines


def _unit(z: torch.Tensor) -> torch.Tensor:
    return z / z.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (z.dim() - 1)))


def naive_func_jvp_power(model, x, iters: int, gen) -> torch.Tensor:
    """The textbook matrix-free power method: torch.func.jvp, then a fresh forward + backward."""
    v = _unit(torch.randn(x.shape, generator=gen))
    for _ in range(iters):
        _, jv = torch.func.jvp(model, (x,), (v,))
        xg = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xg), xg, grad_outputs=_unit(jv))
        v = _unit(g)
    _, jv = torch.func.jvp(model, (x,), (v,))
    return jv.norm(dim=1)


def retained_vjps_svd(model, x, batched: bool) -> torch.Tensor:
    """Form J by d autograd VJPs on one retained graph (a loop, or one vmapped call), then SVD."""
    xg = x.detach().requires_grad_(True)
    out = model(xg)
    d = out.shape[1]
    eye = torch.eye(d).unsqueeze(1).expand(d, *out.shape)
    if batched:
        (rows,) = torch.autograd.grad(out, xg, grad_outputs=eye, is_grads_batched=True)
    else:
        rows = torch.stack([torch.autograd.grad(out, xg, grad_outputs=eye[i], retain_graph=True)[0] for i in range(d)])
    J = rows.transpose(0, 1).reshape(x.shape[0], d, -1)
    return torch.linalg.svdvals(J)[:, 0]


def power_with_jvp(model, x, iters: int, gen, kind: str) -> torch.Tensor:
    """(2, 2) power method, J^T u on one retained graph, J v by torch.func.jvp or forward-mode AD
    (both re-run the forward each time)."""
    lin = Linearization(model, x)

    def matvec(v):
        if kind == "func":
            return torch.func.jvp(model, (x,), (v,))[1]
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            return fwAD.unpack_dual(model(fwAD.make_dual(x, v))).tangent

    return opnorm.power.power_iteration(
        matvec, lin.rmatvec, torch.randn(x.shape, generator=gen), 2, 2, iters=iters
    ).sigma


def pattern_exact_svd(model, x) -> torch.Tensor:
    J = jacobian(model, x, route="pattern").reshape(x.shape[0], 10, -1)
    return torch.linalg.svdvals(J)[:, 0]


def pattern_exact_chunk(model, x, chunk: int) -> torch.Tensor:
    """The pattern exact route with ``chunk`` basis vectors per stacked VJP call."""
    J = jacobian_of(linearize(model, x, "pattern"), chunk=chunk).reshape(x.shape[0], 10, -1)
    v = opnorm.power.exact.top_pair_gram(J)
    return torch.linalg.vector_norm(torch.einsum("bdn,bn->bd", J, v), dim=1)


# ----------------------------------------------------------------------------- the table


def routes(registry_model: nn.Module | None) -> list[dict]:
    """Every configuration: name, the call (model, x, generator) -> sigma (B,), and labels."""
    R: list[dict] = []

    def add(name, fn, method, route, iters=None, note=""):
        R.append(dict(name=name, fn=fn, method=method, route=route, iters=iters, note=note))

    add(
        "naive torch.func.jvp power",
        lambda m, x, g: naive_func_jvp_power(m, x, 10, g),
        "power",
        "func.jvp+fresh vjp",
        10,
        "each iteration: forward-mode jvp + a new forward/backward",
    )
    add("autograd: 10 retained VJPs + SVD", lambda m, x, g: retained_vjps_svd(m, x, False), "exact", "autograd", None)
    add("autograd: batched VJP (vmap) + SVD", lambda m, x, g: retained_vjps_svd(m, x, True), "exact", "autograd", None)
    for kind in ("func", "fwad"):
        label = "torch.func.jvp" if kind == "func" else "forward_ad"
        add(f"power, J v by {label}", lambda m, x, g, kind=kind: power_with_jvp(m, x, 10, g, kind), "power", label, 10)
    for route in ("autograd", "pattern"):
        for k in (10,) if route == "autograd" else (5, 10):
            add(
                f"power ({route})",
                lambda m, x, g, k=k, r=route: (
                    operator_norm(m, x, method="power", iters=k, rtol_change=0, route=r, generator=g).sigma
                ),
                "power",
                route,
                k,
            )
    for route in ("autograd", "pattern"):
        for k in (2, 3) if route == "autograd" else (1, 2, 3, 4, 5, 10):
            add(
                f"lanczos ({route})",
                lambda m, x, g, k=k, r=route: (
                    operator_norm(m, x, method="lanczos", iters=k, rtol_change=0, route=r, generator=g).sigma
                ),
                "lanczos",
                route,
                k,
            )
    for tol in (1e-2, 1e-3, 1e-4):
        add(
            f"lanczos (pattern), rtol_change={tol:g}",
            lambda m, x, g, t=tol: (
                operator_norm(m, x, method="lanczos", iters=10, rtol_change=t, route="pattern", generator=g).sigma
            ),
            "lanczos",
            "pattern",
            10,
            "each example stops when its estimate moves by <= rtol_change (not an error bound); the batch shrinks",
        )
    add(
        "exact (autograd), Gram eigh",
        lambda m, x, g: operator_norm(m, x, method="exact", route="autograd").sigma,
        "exact",
        "autograd",
    )
    add(
        "exact (pattern), Gram eigh",
        lambda m, x, g: operator_norm(m, x, method="exact", route="pattern").sigma,
        "exact",
        "pattern",
    )
    add(
        "exact (pattern), SVD of J",
        lambda m, x, g: pattern_exact_svd(m, x),
        "exact",
        "pattern",
        None,
        "SVD instead of the d x d Gram eigh",
    )
    for c in (2, 10):
        add(
            f"exact (pattern), {c} VJPs per stack",
            lambda m, x, g, c=c: pattern_exact_chunk(m, x, c),
            "exact",
            "pattern",
            None,
            "stacked VJPs instead of one at a time",
        )
    add("auto (defaults)", lambda m, x, g: operator_norm(m, x, generator=g).sigma, "auto", "auto", None)
    for k in (2, 3):
        add(f"auto, iters={k}", lambda m, x, g, k=k: operator_norm(m, x, iters=k, generator=g).sigma, "auto", "auto", k)
    if registry_model is not None:
        add(
            "registry cnn (Normalize first), auto",
            lambda m, x, g: operator_norm(registry_model, x, generator=g).sigma,
            "auto",
            "auto",
            None,
            "Normalize differentiated by autograd, the rest replayed",
        )
        add(
            "registry cnn (Normalize first), auto iters=3",
            lambda m, x, g: operator_norm(registry_model, x, iters=3, generator=g).sigma,
            "auto",
            "auto",
            3,
            "Normalize differentiated by autograd, the rest replayed",
        )
    return R


def spectra_routes() -> list[dict]:
    R = [
        dict(
            name="singular_values k=3, exact (pattern)",
            fn=lambda m, x, g: singular_values(m, x, 3, method="exact", generator=g),
            method="exact",
            route="pattern",
            iters=None,
            note="top-3 spectrum",
        )
    ]
    for k in (10, 30):
        R.append(
            dict(
                name="singular_values k=3, subspace (pattern)",
                fn=lambda m, x, g, k=k: singular_values(m, x, 3, method="power", iters=k, rtol_change=0, generator=g),
                method="subspace",
                route="pattern",
                iters=k,
                note="top-3 spectrum",
            )
        )
    return R


def clean_sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> Callable[[], None]:
    """One clean training step (CE, SGD momentum 0.9) on a train-mode copy of model: the unit of the timings."""
    clean_model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(clean_model.parameters(), lr=lr, momentum=0.9)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(clean_model(x), y).backward()
        opt.step()

    return step


def time_against_clean(fn: Callable[[], object], clean: Callable[[], object], rounds: int) -> dict:
    fn()
    clean()
    ratios, tm, tc = [], [], []
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            order = (clean, fn) if r % 2 == 0 else (fn, clean)
            times = {}
            for f in order:
                t = time.perf_counter()
                f()
                times[f is fn] = time.perf_counter() - t
            tm.append(times[True])
            tc.append(times[False])
            ratios.append(times[True] / times[False])
    finally:
        gc.enable()
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    # ratio: median of the per-round ratios; ratio_of_minima: the least disturbed runs of each
    return dict(
        ms=1e3 * statistics.median(tm),
        clean_ms=1e3 * statistics.median(tc),
        ratio=statistics.median(ratios),
        ratio_q1=q[0],
        ratio_q3=q[2],
        ratio_of_minima=min(tm) / min(tc),
    )


def rel_errors(sigma: torch.Tensor, ref: torch.Tensor) -> dict:
    err = ((sigma.detach().double() - ref) / ref).abs()
    if err.dim() == 2:  # spectra: worst of the k values per example
        err = err.amax(dim=1)
    return dict(median=float(err.median()), p90=float(err.quantile(0.9)), max=float(err.max()))


def write_results(out: Path, payload: dict, md: str, default: Callable[[Any], Any] | None = None) -> None:
    """Write ``payload`` as ``out`` (JSON) and ``md`` beside it as ``out`` with suffix .md, then print ``md``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=default) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)


def fmt(v: float | None, kind: str = "e") -> str:
    if v is None:
        return "-"
    return f"{v:.1e}" if kind == "e" else f"{v:.2f}"


def markdown(meta: dict, rows: list[dict], summary: dict) -> str:
    lines = [
        "# (2, 2) operator norm of J(x): time and accuracy per route",
        "",
        f"Small CNN (conv32-pool-conv64-pool-fc128-fc10, float32), batch {meta['batch']} of {meta['data']} images, "
        f"trained {meta['train_steps']} SGD steps (test accuracy {meta['test_accuracy']:.3f}); "
        f"torch {meta['torch']}, {meta['threads']} threads, load average {meta['loadavg_start']} at start, "
        f"{meta['loadavg_end']} at end.",
        "",
        f"**time / clean step**: median over {meta['rounds']} alternating rounds of (route time / time of one clean "
        f"training step (forward, cross-entropy, backward, SGD step)); the clean step took {meta['clean_ms']:.1f} ms "
        "(median). **ratio of minima**: fastest route run / fastest clean step, closer to an idle machine when others "
        "are running. **error**: |sigma - sigma_ref| / sigma_ref per example against the float64 SVD of the explicitly "
        "formed float64 Jacobian; trained model, and the same architecture at random initialization.",
        "",
        "| route | method | J access | iters | ms | time / clean step (q1-q3) | ratio of minima | error median "
        "| error p90 | error max | random init: median / max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['chosen'] or r['method']} | {r['route']} | "
            f"{r['iters'] if r['iters'] is not None else '-'} | {r['ms']:.1f} | "
            f"{r['ratio']:.2f} ({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}) | {r['ratio_of_minima']:.2f} | "
            f"{fmt(r['err']['median'])} | {fmt(r['err']['p90'])} | "
            f"{fmt(r['err']['max'])} | {fmt(r['err_random']['median'])} / {fmt(r['err_random']['max'])} |"
        )
    lines += ["", "## Goal: sigma to <= 1e-3 relative error at <= 2x a clean training step", ""]
    for key, text in (("median", "median error"), ("max", "max error (every example)")):
        best = summary[f"fastest_meeting_{key}"]
        lines.append(
            f"* {text} <= 1e-3: "
            + (
                f"fastest is **{best['name']}** (iters {best['iters']}) at **{best['ratio']:.2f}x** "
                f"(error median {best['err']['median']:.1e}, max {best['err']['max']:.1e}); "
                + ("within" if best["ratio"] <= GOAL_RATIO else "**not** within")
                + " 2x."
                if best
                else "no route reached it."
            )
        )
    lines += [
        f"* baselines: naive torch.func.jvp power (10 iterations) {summary['naive_ratio']:.2f}x; "
        f"10 retained-graph VJPs + SVD {summary['retained_ratio']:.2f}x.",
        f'* `method="auto"` with default arguments chose **{summary["auto_default"]}** '
        f"({summary['auto_default_ratio']:.2f}x); with iters=3 **{summary['auto_iters3']}** "
        f"({summary['auto_iters3_ratio']:.2f}x). Rule: for (2, 2), always exact (the cheapest route whose error is "
        "bounded); measured here: one pattern-route Lanczos iteration costs "
        f"{summary['measured_iteration_cost']:.2f} VJPs of the pattern exact route.",
        "",
        "## Notes",
        "",
    ]
    lines += [f"* {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "pattern route (opnorm.jacobian.PatternLinearization): one forward pass through the nn.Sequential records ReLU "
    "masks, max-pool argmax indices and eval-BatchNorm scales; J v replays the linear parts (conv/linear without bias, "
    "mask multiplies, gathers), J^T u their transposes (transposed convs, scatter-adds). No autograd graph, no double "
    "backward. Max-pool runs on a channels-last copy: the contiguous CPU max-pool kernel dominates the clean step "
    "here. "
    "A ReLU feeding a max-pool is folded into it (its mask at the pooled positions is `pooled > 0`). Modules it does "
    "not recognize (e.g. Normalize, custom blocks, anything with hooks) are differentiated by autograd locally, so it "
    "is exact for any Sequential; tests check 1e-10 agreement with torch.autograd.functional.jacobian in float64.",
    "exact route: J from d VJPs, then the top eigenpair of the d x d Gram matrix J J^T in float64 "
    "(v = J^T u / |J^T u|, sigma = |J v|) instead of an SVD of the d x n matrix J.",
    "lanczos: Golub-Kahan-Lanczos bidiagonalization in the d-dimensional output space, full reorthogonalization, "
    "started from the centered logits plus 10% noise (closer to the top left singular vector of a trained classifier "
    "than a random start); k iterations = k VJPs + k JVPs; exact once k = d.",
    "power (autograd) uses opnorm.jacobian.Linearization: J^T u on one retained graph, J v by differentiating the VJP "
    "graph (double backward); the torch.func.jvp and forward_ad variants re-run the forward for every J v.",
    "stacked VJPs (several basis vectors per call) were measured and are not faster than one at a time here "
    "(bigger temporaries fall out of the caches); jacobian_of's default for the pattern route is one at a time.",
    "random-init errors: spectra of untrained nets are flatter (sigma_2 / sigma_1 closer to 1), so Krylov methods need "
    "more iterations there; the timings do not depend on the weights.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=300, help="SGD steps of the brief training")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated substrings: time only matching routes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "operator_norm.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    xs, ys, x, y, source = load_data(args.batch)
    torch.manual_seed(0)
    model = small_cnn()
    random_model = copy.deepcopy(model).eval()
    train_s = train(model, xs, ys, args.steps, args.batch)
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    print(f"data: {source}; trained {args.steps} steps in {train_s:.1f} s; accuracy on the eval batch {acc:.3f}")

    registry_model = None
    try:
        from opnorm.training.models import build_model

        registry_model = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, mean=(0.0,), std=(1.0,))
        convs = [m for m in registry_model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for dst, src in zip(convs, [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]):
            dst.load_state_dict(src.state_dict())  # the same function, with an identity Normalize in front
        registry_model.eval()
    except Exception as err:  # the registry is optional for this benchmark
        print(f"registry model skipped: {err!r}")

    clean_step = clean_sgd_step(model, x, y, lr=0.05)

    ref = reference_sigma(model, x)[:, 0]
    ref_random = reference_sigma(random_model, x)[:, 0]
    ref3 = reference_sigma(model, x, 3)
    ref3_random = reference_sigma(random_model, x, 3)

    rows = []
    selected = [s for s in args.only.split(",") if s]
    for spec, (r_ref, r_rand) in [(s, (ref, ref_random)) for s in routes(registry_model)] + [
        (s, (ref3, ref3_random)) for s in spectra_routes()
    ]:
        if selected and not any(s in spec["name"] for s in selected):
            continue
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        sigma = spec["fn"](model, x, gen())
        chosen = None
        if spec["method"] == "auto":
            target = registry_model if spec["name"].startswith("registry") else model
            chosen = operator_norm(target, x, iters=spec["iters"], generator=gen()).method
        if spec["name"].startswith("registry"):
            sigma_random = None
        else:
            sigma_random = spec["fn"](random_model, x, gen())
        timing = time_against_clean(lambda spec=spec, gen=gen: spec["fn"](model, x, gen()), clean_step, args.rounds)
        row = dict(
            name=spec["name"],
            method=spec["method"],
            chosen=chosen,
            route=spec["route"],
            iters=spec["iters"],
            note=spec["note"],
            **timing,
            err=rel_errors(sigma, r_ref),
            err_random=rel_errors(sigma_random, r_rand)
            if sigma_random is not None
            else dict(median=None, p90=None, max=None),
        )
        rows.append(row)
        print(
            f"{row['name']:46s} {str(row['chosen'] or row['method']):8s} {str(row['iters'] or '-'):>4s} "
            f"{row['ms']:8.1f} ms {row['ratio']:6.2f}x  err median {row['err']['median']:.1e} "
            f"max {row['err']['max']:.1e}",
            flush=True,
        )

    def find(name, iters=None):
        return next((r for r in rows if r["name"] == name and r["iters"] == iters), None)

    sigma_rows = [r for r in rows if not r["name"].startswith(("singular_values", "registry"))]
    summary = {}
    for key in ("median", "max"):
        ok = [r for r in sigma_rows if r["err"][key] <= GOAL_ERR]
        summary[f"fastest_meeting_{key}"] = min(ok, key=lambda r: r["ratio"]) if ok else None
    get = lambda r, k: r[k] if r else float("nan")  # noqa: E731
    summary["naive_ratio"] = get(find("naive torch.func.jvp power", 10), "ratio")
    summary["retained_ratio"] = get(find("autograd: 10 retained VJPs + SVD"), "ratio")
    auto_d, auto_3 = find("auto (defaults)"), find("auto, iters=3", 3)
    summary["auto_default"], summary["auto_default_ratio"] = get(auto_d, "chosen"), get(auto_d, "ratio")
    summary["auto_iters3"], summary["auto_iters3_ratio"] = get(auto_3, "chosen"), get(auto_3, "ratio")
    exact_p, lz = find("exact (pattern), Gram eigh"), [r for r in rows if r["name"] == "lanczos (pattern)"]
    if exact_p and len(lz) >= 2:
        # slope of Lanczos time per iteration, in units of one VJP of the exact route (d = 10 VJPs + a forward)
        a, b = lz[0], lz[-1]
        per_iter = (b["ratio"] - a["ratio"]) / (b["iters"] - a["iters"])
        fwd = a["ratio"] - a["iters"] * per_iter
        summary["measured_iteration_cost"] = per_iter / max(1e-9, (exact_p["ratio"] - fwd) / 10)
    else:
        summary["measured_iteration_cost"] = float("nan")

    meta = dict(
        data=source,
        batch=args.batch,
        train_steps=args.steps,
        train_seconds=train_s,
        test_accuracy=acc,
        rounds=args.rounds,
        threads=args.threads,
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        processor=platform.processor() or platform.uname().machine,
        cpus=os.cpu_count(),
        loadavg_start=[round(v, 2) for v in load_start],
        loadavg_end=[round(v, 2) for v in os.getloadavg()],
        clean_ms=statistics.median(r["clean_ms"] for r in rows) if rows else float("nan"),
        goal=dict(max_relative_error=GOAL_ERR, max_time_ratio=GOAL_RATIO),
        notes=NOTES,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    slim = lambda r: {k: v for k, v in r.items() if k != "fn"} if r else None  # noqa: E731
    payload = dict(
        meta=meta, summary={k: slim(v) if isinstance(v, dict) else v for k, v in summary.items()}, results=rows
    )
    print()
    write_results(
        Path(args.out),
        payload,
        markdown(meta, rows, summary),
        default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v),
    )


if __name__ == "__main__":
    main()
