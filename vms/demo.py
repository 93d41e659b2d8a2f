"""The demo fleet: a few VSPs in two host groups and guests in every state the General tab can show."""

from __future__ import annotations

import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import transaction

from vms.agent_client import certificate_fingerprint
from vms.demo_storage import DEMO_DISK_BYTES, DEMO_GUEST_NETWORK, DEMO_POOL, DEMO_POOL_IDENTITY
from vms.models import VSP, HostGroup, PairEncryption, Registration, VirtualMachine

OS = VirtualMachine.OSStatus
BOOT = VirtualMachine.BootAttribute
HW = Registration.HardwareStatus


@dataclass(frozen=True)
class DemoHost:
    name: str
    migration_enabled: bool
    licensed: bool
    memory_mib: int
    cpus: int
    processor_model: str


@dataclass(frozen=True)
class DemoGuest:
    name: str
    host: str
    memory_mib: int
    vcpus: int
    os_type: str
    os_status: str
    hardware_status: str
    boot: str = BOOT.AUTO
    kind: str = VirtualMachine.Kind.VM
    online_migration_enabled: bool = True
    dirty_pages_per_s: int = 500  # what its workload writes (4 KiB pages a second)
    policy: tuple[
        tuple[str, Any], ...
    ] = ()  # its default migration policy's settings (as the policy form takes them)


# vsp1, vsp2: enabled and licensed; vsp3: enabled, not licensed; vsp4: disabled, licensed.
HOSTS = [
    DemoHost("vsp1", True, True, 16384, 8, "Gold 6338"),
    DemoHost("vsp2", True, True, 16384, 8, "Gold 6338"),
    DemoHost("vsp3", True, False, 8192, 4, "Silver 4314"),
    DemoHost("vsp4", False, True, 8192, 4, "Silver 4314"),
]

GUESTS = [
    DemoGuest("web01", "vsp1", 512, 1, "Debian 12", OS.UP, HW.ON),
    DemoGuest("web02", "vsp1", 512, 1, "Debian 12", OS.UP, HW.ON),
    DemoGuest("db01", "vsp1", 4096, 4, "Red Hat Enterprise Linux 9", OS.UP, HW.ON),
    # The busy one: it writes ~12 MB/s and its migrations are capped at 10 MB/s (they share a slow
    # link), so the migrate dialog warns that it will not converge under its policy, and once started
    # anyway the page warns before its limit and offers the rescues (throttle, a longer downtime,
    # switch over now). Its working set (10 s of writes, ~120 MiB) keeps the demo's memory small.
    DemoGuest(
        "reports01",
        "vsp2",
        512,
        2,
        "Debian 12",
        OS.UP,
        HW.ON,
        dirty_pages_per_s=3000,
        policy=(("preset", "custom"), ("bandwidth_cap_mb_s", 10)),
    ),
    DemoGuest("build01", "vsp1", 1024, 2, "Ubuntu 24.04", OS.DOWN, HW.OFF, BOOT.MANUAL),
    DemoGuest("batch01", "vsp2", 2048, 2, "HP-UX 11i v3", OS.UP, HW.ON, online_migration_enabled=False),
    DemoGuest("cache01", "vsp2", 256, 1, "Alpine Linux 3.20", OS.INITIALIZING, HW.ON),
    DemoGuest("mail01", "vsp2", 1024, 2, "Debian 12", OS.UP, HW.ON),
    DemoGuest("test01", "vsp2", 128, 1, "FreeBSD 14", OS.IN_EFI, HW.ON, BOOT.MANUAL),
    DemoGuest("ldap01", "vsp3", 512, 1, "Red Hat Enterprise Linux 9", OS.UP, HW.ON),
    DemoGuest("legacy01", "vsp3", 1024, 1, "HP-UX 11i v2", OS.DOWN, HW.OFF, BOOT.MANUAL),
    DemoGuest("monitor01", "vsp4", 768, 1, "Debian 12", OS.UP, HW.ON),
    DemoGuest("backup01", "vsp4", 2048, 2, "Ubuntu 24.04", OS.DOWN, HW.OFF),
    DemoGuest("vpar-erp", "vsp1", 4096, 4, "HP-UX 11i v3", OS.UP, HW.ON, kind=VirtualMachine.Kind.VPAR),
    DemoGuest("vpar-dw", "vsp3", 2048, 2, "HP-UX 11i v3", OS.DOWN, HW.OFF, kind=VirtualMachine.Kind.VPAR),
]

# Host groups (who sees and uses which VSP, see docs/permissions.md): the demo's 'viewer' is a
# viewer of both; a user given a role in only one of them sees only its VSPs and their guests.
DEMO_GROUPS = {
    "Production": ("vsp1", "vsp2"),
    "Lab": ("vsp3", "vsp4"),
}
# A VSP in this group (where an upgrade put every VSP that existed before host groups) or in none
# is moved to its demo group; one an admin moved elsewhere stays there.
UPGRADE_GROUP = "Default"


