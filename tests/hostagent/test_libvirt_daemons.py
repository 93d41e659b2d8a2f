"""Two real libvirt daemons on this machine as two hosts, and the libvirt driver's groundwork against them.

``devtools.libvirt_hosts`` runs each ``libvirtd`` in mount, network and UTS namespaces of its
own (its own state, host UUID, address and socket). Guests are the QEMU test guest (TCG), booted
by libvirt from each host's /var/lib/libvirt/boot; memwriter on their serial console (a file in the
host's own /var/log/libvirt) says whether every page of their memory is still right. Nothing here
is faked. Needs root and libvirt >= 11 (``scripts/install_libvirt.sh``); skipped loudly otherwise
(CI installs it and fails on skips).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from devtools.libvirt_hosts import LibvirtHosts, libvirt_hosts, memwriter_domain_xml
from devtools.libvirt_hosts import libvirt_missing as rig_missing
from hostagent.drivers.libvirt.connection import (
    LibvirtUnavailable,
    host_identity,
    libvirt_missing,
    open_connection,
)
from hostagent.drivers.libvirt.inventory import list_domains
from hostagent.drivers.libvirt.jobs import MigrationJob, MigrationPolicy
from hostagent.drivers.qemu import DEFAULT_IMAGES
from tests.conftest import BASE_DIR, wait_until


def _missing() -> str | None:
    reason = rig_missing() or libvirt_missing()
    if reason is None and not (DEFAULT_IMAGES / "vmlinuz").is_file():
        reason = "no test guest in guest-images/; run scripts/build_test_guest.sh"
    return f"LIBVIRT TESTS SKIPPED: {reason}" if reason else None


MISSING = _missing()
pytestmark = [pytest.mark.libvirt, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

GUESTS = ("moved", "steered", "orphaned", "recovered")  # booted together, one per migration test
MEMORY_MIB = 256
DIRTY_PAGES_PER_S = 2000  # 8 MB/s of writes: a pass of a few rounds converges at full speed
SLOW_MBPS = 16  # 2 MiB/s: the first pass alone would take two minutes, time to act during Copy
STOPPED_BY_MIGRATION = 4  # libvirt's VIR_DOMAIN_SHUTOFF_MIGRATED


def keeps_passing(rig: LibvirtHosts, host: str, name: str) -> bool:
    """The guest runs on ``host``: one more of its memory checks passes from now on, none failed."""
    passed_before, _ = rig[host].memory_checks(name)
    wait_until(lambda: rig[host].memory_checks(name)[0] > passed_before, timeout=60, interval=0.5)
    passed, failed = rig[host].memory_checks(name)
    return passed > passed_before and failed == 0


def state(connection: Any, name: str) -> tuple[str, int] | None:
    """(state, reason) of domain ``name`` on a host, or None when the host has no such domain."""
    domains = {domain.name: domain for domain in list_domains(connection)}
    return (domains[name].state, domains[name].state_reason) if name in domains else None


@contextmanager
def two_hosts(root: Path) -> Iterator[LibvirtHosts]:
    """Hosts a and b (``libvirt_hosts`` under ``root``) with the QEMU test guest's kernel and initramfs
    in each one's /var/lib/libvirt/boot; stopped on exit."""
    with libvirt_hosts(root, ["a", "b"]) as hosts:
        hosts.install_boot_files(DEFAULT_IMAGES / "vmlinuz", DEFAULT_IMAGES / "initramfs.cpio.gz")
        yield hosts


def connections_to(rig: LibvirtHosts) -> dict[str, Any]:
    """Connections to both daemons, as an admin's virsh or the agent on each host would hold them."""
    return {name: open_connection(rig[name].uri) for name in ("a", "b")}


