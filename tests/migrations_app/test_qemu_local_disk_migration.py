"""Live storage migration of a real QEMU guest through the console: request -> Celery worker -> agents ->
QEMU's mirror (``hostagent/drivers/qemu/diskmirror.py``).

Two host agents run the qemu driver, each with a local pool of its own (hosta ``scratch``, hostb
``fast``), under the pair's default policy *required* (the disk crosses inside QEMU's NBD TLS). The guest
boots the OS image (``guest-images/guest-os.qcow2``) from its one disk, a 1 GiB volume on hosta's local
pool, and its guestload writes sequence-numbered blocks to that disk all along; asked over its command
port it reads back every block it wrote and checks its memory. The console learns both agents mirror
(their health), sends ``local_disks="mirror"``, and after the commit the source deletes its volume and
the audit trail says so. A Celery worker of this module's own drives the migration with no bandwidth
cap (the guest's 1 GiB is mostly unallocated: QEMU zeroes those ranges without sending data). Nothing is
faked. Skipped loudly without QEMU >= 10 or the image (CI builds both).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentprotocol import GuestSpec
from hostagent.drivers.qemu.guestload import request_selfcheck
from hostagent.drivers.qemu.storage import create_volume
from migrations_app.actions import do_request_migration
from tests.conftest import ManagedProcess, wait_until
from tests.factories import make_vm
from tests.hostagent.conftest import AgentFactory, RunningAgent, unique
from tests.migrations_app.conftest import collected_vsps_for, route_migrations_to, worker_on_own_queue
from tests.migrations_app.guests import wait_for_state
from tests.qemu_guest import OS_IMAGE, needs_os_image, runs_intact, workload
from vms.inventory import collect_vsp
from vms.models import AuditEvent

pytestmark = [*needs_os_image, pytest.mark.django_db(transaction=True)]

MEMORY_MIB = 192
GIB = 1 << 30


@pytest.fixture(scope="module")
def local_qemu_agents(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, RunningAgent], dict[str, Path]]]:
    pools = {
        "hosta": tmp_path_factory.mktemp("hosta-scratch"),
        "hostb": tmp_path_factory.mktemp("hostb-fast"),
    }
    run_dir = tmp_path_factory.mktemp("qemu-run")
    factory = AgentFactory(tmp_path_factory.mktemp("qemu-agents"))
    try:
        agents = {
            name: factory(
                name,
                "--pool",
                f"{pool}:local:{pools[name]}",
                "--driver-option",
                f"run_dir={run_dir / name}",
                driver="qemu",
            )
            for name, pool in (("hosta", "scratch"), ("hostb", "fast"))
        }
        yield agents, pools
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def _uncapped_worker(django_db_setup, redis_url) -> Iterator[tuple[str, ManagedProcess]]:
    with worker_on_own_queue("qemu-local", 2, MIGRATION_BANDWIDTH_MBPS="0") as queue_and_worker:
        yield queue_and_worker


@pytest.fixture
def uncapped_worker(_uncapped_worker, settings) -> ManagedProcess:
    return route_migrations_to(_uncapped_worker, settings)


def boot_on_local_disk(agent: RunningAgent, pool: Path, vm) -> str:
    """``vm``'s guest booted on ``agent`` from a 1 GiB copy of the OS image in its local pool
    ``scratch``, its guestload writing that disk and one self-check passed. Returns the volume's name."""
    volume = f"{vm.name}.qcow2"
    create_volume(OS_IMAGE, pool / volume)
    subprocess.run(["qemu-img", "resize", "-q", str(pool / volume), "1G"], check=True)  # noqa: S607
    vda = {"device": "vda", "pool": "scratch", "volume": volume, "virtual_size_bytes": GIB, "boot": True}
    spec = {
        "guest_id": str(vm.guest_id),
        "name": vm.name,
        "memory_mib": MEMORY_MIB,
        "vcpus": 1,
        "os_type": "Linux",
        "dirty_pages_per_s": 1000,
        "disks": [vda],
        "running": True,
    }
    agent.client.define_guest(GuestSpec.model_validate(spec))

    def up() -> bool:
        now = workload(agent, vm.name)
        return now["selfchecks_passed"] >= 1 and now["disk_writes"] > 50

    assert wait_until(up, timeout=120), Path(workload(agent, vm.name)["serial_log"]).read_text(
        errors="replace"
    )
    return volume


def test_a_qemu_guest_writing_its_local_disk_moves_through_the_console_and_its_source_volume_goes(
    local_qemu_agents, admin, uncapped_worker
):
    agents, pools = local_qemu_agents
    vsps = collected_vsps_for(agents)
    assert vsps["hosta"].agent_mirrors_local_disks and vsps["hostb"].agent_mirrors_local_disks
    vm = make_vm(unique("db"), vsp=vsps["hosta"], memory_mib=MEMORY_MIB, os_type="Linux")
    volume = boot_on_local_disk(agents["hosta"], pools["hosta"], vm)
    assert collect_vsp(vsps["hosta"].pk)  # the console learns its disk, on a local pool
    writes_before = workload(agents["hosta"], vm.name)["disk_writes"]

    migration = do_request_migration(vm, vsps["hostb"], admin)
    wait_for_state(wait_until, migration, "completed", "aborted", "cancelled", timeout=180)

    assert migration.state == "completed", migration.alert
    assert migration.guest_devices["disks"][0]["local"] is True
    assert migration.disk_bytes_total >= GIB and migration.disk_bytes_remaining == 0
    assert migration.disk_ready_at is not None and migration.copy_started_at < migration.disk_ready_at
    vm.refresh_from_db()
    assert vm.current_vsp == vsps["hostb"]
    # the source's last word before it quit (its serial console): the guest wrote its disk while moving
    assert workload(agents["hosta"], vm.name)["disk_writes"] > writes_before
    command_port = Path(workload(agents["hostb"], vm.name)["command_port"])
    check = asyncio.run(request_selfcheck(command_port, "after-console-move"))
    assert check.ok and int(check.fields["blocks"]) > writes_before, check.line
    assert runs_intact(agents["hostb"], vm.name)
    assert (pools["hostb"] / volume).is_file(), "the guest's disk is in hostb's own local pool"
    assert not (pools["hosta"] / volume).exists(), "the source's volume is deleted once the target runs"
    deleted = AuditEvent.objects.get(action=AuditEvent.Action.SOURCE_DISKS_DELETED, object_id=str(vm.pk))
    assert deleted.message == (
        f"hosta deleted {vm.name}'s volumes of its mirrored local disks once hostb ran the guest: "
        f"vda (volume {volume} in pool scratch, 1 GiB)"
    )
    assert migration.events.filter(message=deleted.message).exists(), "on the migration's timeline too"
    agents["hostb"].client.stop_guest(str(vm.guest_id))  # the two cores are shared: no idle guest left
