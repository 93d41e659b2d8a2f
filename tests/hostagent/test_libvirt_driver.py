"""``--driver libvirt`` through the agent's API: real agents on two real libvirt daemons.

``devtools.libvirt_hosts`` runs the two daemons (hosts a and b, see ``test_libvirt_daemons``);
one agent per daemon (``--driver libvirt --driver-option uri=...``), each a real process over
HTTPS. Domains are defined with libvirt directly, as an admin would, never through the agent.
Needs root and libvirt >= 11; skipped loudly otherwise (CI installs it and fails on skips).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agentprotocol import ParamsChange, ProgressSnapshot
from devtools.libvirt_hosts import LibvirtHosts, memwriter_domain_xml
from hostagent.drivers.libvirt.jobs import MigrationJob
from tests.conftest import wait_until
from tests.hostagent.conftest import AgentFactory, RunningAgent, follow, resources, start, unique
from tests.hostagent.test_libvirt_daemons import (
    DIRTY_PAGES_PER_S,
    MEMORY_MIB,
    MISSING,
    SLOW_MBPS,
    boot_on_a,
    connections_to,
    keeps_passing,
    state,
    two_hosts,
)
from tests.hostagent.test_qemu_driver import assert_phases_in_order_without_going_back, copying
from vms.agent_client import AgentRefused

pytestmark = [pytest.mark.libvirt, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

GUESTS = ("moves", "stays")  # booted together, one per migration test
STOPPED_BY_MIGRATION = 4  # libvirt's VIR_DOMAIN_SHUTOFF_MIGRATED


def past_copy(snapshot: ProgressSnapshot) -> bool:
    return snapshot.state not in ("init", "copy")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtHosts]:
    with two_hosts(tmp_path_factory.mktemp("lvdrv")) as hosts:
        yield hosts


@pytest.fixture(scope="module")
def connections(rig: LibvirtHosts) -> dict[str, Any]:
    """The admin's own libvirt connections (virsh's), beside the agents'."""
    return connections_to(rig)


@pytest.fixture(scope="module")
def guests(rig: LibvirtHosts, connections: dict[str, Any]) -> dict[str, str]:
    """The test guests, defined and started on host a with libvirt alone; their UUIDs by name."""
    return boot_on_a(rig, connections["a"], dict.fromkeys(GUESTS, MEMORY_MIB), DIRTY_PAGES_PER_S)


@pytest.fixture(scope="module")
def agents(rig: LibvirtHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningAgent]]:
    factory = AgentFactory(tmp_path_factory.mktemp("lvdrv-agents"))
    yield {
        name: factory(f"lv{name}", "--driver-option", f"uri={rig[name].uri}", driver="libvirt")
        for name in ("a", "b")
    }
    factory.stop_all()


def test_a_domain_defined_outside_the_agent_appears_with_its_disks_and_network_cards(
    connections: dict[str, Any], agents: dict[str, RunningAgent]
) -> None:
    a = connections["a"]
    a.networkDefineXML("<network><name>lab</name><bridge name='mxlvd0' stp='off'/></network>").create()
    pool = a.storagePoolDefineXML(
        "<pool type='dir'><name>images</name><target><path>/var/lib/libvirt/images</path></target></pool>"
    )
    pool.create()
    data = pool.createXML(
        "<volume><name>data.qcow2</name><capacity unit='MiB'>32</capacity>"
        "<target><format type='qcow2'/></target></volume>"
    )
    xml = memwriter_domain_xml("adopted").replace(
        "<memballoon",
        f"""<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
          <source file='{data.path()}'/><target dev='vda' bus='virtio'/></disk>
        <interface type='network'><source network='lab'/><mac address='52:54:00:00:00:01'/>
          <model type='virtio'/></interface>
        <memballoon""",
    )
    domain = a.defineXML(xml)

    agent = agents["a"]
    adopted = agent.guest("adopted")

    assert adopted is not None and adopted.guest_id == domain.UUIDString()
    assert (adopted.memory_mib, adopted.vcpus, adopted.hardware_status) == (256, 1, "off")
    [disk] = adopted.disks
    assert (disk.device, disk.pool, disk.volume, disk.format) == ("vda", "images", "data.qcow2", "qcow2")
    assert disk.virtual_size_bytes == 32 * 1024**2
    [nic] = adopted.nics
    assert (nic.network, nic.mac) == ("lab", "52:54:00:00:00:01")
    found = resources(agent)
    assert "images" in [pool.name for pool in found.pools]
    assert ("lab", "mxlvd0") in [(network.name, network.bridge) for network in found.networks]
    health = agent.client.health()
    assert (health.driver, health.switchover_commits) == ("libvirt", True)
    assert domain.state()[0] == 5  # shut off: the agent read it and changed nothing


