"""Shared by the CLI and run-directory tests: running ``opnorm`` in-process, checking that
an error is one line, and a small digits run as flags (``SMALL``) and as settings
(``SMALL_CFG``). Importing modules run in one thread (``one_thread``, tests/conftest.py)."""

from __future__ import annotations

from opnorm.cli import main

# a run small enough for a test: 96 training and 40 test digits, 10 evaluation points
SMALL = [
    "--dataset",
    "digits",
    "--model",
    "cnn",
    "--limit-train",
    "96",
    "--limit-test",
    "40",
    "--eval-points",
    "10",
    "--eval-steps",
    "2",
    "--batch-size",
    "32",
    "--device",
    "cpu",
    "--quiet",
]
SMALL_CFG = dict(
    dataset="digits",
    model="cnn",
    limit_train=96,
    limit_test=40,
    eval_points=10,
    eval_steps=2,
    batch_size=32,
    device="cpu",
    progress=False,
)


def run_main(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err, *fragments) -> str:
    """The single ``opnorm: error: ...`` line of a failed call, which names every fragment."""
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("opnorm: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
