"""The regularizer's parts and the silent failures they rule out: Dropout noise in the fd
penalty, a store loaded into a regularizer of another p, stores under DDP, indices out of range."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from opnorm.regularizers import (
    DirectionStore,
    ExactPenalty,
    FisherKL,
    OperatorNormRegularizer,
    PGASolver,
    paired_noise,
)
from opnorm.training.config import OpnormConfig, TrainConfig, merge, migrate


def _mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 5))


def test_dropout_in_train_mode_penalty_measures_J_not_mask_noise():
    """Same network for both halves: the train-mode penalty is the dropped-out network's (2,2)
    norm, within 1.5x of eval mode's; with two masks it was thousands of times larger."""
    model = _mlp(0.3)
    x = torch.rand(64, 1, 4, 4)
    reg = OperatorNormRegularizer.paper(2, 2, eps=0.005, lam=1.0)
    model.eval()
    torch.manual_seed(1)
    _, pen_eval = reg.joint(model, x)
    model.train()
    torch.manual_seed(1)
    _, pen_train = reg.joint(model, x)
    # a dropped-out copy of the same network (kept units scaled by 1 / 0.7): its mean squared norm
    # stays within 1.5x of eval mode's (measured 1.06 - 1.24 over seeds); unpaired it is > 50x
    assert 1 / 1.5 < float(pen_train.detach()) / float(pen_eval.detach()) < 1.5
    # the same forward without pairing: the two halves get different masks
    torch.manual_seed(1)
    x_p = x + 0.005 * reg.last_v
    out = model(torch.cat([x, x_p]))
    unpaired = ((out[64:] - out[:64]).norm(dim=1) / 0.005).pow(2).mean()
    assert float(unpaired.detach()) > 50 * float(pen_eval.detach())


def test_paired_noise_gives_identical_masks_and_restores_forward():
    drop = nn.Dropout(0.5).train()
    h = torch.ones(6, 10)
    with paired_noise(drop, 3):
        out = drop(h)
    assert torch.equal(out[:3], out[3:]) and not torch.equal(out[:3], torch.ones(3, 10) * 2)
    assert "forward" not in drop.__dict__  # the module's own forward is back


def test_store_of_another_p_is_refused_not_cast():
    x = torch.rand(8, 1, 4, 4)
    model = _mlp().eval()
    signs = OperatorNormRegularizer.fast("inf", 2, eps=0.1, lam=1.0, num_examples=8)
    signs.joint(model, x, torch.arange(8))
    assert signs.store.directions.dtype == torch.int8 and bool(signs.store.seen.all())
    l2 = OperatorNormRegularizer.fast(2, 2, eps=0.1, lam=1.0, num_examples=8)
    with pytest.raises(ValueError, match="l_inf sign directions.*l_2 float directions"):
        l2.load_state_dict(signs.state_dict())
    # the matching p loads exactly, and the penalty stays positive on the next visit
    again = OperatorNormRegularizer.fast("inf", 2, eps=0.1, lam=1.0, num_examples=8)
    again.load_state_dict(signs.state_dict())
    assert torch.equal(again.store.directions, signs.store.directions)
    _, pen = again.joint(model, x, torch.arange(8))
    assert float(pen) > 0