def test_a_guest_migrates_live_through_the_agents_with_its_phases_and_runs_only_on_the_target(
    rig: LibvirtHosts, connections: dict[str, Any], guests: dict[str, str], agents: dict[str, RunningAgent]
) -> None:
    a, b = agents["a"], agents["b"]
    guest = a.client.get_guest(guests["moves"])
    migration_id = unique("lvmove")

    start(a, b, guest, migration_id, "required", downtime_ms=300)
    seen: list[ProgressSnapshot] = follow(
        a, migration_id, lambda snapshot: snapshot.state not in ("init", "copy")
    )
    a.client.quiesce(migration_id)
    ready = a.client.freeze(migration_id)

    assert ready.state == "ready", ready
    assert_phases_in_order_without_going_back([*seen, ready])
    assert any(snapshot.state == "copy" and snapshot.bytes_sent > 0 for snapshot in seen), seen
    assert ready.round >= 1 and ready.downtime_ms is not None and ready.downtime_ms > 0
    with pytest.raises(AgentRefused, match="too late") as refused:
        a.client.cancel(migration_id)
    assert refused.value.status == 409
    assert wait_until(lambda: b.client.snapshot(migration_id).state == "ready", timeout=30)
    assert b.client.resume(migration_id).state == "completed"
    assert a.client.release(migration_id).state == "released"

    assert b.client.get_guest(guest.guest_id).hardware_status == "on"
    assert keeps_passing(rig, "b", "moves")
    assert a.client.get_guest(guest.guest_id).hardware_status == "not_runnable"
    with pytest.raises(AgentRefused, match="migrated to another host"):
        a.client.start_guest(guest.guest_id)
    assert state(connections["a"], "moves") == ("shut off", STOPPED_BY_MIGRATION)


def test_steering_changes_the_running_job_and_a_cancel_in_copy_leaves_the_guest_running_on_its_source(
    rig: LibvirtHosts, connections: dict[str, Any], guests: dict[str, str], agents: dict[str, RunningAgent]
) -> None:
    a, b = agents["a"], agents["b"]
    guest = a.client.get_guest(guests["stays"])
    migration_id = unique("lvcancel")
    domain = connections["a"].lookupByUUIDString(guest.guest_id)
    measured = a.client.dirty_rate(guest.guest_id, 1)
    assert measured.dirty_rate_bytes_s >= 1024**2, measured  # memwriter writes ~8 MB/s

    start(a, b, guest, migration_id, "off", downtime_ms=50, bandwidth_mbps=SLOW_MBPS)
    follow(a, migration_id, copying)
    steered = a.client.change_params(migration_id, ParamsChange(downtime_ms=400, bandwidth_mbps=24))
    assert steered.allowed_downtime_ms == 400
    assert (domain.migrateGetMaxDowntime(), domain.migrateGetMaxSpeed()) == (400, 3)  # ms, MiB/s
    with pytest.raises(AgentRefused, match="auto-converge"):
        a.client.change_params(migration_id, ParamsChange(auto_converge=True))
    cancelled = a.client.cancel(migration_id)
    b.client.discard(migration_id)

    assert (cancelled.state, cancelled.failed_phase) == ("cancelled", "copy"), cancelled
    assert a.client.get_guest(guest.guest_id).hardware_status == "on"
    assert state(connections["a"], "stays") == ("running", 1)  # the same boot: never stopped
    assert keeps_passing(rig, "a", "stays")
    assert b.guest("stays") is None or b.guest("stays").hardware_status == "off"