def boot_on_a(
    rig: LibvirtHosts, connection: Any, memory_mib: Mapping[str, int], dirty_pages_per_s: int
) -> dict[str, str]:
    """Define and start a memwriter domain per name of ``memory_mib`` (its memory in MiB) on host a
    through ``connection``, with libvirt alone; return once every one passed a memory check. Their
    UUIDs by name; AssertionError naming a guest that did not boot within 120 s."""
    ids = {}
    for name, memory in memory_mib.items():
        domain = connection.defineXML(memwriter_domain_xml(name, memory, dirty_pages_per_s))
        domain.create()
        ids[name] = domain.UUIDString()
    for name in memory_mib:
        booted = wait_until(lambda name=name: rig["a"].memory_checks(name)[0] >= 1, timeout=120, interval=0.5)
        assert booted, f"guest {name} did not boot: {rig['a'].serial(name)[-1000:]}"
    return ids


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtHosts]:
    with two_hosts(tmp_path_factory.mktemp("libvirt")) as hosts:
        yield hosts


@pytest.fixture(scope="module")
def hosts(rig: LibvirtHosts) -> dict[str, Any]:
    """Connections to both daemons, as the agent on each host would hold them."""
    return connections_to(rig)


@pytest.fixture(scope="module")
def guests(rig: LibvirtHosts, hosts: dict[str, Any]) -> tuple[str, ...]:
    """The test guests, defined and started on host a outside anything of ours; booted together."""
    boot_on_a(rig, hosts["a"], dict.fromkeys(GUESTS, MEMORY_MIB), DIRTY_PAGES_PER_S)
    return GUESTS


def test_each_daemon_is_a_host_of_its_own(rig: LibvirtHosts, hosts: dict[str, Any]) -> None:
    a, b = host_identity(hosts["a"]), host_identity(hosts["b"])
    assert (a.hostname, b.hostname) == ("a", "b")
    assert a.host_uuid == rig["a"].host_uuid and b.host_uuid == rig["b"].host_uuid
    assert a.host_uuid != b.host_uuid  # else libvirt refuses a migration "to the same host"
    assert int(a.libvirt_version.split(".")[0]) >= 11 and "qemu" in a.domain_types


def test_it_reads_a_domain_defined_outside_with_its_disks_and_network_cards(hosts: dict[str, Any]) -> None:
    a = hosts["a"]
    network = a.networkDefineXML("<network><name>lab</name><bridge name='mxlab0' stp='off'/></network>")
    network.create()  # no <ip>: no dnsmasq, only a bridge inside host a's network namespace
    pool = a.storagePoolDefineXML(
        "<pool type='dir'><name>images</name><target><path>/var/lib/libvirt/images</path></target></pool>"
    )
    pool.create()
    data = pool.createXML(
        "<volume><name>data.qcow2</name><capacity unit='MiB'>32</capacity>"
        "<target><format type='qcow2'/></target></volume>"
    )
    pool.createXML("<volume><name>scratch.raw</name><capacity unit='MiB'>8</capacity></volume>")
    xml = memwriter_domain_xml("adopted").replace(
        "<memballoon",
        f"""<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
          <source file='{data.path()}'/><target dev='vda' bus='virtio'/></disk>
        <disk type='volume' device='disk'><driver name='qemu' type='raw'/>
          <source pool='images' volume='scratch.raw'/><target dev='vdb' bus='virtio'/><shareable/></disk>
        <interface type='network'><source network='lab'/><mac address='52:54:00:00:00:01'/>
          <model type='virtio'/></interface>
        <interface type='bridge'><source bridge='br-admin'/><mac address='52:54:00:00:00:02'/></interface>
        <memballoon""",
    )
    a.defineXML(xml)

    adopted = next(domain for domain in list_domains(a) if domain.name == "adopted")

    assert (adopted.memory_mib, adopted.vcpus, adopted.persistent) == (256, 1, True)
    vda, vdb = adopted.disks
    assert (vda.target, vda.pool, vda.volume, vda.format) == ("vda", "images", "data.qcow2", "qcow2")
    assert vda.capacity_bytes == 32 * 1024**2 and vda.allocation_bytes is not None
    assert (vdb.pool, vdb.volume, vdb.shared) == ("images", "scratch.raw", True)
    assert vdb.capacity_bytes == 8 * 1024**2
    assert vdb.path == "/var/lib/libvirt/images/scratch.raw"  # from the pool: the XML names only the volume
    lab, admin = adopted.nics
    assert (lab.kind, lab.network, lab.bridge, lab.mac) == ("network", "lab", "mxlab0", "52:54:00:00:00:01")
    assert (admin.kind, admin.network, admin.bridge) == ("bridge", None, "br-admin")
    assert adopted.state == "shut off"  # reading changed nothing: still only defined


