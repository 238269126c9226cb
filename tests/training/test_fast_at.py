"""fgsm-rs, n-fgsm and free: closed-form steps on affine models, the random start, free's
replays and budget, exact resume, learning on digits, and one-line errors (Python and CLI)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from affine_models import DT, affine_layer, gen

from opnorm import FreeATLoss, SingleStepATLoss, TrainConfig, train
from opnorm.cli import main
from opnorm.fast_at import FAST_AT_METHODS, Replayed
from opnorm.training.checkpoint import load_checkpoint
from opnorm.training.config import flat_settings
from opnorm.training.trainer import CHECKPOINT, CONFIG, METRICS

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.1


def affine(d: int = 5, n: int = 12, seed: int = 0, zero: bool = False):
    lin, W = affine_layer(d, n, seed)
    if zero:  # f(x) = b: every input gradient vanishes
        with torch.no_grad():
            lin.weight.zero_()
        W = torch.zeros_like(W)
    return lin, W, lin.bias.detach().clone()


def ce_input_grad(W, b, x, y):
    """d/dx sum_b CE(W x_b + b, y_b) = W^T (softmax(W x + b) - onehot(y)), per example."""
    z = x @ W.T + b
    return (torch.softmax(z, dim=1) - F.one_hot(y, W.shape[0]).to(DT)) @ W


def batch(n: int = 12, B: int = 16, seed: int = 1):
    g = gen(seed)
    x = 0.1 + 0.8 * torch.rand(B, n, generator=g, dtype=DT)  # inside [0, 1], away from the edges
    y = torch.randint(0, 5, (B,), generator=g)
    return x, y


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("kind", ["fgsm-rs", "n-fgsm"])
def test_plain_fgsm_step_is_eps_sign_of_the_ce_gradient(kind):
    lin, W, b = affine()
    x, y = batch()
    loss_fn = SingleStepATLoss(kind, eps=EPS, p="inf", step=1.0, start=0.0, clip=None)
    delta = loss_fn.perturb(lin, x, y)
    expected = EPS * torch.sign(ce_input_grad(W, b, x, y))
    torch.testing.assert_close(delta, expected)
    loss = loss_fn(lin, x, y)
    ref = F.cross_entropy((x + expected) @ W.T + b, y)
    torch.testing.assert_close(loss, ref)


def test_fgsm_rs_step_from_its_random_start():
    lin, W, b = affine()
    x, y = batch()
    loss_fn = SingleStepATLoss("fgsm-rs", eps=EPS, p="inf", clip=(0.0, 1.0))
    delta = loss_fn.perturb(lin, x, y, generator=gen(7))
    start = (2 * torch.rand(x.shape, generator=gen(7), dtype=DT) - 1) * EPS  # uniform in the cube
    start = (x + start).clamp(0, 1) - x
    step = start + 1.25 * EPS * torch.sign(ce_input_grad(W, b, x + start, y))
    expected = (x + step.clamp(-EPS, EPS)).clamp(0, 1) - x
    torch.testing.assert_close(delta, expected)
    assert delta.abs().max() <= EPS + 1e-12


def test_n_fgsm_does_not_project_back_onto_the_eps_ball():
    lin, W, b = affine()
    x, y = batch()
    loss_fn = SingleStepATLoss("n-fgsm", eps=EPS, p="inf", clip=None)
    delta = loss_fn.perturb(lin, x, y, generator=gen(3))
    noise = (2 * torch.rand(x.shape, generator=gen(3), dtype=DT) - 1) * 2 * EPS
    expected = noise + EPS * torch.sign(ce_input_grad(W, b, x + noise, y))
    torch.testing.assert_close(delta, expected)
    assert delta.abs().max() > 2 * EPS  # beyond the eps ball: nothing pulled it back
    assert delta.abs().max() <= 3 * EPS + 1e-12


def test_l2_fgsm_step_is_along_the_normalized_gradient():
    lin, W, b = affine()
    x, y = batch()
    delta = SingleStepATLoss("fgsm-rs", eps=0.5, p=2, start=0.0, clip=None).perturb(lin, x, y)
    g = ce_input_grad(W, b, x, y)
    # a step of 1.25 eps along g / ||g||, projected back onto the l_2 ball of radius eps
    torch.testing.assert_close(delta, 0.5 * g / g.norm(dim=1, keepdim=True))


# the methods' papers: FGSM-RS (Wong et al. 2020) starts uniform in the eps ball and steps 1.25 eps,
# projected back; N-FGSM (de Jorge et al. 2022) starts in the 2 eps ball, steps eps, no projection
PAPER_SETTINGS = {
    "fgsm-rs": dict(start=1.0, step=1.25, project=True),
    "n-fgsm": dict(start=2.0, step=1.0, project=False),
}


@pytest.mark.parametrize("method", ["fgsm-rs", "n-fgsm"])
def test_the_trainers_defaults_are_the_papers_settings(method):
    from opnorm.training.objectives import build_objective

    cfg = TrainConfig(method=method, p="inf", eps=EPS).resolved()
    paper = PAPER_SETTINGS[method]
    assert (cfg.fgsm_start, cfg.fgsm_step) == (paper["start"], paper["step"])
    lin, W, b = affine()
    x, y = batch()
    delta = build_objective(cfg, lin).at.perturb(lin, x, y, generator=gen(9))  # the loss the trainer builds
    start = (2 * torch.rand(x.shape, generator=gen(9), dtype=DT) - 1) * paper["start"] * EPS  # uniform in the cube
    start = (x + start).clamp(0, 1) - x
    moved = start + paper["step"] * EPS * torch.sign(ce_input_grad(W, b, x + start, y))
    if paper["project"]:
        moved = moved.clamp(-EPS, EPS)
    torch.testing.assert_close(delta, (x + moved).clamp(0, 1) - x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "p,kind,radius",
    [("inf", "fgsm-rs", 1.0), (2, "fgsm-rs", 1.0), (1, "fgsm-rs", 1.0), ("inf", "n-fgsm", 2.0), (2, "n-fgsm", 2.0)],
)
def test_random_start_lies_in_its_ball(p, kind, radius):
    # zero gradient: the step does not move, so perturb returns the start itself
    lin, _, _ = affine(n=30, zero=True)
    x, y = batch(n=30, B=400)
    eps = 0.3
    delta = SingleStepATLoss(kind, eps=eps, p=p, clip=None).perturb(lin, x, y, generator=gen(5))
    order = math.inf if p == "inf" else float(p)
    norms = torch.linalg.vector_norm(delta, ord=order, dim=1)
    assert (norms <= radius * eps * (1 + 1e-9)).all()
    assert norms.max() > 0.9 * radius * eps  # it fills the ball, not a smaller one
    if p == "inf":  # uniform in the cube: coordinates spread over [-r, r] with mean about 0
        assert abs(float(delta.mean())) < 0.02 * radius * eps * 10
        assert float(delta.abs().mean()) == pytest.approx(radius * eps / 2, rel=0.05)


def test_free_backward_moves_weights_and_delta_together():
    lin, W, b = affine()
    x, y = batch()
    free = FreeATLoss(eps=EPS, p="inf", clip=None)
    expected = torch.zeros_like(x)
    for _ in range(3):  # three replays of one batch
        lin.zero_grad()
        loss = free(lin, x, y)
        torch.testing.assert_close(loss, F.cross_entropy((x + expected) @ W.T + b, y))
        loss.backward()
        g = ce_input_grad(W, b, x + expected, y)
        # the weight gradient of the same backward: mean_b (softmax - onehot) (x + delta)^T
        z = (x + expected) @ W.T + b
        dz = (torch.softmax(z, 1) - F.one_hot(y, 5).to(DT)) / x.shape[0]
        torch.testing.assert_close(lin.weight.grad, dz.T @ (x + expected))
        expected = (expected + EPS * torch.sign(g)).clamp(-EPS, EPS)
        torch.testing.assert_close(free.delta, expected)
    # state_dict carries delta; a short batch uses its first rows and keeps the rest
    state = free.state_dict()
    other = FreeATLoss(eps=EPS, p="inf", clip=None)
    other.load_state_dict(state)
    assert torch.equal(other.delta, free.delta)
    free(lin, x[:5], y[:5]).backward()
    assert free.delta.shape == x.shape and torch.equal(free.delta[5:], expected[5:])


def test_free_applies_the_box_at_use():
    lin, W, b = affine()
    x, y = batch()
    x = x.clone()
    x[:, 0] = 1.0  # at the upper edge
    free = FreeATLoss(eps=EPS, p="inf", clip=(0.0, 1.0))
    free.delta = torch.full_like(x, EPS)
    loss = free(lin, x, y)
    torch.testing.assert_close(loss, F.cross_entropy((x + EPS).clamp(0, 1) @ W.T + b, y))


def test_replayed_repeats_each_batch_in_a_row():
    assert list(Replayed([1, 2, 3], 2)) == [1, 1, 2, 2, 3, 3] and len(Replayed([1, 2, 3], 2)) == 6


# ----------------------------------------------------------------------------- the trainer


SMALL = dict(
    dataset="digits",
    model="cnn",
    limit_train=96,
    limit_test=40,
    eval_points=10,
    eval_steps=2,
    batch_size=32,
    seed=2,
    progress=False,
    p="inf",
    eps=0.1,
)


def test_free_replays_every_batch_and_matches_the_budget(monkeypatch):
    calls = []
    original = FreeATLoss.forward

    def spy(self, model, x, y, index=None):
        calls.append(tuple(index.tolist()))
        return original(self, model, x, y, index)

    monkeypatch.setattr(FreeATLoss, "forward", spy)
    res = train(TrainConfig(method="free", epochs=6, replays=3, **SMALL))
    # 6 epochs of optimizer steps = 2 passes over the 3 batches, each batch 3 times in a row
    assert len(res.history) == 2 and res.config.epochs == 6
    assert len(calls) == 6 * 3
    for k in range(0, len(calls), 3):
        assert calls[k] == calls[k + 1] == calls[k + 2]
    for part in (calls[:9], calls[9:]):  # each pass sees every example once (times 3)
        assert sorted(i for c in part[::3] for i in c) == list(range(96))
    steps = []
    monkeypatch.setattr(
        SingleStepATLoss, "forward", lambda self, m, x, y, i=None: steps.append(1) or F.cross_entropy(m(x), y)
    )
    train(TrainConfig(method="fgsm-rs", epochs=6, **SMALL))
    assert len(steps) == len(calls)  # the same number of optimizer steps as fgsm-rs


@pytest.mark.parametrize("method", FAST_AT_METHODS)
def test_resume_is_bit_identical(tmp_path, method):
    extra = dict(epochs=4, replays=2) if method == "free" else dict(epochs=2)
    full = train(TrainConfig(method=method, out=str(tmp_path / "full"), **SMALL, **extra))
    first = train(TrainConfig(method=method, out=str(tmp_path / "split"), **SMALL, **extra), stop_after=1)
    assert not first.completed and len(first.history) == 1
    resumed = train(TrainConfig(method=method, out=str(tmp_path / "split"), **SMALL, **extra), resume=True)
    assert resumed.completed and len(resumed.history) == 2
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    sa, sb = (load_checkpoint(tmp_path / d / CHECKPOINT)["objective"] for d in ("full", "split"))
    if method == "free":  # the carried perturbation is saved and restored
        assert sa["at._extra_state"]["delta"] is not None
        assert torch.equal(sa["at._extra_state"]["delta"], sb["at._extra_state"]["delta"])


DIGITS = dict(
    dataset="digits",
    model="cnn",
    p="inf",
    eps=0.1,
    epochs=3,
    batch_size=64,
    seed=0,
    eval_points=200,
    eval_steps=10,
    progress=False,
)


@pytest.fixture(scope="module")
def clean(one_thread):
    return train(TrainConfig(method="clean", **DIGITS))


@pytest.mark.parametrize("method,extra", [("fgsm-rs", {}), ("n-fgsm", {}), ("free", {"epochs": 8, "replays": 4})])
def test_fast_methods_learn_and_resist_pgd(method, extra, clean):
    res = train(TrainConfig(method=method, **{**DIGITS, **extra}))
    assert res.metrics["accuracy"] > 0.75, res.metrics
    assert res.metrics["robust_accuracy"] > clean.metrics["robust_accuracy"] + 0.05, (res.metrics, clean.metrics)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(method="free", epochs=3), "epochs (3) must be a multiple of replays (4), e.g. 4$"),
        (dict(method="free", epochs=6), "epochs (6) must be a multiple of replays (4), e.g. 4 or 8$"),
        (dict(method="free", epochs=4, fgsm_start=1.0), "method free has no random start"),
        (dict(method="fgsm-rs", replays=2), "replays applies to method free only"),
        (dict(method="fgsm-rs", fgsm_step=0), "fgsm_step must be > 0"),
        (dict(method="n-fgsm", fgsm_start=-1), "fgsm_start must be >= 0"),
        (dict(method="free", epochs=4, replays=0), "replays must be >= 1"),
        (dict(method="fgsm-rs", p=3, eps=0.1), "p in 1, 2, inf"),
        (dict(method="n-fgsm", eps=0), "needs eps > 0"),
        (dict(method="fgsm-rs", adv_fraction=0.5), "attacks the whole batch"),
    ],
)
def test_bad_options_are_rejected_with_one_line(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        TrainConfig(**changes).resolved()
    assert "\n" not in str(info.value)


def test_bad_loss_arguments():
    with pytest.raises(ValueError, match="kind must be one of fgsm-rs, n-fgsm"):
        SingleStepATLoss("pgd")
    with pytest.raises(ValueError, match="step must be > 0"):
        FreeATLoss(step=0)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        SingleStepATLoss("fgsm-rs", eps=float("nan"))


def test_cli_trains_with_the_new_flags(tmp_path, capsys):
    out = tmp_path / "free"
    common = [
        "--dataset",
        "digits",
        "--limit-train",
        "64",
        "--limit-test",
        "20",
        "--eval-points",
        "10",
        "--eval-steps",
        "2",
        "--batch-size",
        "32",
        "--p",
        "inf",
        "--eps",
        "0.1",
    ]
    argv = ["train", "--method", "free", "--replays", "2", "--fgsm-step", "0.5", "--epochs", "4", "--out", str(out)]
    assert main(argv + common) == 0
    cfg = flat_settings(json.loads((out / CONFIG).read_text()))
    assert cfg["method"] == "free" and cfg["replays"] == 2 and cfg["fgsm_step"] == 0.5
    assert len((out / METRICS).read_text().splitlines()) == 2
    assert "epoch 2/2" in capsys.readouterr().out
    code = main(
        [
            "train",
            "--method",
            "fgsm-rs",
            "--fgsm-start",
            "0.5",
            "--fgsm-step",
            "1",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "rs"),
            *common,
        ]
    )
    assert code == 0
    cfg = flat_settings(json.loads((tmp_path / "rs" / CONFIG).read_text()))
    assert cfg["fgsm_start"] == 0.5 and cfg["fgsm_step"] == 1.0 and cfg["replays"] is None
    code = main(["train", "--method", "free", "--epochs", "3", "--out", str(tmp_path / "bad"), *common])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("opnorm: error: method free makes epochs / replays")
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- free under DDP


def _free_ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    lin, _, _ = affine(d=5, n=4, seed=0)
    free = FreeATLoss(eps=EPS, p="inf", clip=None)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data: its own delta
    for _ in range(3):
        x, y = torch.rand(6, 4, generator=g, dtype=DT), torch.randint(0, 5, (6,), generator=g)
        free(lin, x, y).backward()
    free.sync()
    state = free.state_dict()
    mine = free.delta.clone()
    resumed = FreeATLoss(eps=EPS, p="inf", clip=None)
    resumed.load_state_dict(state)  # every rank loads the one (rank 0's) checkpoint in real runs
    free(lin, x, y).backward()  # a step after the sync: saving now would save stale deltas
    try:
        free.state_dict()
        stale_refused = False
    except RuntimeError:
        stale_refused = True
    torch.save(
        {"state": state, "mine": mine, "resumed": resumed.delta, "stale_refused": stale_refused},
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


@pytest.mark.slow
def test_free_under_ddp_checkpoints_every_ranks_delta(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_free_ddp_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["mine"], r1["mine"])  # the ranks' deltas differ: one copy would be wrong
    for r in (r0, r1):
        assert torch.equal(r["resumed"], r["mine"])  # each rank resumes its own delta from rank 0's state
        assert r["stale_refused"]
    single = FreeATLoss(eps=EPS, p="inf", clip=None)
    with pytest.raises(ValueError, match="resume with torchrun --nproc-per-node 2, not 1"):
        single.load_state_dict(r0["state"])
