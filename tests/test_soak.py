"""The seeded fault soak, as CI runs it: every fault kind at least once, no invariant broken.

Runs ``bench/soak.py`` (its own private stack: Redis, web server, Celery worker and beat, four host
agents, a data-plane proxy) as a subprocess, as ``make soak RUNS=20 SEED=20261129`` would.
"""

import subprocess
import sys
from pathlib import Path

import pytest

BASE_DIR = Path(__file__).resolve().parent.parent
SEED = 20261129
RUNS = 20


@pytest.mark.faults
@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_it_keeps_every_invariant_under_twenty_seeded_faults():
    finished = subprocess.run(
        [sys.executable, "bench/soak.py", "--runs", str(RUNS), "--seed", str(SEED)],
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    lines = finished.stdout.strip().splitlines()
    assert lines, finished.stderr[-3000:]
    assert lines[-1] == f"{RUNS} runs, 0 invariant violations", (
        finished.stdout[-6000:] + finished.stderr[-3000:]
    )
    assert finished.returncode == 0, finished.stdout[-6000:]
    sys.path.insert(0, str(BASE_DIR / "bench"))
    from soak_run import FAULT_KINDS

    for kind in FAULT_KINDS:
        assert f" {kind} " in finished.stdout, f"fault kind {kind} never ran"