def test_it_migrates_a_running_guest_live_and_its_memory_checks_pass_on_the_target(
    rig: LibvirtHosts, hosts: dict[str, Any], guests: tuple[str, ...]
) -> None:
    """Over QEMU's TLS (the encryption policy "required"), with libvirt's own figures all the way."""
    name = "moved"
    job = MigrationJob.start(hosts["a"], name, rig["b"].uri, MigrationPolicy(encryption="required"))
    seen = list(job.snapshots(interval_s=0.1))

    final = seen[-1]
    assert final.stage == "completed", final.error
    order = ["init", "copy", "switchover", "completed"]
    positions = [order.index(snapshot.stage) for snapshot in seen]
    assert positions == sorted(positions) and "copy" in [snapshot.stage for snapshot in seen]
    copying = [snapshot for snapshot in seen if snapshot.stage == "copy"]
    assert copying[0].memory_total_bytes >= MEMORY_MIB * 1024**2
    assert max(snapshot.memory_processed_bytes for snapshot in copying) > 0
    assert [snapshot.round for snapshot in seen] == sorted(snapshot.round for snapshot in seen)
    assert final.round >= 2  # the guest dirtied pages during the first pass: more passes followed
    assert final.downtime_ms is not None and final.downtime_ms > 0
    assert final.source_running is False
    assert state(hosts["b"], name) == ("running", 2)  # running, reason "migrated"
    assert keeps_passing(rig, "b", name)
    # Left defined but not started on the source: one runnable copy, the other one only a definition.
    assert state(hosts["a"], name) == ("shut off", STOPPED_BY_MIGRATION)


def test_it_steers_the_running_job_and_an_abort_leaves_the_guest_running_on_its_source(
    rig: LibvirtHosts, hosts: dict[str, Any], guests: tuple[str, ...]
) -> None:
    name = "steered"
    policy = MigrationPolicy(downtime_ms=50, bandwidth_mbps=SLOW_MBPS, encryption="off")
    job = MigrationJob.start(hosts["a"], name, rig["b"].uri, policy)
    copying = wait_until(lambda: job.snapshot().memory_processed_bytes > 0, timeout=60)
    assert copying, job.snapshot()
    assert job.limits() == (50, 2)

    job.set_downtime(400)
    job.set_bandwidth(80)  # Mbit/s: 10 MiB/s in libvirt's unit
    assert job.limits() == (400, 10)
    processed = job.snapshot().memory_processed_bytes
    assert wait_until(lambda: job.snapshot().memory_processed_bytes > processed + 10 * 1024**2, timeout=60)

    job.abort()
    final = job.wait(timeout=60)

    assert final.stage == "cancelled" and final.source_running is True
    assert state(hosts["a"], name) == ("running", 1)  # still the boot that ran before: never stopped
    assert state(hosts["b"], name) in (None, ("shut off", 6))  # nothing, or the dropped incoming copy
    assert keeps_passing(rig, "a", name)