def test_a_cancel_right_after_the_start_stops_the_migration_before_libvirt_began_it(
    rig: LibvirtHosts, connections: dict[str, Any], guests: dict[str, str], agents: dict[str, RunningAgent]
) -> None:
    """In Init the daemon may not have the job yet (an abort of no job does nothing): the cancel holds."""
    a, b = agents["a"], agents["b"]
    guest = a.client.get_guest(guests["stays"])
    migration_id = unique("lvinit")

    started = start(a, b, guest, migration_id, "off")
    cancelled = a.client.cancel(migration_id)
    b.client.discard(migration_id)

    assert started.state == "init"
    assert cancelled.state == "cancelled", cancelled
    assert state(connections["a"], "stays") == ("running", 1)
    assert MigrationJob.attach(connections["a"], "stays") is None
    assert keeps_passing(rig, "a", "stays")


@pytest.mark.faults
def test_an_agent_killed_mid_copy_comes_back_and_the_guest_runs_on_its_source(
    rig: LibvirtHosts,
    connections: dict[str, Any],
    guests: dict[str, str],
    agents: dict[str, RunningAgent],
    agent_factory: AgentFactory,
) -> None:
    """kill -9 of the source agent: libvirt's job runs on in the daemon (P2P); the restarted agent finds
    its own mark on the domain, aborts the job before its switchover, and the guest runs on here."""
    a, b = agents["a"], agents["b"]
    guest = a.client.get_guest(guests["stays"])  # back on host a after the cancel above
    migration_id = unique("lvkill")
    start(a, b, guest, migration_id, "off", bandwidth_mbps=SLOW_MBPS)
    follow(a, migration_id, copying)

    a.kill()
    assert MigrationJob.attach(connections["a"], "stays") is not None  # the daemon's job outlived it
    restarted = agent_factory("lva", "--driver-option", f"uri={rig['a'].uri}", driver="libvirt")

    assert MigrationJob.attach(connections["a"], "stays") is None
    assert state(connections["a"], "stays") == ("running", 1)
    assert restarted.client.get_guest(guest.guest_id).hardware_status == "on"
    assert keeps_passing(rig, "a", "stays")
    assert "interrupted by the agent's restart: cancelled" in restarted.log()
    assert b.client.discard(migration_id).state == "discarded"
    assert b.guest("stays") is None or b.guest("stays").hardware_status == "off"


@pytest.mark.faults
def test_a_cut_link_mid_copy_ends_the_migration_and_the_guest_runs_on_its_source(
    rig: LibvirtHosts,
    connections: dict[str, Any],
    guests: dict[str, str],
    agents: dict[str, RunningAgent],
    agent_factory: AgentFactory,
) -> None:
    """libvirt's job only stalls when the link goes (no time-out of its own): the driver's watchdog
    (``stall_s``, 3 s here) aborts it, says why, and the guest runs on at the source."""
    source = agent_factory(
        "lvcut", "--driver-option", f"uri={rig['a'].uri}", "--driver-option", "stall_s=3", driver="libvirt"
    )
    b = agents["b"]
    guest = source.client.get_guest(guests["stays"])
    migration_id = unique("lvcut")
    start(source, b, guest, migration_id, "off", bandwidth_mbps=SLOW_MBPS)
    follow(source, migration_id, copying)

    rig.cut_link("a")
    try:
        ended = follow(source, migration_id, past_copy)[-1]
    finally:
        rig.restore_link("a")

    assert (ended.state, ended.failure_kind, ended.failed_phase) == ("aborted", "unreachable", "copy"), ended
    assert ended.error is not None and "moved nothing for 3 s" in ended.error
    assert state(connections["a"], "stays") == ("running", 1)
    assert keeps_passing(rig, "a", "stays")
    b.client.discard(migration_id)
