"""Live storage migration on the qemu driver: a guest booted from its own disk on a **local** pool moves
while it writes that disk, QEMU mirroring it to a new volume in the target's local pool
(``local_disks="mirror"``, ``hostagent/drivers/qemu/diskmirror.py``), under the policy *required*
(the disk crosses inside QEMU's NBD TLS).

Two real agents run the qemu driver, each with a local pool of its own (vsp1 ``local``, vsp2 ``fast``).
The guest is the OS image (``guest-images/guest-os.qcow2``): guestload writes sequence-numbered 4 KiB
blocks to its disk and, asked over its command port, reads back every block it wrote and checks its
memory. What is compared here is what the guest itself checks, and the two volumes' contents read by
``qemu-img compare`` while both QEMUs are paused at "ready". After the release the source's volume is
gone. A third agent's pool is a small tmpfs of its own (a real file system that fills up; mounting
needs root, which CI has). Skipped loudly without QEMU >= 10 or the image (CI builds both).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentprotocol import (
    GuestInfo,
    GuestSpec,
    IncomingRequest,
    OutgoingRequest,
    PhaseLimits,
    PreparedIncoming,
    ProgressSnapshot,
)
from hostagent.drivers.qemu.guestload import SelfCheck, request_selfcheck
from hostagent.drivers.qemu.storage import create_volume
from tests.conftest import wait_until
from tests.hostagent.conftest import (
    AgentFactory,
    RunningAgent,
    follow,
    guest_id_for,
    mount_small_tmpfs,
    outgoing,
    unique,
    wanted_spec,
)
from tests.qemu_guest import OS_IMAGE, needs_os_image, runs_intact, workload

pytestmark = needs_os_image

MIB = 1 << 20
GUEST = {"memory_mib": 192, "vcpus": 1, "os_type": "Linux", "dirty_pages_per_s": 1000}


@dataclass
class Pair:
    source: RunningAgent
    target: RunningAgent
    source_pool: Path
    target_pool: Path
    factory: AgentFactory
    run_dir: Path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    pools = {name: tmp_path_factory.mktemp(f"{name}-local") for name in ("vsp1", "vsp2")}
    run_dir = tmp_path_factory.mktemp("qemu-run")
    factory = AgentFactory(tmp_path_factory.mktemp("qemu-agents"))
    try:
        agents = [
            factory(name, "--pool", pool, "--driver-option", f"run_dir={run_dir / name}", driver="qemu")
            for name, pool in (
                ("vsp1", f"local:local:{pools['vsp1']}"),
                ("vsp2", f"fast:local:{pools['vsp2']}"),
            )
        ]
        yield Pair(agents[0], agents[1], pools["vsp1"], pools["vsp2"], factory, run_dir)
    finally:
        factory.stop_all()


def boot_on_local_disk(pair: Pair) -> tuple[GuestInfo, str]:
    """A running image guest on vsp1 whose boot disk (a copy of the OS image, 64 MiB virtual) is on
    vsp1's local pool; its workload writes the disk and passed a check once. (guest, volume name)."""
    name = unique("local")
    guest_id, volume = guest_id_for(name), f"{name}.qcow2"
    create_volume(OS_IMAGE, pair.source_pool / volume)
    vda = {"device": "vda", "pool": "local", "volume": volume, "virtual_size_bytes": 1, "boot": True}
    spec = {"guest_id": guest_id, "name": name, **GUEST, "disks": [vda], "running": True}
    pair.source.client.define_guest(GuestSpec.model_validate(spec))

    def up() -> bool:
        now = workload(pair.source, name)
        return now["selfchecks_passed"] >= 1 and now["disk_writes"] > 50

    assert wait_until(up, timeout=120), Path(workload(pair.source, name)["serial_log"]).read_text(
        errors="replace"
    )
    return pair.source.client.get_guest(guest_id), volume


def start_mirror(pair: Pair, guest: GuestInfo, migration_id: str, **params: object) -> None:
    """Prepare vsp2 and start vsp1 with ``local_disks="mirror"`` (policy *required*)."""
    prepared = prepare_mirror(pair.target, guest, migration_id)
    start_outgoing_mirror(pair.source, guest, migration_id, prepared, **params)