DRIVER = """
import sys, time
from hostagent.drivers.libvirt.connection import open_connection
from hostagent.drivers.libvirt.jobs import MigrationJob, MigrationPolicy
source, target, name, mbps = sys.argv[1:]
job = MigrationJob.start(open_connection(source), name, target,
                         MigrationPolicy(bandwidth_mbps=float(mbps), encryption="off"))
for snapshot in job.snapshots():
    print(snapshot.stage, snapshot.memory_processed_bytes, flush=True)
"""


@pytest.mark.faults
def test_a_migration_outlives_the_killed_process_that_started_it(
    rig: LibvirtHosts, hosts: dict[str, Any], guests: tuple[str, ...]
) -> None:
    """Peer-to-peer: the source daemon runs the job, the caller only waits; kill -9 it mid-Copy."""
    name = "orphaned"
    starter = subprocess.Popen(
        [sys.executable, "-c", DRIVER, rig["a"].uri, rig["b"].uri, name, str(SLOW_MBPS)],
        cwd=BASE_DIR, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert starter.stdout is not None
    lines: list[str] = []  # what it printed so far: "<stage> <memory processed>" per snapshot
    threading.Thread(target=lambda: lines.extend(iter(starter.stdout.readline, "")), daemon=True).start()

    def copying() -> bool:
        return any(line.startswith("copy") and int(line.split()[1]) > 0 for line in lines)

    try:
        assert wait_until(copying, timeout=60), lines
    finally:
        starter.send_signal(signal.SIGKILL)
        starter.wait(timeout=10)

    job = MigrationJob.attach(hosts["a"], name)  # what a restarted agent finds
    assert job is not None, "the daemon dropped the job with its caller"
    assert job.snapshot().stage == "copy"
    job.set_bandwidth(None)  # steered by another process than the one that started it
    final = job.wait(timeout=120)

    assert final.stage == "completed" and final.source_running is False
    assert state(hosts["b"], name) == ("running", 2)
    assert state(hosts["a"], name) == ("shut off", STOPPED_BY_MIGRATION)
    assert keeps_passing(rig, "b", name)


@pytest.mark.faults
def test_a_source_daemon_killed_mid_copy_comes_back_with_the_guest_still_running_there(
    rig: LibvirtHosts, hosts: dict[str, Any], guests: tuple[str, ...]
) -> None:
    """libvirtd dies (kill -9), not the guest: QEMU is no child of it. Restarted, it finds the
    outgoing migration cut short, cancels it and lets the guest run on; the target dropped its copy
    when the source daemon's connection closed."""
    name = "recovered"
    job = MigrationJob.start(
        hosts["a"], name, rig["b"].uri, MigrationPolicy(bandwidth_mbps=SLOW_MBPS, encryption="off")
    )
    assert wait_until(lambda: job.snapshot().memory_processed_bytes > 0, timeout=60), job.snapshot()
    qemu_pid = rig["a"].qemu_pid(name)

    os.kill(rig["a"].daemon_pid() or 0, signal.SIGKILL)

    with pytest.raises(LibvirtUnavailable, match="outcome is unknown"):
        job.wait(timeout=30)
    assert qemu_pid is not None and rig["a"].qemu_pid(name) == qemu_pid  # not dead with its daemon
    rig.start_daemon(rig["a"])
    rig.wait_ready(rig["a"])
    hosts["a"] = open_connection(
        rig["a"].uri
    )  # the old connection died with the daemon (for later tests too)
    assert MigrationJob.attach(hosts["a"], name) is None
    assert state(hosts["a"], name) == ("running", 1)
    assert state(hosts["b"], name) is None
    assert rig["a"].qemu_pid(name) == qemu_pid  # the same QEMU: adopted again, not restarted
    assert keeps_passing(rig, "a", name)


def test_the_rig_refuses_a_root_too_long_for_a_socket_and_a_bad_host_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too long"):
        LibvirtHosts(tmp_path / ("x" * 90), ["a"])
    with pytest.raises(ValueError, match="host name"):
        LibvirtHosts(tmp_path, ["A b"])
