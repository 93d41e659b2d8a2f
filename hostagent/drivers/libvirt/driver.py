"""``--driver libvirt``: the host's libvirt daemon behind the agent; its existing domains are the guests.

The driver **adopts** what libvirt has: every domain, running or only defined, is a guest known by
its libvirt UUID, with memory, vCPUs, disks and network cards read from its XML and the host's
storage pools and networks (``inventory``). Reading changes nothing; a domain changes only when
an admin acts (start: ``virDomainCreate``; stop: ``virDomainShutdown``, then ``virDomainDestroy``
after the graceful timeout; a migration). Defining or deleting domains stays libvirt's business.

Options (``--driver-option``): ``uri=`` the daemon to drive (default ``qemu:///system``);
``peer_uri=`` the URI a *source* daemon uses to reach this one in a peer-to-peer migration
(default: ``uri``; between real hosts e.g. ``qemu+tls://this-host/system``); ``stall_s=`` how long
Copy may move no byte before the driver aborts it (default 30: libvirt waits forever on a cut link).

A migration is libvirt's peer-to-peer live migration (``jobs.MigrationJob``). libvirt commits it
on its own at the switchover (there is no "ready, the source could still resume" point in P2P), so
the driver says ``switchover_commits = True``: after the switchover a cancel answers 409 (too
late), the source's domain stays defined but shut off (reason *migrated*: reported
``not_runnable``, and refused by ``start_guest``). Source states: ``init`` until memory moves,
``copy`` (bytes, rounds, dirty rate from libvirt's job statistics and ``MIGRATION_ITERATION``
events), ``frozen`` once libvirt paused the vCPUs (``quiesce`` is passed through: libvirt does not
separate draining I/O from stopping vCPUs), ``ready`` once libvirt's job completed (the target
runs), then ``released`` on the control plane's release. The target side records the expected
migration and turns ``ready`` when the domain runs here, ``completed`` on resume.

There is no memory digest: libvirt and QEMU check the stream themselves, the snapshot's digests
stay None. The console reads ``switchover_commits`` from the health answer and checks the arrival
instead by libvirt's completed job ("ready"), the target's domain running and the source's left shut
off (see ``docs/libvirt-driver.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import xml.etree.ElementTree as ElementTree
from typing import Any
from xml.sax.saxutils import quoteattr

from agentprotocol import (
    DirtyRate,
    Encryption,
    Endpoint,
    FailureKind,
    GuestInfo,
    GuestSpec,
    HostResources,
    LocalDisks,
    MigrationParams,
    MigrationState,
    Network,
    ParamsChange,
    PhaseLimits,
    ProgressSnapshot,
    Role,
    StoppedGuest,
    StoragePool,
)
from agentprotocol.guests import HardwareStatus, StopOutcome
from agentprotocol.storage import DiskInfo as ProtocolDisk
from agentprotocol.storage import NicSpec
from hostagent.driver import Conflict, DriverSettings, InvalidRequest, Migration, UnknownGuest
from hostagent.drivers.libvirt.connection import (
    DEFAULT_URI,
    Connection,
    Domain,
    LibvirtUnavailable,
    host_identity,
    libvirt_module,
    open_connection,
)
from hostagent.drivers.libvirt.inventory import DiskInfo, DomainInfo, NicInfo, read_domain
from hostagent.drivers.libvirt.jobs import JobSnapshot, MigrationJob, MigrationPolicy, MigrationRefused
from hostagent.progress import Progress

log = logging.getLogger(__name__)

LIBVIRT_MIGRATION_PORT = 49152  # the first of libvirt's default migration ports (informational)
POLL_S = 0.2  # how often a running job's statistics are read
TARGET_POLL_S = 0.5  # how often the target looks for the arriving domain
SHUTOFF_MIGRATED = 4  # libvirt's VIR_DOMAIN_SHUTOFF_MIGRATED
# The agent's mark on a domain it migrates (live <metadata>): a restarted agent touches only its own jobs.
METADATA_URI = "https://matrixoe.invalid/libvirt-driver/migration"
METADATA_PREFIX = "mxoe"
SETTLE_TIMEOUT_S = 60.0
ABORT_RETRY_S = 1.0  # an abort that found no job yet is sent again after this long
DEFAULT_STALL_S = 30.0  # Copy moving no byte this long (a cut link: libvirt has no time-out): abort
SHARED_POOL_TYPES = {"netfs", "rbd", "iscsi", "iscsi-direct", "gluster", "sheepdog", "vstorage"}
RUNNING_STATES = {"running", "blocked", "paused", "pmsuspended", "shutdown"}
ACTIVE = ("init", "copy", "quiesce", "frozen")


def hardware_status(info: DomainInfo) -> HardwareStatus:
    """``on`` while QEMU runs the domain, ``not_runnable`` once it migrated away, else ``off``."""
    if info.state in RUNNING_STATES:
        return "on"
    if info.state == "shut off" and info.state_reason == SHUTOFF_MIGRATED:
        return "not_runnable"
    return "off"


def _protocol_disk(disk: DiskInfo) -> ProtocolDisk | None:
    """A disk in the protocol's terms, or None when it does not fit them (a CD-ROM, a file in no pool...)."""
    if disk.device != "disk" or not disk.pool or not disk.volume or not disk.capacity_bytes:
        return None
    try:
        return ProtocolDisk(
            device=disk.target,
            pool=disk.pool,
            volume=disk.volume,
            virtual_size_bytes=disk.capacity_bytes,
            format="qcow2" if disk.format == "qcow2" else "raw",
            bus="virtio" if disk.target.startswith("vd") else "scsi",
            read_only=disk.read_only,
            shareable=disk.shared,
            allocated_bytes=disk.allocation_bytes or 0,
        )
    except ValueError:  # a name the protocol does not take (e.g. a space in a volume's name)
        return None


