"""Shared fixtures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session")
def trained_digits_model():
    """A small MLP trained on sklearn's 8x8 digits (about a second on one CPU core).

    Returns a namespace with ``model`` (eval mode, float32, input (B, 1, 8, 8) in [0, 1]),
    the held-out ``x`` (397, 1, 8, 8), ``y`` (397,), its clean accuracy ``clean_acc`` in %,
    and all 1797 digits ``x_all``, ``y_all`` (more examples give less noisy attack comparisons).
    """
    from sklearn.datasets import load_digits

    X, Y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    Y = torch.tensor(Y, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=g)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)  # the initialization
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, deterministic, and robust to a busy machine
    try:
        for _ in range(30):
            order = train[torch.randperm(len(train), generator=g)]
            for i in range(0, len(order), 100):
                b = order[i : i + 100]
                loss = nn.functional.cross_entropy(model(X[b]), Y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    for prm in model.parameters():
        prm.grad = None
    x, y = X[test], Y[test]
    with torch.no_grad():
        clean_acc = (model(x).argmax(1) == y).float().mean().item() * 100
    return SimpleNamespace(model=model, x=x, y=y, clean_acc=clean_acc, x_all=X, y_all=Y)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: they gain nothing from more, and spinning
    OpenMP threads on a shared CPU are very slow (``pytestmark = pytest.mark.usefixtures(...)``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
