"""Every benchmark runs: each ``bench/bench_*.py`` with ``--quick`` (the same code on a small load).

The benchmarks are not tests (speed is measured by running them and reading their figures), but a
benchmark nobody runs breaks unseen: QA found ``bench_demo_memory.py`` failing as shipped, and its
``--quick`` run here found two more (``bench_data_plane_cpu.py`` and ``bench_page_reuse.py`` called the
agents' API and ``SimulatedGuest`` as they were before guest ids). A new benchmark is picked up by its
file name and must take ``--quick`` (argparse refuses an unknown option: the test fails). The whole set
cost 141 s of CPU (442 s wall at load 6-16) on the 2-core machine; ``make bench-quick`` runs only this.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BASE_DIR = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted(path.name for path in (BASE_DIR / "bench").glob("bench_*.py"))
MARKS = {  # what a benchmark needs beyond the test run's own processes
    "bench_qemu_vs_simulated.py": [pytest.mark.qemu],
    "bench_qemu_image_guest.py": [pytest.mark.qemu],
    "bench_libvirt_migration.py": [pytest.mark.libvirt],
}


def bench_environment() -> dict[str, str]:
    """Ours without the test run's Django settings: each benchmark sets up its own console."""
    dropped = ("DJANGO_", "MATRIXOE_TEST", "AXES", "AGENT_PLAIN_HTTP")
    return {key: value for key, value in os.environ.items() if not key.startswith(dropped)}


@pytest.mark.bench
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "script",
    [pytest.param(name, marks=MARKS.get(name, [])) for name in BENCHMARKS],
)
def test_the_benchmark_runs_quick(script, redis_url):
    finished = subprocess.run(
        [sys.executable, "-u", f"bench/{script}", "--quick"],
        cwd=BASE_DIR,
        env=bench_environment(),
        capture_output=True,
        text=True,
        timeout=280,
    )
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    assert finished.stdout.strip(), "the benchmark printed no figures"