def _protocol_nic(nic: NicInfo) -> NicSpec | None:
    """A network card as the protocol's ``NicSpec`` (network: libvirt's network, else the bridge), or None."""
    network = nic.network or nic.bridge
    if not network:
        return None
    try:
        return NicSpec(network=network, mac=nic.mac, model="e1000" if nic.model == "e1000" else "virtio")
    except ValueError:
        return None


def guest_info(info: DomainInfo, migrating: str | None = None) -> GuestInfo:
    """A libvirt domain as the agent reports a guest. ``workload`` keeps libvirt's own words and what
    did not fit the protocol (disks outside pools, CD-ROMs, network cards of other kinds)."""
    disks = [disk for disk in map(_protocol_disk, info.disks) if disk is not None]
    nics = [nic for nic in map(_protocol_nic, info.nics) if nic is not None]
    running = info.state in RUNNING_STATES
    return GuestInfo(
        guest_id=info.uuid,
        name=info.name,
        os_type="unknown",
        os_status="up" if running else "down",
        hardware_status=hardware_status(info),
        memory_mib=max(1, info.memory_mib),
        vcpus=max(1, info.vcpus),
        migrating=migrating,
        disks=disks,
        nics=nics,
        workload={
            "libvirt_state": info.state,
            "libvirt_state_reason": info.state_reason,
            "domain_type": info.domain_type,
            "disks_not_shown": [disk.target for disk in info.disks if _protocol_disk(disk) is None],
            "nics_not_shown": [nic.mac for nic in info.nics if _protocol_nic(nic) is None],
        },
    )


def policy_of(params: MigrationParams, encryption: Encryption, streams: int | None) -> MigrationPolicy:
    """The pair's policy as libvirt's (``jobs.MigrationPolicy``); MigrationRefused when out of range."""
    return MigrationPolicy(
        downtime_ms=params.downtime_ms,
        bandwidth_mbps=params.bandwidth_mbps,
        auto_converge=params.auto_converge,
        throttle_initial_pct=params.throttle_initial_pct,
        throttle_increment_pct=params.throttle_increment_pct,
        streams=streams,
        encryption=encryption,
    )


