#!/usr/bin/env bash
# Create .venv with PyTorch 2.14.1 + torchvision 0.29.1 (runs on the CPU; a GPU is used when present) and opnorm installed in editable mode.
# Safe to rerun. Set OPNORM_TORCH to pick other pins, torch with its matching torchvision
# (e.g. "torch==2.13.0 torchvision==0.28.0"): the tests need torchvision (the [dev] extra asks for it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# Pin torch first: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q ${OPNORM_TORCH:-torch==2.14.1 torchvision==0.29.1}
# [dev]: the tests' needs (pytest, hypothesis, scipy, ruff, torchvision via [vision]) on top of the base.
.venv/bin/python -m pip install -q -e ".[dev]"
# torchattacks ([eval]; the reference attacks of the tests) without its declared deps: they would pull
# another torchvision and with it a CUDA build of torch over the pinned CPU one.
.venv/bin/python -m pip install -q --no-deps torchattacks==3.5.1
echo "opnorm installed in .venv"
