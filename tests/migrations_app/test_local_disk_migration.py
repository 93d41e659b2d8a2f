"""Live storage migration through the console: a guest whose disk is on its host's local pool migrates
between two real agents (simulated driver) with a real worker, Redis and database. The console sends
``local_disks="mirror"``, the target allocates the volume in its own local pool, the source mirrors the
disk while the guest writes it; after the commit the source's volume is deleted once the target runs
the guest, and the audit trail says so. A cancel during the mirror leaves the source's disk as the
guest wrote it and no volume on the target. A source volume that cannot be deleted (its pool's directory
made immutable, ``chattr +i``: the volume is still written, no entry can go) is left, and the console
says where and how much.

The guest's disk is its own self-check: I/O request ``n`` writes block ``n`` with its number and the
guest's seed (``hostagent.drivers.simulated.guest``), and an image's data lies beyond (``PREFILL_AT``).
A volume that holds every request from 1 to the last in order, and the image unchanged, is the disk the
guest wrote; one lost write leaves a hole, one stale block a wrong number.
"""

from __future__ import annotations

import hashlib
import secrets
import subprocess
from pathlib import Path

import pytest
from django.urls import reverse

from hostagent.drivers.simulated.guest import DISK_BLOCK, DISK_STAMP
from migrations_app.actions import do_cancel_migration, do_request_migration
from tests.factories import make_user
from tests.hostagent.conftest import AgentFactory
from tests.migrations_app.conftest import MIGRATOR, collected_vsps_for
from tests.migrations_app.guests import runs_on, wait_for_state
from vms.define import Definition, DiskRequest, NicRequest, do_define_vm
from vms.inventory import collect_vsp
from vms.models import AuditEvent, Role

pytestmark = pytest.mark.django_db(transaction=True)

MIB = 1 << 20
PREFILL_AT = 16 * MIB  # the guest's own writes (block n for request n, ~50 a second) stay far below


@pytest.fixture(scope="module")
def local_agents(tmp_path_factory):
    """hosta and hostb, each with a local pool of its own (scratch, fast) and the network prod-net."""
    factory = AgentFactory(tmp_path_factory.mktemp("agents"))
    pools = {
        "hosta": tmp_path_factory.mktemp("hosta-scratch"),
        "hostb": tmp_path_factory.mktemp("hostb-fast"),
    }
    network = ("--network", "prod-net:simulated")
    agents = {
        "hosta": factory("hosta", "--pool", f"scratch:local:{pools['hosta']}", *network),
        "hostb": factory("hostb", "--pool", f"fast:local:{pools['hostb']}", *network),
    }
    yield agents, pools
    factory.stop_all()


@pytest.fixture
def local_hosts(local_agents):
    agents, pools = local_agents
    return agents, collected_vsps_for(agents), pools


def guest_with_local_disk(vsps, pools, image: bytes):
    """A running VM defined from the console with a 1 GiB disk on hosta's local pool, ``image`` written
    into it at ``PREFILL_AT`` (what an installed guest has on its disk), then collected."""
    rights = (*MIGRATOR, "migrations_app.view_migration", "vms.add_virtualmachine", "vms.view_vsp")
    admin = make_user("ada", rights, role=Role.ADMINISTRATOR)
    name = f"db{secrets.token_hex(3)}"
    definition = Definition(
        name,
        vsps["hosta"],
        16,
        disks=[DiskRequest("scratch", size_bytes=1 << 30)],
        nics=[NicRequest("prod-net")],
        running=True,
    )
    vm = do_define_vm(definition, admin)
    volume = vm.disks.get().volume
    with open(pools["hosta"] / volume, "r+b") as disk:
        disk.seek(PREFILL_AT)
        disk.write(image)
    collect_vsp(vsps["hosta"].pk)  # its allocated bytes, as the forecast reads them
    return vm, volume, admin