def _pool_source(root: ElementTree.Element) -> str:
    """Where a pool's storage comes from, from its XML: ``host:path`` (an NFS export), a device, a name."""
    source = root.find("source")
    if source is None:
        return ""
    host = source.find("host")
    path = source.find("dir") if source.find("dir") is not None else source.find("device")
    parts = (
        host.get("name", "") if host is not None else "",
        path.get("path", "") if path is not None else source.findtext("name", ""),
    )
    return ":".join(part for part in parts if part)


def pool_of(pool: Any, host_uuid: str) -> StoragePool:
    """A libvirt storage pool as the protocol's (ValueError: a name the protocol does not take).

    Network-backed pool types are ``shared``, known by their source (``netfs:nas:/export``, the same
    on every host that mounts it); the others ``local``, known by this host's UUID and the pool's name.
    """
    root = ElementTree.fromstring(pool.XMLDesc(0))  # noqa: S314 - the daemon's own XML
    kind = root.get("type", "dir")
    where = _pool_source(root)
    shared = kind in SHARED_POOL_TYPES and bool(where)
    _state, capacity, _allocation, available = pool.info() if pool.isActive() else (0, 0, 0, 0)
    return StoragePool(
        name=pool.name(),
        kind="shared" if shared else "local",
        identity=f"{kind}:{where}" if shared else f"{host_uuid}:{pool.name()}",
        capacity_bytes=capacity,
        free_bytes=available,
        location=root.findtext("./target/path", "") or where,
    )


def mark_migration(domain: Domain, migration_id: str | None) -> None:
    """Put (or with None, take away) this agent's mark on a running domain: its live ``<metadata>``."""
    libvirt = libvirt_module()
    element = None if migration_id is None else f"<migration id={quoteattr(migration_id)}/>"
    prefix = None if migration_id is None else METADATA_PREFIX
    domain.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, prefix, METADATA_URI, libvirt.VIR_DOMAIN_AFFECT_LIVE
    )


def marked_migration(domain: Domain) -> str | None:
    """The migration id this agent marked a running domain with, or None."""
    libvirt = libvirt_module()
    try:
        xml = domain.metadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_URI, libvirt.VIR_DOMAIN_AFFECT_LIVE
        )
    except libvirt.libvirtError:
        return None  # no mark (VIR_ERR_NO_DOMAIN_METADATA), or not running
    return ElementTree.fromstring(xml).get("id")  # noqa: S314 - our own element, as libvirt keeps it


def unmark(domain: Domain) -> None:
    """Take the mark away, if the domain still runs here (best effort: it may have left)."""
    with contextlib.suppress(Exception):
        mark_migration(domain, None)


