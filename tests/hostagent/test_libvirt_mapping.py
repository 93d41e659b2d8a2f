"""The libvirt driver's pure parts: domain XML read, a policy onto libvirt's flags and parameters, statistics.

No daemon here (``test_libvirt_daemons.py`` has two real ones); the flag mapping needs the binding's
constants, so it is skipped (loudly) without ``libvirt-python``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from hostagent.drivers.libvirt.connection import libvirt_missing
from hostagent.drivers.libvirt.driver import guest_info, hardware_status
from hostagent.drivers.libvirt.inventory import DomainXmlError, parse_domain_xml
from hostagent.drivers.libvirt.jobs import (
    MigrationPolicy,
    MigrationRefused,
    bandwidth_mib_s,
    migration_call,
    snapshot_from_stats,
)

DOMAIN = """<domain type='kvm' id='3'>
  <name>db-01</name>
  <uuid>0d7b5f42-58d1-4d0e-9a41-2b7f3c2e9f10</uuid>
  <memory unit='KiB'>4194304</memory>
  <currentMemory unit='KiB'>2097152</currentMemory>
  <vcpu placement='static'>4</vcpu>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/db-01.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='vms/db-01-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default' bridge='virbr0'/>
      <model type='virtio'/>
    </interface>
    <interface type='direct'>
      <mac address='52:54:00:aa:bb:cd'/>
      <source dev='eth1' mode='bridge'/>
    </interface>
  </devices>
