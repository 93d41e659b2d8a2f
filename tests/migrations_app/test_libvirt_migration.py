"""Domains of two real libvirt daemons moved through the console's own path: request -> Celery worker ->
agents (``--driver libvirt``) -> libvirt's peer-to-peer migration.

``devtools.libvirt_hosts`` runs the two daemons (hosts a and b, see ``tests/hostagent/test_libvirt_daemons``);
the domains are defined and started with libvirt alone, as an admin would, and the console's VM rows
name them by their libvirt UUID. A Celery worker of this module's own drives the migrations. libvirt
commits a migration by itself at its switchover (``Health.switchover_commits``): the console's Frozen
check is then libvirt's completed job, the target running the domain and the source's left shut off
(no memory digests), and a cancel that comes after the switchover cannot stop it: the console follows
libvirt and completes. Nothing is faked. Needs root and libvirt >= 11; skipped loudly otherwise.
"""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.libvirt_hosts import LibvirtHosts
from migrations_app.actions import do_cancel_migration, do_request_migration
from migrations_app.agents import agent_migration_id
from migrations_app.models import Migration
from migrations_app.tasks import recover_migrations
from tests.conftest import ManagedProcess, wait_until
from tests.factories import make_vm
from tests.hostagent.conftest import AgentFactory, RunningAgent
from tests.hostagent.test_libvirt_daemons import (
    MISSING,
    boot_on_a,
    connections_to,
    keeps_passing,
    state,
    two_hosts,
)
from tests.migrations_app.conftest import route_migrations_to, vsps_for, worker_on_own_queue
from tests.migrations_app.guests import wait_for_state
from tests.migrations_app.test_faults import heartbeat_older_than
from tests.migrations_app.test_qemu_migration import restart_agent
from vms.inventory import collect_vsp
from vms.models import Registration, VirtualMachine

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
    pytest.mark.django_db(transaction=True),
]

GUESTS = ("moves", "stays", "late", "orphan")  # booted together, one per test
MEMORY_MIB = {"moves": 192, "stays": 192, "late": 384, "orphan": 192}
DIRTY_PAGES_PER_S = 2000  # 8 MB/s of writes: converges in a few rounds at full speed
# libvirt's Init includes the target daemon starting QEMU and QEMU's TLS handshake: 6-10 s at a load
# average of 20 on 2 cores (the VM's default limit is 10 s).
INIT_LIMIT_S = 60
FAST_MBPS = "800"  # the workers' site cap (Mbit/s), none worth the name: libvirt moves 30-60 MiB/s here
SLOW_MB_S = 2  # the cancelled guest's policy cap: its first pass alone takes about a minute
SLOW = {"preset": "custom", "bandwidth_cap_mb_s": SLOW_MB_S}
STOPPED_BY_MIGRATION = 4  # libvirt's VIR_DOMAIN_SHUTOFF_MIGRATED
BOOTED = 1  # libvirt's VIR_DOMAIN_RUNNING_BOOTED: the same boot, never paused by a migration
ARRIVED = 2  # libvirt's VIR_DOMAIN_RUNNING_MIGRATED


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtHosts]:
    with two_hosts(tmp_path_factory.mktemp("lvcon")) as hosts:
        yield hosts


@pytest.fixture(scope="module")
def connections(rig: LibvirtHosts) -> dict[str, Any]:
    """The admin's own libvirt connections (virsh's), beside the agents'."""
    return connections_to(rig)


@pytest.fixture(scope="module")
def domains(rig: LibvirtHosts, connections: dict[str, Any]) -> dict[str, str]:
    """The test guests, defined and started on host a with libvirt alone; their UUIDs by name."""
    return boot_on_a(rig, connections["a"], {name: MEMORY_MIB[name] for name in GUESTS}, DIRTY_PAGES_PER_S)


@pytest.fixture(scope="module")
def libvirt_agents(
    rig: LibvirtHosts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningAgent]]:
    factory = AgentFactory(tmp_path_factory.mktemp("lvcon-agents"))
    yield {
        f"host{name}": factory(f"host{name}", "--driver-option", f"uri={rig[name].uri}", driver="libvirt")
        for name in ("a", "b")
    }
    factory.stop_all()


@pytest.fixture
def host_agents(libvirt_agents: dict[str, RunningAgent]) -> dict[str, RunningAgent]:
    """The conftest's ``fleet`` registers these libvirt hosts as its VSPs (hosta, hostb)."""
    return libvirt_agents


@pytest.fixture(scope="module")
def _libvirt_worker(django_db_setup: Any, redis_url: str) -> Iterator[tuple[str, ManagedProcess]]:
    with worker_on_own_queue("libvirt", 2, MIGRATION_BANDWIDTH_MBPS=FAST_MBPS) as queue_and_worker:
        yield queue_and_worker


@pytest.fixture
def libvirt_worker(_libvirt_worker: tuple[str, ManagedProcess], settings: Any) -> ManagedProcess:
    return route_migrations_to(_libvirt_worker, settings)


