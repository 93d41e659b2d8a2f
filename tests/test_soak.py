"""The seeded fault soak, as CI runs it: every fault kind at least once, no invariant broken, every guest
with a disk on the shared pool; and the soak's single-writer check against two real agents that both
run a guest on one volume.

Runs ``bench/soak.py`` (its own private stack: Redis, web server, Celery worker and beat, four host
agents, a data-plane proxy) as a subprocess, as ``make soak RUNS=20 SEED=20261129`` would.
"""

import re
import secrets
import subprocess
import sys
import zlib
from dataclasses import replace
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


def test_the_disk_check_passes_a_guests_own_writes_and_names_a_foreign_byte_and_a_lost_write(tmp_path):
    """Issue 20's disk check against a real simulated guest's disk: a prefilled image its workload wrote
    (stamped blocks), then the same image with one byte the guest never wrote, and with its last write
    gone; and the completion's check of a target's copy against the source's at the freeze."""
    from soak_checks import RunDisk, check_completed_disk, expected_image, holds_only_its_guests_writes

    pool = tmp_path / "local"
    pool.mkdir()
    factory = AgentFactory(tmp_path)
    try:
        agent = factory("vsp1", "--pool", f"local:local:{pool}")
        name, volume = unique("disk"), f"{unique('vol')}.img"
        spec = {"device": "vda", "pool": "local", "volume": volume, "virtual_size_bytes": 4 << 20}
        guest = define_running_guest(agent, name, running=False, disks=[{**spec, "create": True}])
        prefill = secrets.token_bytes(1 << 20)
        with open(pool / volume, "r+b") as image:
            image.seek(2 << 20)
            image.write(prefill)
        agent.client.start_guest(guest.guest_id)
        assert wait_until(lambda: agent.client.get_guest(guest.guest_id).workload["disk_writes"] > 20, 30)
        completed = agent.client.stop_guest(guest.guest_id).workload["io_completed"]
    finally:
        factory.stop_all()
    disk = RunDisk(
        volume, True, pool, pool, None, 4 << 20, prefill, 2 << 20, zlib.crc32(guest.guest_id.encode())
    )
    written = (pool / volume).read_bytes()

    assert holds_only_its_guests_writes(disk, written, completed, "vsp1") == []
    foreign = bytearray(written)
    foreign[3 << 20] ^= 1
    (problem,) = holds_only_its_guests_writes(disk, bytes(foreign), completed, "vsp1")
    assert f"with the guest's own writes 1..{completed} and nothing else" in problem
    lost = bytearray(written)
    at = (completed % 1024) * 4096
    lost[at : at + 4096] = expected_image(disk, completed - 1)[at : at + 4096]
    assert holds_only_its_guests_writes(disk, bytes(lost), completed, "vsp1") == [
        f"vsp1: the guest completed {completed} disk writes, its disk holds {completed - 1}"
    ]

    witness, target = tmp_path / "witness", tmp_path / "target"
    frozen = replace(disk, witness=witness, target_pool=target.parent, volume=target.name)
    witness.write_bytes(expected_image(disk, completed - 5))
    target.write_bytes(written)  # the source's at the freeze, then the guest's 5 writes after it resumed
    assert check_completed_disk(frozen, "vsp2", completed) == []
    target.write_bytes(bytes(foreign))
    assert any(
        "differs from the source's at the freeze" in p for p in check_completed_disk(frozen, "vsp2", None)
    )
