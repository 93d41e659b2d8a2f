"""One outgoing peer-to-peer live migration, run by the source host's libvirt daemon.

``MigrationJob.start`` calls ``virDomainMigrateToURI3`` with ``VIR_MIGRATE_LIVE |
VIR_MIGRATE_PEER2PEER | VIR_MIGRATE_PERSIST_DEST`` (never ``UNDEFINE_SOURCE``: once the target
runs, the source's domain stays defined and shut off, reason "migrated", so it can be started
again only by someone who means to) on a thread of its own: the call returns only when the
migration ended. In peer-to-peer mode the *source daemon* runs the whole job and opens the target
daemon's URI itself; the calling process only waits for the answer. So a caller that dies (kill
-9) does not end the migration: it runs to its end in the daemon, and another process finds it
with ``MigrationJob.attach`` (the job's statistics) and may steer or abort it.

``snapshots()`` follows the job: libvirt's job statistics (``virDomainGetJobStats``, polled) and
its domain events (``MIGRATION_ITERATION`` for each pass over memory, lifecycle ``SUSPENDED``
with detail ``MIGRATED`` when the vCPUs stop for the switchover, ``JOB_COMPLETED`` with the final
statistics, the real downtime among them). Stages::

    init        the job exists but copies nothing yet (the target daemon starts its QEMU)
    copy        memory (and disks being mirrored) moves while the guest runs; round = pass number
    switchover  the source's vCPUs are stopped: the last dirty pages and device state move
    completed   the target runs the guest; the source's domain is shut off (reason "migrated")
    cancelled   aborted (``abort()`` or another client's ``virDomainAbortJob``); libvirt rolled back
    failed      libvirt's error ends it (target unreachable, QEMU error, ...); libvirt rolled back

After ``cancelled`` or ``failed`` the final snapshot says whether the source's domain runs
(``source_running``): libvirt's rollback is checked, not assumed.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from hostagent.drivers.libvirt.connection import Connection, Domain, LibvirtUnavailable, libvirt_module

Stage = Literal["init", "copy", "switchover", "completed", "cancelled", "failed"]
Encryption = Literal["required", "off"]
TERMINAL_STAGES = ("completed", "cancelled", "failed")

BYTES_PER_MIB = 1024 * 1024
BYTES_PER_MBIT = 125_000
NO_CAP_MIB_S = (2**63 - 1) >> 20  # libvirt's "no cap": the largest it takes, INT64_MAX bytes/s in MiB/s
MAX_STREAMS = 255  # libvirt's limit on parallel.connections
DEFAULT_PAGE_SIZE = 4096
COMPLETED_EVENT_WAIT_S = 2.0  # how long the final snapshot waits for JOB_COMPLETED after the call returned

# libvirt's constants used here are read from the binding at run time; these are the numbers the
# binding reports and that its C headers fix, named for the code that reads the statistics.
_JOB_NONE = 0
_JOB_OPERATION_MIGRATION_OUT = 5
_EVENT_SUSPENDED = 3
_EVENT_RESUMED = 4
_EVENT_SUSPENDED_MIGRATED = 1
_STATE_RUNNING = 1
_STATE_PAUSED = 3
_STATE_SHUTOFF = 5
_PAUSED_MIGRATION = 2
_SHUTOFF_MIGRATED = 4


class MigrationRefused(ValueError):
    """The migration cannot start as asked (domain not running, bad policy); nothing changed."""


@dataclass(frozen=True)
class MigrationPolicy:
    """A pair's migration policy in libvirt's reach.

    ``downtime_ms``: the allowed downtime (``virDomainMigrateSetMaxDowntime``, set on the domain
    before the job starts: libvirt has no migration parameter for it, and puts the domain's value
    back when the job ends). ``bandwidth_mbps``: a cap in Mbit/s (None: none), sent as libvirt's
    whole MiB/s (``bandwidth_mib_s``). ``auto_converge`` with its first throttle and step (percent
    of vCPU time taken away; libvirt does not expose QEMU's ceiling, 99%). ``streams``: parallel
    connections for memory (None or 1: one). ``encryption`` "required": QEMU's own TLS
    (``VIR_MIGRATE_TLS``; both daemons need ``migrate_tls_x509_cert_dir``), "off": plain TCP.
    ``migrate_disks``: the targets (``vda``...) of local disks to copy to the target (NBD mirror;
    the target daemon creates the volume in its pool of the same path); shared disks stay.
    ``migrate_uri``: where the source's QEMU sends the stream (None: the target daemon's
    ``migration_host``). ``tls_destination``: the name the target's certificate must carry
    (None: the host of the migration URI).
    """

    downtime_ms: int | None = 300
    bandwidth_mbps: float | None = None
    auto_converge: bool = False
    throttle_initial_pct: int = 20
    throttle_increment_pct: int = 10
    streams: int | None = None
    encryption: Encryption = "required"
    migrate_disks: tuple[str, ...] = ()
    migrate_uri: str | None = None
    tls_destination: str | None = None

    def __post_init__(self) -> None:
        if self.downtime_ms is not None and not 1 <= self.downtime_ms <= 600_000:
            raise MigrationRefused(f"downtime_ms must be 1-600000, not {self.downtime_ms}")
        if self.bandwidth_mbps is not None and not 0 < self.bandwidth_mbps <= 1_000_000:
            raise MigrationRefused(f"bandwidth_mbps must be 0-1000000 and not 0, not {self.bandwidth_mbps}")
        for name in ("throttle_initial_pct", "throttle_increment_pct"):
            if not 1 <= getattr(self, name) <= 99:
                raise MigrationRefused(f"{name} must be 1-99, not {getattr(self, name)}")
        if self.streams is not None and not 1 <= self.streams <= MAX_STREAMS:
            raise MigrationRefused(f"streams must be 1-{MAX_STREAMS}, not {self.streams}")
        if self.encryption not in ("required", "off"):
            raise MigrationRefused(f"encryption must be 'required' or 'off', not {self.encryption!r}")
        if any(not disk or not disk.isalnum() for disk in self.migrate_disks):
            raise MigrationRefused(f"migrate_disks are disk targets such as 'vda': {self.migrate_disks}")


def bandwidth_mib_s(mbps: float) -> int:
    """A cap in Mbit/s as libvirt's unit, whole MiB/s: rounded up, so a small cap is never "none" (0)."""
    return max(1, math.ceil(mbps * BYTES_PER_MBIT / BYTES_PER_MIB))


