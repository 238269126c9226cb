"""Data-parallel training: two CPU processes under torchrun against one process.

The 2-process run uses per-process batch 32, i.e. the same global batch (64) and the same
number of optimizer steps as the single-process run with batch 64. The two runs see the
examples in different orders (DistributedSampler vs the seeded loader) and draw different
random starts, so they agree only statistically: **final clean test accuracy within 0.06
(absolute; 360 test points)** and PGD robust accuracy within 0.10 (200 points).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from opnorm.training import distributed as D
from opnorm.training.checkpoint import load_checkpoint
from opnorm.training.config import TrainConfig
from opnorm.training.trainer import CHECKPOINT, CONFIG, METRICS, WEIGHTS, train

ACC_TOL = 0.06
ROBUST_TOL = 0.10
ARGS = dict(
    dataset="digits",
    model="cnn",
    method="opnorm",
    p="inf",
    q=2,
    eps=0.1,
    epochs=3,
    seed=0,
    eval_points=200,
    eval_steps=10,
    progress=False,
)


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not D.launched()
    ctx = D.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    model = torch.nn.Linear(3, 2)
    assert D.wrap(model, ctx) is model
    assert D.sampler(list(range(5)), ctx, seed=0) is None
    assert D.all_reduce_mean([1.5, 2.0], ctx) == [1.5, 2.0]
    assert D.broadcast_object({"a": 1}, ctx) == {"a": 1}
    D.barrier(ctx)
    D.cleanup(ctx)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            D.resolve_device("cuda")
    assert D.resolve_device("cpu") == torch.device("cpu")


def test_torchrun_two_processes_learn_as_well_as_one_process(tmp_path):
    """Statistical agreement (accuracy within ACC_TOL); the exact per-example agreement of the
    direction store under DDP is tests/test_regularizer_parts.py::test_ddp_store_..."""
    out = tmp_path / "ddp"
    # p through a config file: torchrun's own parser refuses "--p" as an ambiguous prefix of its --print-completion
    (tmp_path / "p.json").write_text(json.dumps({"p": "inf"}))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "opnorm",
        "train",
        "--config",
        str(tmp_path / "p.json"),
        "--dataset",
        "digits",
        "--model",
        "cnn",
        "--method",
        "opnorm",
        "--q",
        "2",
        "--eps",
        "0.1",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--seed",
        "0",
        "--eval-points",
        "200",
        "--eval-steps",
        "10",
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("epoch 3/3") == 1  # rank 0 logs alone
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [CHECKPOINT, CONFIG, METRICS, WEIGHTS, CHECKPOINT + ".sha256", WEIGHTS + ".sha256", ".lock"]
    )
    lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    state = load_checkpoint(out / CHECKPOINT)
    assert state["epoch"] == 3 and not any(k.startswith("module.") for k in state["model"])
    # the checkpoint holds a direction for every training example, from both ranks
    assert bool(state["objective"]["reg.store.seen"].all()) and state["objective"]["reg.store.seen"].numel() == 1437

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # like each torchrun process
    try:
        single = train(TrainConfig(batch_size=64, **ARGS))
    finally:
        torch.set_num_threads(before)
    ddp = lines[-1]
    # same number of optimizer steps: ceil(1437 / 64) per epoch alone, ceil(719 / 32) per process
    assert ddp["accuracy"] > 0.8 and single.metrics["accuracy"] > 0.8
    assert abs(ddp["accuracy"] - single.metrics["accuracy"]) <= ACC_TOL, (ddp, single.metrics)
    assert abs(ddp["robust_accuracy"] - single.metrics["robust_accuracy"]) <= ROBUST_TOL, (ddp, single.metrics)
    # the penalty worked under DDP too: the operator norm stays far below clean training's (~95)
    assert ddp["operator_norm"] < 20