def prepare_mirror(target: RunningAgent, guest: GuestInfo, migration_id: str) -> PreparedIncoming:
    request = IncomingRequest(
        migration_id=migration_id, guest=wanted_spec(guest), limits=PhaseLimits(), local_disks="mirror"
    )
    return target.client.prepare_incoming(request)


def start_outgoing_mirror(
    source: RunningAgent, guest: GuestInfo, migration_id: str, prepared: PreparedIncoming, **params: object
) -> None:
    start: OutgoingRequest = outgoing(guest.guest_id, migration_id, prepared.endpoint(), **params)
    source.client.start_outgoing(start.model_copy(update={"local_disks": "mirror"}))


def selfcheck(agent: RunningAgent, name: str, tag: str) -> SelfCheck:
    return asyncio.run(request_selfcheck(Path(workload(agent, name)["command_port"]), tag))


def disk_writes_advance(agent: RunningAgent, name: str) -> bool:
    before = workload(agent, name)["disk_writes"]
    return wait_until(lambda: workload(agent, name)["disk_writes"] > before + 50, timeout=30)


def same_contents(first: Path, second: Path) -> subprocess.CompletedProcess[str]:
    """``qemu-img compare`` of what a guest reads from each image (``-U``: their QEMUs hold them)."""
    return subprocess.run(
        ["qemu-img", "compare", "-U", str(first), str(second)],  # noqa: S607 - QEMU's own tool
        capture_output=True,
        text=True,
        check=False,
    )


def markers(pool: Path) -> list[str]:
    return sorted(path.name for path in pool.glob(".*.matrixoe-mirror"))


def test_a_guest_writing_its_local_disk_moves_with_qemus_mirror_and_checks_itself_on_the_target(pair):
    guest, volume = boot_on_local_disk(pair)
    name = guest.name
    writes_before = workload(pair.source, name)["disk_writes"]
    migration_id = unique("move")

    start_mirror(pair, guest, migration_id, downtime_ms=300)
    seen = follow(pair.source, migration_id, lambda s: s.converged or s.state not in ("init", "copy"))
    allocated_in_copy = (pair.target_pool / volume).exists()
    pair.source.client.quiesce(migration_id)
    ready = pair.source.client.freeze(migration_id)
    assert ready.state == "ready", ready
    frozen = same_contents(pair.source_pool / volume, pair.target_pool / volume)
    writes_during = workload(pair.source, name)["disk_writes"] - writes_before
    pair.target.client.resume(migration_id)
    released = pair.source.client.release(migration_id)

    assert allocated_in_copy, "the target allocated the volume in its own local pool"
    assert frozen.returncode == 0, f"the copies differ at the freeze: {frozen.stdout}{frozen.stderr}"
    assert writes_during > 0, "the guest wrote its disk during the mirror"
    check = selfcheck(pair.target, name, "after-mirror")
    assert check.ok and int(check.fields["blocks"]) > 0, check.line
    assert disk_writes_advance(pair.target, name)
    assert runs_intact(pair.target, name)

    disk_first = [s for s in seen if s.disk_bytes_sent > 0 and s.bytes_sent == 0]
    assert disk_first, "Copy showed the disk's bytes before the memory's"
    assert all(s.disk_mirror_ready for s in seen if s.bytes_sent > 0), (
        "memory moved only once the mirror was ready"
    )
    assert any(0 < s.percent["copy"] < 100 and s.bytes_sent == 0 for s in seen), (
        "the percentage counts the disk"
    )
    assert (
        ready.disk_mirror_ready and ready.disk_bytes_remaining == 0 and ready.disk_throughput_bytes_s > 0
    ), ready
    assert ready.disk_bytes_total >= 64 << 20, ready
    moved = pair.target.client.get_guest(guest.guest_id)
    assert (moved.disks[0].pool, moved.disks[0].volume) == ("fast", volume)
    assert moved.disks[0].allocated_bytes < moved.disks[0].virtual_size_bytes, "zero ranges were not written"
    assert markers(pair.target_pool) == [], "the committed volume is the guest's: no restart removes it"
    assert released.state == "released" and released.disks_deleted == ["vda"], released
    assert not (pair.source_pool / volume).exists(), "the source's volume is deleted at the release"
    assert pair.source.client.get_guest(guest.guest_id).hardware_status == "not_runnable"