</domain>"""


def test_it_reads_memory_vcpus_disks_and_network_cards_from_a_domain_xml() -> None:
    domain = parse_domain_xml(DOMAIN)

    assert (domain.name, domain.domain_type, domain.vcpus) == ("db-01", "kvm", 4)
    assert (domain.memory_mib, domain.max_memory_mib) == (2048, 4096)
    root, data, cdrom = domain.disks
    assert (root.target, root.source_type, root.path, root.format) == (
        "vda",
        "file",
        "/var/lib/libvirt/images/db-01.qcow2",
        "qcow2",
    )
    assert (data.source_type, data.path) == ("network", "rbd:vms/db-01-data")
    assert (cdrom.device, cdrom.path, cdrom.read_only) == ("cdrom", None, True)
    default, direct = domain.nics
    assert (default.kind, default.network, default.bridge, default.mac) == (
        "network",
        "default",
        "virbr0",
        "52:54:00:aa:bb:cc",
    )
    assert (direct.kind, direct.network, direct.bridge) == ("direct", None, None)


@pytest.mark.parametrize(
    ("xml", "words"),
    [
        ("<domain><name>x</name>", "not XML"),
        ("<network><name>x</name></network>", "not a domain"),
        ("<domain type='kvm'><name>x</name><vcpu>1</vcpu></domain>", "needs <name>, <uuid>, <memory>"),
        (DOMAIN.replace("unit='KiB'>4194304", "unit='parsecs'>4"), "unknown size unit"),
    ],
)
def test_it_refuses_xml_that_is_not_a_whole_domain(xml: str, words: str) -> None:
    with pytest.raises(DomainXmlError, match=words):
        parse_domain_xml(xml)


@pytest.mark.parametrize(("mbps", "mib_s"), [(8.4, 2), (80, 10), (0.001, 1), (1000, 120)])
def test_a_bandwidth_cap_is_rounded_up_to_whole_mib_per_second_never_to_no_cap(
    mbps: float, mib_s: int
) -> None:
    assert bandwidth_mib_s(mbps) == mib_s


@pytest.mark.parametrize(
    "policy",
    [
        {"downtime_ms": 0},
        {"bandwidth_mbps": 0},
        {"streams": 256},
        {"throttle_initial_pct": 100},
        {"encryption": "maybe"},
        {"migrate_disks": ("vda", "../etc")},
    ],
)
def test_a_policy_out_of_bounds_is_refused_with_its_field_named(policy: dict) -> None:
    with pytest.raises(MigrationRefused, match=next(iter(policy))):
        MigrationPolicy(**policy)


@pytest.mark.skipif(libvirt_missing() is not None, reason=f"LIBVIRT BINDING MISSING: {libvirt_missing()}")
def test_a_policy_maps_onto_libvirts_flags_and_parameters() -> None:
    import libvirt

    plain_flags, plain_params = migration_call(MigrationPolicy(encryption="off"))
    flags, params = migration_call(
        MigrationPolicy(
            bandwidth_mbps=800,
            auto_converge=True,
            throttle_initial_pct=60,
            throttle_increment_pct=20,
            streams=4,
            migrate_disks=("vda",),
            migrate_uri="tcp://198.18.0.2",
        )
    )

    base = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
    assert (plain_flags, plain_params) == (base, {})
    assert not flags & libvirt.VIR_MIGRATE_UNDEFINE_SOURCE  # the source's definition stays
    extra = libvirt.VIR_MIGRATE_AUTO_CONVERGE | libvirt.VIR_MIGRATE_PARALLEL
    extra |= libvirt.VIR_MIGRATE_TLS | libvirt.VIR_MIGRATE_NON_SHARED_DISK
    assert flags == base | extra
    assert params == {
        "bandwidth": 96,
        "auto_converge.initial": 60,
        "auto_converge.increment": 20,
        "parallel.connections": 4,
        "migrate_disks": ["vda"],
        "migrate_uri": "tcp://198.18.0.2",
    }


def test_job_statistics_become_a_snapshot_in_bytes_with_the_real_downtime_only_when_completed() -> None:
    stats = {
        "type": 2,
        "time_elapsed": 4265,
        "memory_total": 268828672,
        "memory_processed": 259285835,
        "memory_remaining": 61235200,
        "memory_dirty_rate": 2000,
        "memory_iteration": 3,
        "memory_bps": 82462351,
        "downtime": 300,
    }

    running = snapshot_from_stats(stats, "copy", round_seen=4)
    completed = snapshot_from_stats(stats, "completed")

    assert running.dirty_rate_bytes_s == 2000 * 4096  # pages/s times libvirt's default page size
    assert running.round == 4  # a MIGRATION_ITERATION event ahead of the polled statistics
    assert (running.expected_downtime_ms, running.downtime_ms) == (300, None)
    assert (completed.expected_downtime_ms, completed.downtime_ms, completed.round) == (None, 300, 3)
    assert (running.memory_remaining_bytes, running.throughput_bytes_s) == (61235200, 82462351)


def test_a_domain_becomes_a_guest_and_what_the_protocol_cannot_say_is_named_not_dropped() -> None:
    """The agent's view of a domain: a disk in a pool is a disk; a file in no pool, a Ceph image and a
    CD-ROM are named in ``workload`` (the protocol's disk is a pool's volume); a macvtap card too."""
    read = parse_domain_xml(DOMAIN)
    root, data, cdrom = read.disks
    pooled = replace(
        root, pool="default", volume="db-01.qcow2", capacity_bytes=20 * 1024**3, allocation_bytes=1
    )
    domain = replace(read, disks=(pooled, data, cdrom), state="running", state_reason=1)

    guest = guest_info(domain)

    assert (guest.guest_id, guest.name, guest.memory_mib, guest.vcpus) == (
        "0d7b5f42-58d1-4d0e-9a41-2b7f3c2e9f10",
        "db-01",
        2048,
        4,
    )
    assert (guest.hardware_status, guest.os_status) == ("on", "up")
    [disk] = guest.disks
    assert (disk.device, disk.pool, disk.volume, disk.format, disk.virtual_size_bytes) == (
        "vda",
        "default",
        "db-01.qcow2",
        "qcow2",
        20 * 1024**3,
    )
    assert guest.workload["disks_not_shown"] == ["vdb", "sda"]
    [nic] = guest.nics
    assert (nic.network, nic.mac, nic.model) == ("default", "52:54:00:aa:bb:cc", "virtio")
    assert guest.workload["nics_not_shown"] == ["52:54:00:aa:bb:cd"]


@pytest.mark.parametrize(
    ("state", "reason", "hardware"),
    [("running", 1, "on"), ("paused", 2, "on"), ("shut off", 1, "off"), ("shut off", 4, "not_runnable")],
)
def test_a_domain_that_migrated_away_is_not_runnable_here(state: str, reason: int, hardware: str) -> None:
    domain = replace(parse_domain_xml(DOMAIN), state=state, state_reason=reason)

    assert hardware_status(domain) == hardware