def migration_call(policy: MigrationPolicy) -> tuple[int, dict[str, Any]]:
    """``(flags, params)`` for ``virDomainMigrateToURI3`` carrying ``policy`` (downtime is set apart)."""
    libvirt = libvirt_module()
    flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
    params: dict[str, Any] = {}
    if policy.bandwidth_mbps is not None:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib_s(policy.bandwidth_mbps)
    if policy.auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = policy.throttle_initial_pct
        params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = policy.throttle_increment_pct
    if policy.streams is not None and policy.streams > 1:
        flags |= libvirt.VIR_MIGRATE_PARALLEL
        params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = policy.streams
    if policy.encryption == "required":
        flags |= libvirt.VIR_MIGRATE_TLS
        if policy.tls_destination:
            params[libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION] = policy.tls_destination
    if policy.migrate_disks:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
        params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(policy.migrate_disks)
    if policy.migrate_uri:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = policy.migrate_uri
    return flags, params


@dataclass(frozen=True)
class JobSnapshot:
    """Where a migration job is, in bytes, pages and milliseconds, from libvirt's statistics.

    ``round``: the pass over memory (1: the first full copy; libvirt's ``memory_iteration``, or
    its ``MIGRATION_ITERATION`` events when they are ahead). ``dirty_rate_bytes_s``: the guest's
    dirty-page rate times the page size. ``throughput_bytes_s``: libvirt's ``memory_bps``.
    ``expected_downtime_ms``: while the job runs, libvirt's estimate of the downtime (its
    ``downtime`` statistic of a running job). ``downtime_ms``: the real downtime, in the final
    snapshot of a completed job only (the same statistic of the completed job).
    ``source_running``: in a final snapshot, whether the source's domain runs (its vCPUs too).
    """

    stage: Stage
    elapsed_ms: int = 0
    memory_total_bytes: int = 0
    memory_processed_bytes: int = 0
    memory_remaining_bytes: int = 0
    dirty_rate_bytes_s: int = 0
    round: int = 0
    throughput_bytes_s: int = 0
    disk_total_bytes: int = 0
    disk_processed_bytes: int = 0
    disk_remaining_bytes: int = 0
    expected_downtime_ms: int | None = None
    downtime_ms: int | None = None
    source_running: bool | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.stage in TERMINAL_STAGES


