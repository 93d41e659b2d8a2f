"""The ``qemu`` driver: guests are QEMU processes, migrated with QEMU's own live migration.

Options (``DriverSettings.options``, from the agent's command line):
  qemu_binary   QEMU to run (default ``qemu-system-x86_64``); refused below QEMU 10
  guest_images  directory with ``vmlinuz`` and ``initramfs.cpio.gz`` (default: the repo's
                ``guest-images/``, built by ``scripts/build_test_guest.sh``)
  run_dir       where QMP sockets, serial consoles, QEMU logs and guest records go (default: a new
                temp dir per start; give a fixed one to re-adopt the guests after a restart)
  accel         QEMU accelerator (default ``tcg``; ``kvm`` where the host has it)

A guest's disks and network cards come with its definition (``GuestSpec.disks``/``nics``) on the
agent's pools and networks (``--pool``, ``--network``; ``hostagent.hostconfig``): each disk is a
``-blockdev`` on its volume's file, each card a ``virtio-net-pci`` on user-mode networking (a ``user``
network) or on a tap on the network's bridge (a ``bridge`` network, ``[<netns>/]<bridge>``). New
volumes are made by ``qemu-img create``. A guest with a ``boot`` disk boots from it and runs
guestload (memory as memwriter, plus sequence-numbered disk writes and UDP heartbeats; ``machine``,
``guestload``); a guest without one boots the test guest's kernel and initramfs, its disks attached,
and its workload (memwriter) writes ``memory_mib - 96`` MiB at ``dirty_pages_per_s`` and checks them.
Options for guestload:
  guest_subnet  bridged guests' addresses: ``10.77.0.0/24`` (each guest's derived from its id)
  heartbeat     ``<address>:<port>`` guestload sends its heartbeats to (user-mode networking:
                ``10.0.2.2:<port>`` reaches the host's ``127.0.0.1:<port>``)
  heartbeat_listen  ``[<netns>/]<address>:<port>``: this agent listens to the guests' heartbeats there
                and reports the **network blackout** of each switchover it takes part in
                (``network_blackout_ms``: the longest gap in the guest's heartbeats around it,
                measured by the target as it resumes, or by the source as it releases, whichever
                listens; one listener per network is enough)
  disk_rate     guestload's disk writes per second (default 200)
Older options make *every* guest defined without disks an OS image guest, its disk a copy of one
image in one pool directory (kept for the benchmark ``bench/bench_qemu_image_guest.py``):
  boot_image    the OS image (``guest-images/guest-os.qcow2``, built by ``scripts/build_guest_image.sh``)
  pool          the storage pool directory; guest ``<id>``'s disk is ``<pool>/<id>.qcow2``, created
                from ``boot_image`` when the guest is defined; an incoming migration opens the same
                file, so two agents given the same (shared) directory migrate without copying disks
  network       ``user`` (QEMU's NAT) or ``bridge:[<netns>/]<bridge>`` (a tap per QEMU on that bridge)
What the workload says on its serial console is reported under ``workload`` in the guest's info
(with ``vcpus_running``, QEMU's run state as its STOP/RESUME events last said).

Guests survive the agent's own death (``kill -9``): each guest's record (its definition, its power
state, its QEMU's pid and instance, the migration it is in) is kept in ``run_dir/<guest_id>.guest.json``
while the agent runs, and the agent's next start re-adopts what it finds (``_readopt``):

1. A guest whose QEMU still runs is adopted (its QMP socket reconnected) and listed again.
2. A source guest of an interrupted migration: QEMU's migration is cancelled if it still runs
   (``migrate_cancel``) and the guest continues (``cont``): it runs on here, and the control plane, which
   asks about the migration, hears ``UnknownMigration`` and decides from its database. A source whose
   QEMU had sent everything (``postmigrate``: the control plane may have committed to the target)
   stays paused, as only the control plane knows which copy is the guest's now (``vcpus_running``
   False).
3. The incoming copy of an interrupted migration (target) is discarded (its QEMU quits); a definition
   it replaced comes back.
4. A guest whose QEMU is gone is listed Off.
A clean stop (SIGTERM) halts the guests and forgets them, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentprotocol import (
    DirtyRate,
    Encryption,
    Endpoint,
    FailureKind,
    GuestInfo,
    GuestSpec,
    HardwareStatus,
    HostResources,
    LocalDisks,
    MigrationParams,
    OsStatus,
    PhaseLimits,
    StopOutcome,
    StoppedGuest,
    VolumeWriter,
)
from agentprotocol.storage import DiskInfo
from hostagent.driver import Conflict, DriverSettings, InvalidRequest, Migration, UnknownGuest
from hostagent.drivers.qemu.diskmirror import TargetVolume, remove_mirrors
from hostagent.drivers.qemu.machine import BridgeNetwork, Disk, Machine, Network, Nic, UserNetwork, mac_for
from hostagent.drivers.qemu.migration import SETTLE_TIMEOUT_S, QemuMigration
from hostagent.drivers.qemu.network import HeartbeatListener, NetworkError, network_blackout
from hostagent.drivers.qemu.process import MIN_GUEST_MIB, QemuConfig, QemuProcess, Workload, check_qemu
from hostagent.drivers.qemu.qmp import QmpClosed, QmpError
from hostagent.drivers.qemu.source import SourceMigration
from hostagent.drivers.qemu.storage import (
    VolumeError,
    create_empty_volume,
    create_volume,
    image_writers,
    virtual_size,
)
from hostagent.drivers.qemu.target import TargetMigration
from hostagent.drivers.qemu.tls import write_credentials
from hostagent.hostconfig import LOCAL_PREFIX
from hostagent.resources import (
    HostStorage,
    PlannedDisk,
    allocated_bytes,
    mark_allocated,
    mark_committed,
    remove_uncommitted_volumes,
)

log = logging.getLogger(__name__)

DEFAULT_IMAGES = Path(__file__).resolve().parents[3] / "guest-images"
MAX_VCPUS = 8
MAX_MEMORY_MIB = 64 * 1024
MAX_DIRTY_RATE = 1_000_000
RECORD_SUFFIX = ".guest.json"
DEFAULT_DISK_RATE = 200  # guestload's 4 KiB disk writes per second
USER_NET_GUEST = "10.0.2.15/24"  # QEMU's user-mode networking gives the guest this address
BLACKOUT_WAIT_S = 3.0  # after the switchover, wait this long at most for the guest's next heartbeat
BLACKOUT_BEFORE_S = 10.0  # the switchover's silence began within this many seconds before the resume
HEARTBEATS_KEPT_S = 60.0
# QEMU's migration statuses while its migration still runs (qapi/migration.json ``MigrationStatus``).
QEMU_MIGRATING = (
    "setup",
    "active",
    "pre-switchover",
    "device",
    "cancelling",
    "wait-unplug",
    "postcopy-active",
)


@dataclass
class QemuGuest:
    spec: GuestSpec
    hardware: HardwareStatus = "off"
    process: QemuProcess | None = None
    migration: QemuMigration | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    paused: bool = False  # QEMU's vCPUs stopped (STOP/RESUME events; query-status at adoption)
    power_cut: bool = False  # a force stop quit QEMU while a graceful stop waited for the guest
    shutting_down: bool = False  # a graceful stop waits for the guest: it may not start to migrate

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running


def workload_of(spec: GuestSpec) -> Workload:
    return Workload(memory_mib=spec.memory_mib, vcpus=spec.vcpus, dirty_pages_per_s=spec.dirty_pages_per_s)


def parse_network(option: str | None) -> Network | None:
    """The ``network`` option: ``user``, ``bridge:<bridge>`` or ``bridge:<netns>/<bridge>``."""
    if not option:
        return None
    if option == "user":
        return UserNetwork()
    kind, _, where = option.partition(":")
    netns, _, bridge = where.rpartition("/")
    if kind != "bridge" or not bridge:
        raise ValueError(f"network: 'user' or 'bridge:[<netns>/]<bridge>', not {option!r}")
    return BridgeNetwork(bridge=bridge, netns=netns or None)


@dataclass(frozen=True)
class ImageGuests:
    """The driver options that make every guest an OS image guest (module docstring)."""

    image: Path
    pool: Path
    network: Network | None = None
    subnet: ipaddress.IPv4Network | None = None
    heartbeat: tuple[str, int] | None = None
    disk_rate: int = DEFAULT_DISK_RATE

    @classmethod
    def from_options(cls, options: dict[str, str]) -> ImageGuests | None:
        """None without ``boot_image``; raises ``ValueError`` naming a bad or missing option."""
        if not options.get("boot_image"):
            return None
        if not options.get("pool"):
            raise ValueError("boot_image needs pool=<directory> for the guests' disks")
        heartbeat = None
        if options.get("heartbeat"):
            host, _, port = options["heartbeat"].rpartition(":")
            ipaddress.IPv4Address(host)
            heartbeat = (host, int(port))
        network = parse_network(options.get("network"))
        subnet = ipaddress.IPv4Network(options["guest_subnet"]) if options.get("guest_subnet") else None
        if isinstance(network, BridgeNetwork) and subnet is None:
            raise ValueError("network=bridge:... needs guest_subnet=<a.b.c.d/n> for the guests' addresses")
        return cls(
            image=Path(options["boot_image"]),
            pool=Path(options["pool"]),
            network=network,
            subnet=subnet,
            heartbeat=heartbeat,
            disk_rate=int(options.get("disk_rate", DEFAULT_DISK_RATE)),
        )

    def volume(self, guest_id: str) -> Path:
        return self.pool / f"{guest_id}.qcow2"

    def address(self, guest_id: str) -> str:
        return guest_address(self.subnet, guest_id)

    def machine(self, spec: GuestSpec, workload: Workload) -> Machine:
        guest_id = spec.guest_id
        config = [
            ("mib", str(workload.written_mib)),
            ("rate", str(workload.dirty_pages_per_s)),
            ("disk_rate", str(self.disk_rate)),
            ("hb_id", guest_id),
        ]
        nics: tuple[Nic, ...] = ()
        if self.network is not None:
            nics = (Nic(mac=mac_for(guest_id), network=self.network),)
            config.append(("ip", self.address(guest_id)))
            if self.heartbeat is not None:
                config += [("hb_host", self.heartbeat[0]), ("hb_port", str(self.heartbeat[1]))]
        disk = Disk(name="vda", path=self.volume(guest_id), format="qcow2", boot=True)
        return Machine(disks=(disk,), nics=nics, guest_config=tuple(config))


@dataclass(frozen=True)
class GuestloadOptions:
    """The driver options for guests that boot from their own disk (module docstring)."""

    subnet: ipaddress.IPv4Network | None = None
    heartbeat: tuple[str, int] | None = None
    disk_rate: int = DEFAULT_DISK_RATE
    listen: tuple[str | None, str, int] | None = None  # heartbeat_listen: netns, address, port

    @classmethod
    def from_options(cls, options: dict[str, str]) -> GuestloadOptions:
        """Raises ``ValueError`` naming a bad option."""
        heartbeat = listen = None
        if options.get("heartbeat"):
            host, _, port = options["heartbeat"].rpartition(":")
            heartbeat = (str(ipaddress.IPv4Address(host)), int(port))
        if options.get("heartbeat_listen"):
            where, _, port = options["heartbeat_listen"].rpartition(":")
            netns, _, host = where.rpartition("/")
            listen = (netns or None, str(ipaddress.IPv4Address(host)), int(port))
        subnet = ipaddress.IPv4Network(options["guest_subnet"]) if options.get("guest_subnet") else None
        return cls(subnet, heartbeat, int(options.get("disk_rate", DEFAULT_DISK_RATE)), listen)


def guest_address(subnet: ipaddress.IPv4Network | None, guest_id: str) -> str:
    """The guest's address with prefix: user-mode networking's, or one of ``subnet`` derived from
    the guest's id (from the 10th host on; the same on every agent, so it survives a move)."""
    if subnet is None:
        return USER_NET_GUEST
    hosts = subnet.num_addresses - 12
    offset = 10 + int(hashlib.sha256(guest_id.encode()).hexdigest(), 16) % max(1, hosts)
    return f"{subnet.network_address + offset}/{subnet.prefixlen}"


