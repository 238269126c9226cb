"""What configs/paper-cifar10.json costs: seconds and FLOPs per training step of each method.

One step = the method's batch loss (PGD-10 on 75% of the batch, appended, for AT; 10 power
iterations for d.d. regularization; one per-layer power iteration for global SNR) +
backward + RMSprop step, on the paper's 7-layer CNN (width 128) with a batch of 32 random
32x32 images, through the trainer's ``Objective``. The methods run interleaved (one step of
each per repetition); each time is the median over repetitions. FLOPs of one step come from
``torch.utils.flop_counter`` where it runs (clean, AT); for d.d. regularization (double
backward, which the counter's hooks do not support) and global SNR they are the clean step's
FLOPs times the CPU time ratio (stated per method in ``gflops_source``). GPU hours = FLOPs of the whole run
(50000 / 32 steps per epoch x the config's epochs) / an assumed sustained throughput
(``--gpu-tflops``, default 10: about half of an A100's fp32 peak). Writes
``benchmarks/results/paper_cifar10_step.json``.

    python benchmarks/paper_cifar10_step.py [--reps 2] [--threads 2] [--gpu-tflops 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from opnorm.training.config import TrainConfig, method_settings
from opnorm.training.models import build_model
from opnorm.training.objectives import build_objective
from opnorm.training.paper_setup import input_normalization
from opnorm.training.trainer import _build_optimizer

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "clean": dict(method="clean"),
    "pgd-at": dict(method="pgd-at"),
    "opnorm": dict(method="opnorm"),
    "global-snr": dict(method="global-snr", lam=3e-4, iters=1),
}


def _setup(change: dict):
    shared = json.loads((ROOT / "configs" / "paper-cifar10.json").read_text())
    cfg = TrainConfig.from_dict({**method_settings(shared, change["method"]), **change}).resolved()
    mean, std = input_normalization(cfg.input_range, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    model = build_model(cfg.model, input_shape=(3, 32, 32), num_classes=10, mean=mean, std=std, width=cfg.width)
    return cfg, model, build_objective(cfg, model), _build_optimizer(cfg, model)


def _step(model, objective, opt, x, y) -> None:
    model.train()
    loss, _ = objective(model, x, y, torch.arange(x.shape[0]))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu-tflops", type=float, default=10.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    setups = {name: _setup(change) for name, change in METHODS.items()}
    flops, times = {}, {name: [] for name in METHODS}
    source = {}
    for name, (_cfg, model, obj, opt) in setups.items():
        try:  # the flop counter's hooks do not survive the double backward of d.d.'s J v
            with FlopCounterMode(display=False) as counter:
                _step(model, obj, opt, x, y)  # also the warm-up
            flops[name], source[name] = counter.get_total_flops(), "counted"
        except RuntimeError:
            _step(model, obj, opt, x, y)
    for _ in range(args.reps):
        for name, (_cfg, model, obj, opt) in setups.items():
            t0 = time.perf_counter()
            _step(model, obj, opt, x, y)
            times[name].append(time.perf_counter() - t0)
    clean_t = statistics.median(times["clean"])
    for name in METHODS:  # not counted: the clean step's FLOPs scaled by the CPU time ratio
        if name not in flops:
            flops[name], source[name] = flops["clean"] * statistics.median(times[name]) / clean_t, "clean x time ratio"
    cfg = setups["opnorm"][0]
    steps = 50000 // cfg.batch_size * cfg.epochs
    result = {
        "batch": 32,
        "epochs": cfg.epochs,
        "steps_per_run": steps,
        "threads": args.threads,
        "gpu_tflops_assumed": args.gpu_tflops,
        "cpu_seconds_per_step": {n: statistics.median(t) for n, t in times.items()},
        "gflops_per_step": {n: f / 1e9 for n, f in flops.items()},
        "gflops_source": source,
        "estimated_gpu_hours_per_run": {n: f * steps / (args.gpu_tflops * 1e12) / 3600 for n, f in flops.items()},
        "cpu_hours_per_run": {n: statistics.median(t) * steps / 3600 for n, t in times.items()},
        "load_average": list(__import__("os").getloadavg()),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    out = ROOT / "benchmarks" / "results" / "paper_cifar10_step.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
