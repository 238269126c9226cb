"""The per-epoch training losses of three opnorm runs on digits are pinned.

The values in ``tests/data/regression_losses.json`` were recorded with the regularizer as a
single class; the composed regularizer must train the same trajectories (1e-4 relative).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PINNED = json.loads((ROOT / "tests" / "data" / "regression_losses.json").read_text())["runs"]
COMMON = ["--epochs", "2", "--seed", "0", "--eval-points", "100", "--device", "cpu"]
RUNS = {
    "fast-robust": ["--config", str(ROOT / "configs" / "fashion-mnist-fast-robust.json"), "--dataset", "digits"],
    "opnorm": ["--model", "cnn", "--method", "opnorm"],
    "paper": ["--model", "cnn", "--method", "opnorm", "--opnorm-mode", "paper"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_training_losses_match_the_pinned_trajectory(name, tmp_path):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "opnorm", "train", *RUNS[name], *COMMON, "--out", str(out)]
    # the pinned losses were recorded with 2 threads; another count changes the float reduction order
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(PINNED[name], rel=1e-4)