def check_spec(spec: GuestSpec) -> GuestSpec:
    """This driver's own bounds on top of the protocol's (QEMU needs room for the test guest's OS)."""
    if not MIN_GUEST_MIB <= spec.memory_mib <= MAX_MEMORY_MIB:
        raise InvalidRequest(f"memory_mib: a whole number from {MIN_GUEST_MIB} to {MAX_MEMORY_MIB}")
    if not 1 <= spec.vcpus <= MAX_VCPUS:
        raise InvalidRequest(f"vcpus: a whole number from 1 to {MAX_VCPUS}")
    if not 0 <= spec.dirty_pages_per_s <= MAX_DIRTY_RATE:
        raise InvalidRequest(f"dirty_pages_per_s: a whole number from 0 to {MAX_DIRTY_RATE}")
    for disk in spec.disks:
        if disk.bus != "virtio":
            raise InvalidRequest(
                f"disk {disk.device}: the qemu driver attaches virtio disks only, not {disk.bus}"
            )
    for index, nic in enumerate(spec.nics):
        if nic.model != "virtio":
            raise InvalidRequest(f"nic {index}: the qemu driver plugs virtio cards only, not {nic.model}")
    if "os_type" not in spec.model_fields_set:
        spec = spec.model_copy(update={"os_type": "Linux"})
    return spec


