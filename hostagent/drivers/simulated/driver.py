"""The embedded default driver: simulated guests moved by the agent's page-copying engine.

Disks are sparse files in the host's pools (``--pool``), created by ``truncate`` when a definition
asks (``create``); network cards are names and MACs on the host's networks (``--network``, of any
kind). The checks before anything is created are ``hostagent.resources``'.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from agentprotocol import (
    DirtyRate,
    Encryption,
    Endpoint,
    GuestInfo,
    GuestSpec,
    HostResources,
    LocalDisks,
    MigrationParams,
    PhaseLimits,
    StopOutcome,
    StoppedGuest,
    VolumeWriter,
    resolve_streams,
)
from hostagent.driver import Conflict, DriverSettings, InvalidRequest, Migration, UnknownGuest
from hostagent.drivers.simulated.guest import SimulatedGuest
from hostagent.drivers.simulated.memory import PAGE_SIZE
from hostagent.drivers.simulated.source import SourceMigration
from hostagent.drivers.simulated.target import TargetMigration
from hostagent.hostconfig import LOCAL_PREFIX
from hostagent.resources import (
    HostStorage,
    PlannedDisk,
    mark_allocated,
    mark_committed,
    remove_uncommitted_volumes,
)
from hostagent.tls import TlsSettings

log = logging.getLogger("hostagent.simulated")
DEFAULT_CAPACITY_MIB = 64 * 1024


class SimulatedDriver:
    name = "simulated"
    mirrors_local_disks = True  # ``diskmirror``: said in health (``agentprotocol.Health``)

    def __init__(self, settings: DriverSettings) -> None:
        self.settings = settings
        try:
            self.capacity_mib = int(settings.options.get("capacity_mib", DEFAULT_CAPACITY_MIB))
        except ValueError as error:
            raise ValueError("capacity_mib must be a whole number of MiB") from error
        self.guests: dict[str, SimulatedGuest] = {}
        self.storage = HostStorage(settings.pools, settings.networks, settings.agent_name)
        # Guests by guest_id. A target's guest may replace a stopped guest with the same id; kept
        # to restore on discard.
        self._replaced: dict[str, SimulatedGuest] = {}

    async def open(self) -> None:
        """Delete the volumes a mirror allocated here and never committed (the agent was killed in the
        middle of an incoming migration: ``resources.remove_uncommitted``)."""
        remove_uncommitted_volumes(self.storage.pools)

    async def close(self) -> None:
        for guest in list(self.guests.values()):
            await guest.power_off()
            guest.drop_memory()
        self.guests.clear()

    # -- guests ---------------------------------------------------------
    def list_guests(self) -> list[GuestInfo]:
        return [guest.info() for guest in self.guests.values()]

    def get_guest(self, guest_id: str) -> GuestInfo:
        return self._guest(guest_id).info()

    def resources(self) -> HostResources:
        """Pools and networks (``--pool``, ``--network``); a writer per disk a guest holds open to write."""
        writers = [
            VolumeWriter(
                pool_identity=guest.disk_identities[disk.device],
                volume=disk.volume,
                guest_id=guest.guest_id,
                pid=os.getpid(),
            )
            for guest in self.guests.values()
            for disk in guest.spec.disks
            if disk.device in guest.disk_files
        ]
        return self.storage.report(writers)

    async def define_guest(self, spec: GuestSpec) -> GuestInfo:
        """Check the disks and cards first (``HostStorage``), then create the new volumes (sparse
        files) and the guest; a refusal creates nothing."""
        existing = self.guests.get(spec.guest_id)
        if existing is not None and not existing.spec.same_definition(spec):
            if existing.running or existing.migrating:
                raise Conflict(
                    f"guest {spec.name} exists with another definition and is running or migrating"
                )
        if existing is None or not existing.spec.same_definition(spec):
            self._check_room(spec.memory_mib if spec.running else 0)
            planned = self._plan(spec)
            if existing is not None:
                await self.delete_guest(spec.guest_id)
            self.storage.create_volumes(planned, create_sparse_file)
            disks = {disk.spec.device: (disk.path, disk.pool.identity) for disk in planned}
            existing = self.guests[spec.guest_id] = self._new_guest(spec, disks)
        if spec.running and not existing.running:
            await self.start_guest(spec.guest_id)
        return existing.info()

    async def start_guest(self, guest_id: str) -> GuestInfo:
        guest = self._guest(guest_id)
        name = guest.name
        if guest.running:
            return guest.info()
        if guest.not_runnable:
            raise Conflict(f"guest {name} is Not Runnable on this host (it migrated away)")
        if guest.migrating:
            raise Conflict(f"guest {name} is migrating")
        self._check_room(guest.memory_mib)
        await guest.boot()
        return guest.info()

    async def stop_guest(self, guest_id: str, *, graceful_timeout_s: float | None = None) -> StoppedGuest:
        """Graceful: the guest shuts down (``SimulatedGuest.shut_down``) within the timeout, or the power
        is cut when it runs out; None: cut at once."""
        guest = self._guest(guest_id)
        name = guest.name
        if guest.migrating:
            raise Conflict(f"guest {name} is migrating; cancel the migration first")
        started = time.monotonic()
        outcome: StopOutcome = "forced"
        if not guest.running:
            outcome = "already_off"
        elif graceful_timeout_s is not None:
            try:
                powered_itself_off = await asyncio.wait_for(guest.shut_down(), graceful_timeout_s)
                outcome = "shut_down" if powered_itself_off else "forced"  # else a force stop came first
            except TimeoutError:
                outcome = "timed_out"
                log.info("guest %s did not shut down within %s s: power cut", name, graceful_timeout_s)
        await guest.cut_power()  # a no-op after a clean shutdown
        elapsed = round(time.monotonic() - started, 3)
        return StoppedGuest(**guest.info().model_dump(), stop=outcome, stop_s=elapsed)

    async def delete_guest(self, guest_id: str) -> None:
        guest = self._guest(guest_id)
        name = guest.name
        if guest.migrating:
            raise Conflict(f"guest {name} is migrating")
        if guest.running:
            raise Conflict(f"guest {name} is running; stop it first")
        del self.guests[guest_id]
        await asyncio.to_thread(guest.drop_memory)  # freeing GiBs takes 100s of ms

    # -- migrations -----------------------------------------------------
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
        """``streams`` is not needed here: the target admits the count the source's first HELLO names.

        ``local_disks`` "mirror": each disk on a local pool gets a new sparse volume of its virtual size
        in a local pool of this host with room (``HostStorage.incoming_spec``), made only once every
        check passed, and deleted if the migration does not complete here (``diskmirror``).
        """
        tls = self._tls_for(encryption)
        existing = self.guests.get(spec.guest_id)
        if existing is not None and (existing.running or existing.migrating):
            raise Conflict(f"guest {spec.name} already runs or migrates on this host")
        self._check_room(spec.memory_mib)
        # refuses a pool or network this host lacks, a local disk without room for its mirror
        here = self.storage.incoming_spec(spec, mirror=local_disks == "mirror")
        disks, mirrored = {}, []
        for disk in here.disks:
            pool = self.storage.pool(disk.pool)
            assert pool is not None and disk.pool_identity is not None
            path = self.storage.volume_path(pool, disk.volume, disk.device)
            disks[disk.device] = (path, disk.pool_identity)
            if disk.create:
                mirrored.append(PlannedDisk(disk, pool, path))
        if mirrored:  # the guest is known here by its disks on this host's pools
            kept = [disk.model_copy(update={"create": False}) for disk in here.disks]
            spec = spec.model_copy(update={"disks": kept})
        guest = self._new_guest(spec.model_copy(update={"running": False}), disks)
        try:
            self.storage.create_volumes(mirrored, create_sparse_file)
        except OSError as error:
            guest.drop_memory()
            raise Conflict(f"cannot allocate the mirror's volumes for {spec.name}: {error}") from error
        guest.mirror_volumes = {disk.spec.device: disk.path for disk in mirrored}
        for planned in mirrored:
            mark_allocated(planned.path, migration_id)
        try:
            migration = TargetMigration(
                guest,
                migration_id,
                limits,
                self.settings.data_host,
                self._drop_incoming,
                tls.data_server_context() if tls else None,
                host_name=self.settings.agent_name,
            )
        except OSError as error:
            guest.drop_memory()
            remove_volumes(guest)
            raise InvalidRequest(f"cannot listen on data host {self.settings.data_host}: {error}") from error
        self._replaced.pop(spec.guest_id, None)
        if existing is not None:
            self._replaced[spec.guest_id] = existing
        self.guests[spec.guest_id] = guest
        migration.start()
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
        local_disks: LocalDisks = "refuse",
    ) -> Migration:
        """``streams`` None: sized from this host's cores and the guest's memory (``auto_streams``).

        ``local_disks`` "mirror": the guest's disks on local pools are mirrored to the target
        (``diskmirror``); "refuse": the target refused them at prepare already."""
        tls = self._tls_for(encryption)
        guest = self._guest(guest_id)
        if guest.migrating:
            raise Conflict(f"guest {guest.name} is already migrating ({guest.migrating})")
        if not guest.running or guest.not_runnable:
            raise Conflict(f"guest {guest.name} is not running; only a running guest migrates online")
        if guest.shutting_down:
            raise Conflict(f"guest {guest.name} is shutting down")
        context = tls.data_client_context() if tls else None
        count = resolve_streams(streams, guest.memory_mib, os.cpu_count())
        mirrored = []
        if local_disks == "mirror":
            mirrored = [
                disk.device
                for disk in guest.spec.disks
                if disk.device in guest.disk_paths
                and guest.disk_identities.get(disk.device, "").startswith(LOCAL_PREFIX)
            ]
        migration = SourceMigration(
            guest,
            migration_id,
            target,
            params,
            self._release_outgoing,
            context,
            streams=count,
            mirror=mirrored,
        )
        migration.start()
        return migration

    def _tls_for(self, encryption: Encryption) -> TlsSettings | None:
        """The TLS settings the data plane uses under ``encryption``; refuses "required" without any."""
        if encryption == "off":
            return None
        if self.settings.tls is None:
            raise InvalidRequest(
                "the encryption policy requires TLS on the data plane, but this agent has no certificate "
                "(start it with --tls-cert --tls-key --tls-ca, or set the pair's policy to off)"
            )
        return self.settings.tls

    async def measure_dirty_rate(self, guest_id: str, seconds: float) -> DirtyRate:
        guest = self._guest(guest_id)
        if not guest.running or guest.not_runnable:
            raise Conflict(f"guest {guest.name} is not running; only a running guest has a dirty rate")
        rate, working_set = await guest.measure_dirty_rate(seconds)
        return DirtyRate(
            guest_id=guest_id,
            seconds=seconds,
            dirty_rate_bytes_s=round(rate),
            memory_bytes=guest.memory.size,
            written_bytes=guest.memory.written_count() * PAGE_SIZE,
            working_set_bytes=working_set,
        )

    async def _drop_incoming(self, guest: SimulatedGuest) -> None:
        """The half-received guest goes, and the volumes allocated for its mirror with it."""
        await guest.power_off()
        remove_volumes(guest)
        if self.guests.get(guest.guest_id) is guest:  # gone from the listing first, then its memory
            del self.guests[guest.guest_id]
            replaced = self._replaced.pop(guest.guest_id, None)
            if replaced is not None:
                self.guests[guest.guest_id] = replaced
        await asyncio.to_thread(guest.drop_memory)  # freeing GiBs takes 100s of ms

    async def _release_outgoing(self, guest: SimulatedGuest) -> None:
        """After the commit the configuration stays here, Not Runnable; the memory goes."""
        await guest.power_off()
        guest.not_runnable = True
        await asyncio.to_thread(guest.drop_memory)  # freeing GiBs takes 100s of ms
        self._replaced.pop(guest.guest_id, None)

    # -- helpers --------------------------------------------------------
    def _plan(self, spec: GuestSpec) -> list[PlannedDisk]:
        """The definition's disks and cards checked against this host and its other guests."""
        volumes: dict[Path, tuple[str, bool]] = {}
        macs: dict[str, str] = {}
        for guest in self.guests.values():
            if guest.guest_id == spec.guest_id:
                continue
            for disk in guest.spec.disks:
                if disk.device in guest.disk_paths:
                    volumes[guest.disk_paths[disk.device]] = (guest.name, disk.shareable)
            macs.update((nic.mac, guest.name) for nic in guest.spec.nics)
        planned = self.storage.plan_disks(spec, volumes)
        self.storage.check_nics(spec, macs, ("simulated", "bridge", "user"))
        return planned

    def _new_guest(self, spec: GuestSpec, disks: dict[str, tuple[Path, str]] | None = None) -> SimulatedGuest:
        if spec.memory_mib > self.capacity_mib:
            raise Conflict(f"no room: {spec.memory_mib} MiB asked, this host has {self.capacity_mib} MiB")
        try:
            return SimulatedGuest(spec, disks)
        except (OSError, MemoryError) as error:
            raise Conflict(f"no room: cannot map {spec.memory_mib} MiB of guest memory ({error})") from error

    def _guest(self, guest_id: str) -> SimulatedGuest:
        guest = self.guests.get(guest_id)
        if guest is None:
            raise UnknownGuest(f"no guest {guest_id} on this host")
        return guest

    def _check_room(self, memory_mib: int) -> None:
        used = sum(g.memory_mib for g in self.guests.values() if g.running or g.migrating)
        if used + memory_mib > self.capacity_mib:
            free = self.capacity_mib - used
            raise Conflict(f"no room: {memory_mib} MiB asked, {free} MiB of {self.capacity_mib} MiB free")


def remove_volumes(guest: SimulatedGuest) -> None:
    """Delete the volumes a migration's target allocated for ``guest``'s mirror (idempotent)."""
    for path in guest.mirror_volumes.values():
        path.unlink(missing_ok=True)
        mark_committed(path)  # the marker goes with its volume
    guest.mirror_volumes = {}


def create_sparse_file(disk: PlannedDisk) -> None:
    """A new volume: a sparse file of the disk's virtual size (refused if the file exists)."""
    with open(disk.path, "xb") as volume:
        volume.truncate(disk.spec.virtual_size_bytes)
