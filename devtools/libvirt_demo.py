"""`make run HOSTS=libvirt`: the demo hosts as libvirt daemons on this machine, their guests as domains.

``scripts/run_console.py`` calls ``start_rig`` before it starts the demo agents (one per daemon,
``--driver libvirt --driver-option uri=...``: ``agent_options``), and, once the demo fleet is in the
database, ``python -m devtools.libvirt_demo seed VAR_DIR VSP...`` (``seed_domains``) in place of
``seed_demo_agents``: the libvirt driver adopts domains and defines none, so each runnable copy of the
demo fleet is defined in its VSP's daemon as an admin would define it (virsh define), named by the
console's guest id (the domain's UUID), the QEMU test guest with 256 MiB; web01 and web02 are started
(as with ``HOSTS=qemu``: only a couple of TCG guests really run on a laptop), the rest stay shut off.
Then the inventory is collected once.

Needs root (the daemons run in namespaces of their own: ``devtools.libvirt_hosts``), libvirt >= 11
(``scripts/install_libvirt.sh``) and the test guest (``make guest-image``). The daemons keep their
state under ``VAR_DIR/libvirt/<vsp>/`` across runs (a domain that migrated stays defined where it went).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from devtools.libvirt_hosts import LibvirtHosts, libvirt_missing, memwriter_domain_xml

BASE_DIR = Path(__file__).resolve().parent.parent
IMAGES = BASE_DIR / "guest-images"
BOOT_FILES = (IMAGES / "vmlinuz", IMAGES / "initramfs.cpio.gz")
MEMORY_MIB = 256  # each demo domain's memory (the VMs' rows are set to match)
RUNNING = ("web01", "web02")  # the domains started; the others stay shut off
DEFAULT_DIRTY_PAGES_PER_S = 500


def rig_of(var_dir: Path, names: Sequence[str]) -> LibvirtHosts:
    """The demo's daemons, one per VSP name, under ``var_dir/libvirt`` (not started)."""
    return LibvirtHosts(var_dir / "libvirt", names)


def why_not(var_dir: Path) -> str | None:
    """Why the libvirt demo cannot run here, in words (None: it can)."""
    missing = libvirt_missing()
    if missing:
        return f"{missing} (make run HOSTS=libvirt needs root: sudo make run HOSTS=libvirt)"
    if not all(path.is_file() for path in BOOT_FILES):
        return f"no test guest in {IMAGES}; run make guest-image"
    if len(str((var_dir / "libvirt").resolve())) > 80:
        return f"{var_dir} is too deep for libvirt's socket paths; set a shorter MATRIXOE_VAR_DIR"
    return None


def start_rig(var_dir: Path, names: Sequence[str]) -> LibvirtHosts:
    """Start one libvirt daemon per name (stopping what an earlier run left first) with the test
    guest's kernel and initrd on each. Raises ``LibvirtHostError`` naming the step that failed.

    The umask of ``make run`` (077) would keep QEMU, which runs as ``libvirt-qemu``, out of the
    daemons' own directories: they are made with 022 (nothing secret in them but QEMU's TLS key, which
    the rig makes readable by QEMU's group only, and the sockets, root's only)."""
    rig = rig_of(var_dir, names)
    previous = os.umask(0o022)
    try:
        rig.start()
        rig.install_boot_files(*BOOT_FILES)
    finally:
        os.umask(previous)
    return rig


def agent_options(rig: LibvirtHosts, name: str) -> list[str]:
    """The demo agent's options for host ``name``: its daemon's URI (also the peer URI: the daemons
    reach each other's sockets on this machine)."""
    return ["--driver-option", f"uri={rig[name].uri}"]


def seed_domains(var_dir: Path, names: Sequence[str]) -> list[str]:
    """Define each runnable copy of the demo fleet in its VSP's daemon (``names``: the rig's hosts, the
    demo VSPs' names; see the module's docstring); one line per domain for people. Needs Django set up
    and the daemons running."""
    from hostagent.drivers.libvirt.connection import open_connection
    from vms.demo import DEMO_DIRTY_PAGES
    from vms.inventory import collect_all_inventory
    from vms.models import Registration, VirtualMachine

    copies = (
        Registration.objects.exclude(hardware_status=Registration.HardwareStatus.NOT_RUNNABLE)
        .select_related("vm", "vsp")
        .order_by("vsp__name", "vm__name")
    )
    rig = rig_of(var_dir, names)
    connections = {name: open_connection(host.uri) for name, host in rig.hosts.items()}
    lines = []
    for copy in copies:
        vm, connection = copy.vm, connections[copy.vsp.name]
        rate = DEMO_DIRTY_PAGES.get(vm.name, DEFAULT_DIRTY_PAGES_PER_S)
        domain = connection.defineXML(memwriter_domain_xml(vm.name, MEMORY_MIB, rate, uuid=str(vm.guest_id)))
        start = copy.hardware_status == Registration.HardwareStatus.ON and vm.name in RUNNING
        if start and not domain.isActive():
            domain.create()
        VirtualMachine.objects.filter(pk=vm.pk).update(memory_mib=MEMORY_MIB)
        state = "running" if start else "off"
        lines.append(f"{copy.vsp.name}: {vm.name} (libvirt domain, {MEMORY_MIB} MiB, {state})")
    answered = collect_all_inventory()
    lines.append(f"Agents answering: {sum(answered.values())}/{len(answered)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("seed",))
    parser.add_argument("var_dir", type=Path)
    parser.add_argument("names", nargs="+", help="the demo VSPs, as start_rig was given them")
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "matrixoe.settings")
    import django

    django.setup()
    for line in seed_domains(args.var_dir, args.names):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
