"""The embedded default driver: simulated guests moved by the agent's page-copying engine."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from agentprotocol import (
    DirtyRate,
    Encryption,
    Endpoint,
    GuestInfo,
    GuestSpec,
    MigrationParams,
    PhaseLimits,
    StopOutcome,
    StoppedGuest,
    resolve_streams,
)
from hostagent.driver import Conflict, DriverSettings, InvalidRequest, Migration, UnknownGuest
from hostagent.drivers.simulated.guest import SimulatedGuest
from hostagent.drivers.simulated.memory import PAGE_SIZE
from hostagent.drivers.simulated.source import SourceMigration
from hostagent.drivers.simulated.target import TargetMigration
from hostagent.tls import TlsSettings

log = logging.getLogger("hostagent.simulated")
DEFAULT_CAPACITY_MIB = 64 * 1024


class SimulatedDriver:
    name = "simulated"

    def __init__(self, settings: DriverSettings) -> None:
        self.settings = settings
        try:
            self.capacity_mib = int(settings.options.get("capacity_mib", DEFAULT_CAPACITY_MIB))
        except ValueError as error:
            raise ValueError("capacity_mib must be a whole number of MiB") from error
        self.guests: dict[str, SimulatedGuest] = {}
        # Guests by guest_id. A target's guest may replace a stopped guest with the same id; kept
        # to restore on discard.
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

    def get_guest(self, guest_id: str) -> GuestInfo:
        return self._guest(guest_id).info()

    async def define_guest(self, spec: GuestSpec) -> GuestInfo:
        existing = self.guests.get(spec.guest_id)
        if existing is not None and not existing.spec.same_definition(spec):
            if existing.running or existing.migrating:
                raise Conflict(
                    f"guest {spec.name} exists with another definition and is running or migrating"
                )
            await self.delete_guest(spec.guest_id)
            existing = None
        if existing is None:
            self._check_room(spec.memory_mib if spec.running else 0)
            existing = self.guests[spec.guest_id] = self._new_guest(spec)
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
    ) -> tuple[Migration, Endpoint]:
        """``streams`` is not needed here: the target admits the count the source's first HELLO names."""
        tls = self._tls_for(encryption)
        existing = self.guests.get(spec.guest_id)
        if existing is not None and (existing.running or existing.migrating):
            raise Conflict(f"guest {spec.name} already runs or migrates on this host")
        self._check_room(spec.memory_mib)
        guest = self._new_guest(spec.model_copy(update={"running": False}))
        try:
            migration = TargetMigration(
                guest,
                migration_id,
                limits,
                self.settings.data_host,
                self._drop_incoming,
                tls.data_server_context() if tls else None,
            )
        except OSError as error:
            guest.drop_memory()
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
    ) -> Migration:
        """``streams`` None: sized from this host's cores and the guest's memory (``auto_streams``)."""
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
        migration = SourceMigration(
            guest, migration_id, target, params, self._release_outgoing, context, streams=count
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
        await guest.power_off()
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
    def _new_guest(self, spec: GuestSpec) -> SimulatedGuest:
        if spec.memory_mib > self.capacity_mib:
            raise Conflict(f"no room: {spec.memory_mib} MiB asked, this host has {self.capacity_mib} MiB")
        try:
            return SimulatedGuest(spec)
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
