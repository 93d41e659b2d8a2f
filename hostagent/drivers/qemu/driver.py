"""The ``qemu`` driver: guests are QEMU processes, migrated with QEMU's own live migration.

Options (``DriverSettings.options``, from the agent's command line):
  qemu_binary   QEMU to run (default ``qemu-system-x86_64``); refused below QEMU 10
  guest_images  directory with ``vmlinuz`` and ``initramfs.cpio.gz`` (default: the repo's
                ``guest-images/``, built by ``scripts/build_test_guest.sh``)
  run_dir       where QMP sockets, serial consoles and QEMU logs go (default: a temp dir)
  accel         QEMU accelerator (default ``tcg``; ``kvm`` where the host has it)

Every guest boots the test guest's kernel and initramfs; its workload (memwriter) writes
``memory_mib - 96`` MiB at ``dirty_pages_per_s`` and checks them, and what it says on its
serial console is reported under ``workload`` in the guest's info.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostagent.driver import Conflict, DriverSettings, InvalidRequest, Migration, UnknownGuest
from hostagent.drivers.qemu.migration import QemuMigration
from hostagent.drivers.qemu.process import MIN_GUEST_MIB, QemuConfig, QemuProcess, Workload, check_qemu
from hostagent.drivers.qemu.source import SourceMigration
from hostagent.drivers.qemu.target import TargetMigration
from hostagent.protocol import (
    DirtyRate,
    Encryption,
    Endpoint,
    GuestInfo,
    GuestSpec,
    HardwareStatus,
    MigrationParams,
    OsStatus,
    PhaseLimits,
)

log = logging.getLogger(__name__)

DEFAULT_IMAGES = Path(__file__).resolve().parents[3] / "guest-images"
MAX_VCPUS = 8
MAX_MEMORY_MIB = 64 * 1024
MAX_DIRTY_RATE = 1_000_000


def refuse_encryption(encryption: Encryption) -> None:
    """The QEMU driver does not encrypt its migration stream yet (QEMU's ``tls-creds-x509`` is not
    wired): it refuses the policy "required" rather than send guest memory in clear."""
    if encryption != "off":
        raise InvalidRequest(
            "the QEMU driver cannot encrypt the migration stream yet: set this pair's data-plane "
            "encryption policy to off (a trusted migration network) to migrate QEMU guests"
        )


@dataclass
class QemuGuest:
    spec: GuestSpec
    hardware: HardwareStatus = "off"
    process: QemuProcess | None = None
    migration: QemuMigration | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running


def workload_of(spec: GuestSpec) -> Workload:
    return Workload(memory_mib=spec.memory_mib, vcpus=spec.vcpus, dirty_pages_per_s=spec.dirty_pages_per_s)


def check_spec(spec: GuestSpec) -> GuestSpec:
    """This driver's own bounds on top of the protocol's (QEMU needs room for the test guest's OS)."""
    if not MIN_GUEST_MIB <= spec.memory_mib <= MAX_MEMORY_MIB:
        raise InvalidRequest(f"memory_mib: a whole number from {MIN_GUEST_MIB} to {MAX_MEMORY_MIB}")
    if not 1 <= spec.vcpus <= MAX_VCPUS:
        raise InvalidRequest(f"vcpus: a whole number from 1 to {MAX_VCPUS}")
    if not 0 <= spec.dirty_pages_per_s <= MAX_DIRTY_RATE:
        raise InvalidRequest(f"dirty_pages_per_s: a whole number from 0 to {MAX_DIRTY_RATE}")
    if "os_type" not in spec.model_fields_set:
        spec = spec.model_copy(update={"os_type": "Linux"})
    return spec


class QemuDriver:
    name = "qemu"

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
        self.qemu_version = ""
        self._guests: dict[str, QemuGuest] = {}
        self._replaced: dict[str, QemuGuest] = {}

    async def open(self) -> None:
        self.qemu_version = check_qemu(self.config.binary)
        for image in (self.config.kernel, self.config.initramfs):
            if not image.is_file():
                raise RuntimeError(f"guest image {image} missing: build it with scripts/build_test_guest.sh")
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        log.info("qemu driver: QEMU %s, guests from %s", self.qemu_version, self.config.kernel.parent)

    async def close(self) -> None:
        for guest in list(self._guests.values()) + list(self._replaced.values()):
            await self._halt(guest)
        if self._own_run_dir:
            shutil.rmtree(self.config.run_dir, ignore_errors=True)

    # --- inventory -------------------------------------------------------------------

    def list_guests(self) -> list[GuestInfo]:
        return [self._info(guest) for guest in self._guests.values()]

    def get_guest(self, guest_id: str) -> GuestInfo:
        return self._info(self._guest(guest_id))

    def _guest(self, guest_id: str) -> QemuGuest:
        try:
            return self._guests[guest_id]
        except KeyError:
            raise UnknownGuest(f"no guest {guest_id} on {self.settings.agent_name}") from None

    def _info(self, guest: QemuGuest) -> GuestInfo:
        spec = guest.spec
        workload: dict[str, object] = guest.process.workload_report() if guest.process else {}
        return GuestInfo(
            guest_id=spec.guest_id,
            name=spec.name,
            os_type=spec.os_type,
            os_status=self._os_status(guest, workload),
            hardware_status=guest.hardware,
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            migrating=guest.migration.migration_id if guest.migration else None,
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
        else:
            self._guests[clean.guest_id] = QemuGuest(spec=clean)
        if spec.running:
            return await self.start_guest(clean.guest_id)
        return self.get_guest(clean.guest_id)

    async def start_guest(self, guest_id: str) -> GuestInfo:
        guest = self._guest(guest_id)
        name = guest.spec.name
        if guest.hardware == "not_runnable":
            raise Conflict(f"guest {name!r} is Not Runnable here (it migrated away)")
        if guest.migration is not None:
            raise Conflict(f"guest {name!r} is migrating")
        if not guest.running:
            process = QemuProcess(
                self.config, guest_id, workload_of(guest.spec), instance="boot", incoming=False
            )
            await self._launch(guest, process)
            guest.hardware = "on"
        return self.get_guest(guest_id)

    async def stop_guest(self, guest_id: str) -> GuestInfo:
        guest = self._guest(guest_id)
        name = guest.spec.name
        if guest.migration is not None:
            raise Conflict(f"guest {name!r} is migrating")
        await self._halt(guest)
        if guest.hardware == "on":
            guest.hardware = "off"
        return self.get_guest(guest_id)

    async def delete_guest(self, guest_id: str) -> None:
        guest = self._guest(guest_id)
        if guest.running or guest.migration is not None:
            raise Conflict(f"guest {guest.spec.name!r} is running or migrating; stop it first")
        del self._guests[guest_id]

    async def _launch(self, guest: QemuGuest, process: QemuProcess) -> None:
        await process.launch()
        guest.process = process
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
            migration = guest.migration
            if migration is not None and migration.process is process:
                try:
                    await migration.handle_event(event)
                except Exception:
                    log.exception("%s: handling %s", guest.spec.guest_id, event.get("event"))

    async def _watch_exit(self, guest: QemuGuest, process: QemuProcess) -> None:
        assert process.process is not None
        code = await process.process.wait()
        if guest.process is process and guest.hardware == "on" and guest.migration is None:
            log.warning("%s: QEMU exited (%s): %s", guest.spec.guest_id, code, process.log_tail()[-200:])
            guest.hardware = "off"

    # --- migration -------------------------------------------------------------------

    async def prepare_incoming(
        self,
        spec: GuestSpec,
        migration_id: str,
        limits: PhaseLimits,
        *,
        encryption: Encryption = "required",
        streams: int | None = None,
    ) -> tuple[Migration, Endpoint]:
        """``streams`` > 1: QEMU's ``multifd`` with that many ``multifd-channels`` (as the source's)."""
        refuse_encryption(encryption)
        clean = check_spec(spec)
        guest_id = clean.guest_id
        existing = self._guests.get(guest_id)
        if existing is not None and (existing.running or existing.migration is not None):
            raise Conflict(f"guest {clean.name!r} already runs or migrates on {self.settings.agent_name}")
        guest = QemuGuest(spec=clean)
        instance = f"in-{migration_id[:12]}"
        process = QemuProcess(self.config, guest_id, workload_of(clean), instance=instance, incoming=True)
        await self._launch(guest, process)
        migration = TargetMigration(
            process, migration_id, limits, self.settings.data_host, self._finished, channels=streams or 1
        )
        guest.migration = migration
        if existing is not None:
            self._replaced[guest_id] = existing
        self._guests[guest_id] = guest
        await migration.begin()
        return migration, migration.endpoint

    async def start_outgoing(
        self,
        guest_id: str,
        migration_id: str,
        target: Endpoint,
        params: MigrationParams,
        *,
        encryption: Encryption = "required",
        streams: int | None = None,
    ) -> Migration:
        """``streams`` as given to the target's ``prepare_incoming`` (both QEMUs need the same channels)."""
        refuse_encryption(encryption)
        guest = self._guest(guest_id)
        if guest.migration is not None:
            raise Conflict(f"guest {guest.spec.name!r} is already migrating")
        if not guest.running or guest.hardware != "on" or guest.process is None:
            raise Conflict(f"guest {guest.spec.name!r} is not running")
        migration = SourceMigration(
            guest.process, migration_id, target, params, self._finished, channels=streams or 1
        )
        guest.migration = migration
        migration.begin()
        return migration

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