def demo_host_groups() -> dict[str, HostGroup]:
    """The demo's host groups by name, created if missing."""
    return {name: HostGroup.objects.get_or_create(name=name)[0] for name in DEMO_GROUPS}


# mail01 migrated from vsp1 to vsp2: its leftover configuration on vsp1 is Not Runnable, set by Migrate.
MIGRATED_COPY = ("mail01", "vsp1", "guest migrated to VSP vsp2")


def read_or_create_secret(secrets_dir: Path, host_name: str) -> str:
    """The agent secret shared with the host agent through ``{secrets_dir}/{name}.secret`` (mode 600)."""
    path = secrets_dir / f"{host_name}.secret"
    if path.exists():
        return path.read_text().strip()
    secrets_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")
    return secret


@transaction.atomic
def create_demo_fleet(
    agents_base_port: int, secrets_dir: Path, pki_dir: Path | None = None, data_plane: str = "required"
) -> list[str]:
    """Create or update the demo fleet; running it again changes nothing but the agents' addresses.

    ``pki_dir`` (``devtools.pki``'s layout, ``<vsp>.pem`` per agent): the agents serve HTTPS and
    each VSP registers its agent's certificate fingerprint (SHA-256). ``data_plane`` "off" sets
    every pair's data-plane encryption policy to off (a trusted migration network); "required" (also
    for QEMU hosts, whose driver encrypts with QEMU's migration TLS) removes the rows an earlier
    "off" run left, so the default policy applies again.
    """
    hosts = {
        host.name: upsert_host(host, index, agents_base_port, secrets_dir, pki_dir)
        for index, host in enumerate(HOSTS)
    }
    names = sorted(hosts)
    for position, first in enumerate(names):
        for second in names[position + 1 :]:
            low, high = sorted((hosts[first], hosts[second]), key=lambda vsp: vsp.pk)
            if data_plane == "off":
                PairEncryption.objects.update_or_create(
                    vsp_a=low,
                    vsp_b=high,
                    defaults={"encryption": "off", "reason": "demo QEMU hosts on loopback"},
                )
            else:
                PairEncryption.objects.filter(
                    vsp_a=low, vsp_b=high, reason="demo QEMU hosts on loopback"
                ).delete()
    for group_name, group in demo_host_groups().items():
        for vsp_name in DEMO_GROUPS[group_name]:
            vsp = hosts[vsp_name]
            if vsp.group is None or vsp.group.name == UPGRADE_GROUP:
                vsp.group = group
                vsp.save(update_fields=["group"])
    for guest in GUESTS:
        upsert_guest(guest, hosts[guest.host])
    vm_name, vsp_name, reason = MIGRATED_COPY
    Registration.objects.get_or_create(
        vm=VirtualMachine.objects.get(name=vm_name),
        vsp=hosts[vsp_name],
        defaults={
            "hardware_status": HW.NOT_RUNNABLE,
            "not_runnable_set_by": Registration.SetBy.MIGRATE,
            "not_runnable_reason": reason,
        },
    )
    return [f"{vsp.name}: agent {vsp.agent_url}" for vsp in hosts.values()]


def upsert_host(
    host: DemoHost, index: int, agents_base_port: int, secrets_dir: Path, pki_dir: Path | None = None
) -> VSP:
    certificate = pki_dir / f"{host.name}.pem" if pki_dir else None
    scheme = "https" if certificate and certificate.exists() else "http"
    agent = {
        "agent_url": f"{scheme}://127.0.0.1:{agents_base_port + index}",
        "agent_secret": read_or_create_secret(secrets_dir, host.name),
        "agent_certificate": (
            certificate_fingerprint(ssl.PEM_cert_to_DER_cert(certificate.read_text()))
            if certificate and certificate.exists()
            else ""
        ),
    }
    vsp, _ = VSP.objects.update_or_create(
        name=host.name,
        defaults=agent,
        create_defaults={
            **agent,
            "migration_enabled": host.migration_enabled,
            "licensed": host.licensed,
            "processor_family": "Intel Xeon",
            "processor_model": host.processor_model,
            "memory_mib": host.memory_mib,
            "cpus": host.cpus,
        },
    )
    return vsp