class LibvirtSourceMigration:
    """The source side: one ``MigrationJob`` followed into a ``Progress`` by a task of the agent's loop."""

    def __init__(
        self,
        migration_id: str,
        guest_id: str,
        job: MigrationJob,
        params: MigrationParams,
        stall_s: float = DEFAULT_STALL_S,
    ) -> None:
        """``params.limits``: Init and Copy time limits (s) end the job (``time_limit``); after the
        switchover libvirt commits on its own, so Quiesce and Frozen have none here. ``stall_s``: Copy
        moving no byte that long ends it (``unreachable``)."""
        self.migration_id = migration_id
        self.role: Role = "source"
        self.guest_id = guest_id
        self.job = job
        self.progress = Progress(migration_id, "source", guest_id)
        self.progress.update(allowed_downtime_ms=params.downtime_ms)
        self.limits = params.limits
        self.stall_s = stall_s
        self._moved_at = (time.monotonic(), -1)  # when bytes_sent last grew, and its value then
        self._giving_up: tuple[str, FailureKind] | None = None  # why the driver aborts the job itself
        self._aborter: asyncio.Task[None] | None = None
        self.final: JobSnapshot | None = None
        self._ended = asyncio.Event()
        self._task = asyncio.create_task(self._follow(), name=f"libvirt-migration-{migration_id}")

    def snapshot(self) -> ProgressSnapshot:
        return self.progress.snapshot()

    async def next_change(self, after_seq: int) -> ProgressSnapshot:
        return await self.progress.next_change(after_seq)

    @property
    def committed(self) -> bool:
        """True once libvirt paused the source for the switchover: from there libvirt commits by itself."""
        return self.progress.state in ("frozen", "ready", "released", "completed")

    async def _follow(self) -> None:
        try:
            while True:
                current = await asyncio.to_thread(self.job.snapshot)
                self._take(current)
                if current.finished:
                    return
                reason = self._over_a_limit()
                if reason is not None and self._giving_up is None:
                    self._giving_up = reason
                    log.warning("%s: %s: aborting", self.migration_id, reason[0])
                    self._aborter = asyncio.create_task(self._abort_until_ended())
                await asyncio.sleep(POLL_S)
        except LibvirtUnavailable as error:
            self.progress.fail("aborted", str(error), FailureKind.UNREACHABLE)
        except Exception as error:  # noqa: BLE001 - any libvirt surprise ends the follow, said in words
            log.exception("following migration %s", self.migration_id)
            self.progress.fail("aborted", f"libvirt: {error}", FailureKind.INTERNAL)
        finally:
            unmark(self.job.domain)  # cancelled/failed: it runs here again; completed: it left
            self._ended.set()

    def _over_a_limit(self) -> tuple[str, FailureKind] | None:
        """Why to abort now: Init or Copy over its time limit, or Copy not moving (else None)."""
        now, phase = time.monotonic(), self.progress.phase
        if self.progress.state not in ("init", "copy") or phase is None:
            return None
        limit = self.limits.of(phase)
        if limit is not None and now - self.progress.phase_started > limit:
            return f"the {phase} phase ran over its limit of {limit:g} s", FailureKind.TIME_LIMIT
        sent = self.progress.current.bytes_sent
        if sent != self._moved_at[1]:
            self._moved_at = (now, sent)
        elif phase == "copy" and now - self._moved_at[0] > self.stall_s:
            return f"the migration stream moved nothing for {self.stall_s:g} s", FailureKind.UNREACHABLE
        return None

    def _take(self, current: JobSnapshot) -> None:
        fields: dict[str, Any] = {
            "round": current.round,
            "dirty_rate_bytes_s": current.dirty_rate_bytes_s,
            "throughput_bytes_s": current.throughput_bytes_s,
            "expected_downtime_ms": current.expected_downtime_ms,
        }
        if current.memory_total_bytes:
            fields.update(
                bytes_total=current.memory_total_bytes + current.disk_total_bytes,
                bytes_sent=current.memory_processed_bytes + current.disk_processed_bytes,
                bytes_remaining=current.memory_remaining_bytes + current.disk_remaining_bytes,
            )
        self.progress.update(**fields)
        if current.stage == "copy":
            self.progress.enter("copy")
            total = current.memory_processed_bytes + current.memory_remaining_bytes
            if total:
                self.progress.raise_percent("copy", 100 * current.memory_processed_bytes / total)
        elif current.stage == "switchover":
            self.progress.enter("frozen")
        elif current.stage == "completed":
            self.final = current
            self.progress.update(downtime_ms=current.downtime_ms, bytes_remaining=0)
            self.progress.enter("ready")
        elif current.stage in ("cancelled", "failed"):
            self.final = current
            running = "the domain runs on here" if current.source_running else "the domain does NOT run here"
            kind = FailureKind.CANCELLED if current.stage == "cancelled" else FailureKind.INTERNAL
            state: MigrationState = "cancelled" if current.stage == "cancelled" else "aborted"
            error = f"libvirt: {current.error} ({running})"
            if self._giving_up is not None:  # the driver's own abort: its reason, not libvirt's words
                state, error, kind = "aborted", f"{self._giving_up[0]} ({running})", self._giving_up[1]
            self.progress.fail(state, error, kind)

    async def _until_ended_or(self, states: tuple[str, ...]) -> ProgressSnapshot:
        """Wait until the state is one of ``states`` or the follow ended; the snapshot then."""
        seq = 0
        while self.progress.state not in states and not self._ended.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.next_change(seq), 1.0)
            seq = self.progress.seq
        return self.snapshot()

    async def quiesce(self) -> ProgressSnapshot:
        """libvirt quiesces on its own when it pauses the vCPUs: wait for that (or the end)."""
        return await self._until_ended_or(("frozen", "ready", "released"))

    async def freeze(self) -> ProgressSnapshot:
        """libvirt freezes and commits on its own: wait for "ready" (the target runs) or the end."""
        return await self._until_ended_or(("ready", "released"))

    async def release(self) -> ProgressSnapshot:
        """After "ready": libvirt already shut the source's domain off (kept defined, Not Runnable)."""
        if self.progress.state not in ("ready", "released"):
            state = self.progress.state
            raise Conflict(f"migration {self.migration_id} is {state}, not ready: nothing to release")
        self.progress.enter("released")
        return self.snapshot()

    async def cancel(self) -> ProgressSnapshot:
        """Before the switchover: ``virDomainAbortJob``, then the source's state checked. After: 409."""
        if self.progress.state in ("cancelled", "aborted"):
            return self.snapshot()
        if self.committed:
            raise Conflict(
                f"too late: libvirt commits migration {self.migration_id} at the switchover "
                f"(it is {self.progress.state}); the guest is the target's now"
            )
        await self._abort_until_ended()
        await self._ended.wait()
        return self.snapshot()

    async def _abort_until_ended(self) -> None:
        """``virDomainAbortJob`` until the job ends or passes the switchover: in Init the daemon may not
        have begun the job yet, and an abort of no job does nothing (then the next one lands)."""
        while not self._ended.is_set() and self.progress.state in ("init", "copy"):
            try:
                await asyncio.to_thread(self.job.abort)
            except Exception as error:  # noqa: BLE001 - the job ended meanwhile: its outcome follows
                log.info("abort of %s: %s", self.migration_id, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), ABORT_RETRY_S)

    async def resume(self) -> ProgressSnapshot:
        """Make sure the guest runs here: as cancel before the switchover; after it, 409 (too late)."""
        return await self.cancel()

    async def discard(self) -> ProgressSnapshot:
        raise Conflict("discard is a target command; the source keeps its guest")

    async def change_params(self, change: ParamsChange) -> ProgressSnapshot:
        """Allowed downtime and bandwidth of the running job through libvirt; auto-converge is fixed."""
        if self.progress.state not in ("init", "copy"):
            raise Conflict(f"migration {self.migration_id} is {self.progress.state}; its Copy is over")
        if change.auto_converge is not None:
            raise Conflict("libvirt cannot turn auto-converge on or off during a migration")
        downtime = change.downtime_ms
        if change.switchover_now:
            downtime = max(downtime or 0, 600_000)  # libvirt's job then switches over at the next pass
        try:
            if downtime is not None:
                await asyncio.to_thread(self.job.set_downtime, downtime)
                self.progress.update(allowed_downtime_ms=downtime)
            if change.bandwidth_mbps is not None:
                await asyncio.to_thread(self.job.set_bandwidth, change.bandwidth_mbps or None)
        except libvirt_module().libvirtError as error:
            raise Conflict(f"libvirt refused the change (the job may have ended): {error}") from None
        return self.snapshot()