def snapshot_from_stats(stats: dict[str, Any], stage: Stage, round_seen: int = 0) -> JobSnapshot:
    """A JobSnapshot from libvirt's job statistics (the typed parameters of ``virDomainGetJobStats``).

    ``stage`` "completed": ``stats`` are the completed job's, whose ``downtime`` is the real one.
    """
    downtime = int(stats["downtime"]) if "downtime" in stats else None
    page_size = int(stats.get("memory_page_size") or DEFAULT_PAGE_SIZE)
    return JobSnapshot(
        stage=stage,
        elapsed_ms=int(stats.get("time_elapsed", 0)),
        memory_total_bytes=int(stats.get("memory_total", 0)),
        memory_processed_bytes=int(stats.get("memory_processed", 0)),
        memory_remaining_bytes=int(stats.get("memory_remaining", 0)),
        dirty_rate_bytes_s=int(stats.get("memory_dirty_rate", 0)) * page_size,
        round=max(int(stats.get("memory_iteration", 0)), round_seen),
        throughput_bytes_s=int(stats.get("memory_bps", 0)),
        disk_total_bytes=int(stats.get("disk_total", 0)),
        disk_processed_bytes=int(stats.get("disk_processed", 0)),
        disk_remaining_bytes=int(stats.get("disk_remaining", 0)),
        expected_downtime_ms=None if stage == "completed" else downtime,
        downtime_ms=downtime if stage == "completed" else None,
    )


@dataclass
class _Outcome:
    """The answer of ``virDomainMigrateToURI3`` (set by the calling thread when it returns)."""

    done: threading.Event = field(default_factory=threading.Event)
    error: Any = None  # the libvirtError, if it failed


