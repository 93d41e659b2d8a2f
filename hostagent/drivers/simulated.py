"""The embedded default driver: simulated guests moved by the agent's page-copying engine."""

from __future__ import annotations

import logging

from hostagent.driver import (
    Conflict,
    DriverSettings,
    Endpoint,
    GuestInfo,
    GuestSpec,
    InvalidRequest,
    Migration,
    MigrationParams,
    NotFound,
    PhaseLimits,
)
from hostagent.engine import SourceMigration, TargetMigration
from hostagent.guest import SimulatedGuest

log = logging.getLogger("hostagent.simulated")
DEFAULT_CAPACITY_MIB = 64 * 1024
# Fields that define a guest; "running" is a wish, not part of the definition.
DEFINING_FIELDS = (
    "memory_mib",
    "vcpus",
    "os_type",
    "dirty_pages_per_s",
    "io_latency_ms",
    "state_save_ms",
    "fill_percent",
)


class SimulatedDriver:
    name = "simulated"

    def __init__(self, settings: DriverSettings) -> None:
        self.settings = settings
        try:
            self.capacity_mib = int(settings.options.get("capacity_mib", DEFAULT_CAPACITY_MIB))
        except ValueError as error:
            raise ValueError("capacity_mib must be a whole number of MiB") from error
        self.guests: dict[str, SimulatedGuest] = {}
        # A target's guest may replace a stopped guest of the same name; kept to restore on discard.
        self._replaced: dict[str, SimulatedGuest] = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        for guest in list(self.guests.values()):
            await guest.power_off()
            guest.drop_memory()
        self.guests.clear()

    # -- guests ---------------------------------------------------------
    def list_guests(self) -> list[GuestInfo]:
        return [guest.info() for guest in self.guests.values()]

    def get_guest(self, name: str) -> GuestInfo:
        return self._guest(name).info()

    async def define_guest(self, spec: GuestSpec) -> GuestInfo:
        existing = self.guests.get(spec["name"])
        if existing is not None and not self._same_definition(existing.spec, spec):
            if existing.running or existing.migrating:
                raise Conflict(
                    f"guest {spec['name']} exists with another definition and is running or migrating"
                )
            await self.delete_guest(spec["name"])
            existing = None
        if existing is None:
            self._check_room(spec["memory_mib"] if spec.get("running") else 0)
            existing = self.guests[spec["name"]] = self._new_guest(spec)
        if spec.get("running") and not existing.running:
            await self.start_guest(spec["name"])
        return existing.info()

    @staticmethod
    def _same_definition(old: GuestSpec, new: GuestSpec) -> bool:
        return all(old.get(field) == new.get(field) for field in DEFINING_FIELDS)

    async def start_guest(self, name: str) -> GuestInfo:
        guest = self._guest(name)
        if guest.running:
            return guest.info()
        if guest.not_runnable:
            raise Conflict(f"guest {name} is Not Runnable on this host (it migrated away)")
        if guest.migrating:
            raise Conflict(f"guest {name} is migrating")
        self._check_room(guest.memory_mib)
        await guest.boot()
        return guest.info()

    async def stop_guest(self, name: str) -> GuestInfo:
        guest = self._guest(name)
        if guest.migrating:
            raise Conflict(f"guest {name} is migrating; cancel the migration first")
        await guest.power_off()
        return guest.info()

    async def delete_guest(self, name: str) -> None:
        guest = self._guest(name)
        if guest.migrating:
            raise Conflict(f"guest {name} is migrating")
        if guest.running:
            raise Conflict(f"guest {name} is running; stop it first")
        del self.guests[name]
        guest.drop_memory()

    # -- migrations -----------------------------------------------------
    async def prepare_incoming(
        self, spec: GuestSpec, migration_id: str, limits: PhaseLimits
    ) -> tuple[Migration, Endpoint]:
        existing = self.guests.get(spec["name"])
        if existing is not None and (existing.running or existing.migrating):
            raise Conflict(f"guest {spec['name']} already runs or migrates on this host")
        self._check_room(spec["memory_mib"])
        guest = self._new_guest({**spec, "running": False})
        try:
            migration = TargetMigration(
                guest, migration_id, limits, self.settings.data_host, self._drop_incoming
            )
        except OSError as error:
            guest.drop_memory()
            raise InvalidRequest(f"cannot listen on data host {self.settings.data_host}: {error}") from error
        self._replaced.pop(spec["name"], None)
        if existing is not None:
            self._replaced[spec["name"]] = existing
        self.guests[spec["name"]] = guest
        migration.start()
        return migration, migration.endpoint

    async def start_outgoing(
        self, guest_name: str, migration_id: str, target: Endpoint, params: MigrationParams
    ) -> Migration:
        guest = self._guest(guest_name)
        if guest.migrating:
            raise Conflict(f"guest {guest_name} is already migrating ({guest.migrating})")
        if not guest.running or guest.not_runnable:
            raise Conflict(f"guest {guest_name} is not running; only a running guest migrates online")
        migration = SourceMigration(guest, migration_id, target, params, self._release_outgoing)
        migration.start()
        return migration

    async def _drop_incoming(self, guest: SimulatedGuest) -> None:
        await guest.power_off()
        guest.drop_memory()
        if self.guests.get(guest.name) is guest:
            del self.guests[guest.name]
            replaced = self._replaced.pop(guest.name, None)
            if replaced is not None:
                self.guests[guest.name] = replaced

    async def _release_outgoing(self, guest: SimulatedGuest) -> None:
        """After the commit the configuration stays here, Not Runnable; the memory goes."""
        await guest.power_off()
        guest.not_runnable = True
        guest.drop_memory()
        self._replaced.pop(guest.name, None)

    # -- helpers --------------------------------------------------------
    def _new_guest(self, spec: GuestSpec) -> SimulatedGuest:
        if spec["memory_mib"] > self.capacity_mib:
            raise Conflict(f"no room: {spec['memory_mib']} MiB asked, this host has {self.capacity_mib} MiB")
        try:
            return SimulatedGuest(spec)
        except (OSError, MemoryError) as error:
            raise Conflict(
                f"no room: cannot map {spec['memory_mib']} MiB of guest memory ({error})"
            ) from error

    def _guest(self, name: str) -> SimulatedGuest:
        guest = self.guests.get(name)
        if guest is None:
            raise NotFound(f"no guest named {name} on this host")
        return guest

    def _check_room(self, memory_mib: int) -> None:
        used = sum(g.memory_mib for g in self.guests.values() if g.running or g.migrating)
        if used + memory_mib > self.capacity_mib:
            free = self.capacity_mib - used
            raise Conflict(f"no room: {memory_mib} MiB asked, {free} MiB of {self.capacity_mib} MiB free")