class LibvirtTargetMigration:
    """The target side: the expected migration, "ready" once libvirt runs the arrived domain here."""

    def __init__(self, driver: LibvirtDriver, migration_id: str, spec: GuestSpec) -> None:
        self.migration_id = migration_id
        self.role: Role = "target"
        self.guest_id = spec.guest_id
        self.name = spec.name
        self.driver = driver
        self.progress = Progress(migration_id, "target", spec.guest_id)
        self._task = asyncio.create_task(self._watch(), name=f"libvirt-incoming-{migration_id}")

    def snapshot(self) -> ProgressSnapshot:
        return self.progress.snapshot()

    async def next_change(self, after_seq: int) -> ProgressSnapshot:
        return await self.progress.next_change(after_seq)

    async def _watch(self) -> None:
        while self.progress.state in ACTIVE:
            info = await asyncio.to_thread(self.driver.find, self.guest_id)
            if info is not None and info.state == "running":
                self.progress.enter("ready")
                return
            if info is not None and info.state == "paused":
                self.progress.enter("frozen")  # libvirt's incoming domain, before it runs
            await asyncio.sleep(TARGET_POLL_S)

    async def resume(self) -> ProgressSnapshot:
        """ "completed" once the domain runs here; the watch looks every ``TARGET_POLL_S``, so the domain is
        looked at now too (the control plane resumes as soon as the source's job completed)."""
        if self.progress.state in ACTIVE:
            info = await asyncio.to_thread(self.driver.find, self.guest_id)
            if info is not None and info.state == "running":
                self.progress.enter("ready")
        if self.progress.state not in ("ready", "completed"):
            state = self.progress.state
            raise Conflict(f"migration {self.migration_id} is {state}; the guest has not arrived")
        self.progress.enter("completed")
        with contextlib.suppress(UnknownGuest):
            await asyncio.to_thread(unmark, self.driver._domain(self.guest_id))  # the mark came along
        return self.snapshot()

    async def discard(self) -> ProgressSnapshot:
        if self.progress.state in ("ready", "completed"):
            raise Conflict(f"too late: libvirt committed migration {self.migration_id}; the guest runs here")
        self.progress.fail("discarded", "discarded by the control plane", FailureKind.CANCELLED)
        return self.snapshot()

    async def cancel(self) -> ProgressSnapshot:
        return await self.discard()

    async def quiesce(self) -> ProgressSnapshot:
        raise Conflict("quiesce is a source command")

    async def freeze(self) -> ProgressSnapshot:
        raise Conflict("freeze is a source command")

    async def release(self) -> ProgressSnapshot:
        raise Conflict("release is a source command")


