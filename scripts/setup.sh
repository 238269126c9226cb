#!/usr/bin/env bash
# Create .venv with PyTorch 2.14.1 + torchvision 0.29.1 (runs on the CPU; a GPU is used when present) and opnorm installed in editable mode.
# Safe to rerun. Set OPNORM_TORCH to pick another torch pin (e.g. "torch==2.13.0" without torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# Pin torch first: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q ${OPNORM_TORCH:-torch==2.14.1 torchvision==0.29.1}
.venv/bin/python -m pip install -q -e ".[dev]"
# torchattacks is a test-only reference; its declared deps would pull torchvision (and CUDA torch).
.venv/bin/python -m pip install -q --no-deps torchattacks==3.5.1
echo "opnorm installed in .venv"