def test_a_cancel_mid_mirror_leaves_the_guest_writing_on_its_source_and_no_volume_on_the_target(pair):
    guest, volume = boot_on_local_disk(pair)
    name = guest.name
    migration_id = unique("cancel")

    start_mirror(pair, guest, migration_id, bandwidth_mbps=16)  # 2 MB/s: ~18 MiB of data takes ~9 s
    assert (pair.target_pool / volume).exists() and markers(pair.target_pool), "allocated and marked"
    copying: list[ProgressSnapshot] = follow(
        pair.source, migration_id, lambda s: s.disk_bytes_sent > 0 or s.state not in ("init", "copy")
    )
    cancelled = pair.source.client.cancel(migration_id)
    pair.target.client.discard(migration_id)

    assert copying[-1].state == "copy", copying[-1]
    assert cancelled.state == "cancelled" and not cancelled.disk_mirror_ready, cancelled
    assert pair.target.guest(name) is None
    assert not (pair.target_pool / volume).exists(), "the target's new volume is deleted"
    assert markers(pair.target_pool) == []
    assert disk_writes_advance(pair.source, name), "the guest writes on the source"
    check = selfcheck(pair.source, name, "after-cancel")
    assert check.ok and int(check.fields["blocks"]) > 0, check.line
    assert runs_intact(pair.source, name)
    assert pair.source.client.get_guest(guest.guest_id).migrating is None


@pytest.fixture
def tiny_target(pair: Pair, tmp_path: Path) -> Iterator[tuple[RunningAgent, Path]]:
    """vsp3, its one local pool ``tiny`` an 80 MiB tmpfs of its own; skipped (saying so) where this
    user cannot mount one."""
    mount_point = tmp_path / "tiny"
    mount_small_tmpfs(mount_point, 80)
    factory = AgentFactory(tmp_path / "agent")
    (tmp_path / "agent").mkdir()
    try:
        run_dir = pair.run_dir / "vsp3"
        yield (
            factory(
                "vsp3",
                "--pool",
                f"tiny:local:{mount_point}",
                "--driver-option",
                f"run_dir={run_dir}",
                driver="qemu",
            ),
            mount_point,
        )
    finally:
        factory.stop_all()
        subprocess.run(["umount", str(mount_point)], check=False)  # noqa: S607


def test_a_target_pool_filling_up_mid_mirror_aborts_naming_it_and_the_guest_writes_on(pair, tiny_target):
    vsp3, tiny = tiny_target
    guest, volume = boot_on_local_disk(pair)
    name = guest.name
    migration_id = unique("full")
    prepared = prepare_mirror(vsp3, guest, migration_id)  # the 64 MiB virtual disk fits in 80 MiB
    free = os.statvfs(tiny).f_bavail * os.statvfs(tiny).f_frsize
    (tiny / "other-guest").write_bytes(bytes(free - 8 * MIB))  # then another user takes all but 8 MiB

    start_outgoing_mirror(pair.source, guest, migration_id, prepared)
    ended = follow(pair.source, migration_id, lambda s: s.state not in ("init", "copy"))[-1]

    assert (ended.state, ended.failed_side) == ("aborted", "target"), ended
    assert "vsp3's pool tiny ran out of space at " in (ended.error or ""), ended
    assert ended.error.endswith(f" of 64 MiB ({name}'s disk vda)"), ended.error
    assert disk_writes_advance(pair.source, name), "the guest writes on the source"
    check = selfcheck(pair.source, name, "after-full")
    assert check.ok and int(check.fields["blocks"]) > 0, check.line
    assert wait_until(lambda: not (tiny / volume).exists(), timeout=10), "the target's new volume is deleted"
    assert vsp3.guest(name) is None
    assert (pair.source_pool / volume).exists()
    pair.source.client.stop_guest(guest.guest_id)  # the two cores are shared: no idle guest left running
