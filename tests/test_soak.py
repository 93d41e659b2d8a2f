"""The seeded fault soak, as CI runs it: every fault kind at least once, no invariant broken, every guest
with a disk on the shared pool; and the soak's single-writer check against two real agents that both
run a guest on one volume.

Runs ``bench/soak.py`` (its own private stack: Redis, web server, Celery worker and beat, four host
agents, a data-plane proxy) as a subprocess, as ``make soak RUNS=20 SEED=20261129`` would.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.hostagent.conftest import AgentFactory, define_running_guest, unique

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR / "bench"))
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
    from soak_run import FAULT_KINDS

    for kind in FAULT_KINDS:
        assert f" {kind} " in finished.stdout, f"fault kind {kind} never ran"
    written = re.search(r"writing its disk before its migration in (\d+) of (\d+) runs", finished.stdout)
    sampled = re.search(r"(\d+) of them with the run's disk written by a running guest", finished.stdout)
    assert written and written.groups() == (str(RUNS), str(RUNS)), finished.stdout[-2000:]
    assert sampled and int(sampled.group(1)) >= RUNS, "the single-writer invariant saw the disks written"


@pytest.fixture
def shared_pool_agents(tmp_path: Path):
    """Two simulated agents that both mount one directory as shared pool ``san``."""
    pool = tmp_path / "san"
    pool.mkdir()
    factory = AgentFactory(tmp_path)
    try:
        yield [factory(name, "--pool", f"san:shared:{pool}:san-one") for name in ("vsp1", "vsp2")]
    finally:
        factory.stop_all()


def test_the_single_writer_check_names_the_volume_hosts_and_guests_of_two_running_writers(
    shared_pool_agents,
):
    from soak_checks import single_writer_violations

    vsp1, vsp2 = shared_pool_agents
    volume = f"{unique('vol')}.img"
    disk = {"device": "vda", "pool": "san", "volume": volume, "virtual_size_bytes": 16 << 20, "format": "raw"}
    first, second = unique("first"), unique("second")
    define_running_guest(vsp1, first, disks=[{**disk, "create": True}])
    clients = {"vsp1": vsp1.client, "vsp2": vsp2.client}
    assert single_writer_violations(clients)[0] == [], "one writer is no violation"

    # vsp2's agent knows nothing of vsp1's guest: it lets a guest of its own open the same image.
    copy = define_running_guest(vsp2, second, disks=[disk])
    assert wait_until(lambda: single_writer_violations(clients)[0], timeout=10)
    (violation,) = single_writer_violations(clients)[0]
    assert f"volume {volume} of pool san-one is written by 2 running guests at once" in violation
    assert f"{first} on vsp1 (pid " in violation and f"{second} on vsp2 (pid " in violation

    vsp2.client.stop_guest(copy.guest_id)
    assert single_writer_violations(clients)[0] == [], "a stopped guest writes nothing"