class LibvirtDriver:
    """The ``Driver`` of a libvirt host (see the module's docstring)."""

    name = "libvirt"
    switchover_commits = True  # libvirt's P2P migration commits at the switchover: no cancel after it

    def __init__(self, settings: DriverSettings) -> None:
        self.settings = settings
        self.uri = settings.options.get("uri", DEFAULT_URI)
        self.peer_uri = settings.options.get("peer_uri", self.uri)
        try:
            self.stall_s = float(settings.options.get("stall_s", DEFAULT_STALL_S))
        except ValueError:
            raise ValueError("--driver-option stall_s must be a number of seconds") from None
        self._connection: Connection | None = None
        self._migrations: dict[str, LibvirtSourceMigration | LibvirtTargetMigration] = {}

    async def open(self) -> None:
        self._connection = await asyncio.to_thread(open_connection, self.uri)
        identity = await asyncio.to_thread(host_identity, self._connection)
        log.info(
            "libvirt %s at %s (host %s, uuid %s): %d domains adopted",
            identity.libvirt_version,
            self.uri,
            identity.hostname,
            identity.host_uuid,
            len(self.list_guests()),
        )
        await asyncio.to_thread(self._settle_interrupted)

    def _settle_interrupted(self) -> None:
        """After a restart: a migration this agent started (its mark on the domain) and the agent's death
        interrupted is aborted before its switchover, so the guest runs on here (as the QEMU driver does);
        one past the switchover completes (libvirt commits). Jobs without the mark (an admin's virsh
        migrate) are left alone. The mark is taken away either way."""
        for domain in self.connection.listAllDomains(self.libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            migration_id = marked_migration(domain)
            if migration_id is None:
                continue
            job = MigrationJob.attach(self.connection, domain.name())
            if job is not None:
                try:
                    job.abort()
                except self.libvirt.libvirtError as error:
                    log.warning(
                        "%s: abort of interrupted migration %s: %s", domain.name(), migration_id, error
                    )
                final = job.wait(timeout=SETTLE_TIMEOUT_S)
                log.warning(
                    "%s: migration %s interrupted by the agent's restart: %s (the guest %s here)",
                    domain.name(),
                    migration_id,
                    final.stage,
                    "runs" if final.source_running else "does not run",
                )
            unmark(domain)

    @property
    def libvirt(self) -> Any:
        return libvirt_module()

    async def close(self) -> None:
        """Stop following; the domains and any migration job run on in the daemon (nothing is stopped)."""
        for migration in self._migrations.values():
            migration._task.cancel()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            raise LibvirtUnavailable("the libvirt driver is not open")
        return self._connection

    # -- guests ---------------------------------------------------------------------------------

    def _domain(self, guest_id: str) -> Domain:
        libvirt = libvirt_module()
        try:
            return self.connection.lookupByUUIDString(guest_id)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise UnknownGuest(f"no guest {guest_id} on {self.settings.agent_name}") from None
            raise

    def find(self, guest_id: str) -> DomainInfo | None:
        """The domain of UUID ``guest_id`` here, or None."""
        try:
            return read_domain(self.connection, self._domain(guest_id))
        except UnknownGuest:
            return None

    def _migrating(self, guest_id: str) -> str | None:
        for migration in self._migrations.values():
            if migration.guest_id == guest_id and migration.progress.state in ACTIVE:
                return migration.migration_id
        return None

    def list_guests(self) -> list[GuestInfo]:
        libvirt = libvirt_module()
        guests = []
        for domain in self.connection.listAllDomains(0):
            try:
                info = read_domain(self.connection, domain)
            except libvirt.libvirtError:
                continue  # undefined meanwhile
            guests.append(guest_info(info, self._migrating(info.uuid)))
        return sorted(guests, key=lambda guest: guest.name)

    def get_guest(self, guest_id: str) -> GuestInfo:
        return guest_info(read_domain(self.connection, self._domain(guest_id)), self._migrating(guest_id))

    def resources(self) -> HostResources:
        """libvirt's storage pools (capacity and free space now) and networks; no writers are tracked."""
        identity = host_identity(self.connection)
        pools = []
        for pool in self.connection.listAllStoragePools(0):
            try:
                pools.append(pool_of(pool, identity.host_uuid))
            except ValueError:
                log.warning("storage pool %r: a name the console cannot take; left out", pool.name())
        networks = []
        for network in self.connection.listAllNetworks(0):
            try:
                bridge = network.bridgeName() if network.isActive() else None
                networks.append(Network(name=network.name(), kind="bridge", bridge=bridge))
            except (ValueError, libvirt_module().libvirtError):
                log.warning("network %r: left out of the resources", network.name())
        return HostResources(pools=pools, networks=networks)

    async def define_guest(self, spec: GuestSpec) -> GuestInfo:
        raise InvalidRequest(
            "the libvirt driver adopts the host's domains; define a domain with libvirt (virsh define)"
        )

    async def delete_guest(self, guest_id: str) -> None:
        raise InvalidRequest("the libvirt driver does not undefine domains; use libvirt (virsh undefine)")

    async def start_guest(self, guest_id: str) -> GuestInfo:
        """``virDomainCreate``; refused (Conflict) for a domain that migrated away (Not Runnable)."""
        domain = self._domain(guest_id)
        info = read_domain(self.connection, domain)
        if hardware_status(info) == "not_runnable":
            raise Conflict(
                f"guest {info.name!r} migrated to another host; its definition here is kept but must not run "
                "(two copies would run)"
            )
        if info.state == "shut off" or info.state == "crashed":
            try:
                await asyncio.to_thread(domain.create)
            except libvirt_module().libvirtError as error:
                raise Conflict(f"libvirt did not start {info.name!r}: {error}") from None
        return self.get_guest(guest_id)

    async def stop_guest(self, guest_id: str, *, graceful_timeout_s: float | None = None) -> StoppedGuest:
        """``virDomainShutdown`` and up to ``graceful_timeout_s`` s for it, then ``virDomainDestroy``."""
        libvirt = libvirt_module()
        domain = self._domain(guest_id)
        if self._migrating(guest_id):
            raise Conflict(f"guest {guest_id} is migrating")
        started = time.monotonic()
        outcome: StopOutcome = "forced"
        if not domain.isActive():
            outcome = "already_off"
        else:
            if graceful_timeout_s is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    await asyncio.to_thread(domain.shutdown)
                deadline = started + graceful_timeout_s
                while domain.isActive() and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                outcome = "timed_out" if domain.isActive() else "shut_down"
            if domain.isActive():
                with contextlib.suppress(libvirt.libvirtError):  # it went off meanwhile
                    await asyncio.to_thread(domain.destroy)
        elapsed = round(time.monotonic() - started, 3)
        return StoppedGuest(**self.get_guest(guest_id).model_dump(), stop=outcome, stop_s=elapsed)

    async def measure_dirty_rate(self, guest_id: str, seconds: float) -> DirtyRate:
        """libvirt's dirty-rate calculation (``virDomainStartDirtyRateCalc``, QEMU's page sampling: its
        bitmap mode read 0 under TCG here) over ``seconds`` rounded up to whole seconds (1-60: libvirt's
        unit), read from the domain's statistics (MB/s as libvirt says, MiB). Conflict when the domain
        does not run or QEMU refuses."""
        libvirt = libvirt_module()
        domain = self._domain(guest_id)
        if not domain.isActive():
            raise Conflict(f"guest {guest_id} does not run: no dirty rate to measure")
        whole = min(60, max(1, math.ceil(seconds)))
        try:
            await asyncio.to_thread(
                domain.startDirtyRateCalc, whole, libvirt.VIR_DOMAIN_DIRTYRATE_MODE_PAGE_SAMPLING
            )
            stats: dict[str, Any] = {}
            deadline = time.monotonic() + whole + 10
            while time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                [(_domain, stats)] = await asyncio.to_thread(
                    self.connection.domainListGetStats, [domain], libvirt.VIR_DOMAIN_STATS_DIRTYRATE
                )
                if stats.get("dirtyrate.calc_status") == libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED:
                    break
            else:
                raise Conflict(f"libvirt did not finish measuring the dirty rate of {guest_id} in time")
        except libvirt.libvirtError as error:
            raise Conflict(f"libvirt refused to measure the dirty rate: {error}") from None
        info = read_domain(self.connection, domain)
        rate = int(stats.get("dirtyrate.megabytes_per_second", 0)) * 1024 * 1024
        return DirtyRate(
            guest_id=guest_id,
            seconds=whole,
            dirty_rate_bytes_s=rate,
            memory_bytes=info.memory_mib * 1024 * 1024,
        )

    # -- migrations -----------------------------------------------------------------------------

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
        """Record the expected migration; the endpoint's token is this daemon's URI for the source daemon.
        ``local_disks``: this driver moves shared-storage disks only (libvirt's ``migrate_disks`` is not
        used yet): a mirror asked for is refused."""
        if local_disks != "refuse":
            raise InvalidRequest("the libvirt driver does not mirror local disks yet")
        existing = self.find(spec.guest_id)
        if existing is not None and existing.state in RUNNING_STATES:
            raise Conflict(f"guest {spec.name!r} already runs on {self.settings.agent_name}")
        if migration_id in self._migrations:
            migration = self._migrations[migration_id]
        else:
            migration = LibvirtTargetMigration(self, migration_id, spec)
            self._migrations[migration_id] = migration
        endpoint = Endpoint(host=self.settings.data_host, port=LIBVIRT_MIGRATION_PORT, token=self.peer_uri)
        return migration, endpoint

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
        """``virDomainMigrateToURI3`` P2P to the URI the target's agent gave (the endpoint's token).
        ``local_disks``: not mirrored by this driver (a mirror is refused at prepare)."""
        if migration_id in self._migrations:
            return self._migrations[migration_id]
        if "://" not in target.token:
            raise InvalidRequest("the target is not a libvirt host (its endpoint names no libvirt URI)")
        info = read_domain(self.connection, self._domain(guest_id))
        if self._migrating(guest_id):
            raise Conflict(f"guest {info.name!r} is migrating")
        domain = self._domain(guest_id)
        try:
            policy = policy_of(params, encryption, streams)
            if domain.isActive():
                await asyncio.to_thread(mark_migration, domain, migration_id)
            job = await asyncio.to_thread(
                MigrationJob.start, self.connection, info.name, target.token, policy
            )
        except MigrationRefused as error:
            await asyncio.to_thread(unmark, domain)
            raise Conflict(str(error)) from None
        migration = LibvirtSourceMigration(migration_id, guest_id, job, params, self.stall_s)
        self._migrations[migration_id] = migration
        return migration
