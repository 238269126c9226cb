"""The regularizer's parts and the silent failures they rule out: Dropout noise in the fd
penalty, a store loaded into a regularizer of another p, stores under DDP, indices out of range."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from opnorm.regularizers import (DirectionStore, ExactPenalty, FisherKL, LogitNorm, OperatorNormRegularizer,
                                 PGASolver, paired_noise)
from opnorm.training.config import OpnormConfig, TrainConfig, merge, migrate


def _mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 5))


def test_dropout_in_train_mode_penalty_measures_J_not_mask_noise():
    """Same network for both halves: the train-mode penalty is the dropped-out network's (2,2)
    norm, within a small factor of eval mode's; with two masks it was thousands of times larger."""
    model = _mlp(0.3)
    x = torch.rand(64, 1, 4, 4)
    reg = OperatorNormRegularizer.paper(2, 2, eps=0.005, lam=1.0)
    model.eval()
    torch.manual_seed(1)
    _, pen_eval = reg.joint(model, x)
    model.train()
    torch.manual_seed(1)
    _, pen_train = reg.joint(model, x)
    assert 0.2 < float(pen_train.detach()) / float(pen_eval.detach()) < 5.0
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
        "method": "opnorm", "opnorm": {"mode": "paper", "iters": 5}}
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


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    n = 24
    g = torch.Generator().manual_seed(0)
    data = torch.rand(n, 1, 4, 4, generator=g)
    model = nn.parallel.DistributedDataParallel(_mlp())
    reg = OperatorNormRegularizer.fast("inf", 2, eps=0.1, lam=0.1, num_examples=n, clip=(0.0, 1.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    warm_epoch2 = []
    for epoch in range(2):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))[rank::world]  # a reshuffled split
        for i in range(0, len(order), 4):
            idx = order[i:i + 4]
            if epoch == 1:
                reg.store.sync()
                warm_epoch2.append(reg.store.seen[idx].float().mean().item())
            logits, pen = reg.joint(model, data[idx], idx)
            opt.zero_grad()
            (logits.square().mean() * 0 + pen).backward()
            opt.step()
        reg.sync()
    torch.save({"state": reg.state_dict(), "warm": warm_epoch2}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_share_one_store_and_resume_restores_all(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_ddp_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert min(r0["warm"] + r1["warm"]) == 1.0  # every example found its direction in epoch 2
    s0, s1 = r0["state"], r1["state"]
    assert bool(s0["store.seen"].all())
    assert torch.equal(s0["store.directions"], s1["store.directions"]) and torch.equal(s0["store.seen"], s1["store.seen"])
    fresh = OperatorNormRegularizer.fast("inf", 2, eps=0.1, lam=0.1, num_examples=24, clip=(0.0, 1.0))
    fresh.load_state_dict(s0)
    assert bool(fresh.store.seen.all()) and torch.equal(fresh.store.directions, s0["store.directions"])


def test_flat_form_of_the_shipped_config_resolves_to_the_nested_one():
    import json
    from pathlib import Path

    nested = json.loads((Path(__file__).parents[1] / "configs" / "fashion-mnist-fast-robust.json").read_text())
    flat = {k: v for k, v in nested.items() if k != "opnorm"}
    names = {"mode": "opnorm_mode", "output": "opnorm_output", "task": "opnorm_task", "step": "opnorm_step",
             "clip": "opnorm_clip", "iters": "iters", "warm_iters": "warm_iters", "dynamic": "dynamic"}
    flat.update({names[k]: v for k, v in nested["opnorm"].items()})
    assert TrainConfig.from_dict(flat).resolved() == TrainConfig.from_dict(nested).resolved()


def test_stochastic_depth_is_paired_too():
    from torchvision.ops import StochasticDepth

    depth = StochasticDepth(0.5, "row").train()
    h = torch.ones(16, 3)
    with paired_noise(depth, 8):
        out = depth(h)
    assert torch.equal(out[:8], out[8:]) and bool((out == 0).any())