def adopted(
    vsps: dict[str, Any], domains: dict[str, str], name: str, host: str = "hosta", **vm_fields: Any
) -> VirtualMachine:
    """The console's VM for the libvirt domain ``name`` on ``host`` (its UUID as ``guest_id``), registered
    Off, then that host's inventory collected once: what libvirt says of the domain is what the console
    shows."""
    vm = make_vm(
        name,
        vsp=vsps[host],
        hardware_status=Registration.HardwareStatus.OFF,
        guest_id=uuid.UUID(domains[name]),
        memory_mib=MEMORY_MIB[name],
        os_type="Linux",
        init_limit_s=INIT_LIMIT_S,
        **vm_fields,
    )
    assert collect_vsp(vsps[host].pk), f"{host}'s agent answered the inventory"
    return vm


def assert_moved(
    rig: LibvirtHosts, connections: dict[str, Any], vm: VirtualMachine, vsps: dict[str, Any]
) -> None:
    """Runnable on hostb only; libvirt runs the domain on b and keeps a's definition shut off (migrated);
    the guest's own memory check passes on b."""
    assert vm.current_vsp == vsps["hostb"]
    assert Registration.objects.get(vm=vm, vsp=vsps["hosta"]).hardware_status == "not_runnable"
    assert state(connections["a"], vm.name) == ("shut off", STOPPED_BY_MIGRATION)
    assert state(connections["b"], vm.name) == ("running", ARRIVED)
    assert keeps_passing(rig, "b", vm.name), "the guest's own memory check on its new host"


def test_an_adopted_domain_migrates_through_the_console_with_its_four_phases(
    rig: LibvirtHosts,
    connections: dict[str, Any],
    domains: dict[str, str],
    fleet: dict[str, Any],
    admin: Any,
    libvirt_worker: ManagedProcess,
) -> None:
    vm = adopted(fleet, domains, "moves")
    assert Registration.objects.get(vm=vm, vsp=fleet["hosta"]).hardware_status == "on"

    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_until, migration, "completed", "aborted", "cancelled", timeout=90)

    assert migration.state == "completed", migration.alert
    assert [row[1] for row in migration.phase_rows()] == [100, 100, 100, 100]
    assert list(migration.events.values_list("to_state", flat=True)) == [
        "queued",
        "init",
        "copy",
        "io_quiesce",
        "frozen",
        "committing",
        "completed",
    ]
    assert migration.bytes_sent > 0 and migration.rounds >= 1
    assert migration.downtime_ms is not None and migration.downtime_ms > 0  # libvirt's completed job's
    assert (migration.source_digest, migration.target_digest) == ("", "")  # none: libvirt checks the stream
    assert_moved(rig, connections, vm, fleet)


def test_a_cancel_during_copy_leaves_the_domain_running_on_its_source(
    rig: LibvirtHosts,
    connections: dict[str, Any],
    domains: dict[str, str],
    fleet: dict[str, Any],
    admin: Any,
    libvirt_worker: ManagedProcess,
) -> None:
    vm = adopted(fleet, domains, "stays", migration_policy=SLOW)
    migration = do_request_migration(vm, fleet["hostb"], admin)
    assert wait_until(lambda: copying(migration), timeout=60), (migration.state, migration.alert)

    do_cancel_migration(migration, admin)
    wait_for_state(wait_until, migration, "cancelled", "aborted", "completed", timeout=60)

    assert (migration.state, migration.failed_phase) == ("cancelled", "copy"), migration.alert
    assert migration.alert.endswith("The VM keeps running on hosta."), migration.alert
    assert vm.current_vsp == fleet["hosta"]
    assert state(connections["a"], "stays") == ("running", BOOTED)
    assert keeps_passing(rig, "a", "stays")
    assert state(connections["b"], "stays") is None  # libvirt dropped the incoming domain


def test_a_cancel_during_libvirts_switchover_completes_the_migration_on_the_target(
    rig: LibvirtHosts,
    connections: dict[str, Any],
    domains: dict[str, str],
    fleet: dict[str, Any],
    admin: Any,
    libvirt_worker: ManagedProcess,
) -> None:
    """An allowed downtime of 600 s: libvirt pauses the guest almost at once and sends its memory while
    it is paused (288 MiB written: seconds here), then commits by itself. A cancel in that switchover
    reaches the source too late (409): the console completes, the guest is the target's, never
    reported on its source."""
    long_switchover = {"preset": "custom", "max_downtime_ms": 600_000}
    vm = adopted(fleet, domains, "late", migration_policy=long_switchover)
    migration = do_request_migration(vm, fleet["hostb"], admin)
    switching = ("io_quiesce", "frozen")  # the console's states once the source reported the pause
    wait_for_state(wait_until, migration, *switching, "committing", "completed", "aborted", timeout=60)
    assert migration.state in switching, "libvirt's switchover ended before the test could cancel in it"

    do_cancel_migration(migration, admin)
    wait_for_state(wait_until, migration, "completed", "aborted", "cancelled", timeout=60)

    assert migration.state == "completed", migration.alert
    assert "keeps running" not in migration.alert
    committing = migration.events.get(to_state="committing").message
    assert "committed the migration itself" in committing, committing
    assert re.search(
        r"could not stop it any more: Cancelled by alice during the (I/O Quiesce|Frozen) phase\.", committing
    ), committing
    assert [row[1] for row in migration.phase_rows()] == [100, 100, 100, 100]
    assert_moved(rig, connections, vm, fleet)


