"""Shared by the CLI and run-directory tests: running ``opnorm`` in-process and checking that
an error is one line. Importing modules run in one thread (``one_thread``, tests/conftest.py)."""

from __future__ import annotations

from opnorm.cli import main


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
