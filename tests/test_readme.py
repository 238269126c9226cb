"""README.md's and docs/usage.md's Python examples run as written: every ```python block of a
file, in order, in one namespace."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USAGE = ROOT / "docs" / "usage.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

# runs the blocks in a fresh interpreter (no state shared with the other tests), in one thread
RUNNER = """
import json, sys, torch
torch.set_num_threads(1)
namespace = {"__name__": "__readme__"}
for line, code in json.load(open(sys.argv[1])):
    exec(compile(code, f"{sys.argv[2]}, the python block at line {line}", "exec"), namespace)
"""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line of the opening fence, code) of every ```python block, in order."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_python_blocks_are_found():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n"), (8, "y = x\n")]


@pytest.mark.parametrize("doc", [README, USAGE], ids=["README.md", "docs/usage.md"])
def test_python_blocks_run_in_order(tmp_path, doc):
    blocks = python_blocks(doc.read_text())
    assert len(blocks) >= 4
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json"), str(doc.relative_to(ROOT))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