@pytest.fixture
def doomed_worker(django_db_setup: Any, redis_url: str, settings: Any) -> Iterator[ManagedProcess]:
    """A worker of its own for a test that kills it mid-migration."""
    with worker_on_own_queue("libvirt-doomed", 1, MIGRATION_BANDWIDTH_MBPS=FAST_MBPS) as queue_and_worker:
        yield route_migrations_to(queue_and_worker, settings)


@pytest.mark.faults
def test_recovery_of_a_migration_whose_worker_died_rolls_forward_once_libvirt_committed_it(
    rig: LibvirtHosts,
    connections: dict[str, Any],
    domains: dict[str, str],
    libvirt_agents: dict[str, RunningAgent],
    fleet: dict[str, Any],
    admin: Any,
    doomed_worker: ManagedProcess,
) -> None:
    """The worker killed (-9) during Copy: libvirt's job goes on in the source daemon and commits by
    itself. Recovery, which aborts a migration its worker left before the commit (simulated and QEMU
    hosts: ``test_faults``), finds this source switched over and rolls forward instead."""
    vm = adopted(fleet, domains, "orphan")
    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_until, migration, "copy", "aborted", timeout=60)
    source, agent_id = libvirt_agents["hosta"].client, agent_migration_id(migration)

    doomed_worker.kill()
    assert wait_until(lambda: source.snapshot(agent_id).state == "ready", timeout=60)
    assert wait_until(lambda: heartbeat_older_than(migration, 1.5), timeout=15)
    assert recover_migrations(stale_after_s=1) == [migration.pk]
    migration.refresh_from_db()

    assert migration.state == "completed", migration.alert
    committing = migration.events.get(to_state="committing").message
    assert "committed the migration itself" in committing, committing
    assert "the control-plane worker driving it stopped answering" in committing, committing
    assert_moved(rig, connections, vm, fleet)
    assert recover_migrations(stale_after_s=1) == []  # decided once


@pytest.mark.faults
def test_a_source_agent_killed_mid_copy_and_restarted_leaves_the_domain_running_on_its_source(
    rig: LibvirtHosts,
    connections: dict[str, Any],
    domains: dict[str, str],
    admin: Any,
    libvirt_worker: ManagedProcess,
    tmp_path: Path,
) -> None:
    """kill -9 of the source's agent during Copy, started again at once (a service manager): libvirt's
    job runs on in the daemon without it, and the restarted agent, finding its mark on the domain,
    aborts the job before its switchover. The console may not abort a libvirt source before it knows
    how the job ended: it waits for the agent to answer again, which no longer knows the migration, and
    judges by the domain (running there): the migration aborts, the VM keeps running on its source,
    the same boot. Agents of its own: the module's keep running for the other tests."""
    factory = AgentFactory(tmp_path)
    uris = {"lvsrc": rig["a"].uri, "lvdst": rig["b"].uri}
    try:
        agents = {
            name: factory(name, "--driver-option", f"uri={uri}", driver="libvirt")
            for name, uri in uris.items()
        }
        vsps = vsps_for(agents)
        vm = adopted(vsps, domains, "stays", host="lvsrc", migration_policy=SLOW)
        migration = do_request_migration(vm, vsps["lvdst"], admin)
        assert wait_until(lambda: copying(migration), timeout=60), (migration.state, migration.alert)

        source = agents["lvsrc"].process.process
        os.kill(source.pid, signal.SIGKILL)  # the agent alone: libvirt's job is the daemon's
        source.wait(timeout=10)
        restart_agent(factory, agents["lvsrc"], "--driver-option", f"uri={uris['lvsrc']}", driver="libvirt")
        wait_for_state(wait_until, migration, "aborted", "cancelled", "completed", timeout=90)
    finally:
        factory.stop_all()

    assert (migration.state, migration.failed_phase) == ("aborted", "copy"), migration.alert
    assert migration.alert.endswith("The VM keeps running on lvsrc."), migration.alert
    assert vm.current_vsp == vsps["lvsrc"]
    assert state(connections["a"], "stays") == ("running", BOOTED)
    assert keeps_passing(rig, "a", "stays")
    assert state(connections["b"], "stays") is None


def copying(migration: Migration) -> bool:
    migration.refresh_from_db()
    return migration.state == "copy" and migration.bytes_sent > 0