class QemuDriver:
    name = "qemu"
    # Live storage migration of local disks (``diskmirror``): said in health (``agentprotocol.Health``),
    # the console offers a guest with local disks a move only between two agents that say so.
    mirrors_local_disks = True

    def __init__(self, settings: DriverSettings) -> None:
        self.settings = settings
        options = settings.options
        images = Path(
            options.get("guest_images") or os.environ.get("HOSTAGENT_GUEST_IMAGES") or DEFAULT_IMAGES
        )
        self._own_run_dir = "run_dir" not in options
        run_dir = Path(options["run_dir"]) if "run_dir" in options else Path(tempfile.mkdtemp(prefix="qemu-"))
        self.config = QemuConfig(
            binary=options.get("qemu_binary", "qemu-system-x86_64"),
            kernel=images / "vmlinuz",
            initramfs=images / "initramfs.cpio.gz",
            run_dir=run_dir,
            accel=options.get("accel", "tcg"),
        )
        try:
            self.image_guests = ImageGuests.from_options(options)
            self.guestload = GuestloadOptions.from_options(options)
        except ValueError as error:
            raise RuntimeError(f"qemu driver: {error}") from None
        self.storage = HostStorage(settings.pools, settings.networks, settings.agent_name)
        self._heartbeats: HeartbeatListener | None = None
        self.qemu_version = ""
        self._tls_dir: Path | None = None  # QEMU's copy of the agent's TLS files (``tls``)
        self._guests: dict[str, QemuGuest] = {}
        self._replaced: dict[str, QemuGuest] = {}

    async def open(self) -> None:
        self.qemu_version = check_qemu(self.config.binary)
        if self.image_guests is not None:
            if not self.image_guests.image.is_file():
                raise RuntimeError(
                    f"OS image {self.image_guests.image} missing: build it with scripts/build_guest_image.sh"
                )
            if not self.image_guests.pool.is_dir():
                raise RuntimeError(f"storage pool {self.image_guests.pool} is not a directory")
        for image in (self.config.kernel, self.config.initramfs):
            if self.image_guests is None and not image.is_file():
                raise RuntimeError(f"guest image {image} missing: build it with scripts/build_test_guest.sh")
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        if self.guestload.listen is not None:
            netns, host, port = self.guestload.listen
            self._heartbeats = HeartbeatListener(host, port, netns=netns, keep_s=HEARTBEATS_KEPT_S)
        if self.settings.tls is not None:
            self._tls_dir = write_credentials(self.settings.tls, self.config.run_dir)
        log.info("qemu driver: QEMU %s, guests from %s", self.qemu_version, self.config.kernel.parent)
        await self._readopt()
        self._remove_uncommitted_volumes()

    def _remove_uncommitted_volumes(self) -> None:
        """Delete the volumes a mirror allocated here for a migration that never completed (the agent
        died in the middle of it; ``resources.remove_uncommitted``): after re-adoption, which quit the
        incoming QEMU that had them open."""
        remove_uncommitted_volumes(self.storage.pools)

    async def close(self) -> None:
        for guest in list(self._guests.values()) + list(self._replaced.values()):
            await self._halt(guest)
        for record in self.config.run_dir.glob(f"*{RECORD_SUFFIX}"):
            record.unlink(missing_ok=True)  # a clean stop halted its guests: nothing to re-adopt
        if self._own_run_dir:
            shutil.rmtree(self.config.run_dir, ignore_errors=True)
        if self._heartbeats is not None:
            self._heartbeats.close()

    # --- records and re-adoption after a restart ---------------------------------------

    def _record_path(self, guest_id: str) -> Path:
        return self.config.run_dir / f"{guest_id}{RECORD_SUFFIX}"

    def _save(self, guest_id: str) -> None:
        """Write the guest's record (atomically), or remove it once the guest is gone."""
        path = self._record_path(guest_id)
        guest = self._guests.get(guest_id)
        if guest is None:
            path.unlink(missing_ok=True)
            return
        process = guest.process if guest.running else None
        replaced = self._replaced.get(guest_id)
        record = {
            "spec": guest.spec.model_dump(mode="json"),
            "hardware": guest.hardware,
            "process": process
            and {"pid": process.pid, "instance": process.instance, "incoming": process.incoming},
            "migration": guest.migration
            and {"id": guest.migration.migration_id, "role": guest.migration.role},
            "replaced": replaced
            and {"spec": replaced.spec.model_dump(mode="json"), "hardware": replaced.hardware},
        }
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(record))
        os.replace(partial, path)

    async def _readopt(self) -> None:
        """After a restart: take back the guests an earlier run left (module docstring, steps 1-4)."""
        for path in sorted(self.config.run_dir.glob(f"*{RECORD_SUFFIX}")):
            try:
                await self._readopt_one(json.loads(path.read_text()))
            except Exception:
                log.exception("qemu driver: cannot re-adopt the guest recorded in %s", path)

    async def _readopt_one(self, record: dict[str, Any]) -> None:
        spec = GuestSpec.model_validate(record["spec"])
        guest = QemuGuest(spec=spec, hardware=record["hardware"])
        process = await self._adopt_process(spec, record.get("process"))
        migration = record.get("migration") or {}
        if migration.get("role") == "target":
            if process is not None:
                await process.quit()
            log.warning(
                "%s: discarded the incoming copy of interrupted migration %s", spec.name, migration["id"]
            )
            replaced = record.get("replaced")
            if replaced:
                previous = GuestSpec.model_validate(replaced["spec"])
                self._guests[spec.guest_id] = QemuGuest(spec=previous, hardware=replaced["hardware"])
            self._save(spec.guest_id)
            return
        self._guests[spec.guest_id] = guest
        if process is None:
            if guest.hardware == "on":
                guest.hardware = "off"
            self._save(spec.guest_id)
            return
        guest.process = process
        guest.tasks = [
            asyncio.create_task(self._pump_events(guest, process)),
            asyncio.create_task(self._watch_exit(guest, process)),
        ]
        if migration.get("role") == "source":
            await self._settle_interrupted_source(guest, migration["id"])
        assert process.qmp is not None
        guest.paused = not (await process.qmp.execute("query-status"))["running"]
        log.warning("%s: re-adopted QEMU pid %s (%s)", spec.name, process.pid, guest.hardware)
        self._save(spec.guest_id)

    async def _adopt_process(self, spec: GuestSpec, recorded: dict[str, Any] | None) -> QemuProcess | None:
        if not recorded:
            return None
        try:
            return await QemuProcess.adopt(
                self.config,
                spec.guest_id,
                workload_of(spec),
                recorded["instance"],
                recorded["incoming"],
                recorded["pid"],
                self._machine(spec),
            )
        except RuntimeError as error:
            log.warning("%s: %s", spec.name, error)
            return None

    async def _settle_interrupted_source(self, guest: QemuGuest, migration_id: str) -> None:
        """A source whose migration the agent's death interrupted: cancel QEMU's migration if it still
        runs, then let the guest run on here, unless QEMU had sent everything (``postmigrate``)."""
        assert guest.process is not None and guest.process.qmp is not None
        qmp = guest.process.qmp
        cancelled = await remove_mirrors(qmp)  # no guest write may wait on a target any longer
        if cancelled:
            name = guest.spec.name
            log.warning("%s: cancelled the disk mirror(s) %s of migration %s", name, cancelled, migration_id)
        for _ in range(int(SETTLE_TIMEOUT_S / 0.05)):
            status = (await qmp.execute("query-migrate")).get("status")
            if status not in QEMU_MIGRATING:
                break
            if status != "cancelling":
                await qmp.execute("migrate_cancel")
            await asyncio.sleep(0.05)
        run_state = (await qmp.execute("query-status"))["status"]
        if run_state == "postmigrate":
            log.warning(
                "%s: migration %s had sent everything before the agent restarted; the guest stays paused "
                "(the control plane decides which copy runs)",
                guest.spec.name,
                migration_id,
            )
            return
        if run_state != "running":
            await qmp.execute("cont")
        log.warning(
            "%s: migration %s interrupted by the agent's restart; the guest runs here",
            guest.spec.name,
            migration_id,
        )

    # --- inventory -------------------------------------------------------------------

    def list_guests(self) -> list[GuestInfo]:
        return [self._info(guest) for guest in self._guests.values()]

    def get_guest(self, guest_id: str) -> GuestInfo:
        return self._info(self._guest(guest_id))

    def _machine(self, spec: GuestSpec, mirrored: frozenset[str] = frozenset()) -> Machine:
        """The guest's disks and network cards: those of its definition, or (defined without any) the
        old options' image guest, or none (the test guest). ``mirrored``: the devices an incoming
        mirror writes (their volumes new here: ``Disk.detect_zeroes``)."""
        if spec.disks or spec.nics:
            return self._spec_machine(spec, mirrored)
        if self.image_guests is None:
            return Machine()
        return self.image_guests.machine(spec, workload_of(spec))

    def _spec_machine(self, spec: GuestSpec, mirrored: frozenset[str] = frozenset()) -> Machine:
        """Disks on this host's pools, cards on its networks (the spec was checked against them)."""
        disks = []
        for disk in spec.disks:
            pool = self.storage.pool(disk.pool)
            if pool is None:
                raise Conflict(
                    f"disk {disk.device}: no storage pool {disk.pool} on {self.settings.agent_name}"
                )
            path = self.storage.volume_path(pool, disk.volume, disk.device)
            disks.append(
                Disk(
                    disk.device,
                    path,
                    disk.format,
                    read_only=disk.read_only,
                    boot=disk.boot,
                    detect_zeroes=disk.device in mirrored,
                )
            )
        nics = []
        for nic in spec.nics:
            network = self.storage.network(nic.network)
            if network is None or network.kind == "simulated":
                raise Conflict(
                    f"no network {nic.network} a QEMU card can plug into on {self.settings.agent_name}"
                )
            netns, bridge = network.netns_and_bridge
            on: Network = BridgeNetwork(bridge, netns) if network.kind == "bridge" else UserNetwork()
            nics.append(Nic(mac=nic.mac, network=on))
        config: list[tuple[str, str]] = []
        if any(disk.boot for disk in disks):
            config = self._guestload_config(
                spec, bridged=any(isinstance(n.network, BridgeNetwork) for n in nics)
            )
        return Machine(disks=tuple(disks), nics=tuple(nics), guest_config=tuple(config))

    def _guestload_config(self, spec: GuestSpec, bridged: bool) -> list[tuple[str, str]]:
        options, workload = self.guestload, workload_of(spec)
        config = [
            ("mib", str(workload.written_mib)),
            ("rate", str(workload.dirty_pages_per_s)),
            ("disk_rate", str(options.disk_rate)),
            ("hb_id", spec.guest_id),
        ]
        if spec.nics:
            config.append(("ip", guest_address(options.subnet if bridged else None, spec.guest_id)))
            if options.heartbeat is not None:
                config += [("hb_host", options.heartbeat[0]), ("hb_port", str(options.heartbeat[1]))]
        return config

    def resources(self) -> HostResources:
        """Pools and networks (``--pool``, ``--network``); the writers are read from the kernel: each
        of this agent's QEMUs holding QEMU's write lock on a disk's image (``storage.image_writers``)."""
        writers = []
        for guest in self._guests.values():
            pid = guest.process.pid if guest.process is not None and guest.running else None
            if pid is None:
                continue
            for disk, path in self._disk_paths(guest.spec):
                if path is not None and pid in image_writers(path, [pid]):
                    identity = self._pool_identity(disk.pool)
                    writers.append(
                        VolumeWriter(
                            pool_identity=identity, volume=disk.volume, guest_id=guest.spec.guest_id, pid=pid
                        )
                    )
        return self.storage.report(writers)

    def _pool_identity(self, name: str) -> str:
        pool = self.storage.pool(name)
        return pool.identity if pool is not None else f"unknown-{name}"

    def _disk_paths(self, spec: GuestSpec) -> list[tuple[Any, Path | None]]:
        found = []
        for disk in spec.disks:
            pool = self.storage.pool(disk.pool)
            found.append(
                (disk, None if pool is None else self.storage.volume_path(pool, disk.volume, disk.device))
            )
        return found

    def _disk_infos(self, spec: GuestSpec) -> list[DiskInfo]:
        infos = []
        for disk, path in self._disk_paths(spec):
            size, allocated = disk.virtual_size_bytes, 0
            if path is not None:
                with contextlib.suppress(OSError, VolumeError):
                    size, allocated = virtual_size(path, disk.format), allocated_bytes(path)
            fields = disk.model_dump() | {
                "virtual_size_bytes": max(1, size),
                "pool_identity": self._pool_identity(disk.pool),
            }
            infos.append(DiskInfo(**fields, allocated_bytes=allocated))
        return infos

    def _plan(self, spec: GuestSpec) -> list[PlannedDisk]:
        """The definition's disks and cards checked against this host and its other guests; each
        existing volume must be of the format the disk says."""
        volumes: dict[Path, tuple[str, bool]] = {}
        macs: dict[str, str] = {}
        for guest in self._guests.values():
            if guest.spec.guest_id == spec.guest_id:
                continue
            for disk, path in self._disk_paths(guest.spec):
                if path is not None:
                    volumes[path] = (guest.spec.name, disk.shareable)
            macs.update((nic.mac, guest.spec.name) for nic in guest.spec.nics)
        planned = self.storage.plan_disks(spec, volumes)
        self.storage.check_nics(spec, macs, ("user", "bridge"))
        bridged = any(getattr(self.storage.network(nic.network), "kind", "") == "bridge" for nic in spec.nics)
        if bridged and any(disk.boot for disk in spec.disks) and self.guestload.subnet is None:
            raise InvalidRequest(
                f"{self.settings.agent_name} cannot give a booted guest an address on a bridge: "
                "start its agent with --driver-option guest_subnet=<a.b.c.d/n>"
            )
        for disk in planned:
            if not disk.spec.create:
                try:
                    virtual_size(disk.path, disk.spec.format)
                except (OSError, VolumeError) as error:
                    raise InvalidRequest(f"disk {disk.spec.device}: {error}") from None
        return planned

    def _guest(self, guest_id: str) -> QemuGuest:
        try:
            return self._guests[guest_id]
        except KeyError:
            raise UnknownGuest(f"no guest {guest_id} on {self.settings.agent_name}") from None

    def _info(self, guest: QemuGuest) -> GuestInfo:
        spec = guest.spec
        workload: dict[str, object] = guest.process.workload_report() if guest.process else {}
        if guest.running:
            workload["vcpus_running"] = not guest.paused
        return GuestInfo(
            guest_id=spec.guest_id,
            name=spec.name,
            os_type=spec.os_type,
            os_status=self._os_status(guest, workload),
            hardware_status=guest.hardware,
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            migrating=guest.migration.migration_id if guest.migration else None,
            disks=self._disk_infos(spec),
            nics=list(spec.nics),
            workload=workload,
        )

    @staticmethod
    def _os_status(guest: QemuGuest, workload: dict[str, object]) -> OsStatus:
        if not guest.running or guest.hardware != "on":
            return "down"
        return "up" if workload.get("booted") else "initializing"

    # --- lifecycle -------------------------------------------------------------------

    async def define_guest(self, spec: GuestSpec) -> GuestInfo:
        clean = check_spec(spec)
        existing = self._guests.get(clean.guest_id)
        if existing is not None:
            if not existing.spec.same_definition(clean):
                raise Conflict(f"guest {clean.name!r} exists with a different definition")
        elif clean.disks or clean.nics:
            planned = self._plan(clean)
            try:
                await asyncio.to_thread(self.storage.create_volumes, planned, create_empty_volume)
            except VolumeError as error:
                raise Conflict(f"cannot create the disks of {clean.name!r}: {error}") from None
            self._guests[clean.guest_id] = QemuGuest(spec=clean)
            self._save(clean.guest_id)
        else:
            await self._create_volume(clean)
            self._guests[clean.guest_id] = QemuGuest(spec=clean)
            self._save(clean.guest_id)
        if spec.running:
            return await self.start_guest(clean.guest_id)
        return self.get_guest(clean.guest_id)

    async def _create_volume(self, spec: GuestSpec) -> None:
        """An OS image guest's disk: a copy of the image in the pool, unless the pool has it already
        (a guest defined again keeps its disk)."""
        if self.image_guests is None:
            return
        volume = self.image_guests.volume(spec.guest_id)
        if volume.exists():
            return
        try:
            await asyncio.to_thread(create_volume, self.image_guests.image, volume)
        except VolumeError as error:
            raise Conflict(f"cannot create the disk of {spec.name!r}: {error}") from None

    async def start_guest(self, guest_id: str) -> GuestInfo:
        guest = self._guest(guest_id)
        name = guest.spec.name
        if guest.hardware == "not_runnable":
            raise Conflict(f"guest {name!r} is Not Runnable here (it migrated away)")
        if guest.migration is not None:
            raise Conflict(f"guest {name!r} is migrating")
        if not guest.running:
            process = QemuProcess(
                self.config,
                guest_id,
                workload_of(guest.spec),
                instance="boot",
                incoming=False,
                machine=self._machine(guest.spec),
            )
            await self._launch(guest, process)
            guest.hardware = "on"
        elif guest.paused and guest.process is not None and guest.process.qmp is not None:
            await guest.process.qmp.execute("cont")  # a re-adopted source left paused (postmigrate)
        self._save(guest_id)
        return self.get_guest(guest_id)

    async def stop_guest(self, guest_id: str, *, graceful_timeout_s: float | None = None) -> StoppedGuest:
        """Graceful: the ACPI power button, then up to ``graceful_timeout_s`` for the guest to power off
        (QEMU exits), else ``quit`` (kill if QEMU does not). None: ``quit`` at once."""
        guest = self._guest(guest_id)
        name = guest.spec.name
        if guest.migration is not None:
            raise Conflict(f"guest {name!r} is migrating")
        started = time.monotonic()
        outcome: StopOutcome = "forced"
        if not guest.running or guest.process is None:
            outcome = "already_off"
        elif graceful_timeout_s is not None:
            self._stop_tasks(guest)  # its exit is expected now: no warning from _watch_exit
            guest.power_cut, guest.shutting_down = False, True
            try:
                shut_down = await guest.process.power_down(graceful_timeout_s)
            finally:
                guest.shutting_down = False
            outcome = ("forced" if guest.power_cut else "shut_down") if shut_down else "timed_out"
            if not shut_down:
                log.info("%s: no power-off %s s after the ACPI power button: quit", name, graceful_timeout_s)
        else:
            guest.power_cut = True
        await self._halt(guest)
        if guest.hardware == "on":
            guest.hardware = "off"
        self._save(guest_id)
        elapsed = round(time.monotonic() - started, 3)
        return StoppedGuest(**self.get_guest(guest_id).model_dump(), stop=outcome, stop_s=elapsed)

    async def delete_guest(self, guest_id: str) -> None:
        guest = self._guest(guest_id)
        if guest.running or guest.migration is not None:
            raise Conflict(f"guest {guest.spec.name!r} is running or migrating; stop it first")
        del self._guests[guest_id]
        self._save(guest_id)

    async def _launch(self, guest: QemuGuest, process: QemuProcess) -> None:
        try:
            await process.launch()
        except NetworkError as error:
            raise Conflict(f"cannot attach the network card of {guest.spec.name!r}: {error}") from None
        guest.process = process
        guest.paused = process.incoming  # an incoming QEMU starts stopped (-S)
        guest.tasks = [
            asyncio.create_task(self._pump_events(guest, process)),
            asyncio.create_task(self._watch_exit(guest, process)),
        ]

    async def _halt(self, guest: QemuGuest) -> None:
        for task in guest.tasks:
            task.cancel()
        guest.tasks = []
        if guest.process is not None:
            await guest.process.quit()

    async def _pump_events(self, guest: QemuGuest, process: QemuProcess) -> None:
        """Hand the process's QMP events to the migration it belongs to."""
        assert process.qmp is not None
        while True:
            event = await process.qmp.events.get()
            if event.get("event") in ("STOP", "RESUME"):
                guest.paused = event["event"] == "STOP"
            migration = guest.migration
            if migration is not None and migration.process is process:
                try:
                    await migration.handle_event(event)
                except Exception:
                    log.exception("%s: handling %s", guest.spec.guest_id, event.get("event"))

    async def _watch_exit(self, guest: QemuGuest, process: QemuProcess) -> None:
        await process.wait()
        if guest.process is process and guest.hardware == "on" and guest.migration is None:
            log.warning("%s: QEMU exited: %s", guest.spec.guest_id, process.log_tail()[-200:])
            guest.hardware = "off"
            self._save(guest.spec.guest_id)

    # --- migration -------------------------------------------------------------------

    async def prepare_incoming(
        self,
        spec: GuestSpec,
        migration_id: str,
        limits: PhaseLimits,
        *,
        encryption: Encryption = "required",
        streams: int | None = None,
        local_disks: LocalDisks = "refuse",
    ) -> tuple[Migration, Endpoint]:
        """``streams`` > 1: QEMU's ``multifd`` with that many ``multifd-channels`` (as the source's).

        ``local_disks`` "mirror": each disk on a local pool gets a new volume (``qemu-img create``, the
        disk's format and virtual size) in a local pool of this host with room for it
        (``HostStorage.incoming_spec``), made only once every check passed, marked as this
        migration's (``resources.mark_allocated``) and exported to the source over this QEMU's NBD
        server (``diskmirror``); deleted if the migration does not complete here. "refuse": a local
        disk is refused (409)."""
        tls_dir = self._tls_for(encryption)
        clean = check_spec(spec)
        guest_id = clean.guest_id
        existing = self._guests.get(guest_id)
        if existing is not None and (existing.running or existing.migration is not None):
            raise Conflict(f"guest {clean.name!r} already runs or migrates on {self.settings.agent_name}")
        if clean.disks or clean.nics:
            # refuses a pool or network this host lacks, a local disk (unless mirrored: without room)
            clean = self.storage.incoming_spec(clean, mirror=local_disks == "mirror")
        planned = self._mirror_volumes(clean)
        if planned:  # the guest is known here by its disks on this host's pools, made now
            clean = clean.model_copy(
                update={"disks": [disk.model_copy(update={"create": False}) for disk in clean.disks]}
            )
        machine = self._machine(clean, frozenset(disk.spec.device for disk in planned))
        volumes = await self._allocate_mirror(clean.name, planned, migration_id)
        try:
            for disk in machine.disks:
                if not disk.path.is_file():
                    raise Conflict(
                        f"{self.settings.agent_name} does not see the disk of {clean.name!r} ({disk.path}): "
                        "its pool is not shared with the source"
                    )
            guest = QemuGuest(spec=clean)
            instance = f"in-{migration_id[:12]}"
            process = QemuProcess(
                self.config, guest_id, workload_of(clean), instance=instance, incoming=True, machine=machine
            )
            await self._launch(guest, process)
        except BaseException:
            for volume in volumes:
                volume.unlink(missing_ok=True)
                mark_committed(volume)
            raise
        migration = TargetMigration(
            process,
            migration_id,
            limits,
            self.settings.data_host,
            self._finished,
            channels=streams or 1,
            tls_dir=tls_dir,
            mirror=[disk.spec.device for disk in planned],
            volumes=volumes,
            places={
                disk.spec.device: TargetVolume(self.settings.agent_name, disk.pool.name) for disk in planned
            },
        )
        guest.migration = migration
        migration.after_switchover = self._measure_blackout
        if existing is not None:
            self._replaced[guest_id] = existing
        self._guests[guest_id] = guest
        self._save(guest_id)
        try:
            await migration.begin()
        except (QmpError, QmpClosed) as error:  # e.g. QEMU refused the TLS credentials
            reason = f"the target QEMU refused the migration set-up: {error}"
            await migration.abort(reason, FailureKind.INTERNAL)  # its guest goes, a replaced one returns
            raise Conflict(reason) from None
        return migration, migration.endpoint

    def _mirror_volumes(self, spec: GuestSpec) -> list[PlannedDisk]:
        """The disks of an incoming spec that get a new volume here (``create``: a mirror's)."""
        planned = []
        for disk in spec.disks:
            if disk.create:
                pool = self.storage.pool(disk.pool)
                assert pool is not None  # incoming_spec chose it
                path = self.storage.volume_path(pool, disk.volume, disk.device)
                planned.append(PlannedDisk(disk, pool, path))
        return planned

    async def _allocate_mirror(self, name: str, planned: list[PlannedDisk], migration_id: str) -> list[Path]:
        """Make the mirror's new volumes (all or none) and mark them as ``migration_id``'s; their
        paths. Raises Conflict naming the guest and ``qemu-img``'s reason."""
        if not planned:
            return []
        try:
            await asyncio.to_thread(self.storage.create_volumes, planned, create_empty_volume)
        except VolumeError as error:
            raise Conflict(f"cannot allocate the mirror's volumes for {name!r}: {error}") from None
        for disk in planned:
            mark_allocated(disk.path, migration_id)
        return [disk.path for disk in planned]

    async def start_outgoing(
        self,
        guest_id: str,
        migration_id: str,
        target: Endpoint,
        params: MigrationParams,
        *,
        encryption: Encryption = "required",
        streams: int | None = None,
        local_disks: LocalDisks = "refuse",
    ) -> Migration:
        """``streams`` as given to the target's ``prepare_incoming`` (both QEMUs need the same channels).

        ``local_disks`` "mirror": the guest's disks on local pools are mirrored to the volumes the
        target made for them, in Copy before the memory (``diskmirror``); "refuse": the target refused
        them at prepare already. After the commit the release deletes this host's volumes of the
        mirrored disks (``SourceMigration.release``)."""
        tls_dir = self._tls_for(encryption)
        guest = self._guest(guest_id)
        if guest.migration is not None:
            raise Conflict(f"guest {guest.spec.name!r} is already migrating")
        if not guest.running or guest.hardware != "on" or guest.process is None:
            raise Conflict(f"guest {guest.spec.name!r} is not running")
        if guest.shutting_down:
            raise Conflict(f"guest {guest.spec.name!r} is shutting down")
        mirrored, volumes = [], {}
        if local_disks == "mirror":
            for disk, path in self._disk_paths(guest.spec):
                if self._pool_identity(disk.pool).startswith(LOCAL_PREFIX) and not disk.read_only:
                    mirrored.append(disk.device)
                    if path is not None:
                        volumes[disk.device] = path
        migration = SourceMigration(
            guest.process,
            migration_id,
            target,
            params,
            self._finished,
            channels=streams or 1,
            tls_dir=tls_dir,
            mirror=mirrored,
            volumes=volumes,
            guest_name=guest.spec.name,
        )
        guest.migration = migration
        migration.after_switchover = self._measure_blackout
        migration.owns_guest = lambda: guest.migration in (None, migration)
        self._save(guest_id)
        migration.begin()
        return migration

    async def _measure_blackout(self, migration: QemuMigration, since: float) -> None:
        """The network blackout of ``migration``'s switchover, if this agent listens to heartbeats: wait
        (``BLACKOUT_WAIT_S`` at most) for one sent after ``since`` (the guest runs again), then record
        the longest gap before it (``network.network_blackout``) as ``network_blackout_ms``."""
        listener = self._heartbeats
        if listener is None:
            return
        guest_id = migration.guest_id
        if not any(beat.arrived > since - BLACKOUT_BEFORE_S for beat in listener.heartbeats(guest_id)):
            return  # it sends none here (no guestload, or its heartbeats go to another listener)
        deadline = time.monotonic() + BLACKOUT_WAIT_S
        while not any(beat.arrived > since for beat in listener.heartbeats(guest_id)):
            if time.monotonic() > deadline:
                log.warning("%s: no heartbeat after the switchover: network blackout unknown", guest_id)
                return
            await asyncio.sleep(0.02)
        try:
            blackout = network_blackout(listener.heartbeats(guest_id), since - BLACKOUT_BEFORE_S, since)
        except ValueError as error:
            log.warning("%s: network blackout unknown: %s", guest_id, error)
            return
        migration.progress.update(network_blackout_ms=blackout.gap_ms)
        log.info(
            "%s: network blackout of migration %s: %.1f ms", guest_id, migration.migration_id, blackout.gap_ms
        )

    def _tls_for(self, encryption: Encryption) -> Path | None:
        """QEMU's credentials directory under ``encryption`` (None: plain TCP); refuses "required"
        on an agent without a certificate rather than send guest memory in clear."""
        if encryption == "off":
            return None
        if self._tls_dir is None:
            raise InvalidRequest(
                "the encryption policy requires TLS on the data plane, but this agent has no certificate "
                "(start it with --tls-cert --tls-key --tls-ca, or set the pair's policy to off)"
            )
        return self._tls_dir

    async def measure_dirty_rate(self, guest_id: str, seconds: float) -> DirtyRate:
        """QEMU's own measurement: ``calc-dirty-rate`` (page sampling) then ``query-dirty-rate`` (MB/s)."""
        guest = self._guest(guest_id)
        process = guest.process
        if not guest.running or process is None or process.qmp is None:
            raise Conflict(f"guest {guest.spec.name!r} is not running; only a running guest has a dirty rate")
        calc_s = max(1, round(seconds))  # QEMU measures whole seconds
        await process.qmp.execute("calc-dirty-rate", calc_time=calc_s)
        info: dict[str, Any] = {}
        for _ in range(int((calc_s + 5) / 0.1)):
            await asyncio.sleep(0.1)
            info = await process.qmp.execute("query-dirty-rate")
            if info.get("status") == "measured":
                break
        else:
            raise Conflict(f"QEMU did not finish measuring the dirty rate of {guest.spec.name!r}")
        memory = guest.spec.memory_mib * 1024 * 1024
        return DirtyRate(
            guest_id=guest_id,
            seconds=float(calc_s),
            dirty_rate_bytes_s=int(info.get("dirty-rate", 0)) * 1024 * 1024,  # QEMU reports MiB/s
            memory_bytes=memory,
        )

    def _finished(self, migration: QemuMigration) -> None:
        """A side reached its end: update the guest it belongs to."""
        name = migration.guest_id
        guest = self._guests.get(name)
        if guest is None or guest.migration is not migration:
            return
        guest.migration = None
        try:
            self._settle_finished(guest, migration)
        finally:
            self._save(name)

    def _settle_finished(self, guest: QemuGuest, migration: QemuMigration) -> None:
        name = migration.guest_id
        state = migration.progress.state
        if migration.role == "source":
            if state == "released":
                guest.hardware = "not_runnable"
                self._stop_tasks(guest)
            return
        if state == "completed":
            guest.hardware = "on"
            self._replaced.pop(name, None)
            return
        del self._guests[name]
        previous = self._replaced.pop(name, None)
        if previous is not None:
            self._guests[name] = previous
        self._stop_tasks(guest)

    @staticmethod
    def _stop_tasks(guest: QemuGuest) -> None:
        for task in guest.tasks:
            task.cancel()
        guest.tasks = []