class MigrationJob:
    """One outgoing P2P live migration of a domain, followed, steered and aborted through libvirt.

    Make one with ``start`` (this process starts it) or ``attach`` (it already runs, started by a
    process that may be gone). ``close()`` (or the context manager) drops the event callbacks.
    """

    def __init__(self, connection: Connection, domain: Domain, outcome: _Outcome | None) -> None:
        self.connection = connection
        self.domain = domain
        self.name: str = domain.name()
        self._outcome = outcome  # None: attached, the call belongs to another process
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._callbacks: list[int] = []
        self._round = 0
        self._paused = False
        self._aborted = False
        self._completed_stats: dict[str, Any] | None = None
        self._last: JobSnapshot | None = None  # the last snapshot of the running job
        self._final: JobSnapshot | None = None
        self._register_events()

    # -- making one ------------------------------------------------------------------------------

    @classmethod
    def start(
        cls, connection: Connection, name: str, target_uri: str, policy: MigrationPolicy
    ) -> MigrationJob:
        """Start migrating the running domain ``name`` to the daemon at ``target_uri``.

        Returns at once; ``snapshots()`` follows it. Raises MigrationRefused (nothing changed) when
        the domain does not exist or does not run. What libvirt refuses once the call runs (the
        target unreachable, the same host, a missing network on the target) ends the job as
        ``failed`` with libvirt's reason, the domain still running here.
        """
        libvirt = libvirt_module()
        try:
            domain = connection.lookupByName(name)
        except libvirt.libvirtError as error:
            raise MigrationRefused(f"no domain {name!r} on this host: {error.get_error_message()}") from None
        if domain.state()[0] != _STATE_RUNNING:
            raise MigrationRefused(f"domain {name!r} does not run: a live migration needs a running guest")
        flags, params = migration_call(policy)
        if policy.downtime_ms is not None:
            try:
                domain.migrateSetMaxDowntime(policy.downtime_ms)
            except libvirt.libvirtError as error:  # it stopped meanwhile, say
                raise MigrationRefused(f"domain {name!r}: {error.get_error_message()}") from None
        job = cls(connection, domain, _Outcome())

        def call() -> None:
            assert job._outcome is not None
            try:
                domain.migrateToURI3(target_uri, params, flags)
            except libvirt.libvirtError as error:
                job._outcome.error = error
            finally:
                job._outcome.done.set()

        threading.Thread(target=call, name=f"migrate-{name}", daemon=True).start()
        return job

    @classmethod
    def attach(cls, connection: Connection, name: str) -> MigrationJob | None:
        """The outgoing migration of domain ``name`` that the daemon runs now, or None if there is none."""
        libvirt = libvirt_module()
        try:
            domain = connection.lookupByName(name)
            stats = domain.jobStats()
        except libvirt.libvirtError:
            return None  # no such domain, or it does not run (no job can run then)
        running = stats.get("type", _JOB_NONE) != _JOB_NONE
        if not running or stats.get("operation") != _JOB_OPERATION_MIGRATION_OUT:
            return None
        return cls(connection, domain, None)

    # -- events ----------------------------------------------------------------------------------

    def _register_events(self) -> None:
        libvirt = libvirt_module()

        def on_iteration(_conn: Any, _dom: Any, iteration: int, _opaque: Any) -> None:
            self._events.put(("iteration", iteration))

        def on_lifecycle(_conn: Any, _dom: Any, event: int, detail: int, _opaque: Any) -> None:
            self._events.put(("lifecycle", (event, detail)))

        def on_completed(_conn: Any, _dom: Any, params: dict[str, Any], _opaque: Any) -> None:
            self._events.put(("completed", params))

        for event_id, callback in (
            (libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, on_iteration),
            (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle),
            (libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, on_completed),
        ):
            callback_id = self.connection.domainEventRegisterAny(self.domain, event_id, callback, None)
            self._callbacks.append(callback_id)

    def _drain_events(self, wait_s: float = 0.0) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                kind, value = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if kind == "iteration":
                self._round = max(self._round, int(value))
            elif kind == "lifecycle":
                event, detail = value
                if event == _EVENT_SUSPENDED and detail == _EVENT_SUSPENDED_MIGRATED:
                    self._paused = True
                elif event == _EVENT_RESUMED:
                    self._paused = False
            elif kind == "completed":
                self._completed_stats = dict(value)
            deadline = time.monotonic()  # keep draining what is there, wait no more

    def close(self) -> None:
        """Deregister the event callbacks (idempotent)."""
        for callback_id in self._callbacks:
            try:
                self.connection.domainEventDeregisterAny(callback_id)
            except Exception:  # noqa: BLE001, S110 - a closed connection has dropped them already
                pass
        self._callbacks.clear()

    def __enter__(self) -> MigrationJob:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- following -------------------------------------------------------------------------------

    def snapshot(self) -> JobSnapshot:
        """Where the job is now; once it ended, its final snapshot (the same object every time).

        Raises LibvirtUnavailable when the connection to the source daemon is lost (the daemon
        died or restarted): the job's outcome is then for a new connection to find out.
        """
        if self._final is not None:
            return self._final
        self._drain_events()
        libvirt = libvirt_module()
        if self._outcome is not None and self._outcome.done.is_set():
            return self._finish()
        try:
            stats = self.domain.jobStats()
            state, reason = self.domain.state()
        except libvirt.libvirtError:
            self._check_connection()
            stats, state, reason = {}, _STATE_SHUTOFF, 0  # the domain stopped running here: the job ended
        if stats.get("type", _JOB_NONE) == _JOB_NONE:
            if self._outcome is None:
                return self._finish()  # attached: the job ended
            # Started here: the daemon has not begun the job yet, or is ending it and the call has
            # not returned yet (statistics go first): the stage never goes back.
            return self._last or JobSnapshot(stage="init")
        if state == _STATE_PAUSED and reason == _PAUSED_MIGRATION:
            self._paused = True
        memory_started = int(stats.get("memory_total", 0)) > 0
        stage: Stage = "switchover" if self._paused else "copy" if memory_started else "init"
        self._last = snapshot_from_stats(stats, stage, self._round)
        return self._last

    def snapshots(self, interval_s: float = 0.2) -> Iterator[JobSnapshot]:
        """Snapshots every ``interval_s`` (and on each event) until the final one, which is yielded last."""
        while True:
            current = self.snapshot()
            yield current
            if current.finished:
                return
            if self._outcome is not None:
                self._outcome.done.wait(interval_s)
            else:
                time.sleep(interval_s)

    def wait(self, timeout: float | None = None, interval_s: float = 0.2) -> JobSnapshot:
        """The final snapshot, following the job until it ends; raises TimeoutError after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for current in self.snapshots(interval_s):
            if current.finished:
                return current
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the migration of {self.name} still runs after {timeout} s")
        raise AssertionError("unreachable: snapshots() ends with a final snapshot")

    def _check_connection(self) -> None:
        """Raise LibvirtUnavailable when the source daemon's connection is gone: how the job ends
        is unknown until it answers again (a restarted libvirtd cancels an outgoing migration it
        finds and lets the domain run on; reconnect, then ``attach`` or read the domain's state)."""
        if not self.connection.isAlive():
            raise LibvirtUnavailable(
                f"lost the connection to the source's libvirt daemon while migrating {self.name}; "
                "the job's outcome is unknown until it answers again"
            )

    def _finish(self) -> JobSnapshot:
        """The final snapshot: the outcome, the completed job's statistics, the source's state checked."""
        libvirt = libvirt_module()
        self._check_connection()
        error = self._outcome.error if self._outcome is not None else None
        state, reason = self._source_state()
        if error is None and self._outcome is None:
            succeeded = state == _STATE_SHUTOFF and reason == _SHUTOFF_MIGRATED
        else:
            succeeded = error is None
        if succeeded:
            self._drain_events(COMPLETED_EVENT_WAIT_S if self._completed_stats is None else 0.0)
            stats = self._completed_stats or self._completed_job_stats()
            final = snapshot_from_stats(stats, "completed", self._round)
        else:
            aborted = self._aborted or (
                error is not None and error.get_error_code() == libvirt.VIR_ERR_OPERATION_ABORTED
            )
            message = error.get_error_message() if error is not None else "it ended without completing"
            final = JobSnapshot(stage="cancelled" if aborted else "failed", round=self._round, error=message)
        self._final = replace(final, source_running=state == _STATE_RUNNING)
        self.close()
        return self._final

    def _source_state(self) -> tuple[int, int]:
        libvirt = libvirt_module()
        try:
            state, reason = self.domain.state()
        except libvirt.libvirtError as error:
            if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                self._check_connection()
                raise
            return _STATE_SHUTOFF, _SHUTOFF_MIGRATED  # a transient domain that left: gone from here
        return int(state), int(reason)

    def _completed_job_stats(self) -> dict[str, Any]:
        libvirt = libvirt_module()
        try:
            return dict(self.domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
        except libvirt.libvirtError:
            return {}

    # -- steering --------------------------------------------------------------------------------

    def set_downtime(self, downtime_ms: int) -> None:
        """Change the allowed downtime of the running job (libvirt errors propagate: the job ended)."""
        if not 1 <= downtime_ms <= 600_000:
            raise MigrationRefused(f"downtime_ms must be 1-600000, not {downtime_ms}")
        self.domain.migrateSetMaxDowntime(downtime_ms)

    def set_bandwidth(self, bandwidth_mbps: float | None) -> None:
        """Cap the running job's bandwidth in Mbit/s (None or 0: no cap)."""
        if bandwidth_mbps is not None and not 0 <= bandwidth_mbps <= 1_000_000:
            raise MigrationRefused(f"bandwidth_mbps must be 0-1000000, not {bandwidth_mbps}")
        self.domain.migrateSetMaxSpeed(bandwidth_mib_s(bandwidth_mbps) if bandwidth_mbps else NO_CAP_MIB_S)

    def limits(self) -> tuple[int, int]:
        """The running job's allowed downtime (ms) and bandwidth cap (MiB/s) as libvirt holds them."""
        return int(self.domain.migrateGetMaxDowntime()), int(self.domain.migrateGetMaxSpeed())

    def abort(self) -> None:
        """Ask libvirt to abort the job (``virDomainAbortJob``): it rolls back and the source runs on.

        Returns at once; the final snapshot says ``cancelled`` and whether the source runs. A job
        that has just ended cannot be aborted any more: then the final snapshot says how it ended.
        """
        libvirt = libvirt_module()
        self._aborted = True
        try:
            self.domain.abortJob()
        except libvirt.libvirtError as error:
            if error.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # no job any more
                raise
