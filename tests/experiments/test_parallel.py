"""The worker pool of `opnorm reproduce --jobs`: its workers stop when the study's process dies."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = """
import os, sys, time

def pid(_):
    return os.getpid()

if __name__ == "__main__":
    from opnorm.experiments.parallel import Workers
    from opnorm.experiments.runs import Runs
    from opnorm.experiments.study import fingerprint, study_config

    cfg = study_config("digits", quick=True)
    workers = Workers(2, cfg, Runs(sys.argv[1], fingerprint(cfg)))
    print(" ".join(str(p) for p in set(workers.map(pid, range(8)))), flush=True)
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        state = next(line for line in status.read_text().splitlines() if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return " Z " not in state and "zombie" not in state  # a zombie has exited; only its entry waits to be reaped


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads process states from /proc")
def test_workers_stop_when_the_study_is_killed(tmp_path):
    script = tmp_path / "study.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "runs")], stdout=subprocess.PIPE, env=env)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and all(_alive(p) for p in pids)
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup of its own: the workers must notice
        proc.wait()
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a worker outlived the study"