def upsert_guest(guest: DemoGuest, vsp: VSP) -> None:
    vm, created = VirtualMachine.objects.get_or_create(
        name=guest.name,
        defaults={
            "kind": guest.kind,
            "os_type": guest.os_type,
            "os_status": guest.os_status,
            "boot_attribute": guest.boot,
            "memory_mib": guest.memory_mib,
            "vcpus": guest.vcpus,
            "online_migration_enabled": guest.online_migration_enabled,
            # Stored as given: whoever reads a policy fills the keys it lacks with the defaults.
            "migration_policy": dict(guest.policy),
        },
    )
    if created:
        Registration.objects.create(vm=vm, vsp=vsp, hardware_status=guest.hardware_status)


# Share of a simulated demo guest's RAM its OS filled at boot; the workload writes within it (at
# least 10 s of writes). Ten running guests of 14 GiB in all then hold ~0.7 GiB, so the whole
# `make run` stack stays under 2 GiB resident (bench/bench_demo_memory.py measures it).
DEMO_FILL_PERCENT = 5
# Under QEMU (software emulation on a laptop) only a couple of small guests can really run.
QEMU_DEMO_MEMORY_MIB = 256
QEMU_DEMO_RUNNING_GUESTS = ("web01", "web02")


# What each demo guest's workload writes (pages a second), so migrations show real dirty-page rounds.
DEMO_DIRTY_PAGES = {guest.name: guest.dirty_pages_per_s for guest in GUESTS}
DEFAULT_DIRTY_PAGES_PER_S = 500


def seed_demo_agents(driver: str, pool_dir: Path | None = None) -> list[str]:
    """Define every demo guest on the agent of the VSP where it is runnable, started if it is On.

    With the QEMU driver, guests get QEMU_DEMO_MEMORY_MIB and only QEMU_DEMO_RUNNING_GUESTS
    are started; the rest are defined but Off. The VMs' memory in the database is set to match.
    Simulated guests whose agent mounts the demo pool get a system disk there (``pool_dir``: its
    directory, so a volume made by an earlier run is taken as it is) and a network card
    (``demo_devices``); an agent older than pools gets neither, and says so.
    """
    from vms.agent_client import AgentClient
    from vms.agent_messages import guest_spec

    lines = []
    runnable = (
        Registration.objects.exclude(hardware_status=HW.NOT_RUNNABLE)
        .select_related("vm", "vsp")
        .order_by("vsp__name", "vm__name")
    )
    for registration in runnable:
        vm, vsp = registration.vm, registration.vsp
        running = registration.hardware_status == HW.ON
        memory_mib = vm.memory_mib
        if driver == "qemu":
            # The console sends the VM's size to the target agent, so both must agree.
            memory_mib = QEMU_DEMO_MEMORY_MIB
            VirtualMachine.objects.filter(pk=vm.pk).update(memory_mib=memory_mib)
            running = running and vm.name in QEMU_DEMO_RUNNING_GUESTS
        workload = {"dirty_pages_per_s": DEMO_DIRTY_PAGES.get(vm.name, DEFAULT_DIRTY_PAGES_PER_S)}
        if driver != "qemu":
            workload["fill_percent"] = DEMO_FILL_PERCENT
        with AgentClient.for_vsp(vsp) as agent:
            devices = demo_devices(agent, vm, pool_dir) if driver != "qemu" else {}
            spec = guest_spec(vm, memory_mib=memory_mib, running=running, **workload, **devices)
            agent.define_guest(spec)
        lines.append(
            f"{vsp.name}: {vm.name} ({memory_mib} MiB, {'running' if running else 'off'}"
            f"{', no pools known on its agent' if driver != 'qemu' and not devices else ''})"
        )
    return lines


def demo_devices(agent: Any, vm: VirtualMachine, pool_dir: Path | None) -> dict[str, Any]:
    """``vm``'s demo disk (vda, on the shared pool) and card, as ``GuestSpec`` fields; {} when the agent
    does not mount the demo pool (or is older than pools: ``resources()`` is None)."""
    from agentprotocol import DiskSpec, NicSpec

    resources = agent.resources()
    if resources is None or not any(pool.name == DEMO_POOL for pool in resources.pools):
        return {}
    volume = f"{vm.name}-vda.qcow2"
    made = pool_dir is not None and (pool_dir / volume).exists()
    network = DEMO_GUEST_NETWORK.get(vm.name, "prod-net")
    disk = DiskSpec(
        device="vda",
        pool=DEMO_POOL,
        volume=volume,
        virtual_size_bytes=DEMO_DISK_BYTES,
        create=not made,
        pool_identity=DEMO_POOL_IDENTITY,
    )
    return {"disks": [disk], "nics": [NicSpec(network=network, mac=demo_mac(vm))]}


def demo_mac(vm: VirtualMachine) -> str:
    """A stable MAC per demo guest, from its id (the same on every run)."""
    digits = vm.guest_id.hex[:6]
    return f"52:54:00:{digits[0:2]}:{digits[2:4]}:{digits[4:6]}"