def test_store_sized_for_another_dataset_is_refused():
    a = OperatorNormRegularizer.fast(2, 2, eps=0.1, num_examples=8)
    a.joint(_mlp().eval(), torch.rand(8, 1, 4, 4), torch.arange(8))
    b = OperatorNormRegularizer.fast(2, 2, eps=0.1, num_examples=9)
    with pytest.raises(ValueError, match="holds 8 examples, this one 9"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("bad", [10**9, 8, -1])
def test_index_out_of_range_is_a_clear_error(bad):
    reg = OperatorNormRegularizer.fast(2, 2, eps=0.1, num_examples=8)
    index = torch.tensor([0, 1, bad])
    with pytest.raises(ValueError, match=rf"index {bad} is out of range for a DirectionStore of 8 examples"):
        reg.joint(_mlp().eval(), torch.rand(3, 1, 4, 4), index)


def test_parts_are_checked_against_each_other():
    with pytest.raises(ValueError, match="pass q equal to the metric's"):
        OperatorNormRegularizer(2, 1, eps=0.1, metric=FisherKL())
    with pytest.raises(ValueError, match="finite differences"):
        OperatorNormRegularizer(2, 2, eps=0.1, metric=FisherKL(), penalty=ExactPenalty())
    with pytest.raises(ValueError, match="divides by eps"):
        OperatorNormRegularizer(2, 2, eps=0.0)
    with pytest.raises(ValueError, match="p in 1, 2, inf"):
        OperatorNormRegularizer(3, 2, eps=0.1, solver=PGASolver(step=0.25))
    store = DirectionStore(4)
    OperatorNormRegularizer(2, 2, eps=0.1, store=store)
    with pytest.raises(ValueError, match="needs its own store"):
        OperatorNormRegularizer("inf", 2, eps=0.1, store=store)


def test_paper_configuration_matches_the_svd_on_an_affine_model():
    """(2,2) on f(x) = W x: sigma is W's top singular value and the fd penalty lam * sigma^2."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).double()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    reg = OperatorNormRegularizer.paper(2, 2, eps=0.01, lam=0.5)
    reg.solver.iters = 200
    _, pen = reg.joint(lin, x)
    top = torch.linalg.matrix_norm(lin[1].weight.detach(), 2)
    assert torch.allclose(reg.last_sigma, top.expand(4), rtol=1e-9)
    assert float(pen) == pytest.approx(0.5 * float(top) ** 2, rel=1e-9)


def test_flat_configs_migrate_and_fd_iteration_is_refused():
    assert migrate({"method": "opnorm", "opnorm_mode": "paper", "iters": 5}) == {
        "method": "opnorm",
        "opnorm": {"mode": "paper", "iters": 5},
    }
    cfg = TrainConfig.from_dict({"method": "opnorm", "warm_iters": 2, "dynamic": True}).resolved()
    assert (cfg.opnorm.warm_iters, cfg.opnorm.dynamic, cfg.opnorm.iters) == (2, True, 3)
    with pytest.raises(ValueError, match="opnorm_iteration 'fd' was removed"):
        migrate({"opnorm_iteration": "fd"})
    merged = merge({"opnorm": {"mode": "fast", "step": 0.5}}, {"opnorm_step": 0.25})
    assert merged["opnorm"] == {"mode": "fast", "step": 0.25}
    with pytest.raises(ValueError, match="unknown config field.*opnorm.stepp"):
        TrainConfig.from_dict({"opnorm": {"stepp": 1}})
    with pytest.raises(ValueError, match="--opnorm-iters"):
        TrainConfig(method="opnorm", iters=3).resolved()
    assert TrainConfig(method="opnorm", opnorm=OpnormConfig(mode="paper")).resolved().opnorm.warm_iters == 10


# ----------------------------------------------------------------------------- DDP


# A store trained by 2 gloo processes (torchrun) against one process on the same data order:
# every global batch of 8 is split 4 + 4 between the ranks, the single process takes all 8 (DDP
# averages the two halves' gradients, i.e. the mean over the 8). Every direction is warm from
# the start (put before the process group exists), so no random start depends on the batch.
# The script is run by torchrun (phases "first" and "resume", separate launches: the second
# reads the checkpoint the first wrote) and loaded by the test for the single-process run.
STORE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from opnorm.regularizers import OperatorNormRegularizer
    from opnorm.training.checkpoint import load_checkpoint, save_checkpoint

    N, BATCH, EPOCHS = 24, 8, 3

    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5)).double()
        reg = OperatorNormRegularizer.fast(2, 2, eps=0.1, lam=0.5, num_examples=N)
        data = torch.rand(N, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        start = torch.randn(N, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        reg.store.configure(2, signs=False)
        reg.store.put(torch.arange(N), start / start.flatten(1).norm(dim=1).reshape(N, 1, 1, 1))
        return model, reg, data

    def run_epoch(net, reg, opt, data, epoch, rank=0, world=1):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch))
        for i in range(0, N, BATCH):
            idx = order[i:i + BATCH].chunk(world)[rank]
            logits, pen = reg.joint(net, data[idx], idx)
            opt.zero_grad()
            (pen + 0 * logits.sum()).backward()
            opt.step()
        reg.sync()

    if __name__ == "__main__":
        phase, out = sys.argv[1], sys.argv[2]
        model, reg, data = setup()
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        first = 0
        if phase == "resume":  # what the first launch left on disk, nothing else
            state = load_checkpoint(f"{out}/checkpoint.pt")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            reg.load_state_dict(state["reg"])
            first = state["epoch"]
        net = nn.parallel.DistributedDataParallel(model)
        for epoch in range(first, EPOCHS if phase == "resume" else EPOCHS - 1):
            run_epoch(net, reg, opt, data, epoch, rank, world)
            torch.save(reg.state_dict(), f"{out}/{phase}-epoch{epoch + 1}-rank{rank}.pt")
        if phase == "first" and rank == 0:
            save_checkpoint(f"{out}/checkpoint.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                     "reg": reg.state_dict(), "epoch": EPOCHS - 1})
        dist.barrier()
        dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_ddp_store_holds_each_examples_direction_as_one_process_and_after_resume(tmp_path):
    script = tmp_path / "ddp_store.py"
    script.write_text(STORE_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for phase in ("first", "resume"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                str(script),
                phase,
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ref = runpy.run_path(str(script), run_name="reference")
    model, reg, data = ref["setup"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    moved = 0.0
    for epoch in range(ref["EPOCHS"]):
        before = reg.store.directions.clone()
        ref["run_epoch"](model, reg, opt, data, epoch)
        moved = max(moved, float((reg.store.directions - before).abs().max()))
        phase = "first" if epoch + 1 < ref["EPOCHS"] else "resume"
        for rank in (0, 1):
            where = f"epoch {epoch + 1} ({phase}), rank {rank}"
            got = torch.load(tmp_path / f"{phase}-epoch{epoch + 1}-rank{rank}.pt", weights_only=True)
            assert bool(got["store.seen"].all())
            # example i holds example i's direction, row by row, on every rank
            torch.testing.assert_close(
                got["store.directions"],
                reg.store.directions,
                rtol=1e-9,
                atol=1e-12,
                msg=lambda m, where=where: f"{where}: {m}",
            )
    assert moved > 0.05  # the directions moved: equal rows are not equal starts


def test_flat_form_of_the_shipped_config_resolves_to_the_nested_one():
    import json
    from pathlib import Path

    nested = json.loads((Path(__file__).parents[1] / "configs" / "fashion-mnist-fast-robust.json").read_text())
    flat = {k: v for k, v in nested.items() if k != "opnorm"}
    names = {
        "mode": "opnorm_mode",
        "output": "opnorm_output",
        "task": "opnorm_task",
        "step": "opnorm_step",
        "clip": "opnorm_clip",
        "iters": "iters",
        "warm_iters": "warm_iters",
        "dynamic": "dynamic",
    }
    flat.update({names[k]: v for k, v in nested["opnorm"].items()})
    assert TrainConfig.from_dict(flat).resolved() == TrainConfig.from_dict(nested).resolved()


def test_stochastic_depth_is_paired_too():
    from torchvision.ops import StochasticDepth

    depth = StochasticDepth(0.5, "row").train()
    h = torch.ones(16, 3)
    with paired_noise(depth, 8):
        out = depth(h)
    assert torch.equal(out[:8], out[8:]) and bool((out == 0).any())