def self_check(path: Path, image: bytes) -> int:
    """The guest's writes on the volume at ``path`` (its guest stopped): blocks 1..n hold requests 1..n
    of one seed and nothing follows; the image is intact. Returns n."""
    data = path.read_bytes()
    assert (
        hashlib.sha256(data[PREFILL_AT : PREFILL_AT + len(image)]).digest() == hashlib.sha256(image).digest()
    )
    seeds, last = set(), 0
    for block in range(1, PREFILL_AT // DISK_BLOCK):
        chunk = data[block * DISK_BLOCK : (block + 1) * DISK_BLOCK]
        if chunk == bytes(DISK_BLOCK):
            last = block - 1
            break
        magic, seed, request = DISK_STAMP.unpack_from(chunk)
        assert (magic, request) == (b"MXDISK01", block), (
            f"block {block} holds request {request}: a stale copy"
        )
        seeds.add(seed)
    assert len(seeds) == 1 and last > 0, (seeds, last)
    assert data[(last + 1) * DISK_BLOCK : PREFILL_AT].count(0) == PREFILL_AT - (last + 1) * DISK_BLOCK, (
        f"a write after request {last} but not request {last + 1}: a lost write"
    )
    return last


def test_a_guest_on_a_local_disk_migrates_with_its_disk_mirrored_and_the_source_volume_goes(
    local_hosts, migration_worker, wait_for, client
):
    agents, vsps, pools = local_hosts
    image = secrets.token_bytes(8 * MIB)
    vm, volume, admin = guest_with_local_disk(vsps, pools, image)

    migration = do_request_migration(vm, vsps["hostb"], admin)
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled")

    assert migration.state == "completed", migration.alert
    assert vm.current_vsp == vsps["hostb"] and runs_on(agents["hostb"], vm.name)
    assert migration.guest_devices["disks"][0]["local"] is True
    assert migration.disk_bytes_total >= len(image) and migration.disk_bytes_remaining == 0
    assert migration.disk_ready_at is not None and migration.copy_started_at < migration.disk_ready_at
    assert not (pools["hosta"] / volume).exists(), "the source's volume is deleted once the target runs"
    deleted = AuditEvent.objects.get(action=AuditEvent.Action.SOURCE_DISKS_DELETED, object_id=str(vm.pk))
    assert f"hosta deleted {vm.name}'s volumes of its mirrored local disks once hostb ran the guest: vda" in (
        deleted.message
    )
    assert migration.events.filter(message=deleted.message).exists(), "on the migration's timeline too"
    client.force_login(admin)
    report = client.get(reverse("migration_history:report", args=[migration.pk])).content.decode()
    assert 'data-field="disk_mirror"' in report and "In step after" in report
    collect_vsp(vsps["hostb"].pk)
    assert list(vm.disks.values_list("pool", "volume")) == [("fast", volume)]

    stopped = agents["hostb"].client.stop_guest(str(vm.guest_id))  # its writes stop: read it whole
    assert stopped.hardware_status == "off"
    written = self_check(pools["hostb"] / volume, image)
    assert written > 0


def test_a_cancel_during_the_mirror_leaves_the_source_disk_and_no_volume_on_the_target(
    local_hosts, migration_worker, wait_for, client
):
    agents, vsps, pools = local_hosts
    image = secrets.token_bytes(32 * MIB)  # ~7 s of mirror at the test worker's 5 MB/s
    vm, volume, admin = guest_with_local_disk(vsps, pools, image)
    before = set(pools["hostb"].iterdir())

    migration = do_request_migration(vm, vsps["hostb"], admin)
    assert wait_for(lambda: migration.refresh_from_db() or migration.disk_bytes_sent > 0, timeout=30)
    assert migration.disk_ready_at is None and migration.bytes_sent == 0, "still mirroring the disk"
    client.force_login(admin)
    panel = client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()
    assert "<dt>Disk copied</dt>" in panel and "<dt>Memory sent</dt>" in panel, "disk and memory apart"
    do_cancel_migration(migration, admin)
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled")

    assert migration.state == "cancelled", migration.alert
    assert vm.current_vsp == vsps["hosta"] and runs_on(agents["hosta"], vm.name)
    assert wait_for(lambda: set(pools["hostb"].iterdir()) == before, timeout=10), "no volume left on hostb"
    agents["hosta"].client.stop_guest(str(vm.guest_id))
    self_check(pools["hosta"] / volume, image)
    assert not AuditEvent.objects.filter(object_id=str(vm.pk), action__startswith="source_disks").exists()


def test_a_source_volume_that_cannot_be_deleted_is_left_and_the_console_says_so(
    local_hosts, migration_worker, wait_for
):
    agents, vsps, pools = local_hosts
    vm, volume, admin = guest_with_local_disk(vsps, pools, secrets.token_bytes(MIB))
    locked = subprocess.run(["chattr", "+i", str(pools["hosta"])], capture_output=True, text=True)  # noqa: S607
    assert locked.returncode == 0, f"cannot make the pool immutable here: {locked.stderr}"
    try:
        migration = do_request_migration(vm, vsps["hostb"], admin)
        wait_for_state(wait_for, migration, "completed", "aborted", "cancelled")
    finally:
        subprocess.run(["chattr", "-i", str(pools["hosta"])], check=True)  # noqa: S607

    assert migration.state == "completed", migration.alert
    assert vm.current_vsp == vsps["hostb"] and runs_on(agents["hostb"], vm.name)
    assert (pools["hosta"] / volume).exists(), "the volume the source could not delete is left"
    left = AuditEvent.objects.get(action=AuditEvent.Action.SOURCE_DISKS_LEFT, object_id=str(vm.pk))
    assert left.message == (
        f"{vm.name}'s volumes of its mirrored local disks were left on hosta (its agent did not delete "
        f"them): vda (volume {volume} in pool scratch, 1 GiB); up to 1 GiB: delete them there once no "
        "longer needed"
    )
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.SOURCE_DISKS_DELETED, object_id=str(vm.pk))
