"""The driving loop of one migration against its two host agents (``docs/migrations.md``).

1. Claim the source VSP: QUEUED -> INIT only when no other migration is leaving it
   (``scheduling.do_claim_source``); the claim takes the decider's lease (``lease``).
2. Run the phases in order (``phases.PHASES``), recording each in the database before acting on the agents.
   Progress from the source agent's stream is persisted (percentages never decrease) and published,
   throttled; a watchdog thread beats the heartbeat, notices a cancel request and backs up phase limits.
3. Commit (``decisions.commit``): in one transaction, FROZEN -> COMMITTING (only if no cancel was
   requested) and the registration flip. This is the point of no return.
4. Roll forward (``decisions.roll_forward``): resume on the target, release on the source, then COMPLETED.
Any failure before step 3 records ABORTED/CANCELLED with the alert first, then tells the target to
discard and the source to resume: the guest never stopped belonging to the source.
The watchdog renews the lease with each heartbeat, from the claim to the end of the roll forward. A
renewal that matches no row (recovery took over a worker silent past the limit, e.g. SIGSTOPped) stops
the run at once: it raises ``LeaseLost``, sends no further agent command, and writes only the event
saying it stood down (``lease.record_stood_down``); the new decider moves the queue on.

Only ``tasks`` imports this module; the decisions it shares with recovery live in ``decisions``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from django.conf import settings
from django.db import connection
from django.utils import timezone

from hostagent.protocol import FAILED_STATES, FailureKind, ProgressSnapshot, ProtocolViolation, parse
from vms.agent_client import AgentProtocolError, AgentRefused, AgentUnreachable
from vms.inventory import mark_reachable
from vms.models import Registration

from . import migration_policy
from .decisions import (
    abort,
    agent_for,
    agent_migration_id,
    cancel_on_source,
    cancelled_by,
    commit,
    load_migration,
    progress_fields,
    roll_forward,
)
from .errors import MigrationCancelled, MigrationFailed, Superseded
from .lease import DATABASE_GONE, Lease, LeaseLost, new_owner, record_stood_down
from .models import PHASE_PERCENT_FIELD, Migration
from .outcomes import deliver_outcome_of
from .phases import PHASE_BY_AGENT_NAME, PHASES, Phase
from .progress import publish_progress
from .samples import add_round_sample
from .scheduling import do_claim_source, enqueue_next_for_source
from .transitions import transition

logger = logging.getLogger(__name__)

State = Migration.State
PUBLISH_INTERVAL_S = 0.2  # at most ~5 progress updates a second within a phase
WATCH_INTERVAL_S = 0.1
HEARTBEAT_INTERVAL_S = 1.0
BACKSTOP_GRACE_S = 1.0  # the agent enforces each limit; the worker stops the phase this much after it
COMMAND_POLL_INTERVAL_S = 0.15  # while quiesce/freeze block: how often the source's snapshot is read
SILENT_AFTER_S = 1.0  # a host whose call is this long without an answer at a time-out "did not answer"

T = TypeVar("T")


def drive_migration(migration_id: int) -> bool:
    """The whole life of one migration, from its claim of the source to COMPLETED, ABORTED or CANCELLED.

    False, with nothing done, when it could not claim the migration: not its source's turn yet, or no
    longer QUEUED (another delivery of its task claimed it, or it was decided or cancelled).
    """
    lease = Lease(migration_id, new_owner("worker"))
    if not do_claim_source(migration_id, lease.owner):
        return False
    migration = load_migration(migration_id)
    run = MigrationRun(migration, lease)
    stood_down = False
    try:
        # The watchdog's first heartbeat before anything that may block (a slow Redis); it renews the
        # lease until the roll forward is over.
        with Watchdog(run) as watchdog:
            if run_until_committed(run, watchdog):
                roll_forward(migration, lease)
    except LeaseLost:
        stood_down = True
        record_stood_down(lease)
    finally:
        run.close()
        if not stood_down:  # the decider that took over moves the queue on and delivers the outcome
            enqueue_next_for_source(migration.require_source().pk)
            deliver_outcome_of(migration_id)  # its followers (an evacuation...), once the undo was tried
    return True


def run_until_committed(run: MigrationRun, watchdog: Watchdog) -> bool:
    """Steps 2 and 3; True once committed. Failures before the commit end here, recorded and undone.

    Raises ``LeaseLost`` (nothing recorded, no agent told) once another decider took the lease.
    """
    publish_progress(run.migration.pk)
    try:
        run_phases(run, watchdog)
        watchdog.disarm()
        commit(run.migration, run.check_stop, run.lease)
        return True
    except LeaseLost:
        raise
    except MigrationFailed as failure:
        abort(run.migration, failure, run.source, run.target, run.agent_id, run.lease)
    except Superseded:
        logger.info("Migration %s was decided elsewhere; this worker stops", run.migration.pk)
    except Exception:
        run.lease.check()
        logger.exception("Migration %s hit an unexpected error before the commit", run.migration.pk)
        internal = MigrationFailed(run.migration.state, "an internal error in the control plane")
        abort(run.migration, internal, run.source, run.target, run.agent_id, run.lease)
    return False


def run_phases(run: MigrationRun, watchdog: Watchdog) -> None:
    for index, phase in enumerate(PHASES):
        # Recorded and armed under the watchdog's lock: a cancel or time-out is blamed on the phase the
        # record shows (armed first, a stop before the record would blame a phase that never started).
        with watchdog.lock:
            if index:
                run.enter(phase)
            watchdog.arm(phase, phase.limit_s(run.migration))
        try:
            phase.run(run)
        finally:
            phase.cleanup(run)
        run.finish(phase)


class MigrationRun:
    """One worker's hold on one migration: its agents, its last known progress, why it must stop."""

    def __init__(self, migration: Migration, lease: Lease) -> None:
        self.migration = migration
        self.lease = lease
        self.agent_id = agent_migration_id(migration)
        self.source = agent_for(migration.require_source())
        self.target = agent_for(migration.target)
        # Set by the watchdog thread: a cancel or time limit (``MigrationFailed``) or ``LeaseLost``.
        self.stop_reason: MigrationFailed | LeaseLost | None = None
        self.seq = 0
        self.last_flush = 0.0
        self.phase_started = time.monotonic()
        # The agent the driving thread is waiting on, and since when (monotonic s); None between calls.
        self.waiting_on: tuple[str, float] | None = None

    def close(self) -> None:
        self.source.close()
        self.target.close()

    # --- what the agents are told ---------------------------------------------------------------

    def guest_spec(self) -> dict[str, Any]:
        """The ``protocol.GuestSpec`` the target prepares: the guest's id, its display name, its size."""
        vm = self.migration.require_vm()
        spec = {"guest_id": str(vm.guest_id), "name": vm.name, "memory_mib": vm.memory_mib, "vcpus": vm.vcpus}
        return {**spec, "os_type": vm.os_type} if vm.os_type else spec

    def limits(self) -> dict[str, float | None]:
        vm = self.migration.require_vm()
        return {
            "init_s": vm.init_limit_s,
            "copy_s": vm.copy_limit_s,
            "quiesce_s": vm.quiesce_limit_s,
            "frozen_s": vm.frozen_limit_s,
        }

    def agent_params(self) -> dict[str, Any]:
        """``protocol.MigrationParams``: the migration's effective policy, the VM's phase limits."""
        site = settings.MIGRATION_AGENT_PARAMS
        params = migration_policy.agent_params(
            self.migration.policy,
            max_rounds=site.get("max_rounds") or migration_policy.DEFAULT_MAX_ROUNDS,
            site_cap_mbps=site.get("bandwidth_mbps"),
        )
        return {**params, "limits": self.limits()}

    # --- talking to the agents ------------------------------------------------------------------

    def check_stop(self) -> None:
        if self.stop_reason is not None:
            raise self.stop_reason

    def stop(self, reason: MigrationFailed | LeaseLost) -> None:
        """Called by the watchdog: the driving thread raises ``reason`` at once, even mid-call."""
        self.stop_reason = reason

    def silent_host(self) -> str | None:
        """The side ("source"/"target") whose call has gone unanswered for ``SILENT_AFTER_S``, else None."""
        waiting = self.waiting_on
        if waiting is None or time.monotonic() - waiting[1] < SILENT_AFTER_S:
            return None
        return waiting[0]

    def interruptible(self, side: str, work: Callable[[], T]) -> T:
        """``work()`` (a call to ``side``'s agent) in a helper thread; a stop interrupts the wait.

        A frozen peer (SIGSTOP, a hung host) holds an HTTP call until the client's time-out (10 s);
        the phase's time limit must not wait for that. The abandoned call ends on its own time-out.
        Raises what ``work`` raised, or the stop reason.
        """
        self.check_stop()
        outcome: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

        def helper() -> None:
            try:
                outcome.put((True, work()))
            except BaseException as error:  # handed to the driving thread
                outcome.put((False, error))
            finally:
                connection.close()

        self.waiting_on = (side, time.monotonic())
        try:
            threading.Thread(target=helper, name=f"{side}-call-{self.migration.pk}", daemon=True).start()
            while True:
                try:
                    ok, value = outcome.get(timeout=WATCH_INTERVAL_S)
                    break
                except queue.Empty:
                    self.check_stop()
        finally:
            self.waiting_on = None
        if not ok:
            raise value
        return value

    def call(self, side: str, method: str, *args: Any) -> Any:
        self.check_stop()
        self.lease.confirm()
        client = self.source if side == "source" else self.target
        with self.agent_errors(side):
            result = self.interruptible(side, lambda: getattr(client, method)(*args))
        self.check_stop()
        return result

    def host(self, side: str) -> str:
        """ "the target host vsp2": how alerts name an agent."""
        vsp = self.migration.require_source() if side == "source" else self.migration.target
        return f"the {side} host {vsp.name}"

    @contextmanager
    def agent_errors(self, side: str) -> Iterator[None]:
        """Agent errors become a failure of the current phase, in plain words naming the host (a stop
        reason wins). An agent that did not answer marks its VSP unreachable at once (the migrate
        dialog and the checks see it), not at the next inventory collection.

        The failure's kind is the error's (unreachable, refused, or internal for a bad reply).
        """
        try:
            yield
        except AgentUnreachable as error:
            self.lease.check()
            mark_reachable(
                self.migration.require_source() if side == "source" else self.migration.target, False
            )
            self.check_stop()
            raise MigrationFailed(
                self.migration.state, f"{self.host(side)} stopped answering", kind=error.kind
            ) from None
        except AgentRefused as refusal:
            self.check_stop()
            raise MigrationFailed(
                self.migration.state, f"{self.host(side)} refused: {refusal}", kind=refusal.kind
            ) from None
        except AgentProtocolError as error:
            self.check_stop()
            raise MigrationFailed(
                self.migration.state, f"{self.host(side)} sent a reply that makes no sense", kind=error.kind
            ) from None

    def follow_progress(self, until: Callable[[ProgressSnapshot], bool]) -> None:
        """Absorb the source's progress stream until ``until(snapshot)``; failures raise."""
        self.check_stop()
        stream = self.source.iter_progress(self.agent_id, self.seq)
        end = object()
        with self.agent_errors("source"):
            while True:
                snapshot = self.interruptible("source", lambda: next(stream, end))
                if snapshot is end:
                    break
                if until(self.absorb(snapshot)):
                    stream.close()
                    return
        self.check_stop()
        raise MigrationFailed(
            self.migration.state,
            f"{self.host('source')} ended its progress report early",
            kind=FailureKind.UNREACHABLE,
        )

    def source_guest_running(self) -> bool | None:
        """Ask the source agent whether the guest runs (None if it cannot tell); a stopped one is stored Off.

        Used after the source refused to start: the inventory may be older than the guest's power-off.
        """
        vm = self.migration.require_vm()
        self.lease.check()
        try:
            guest = self.source.get_guest(str(vm.guest_id))
        except (AgentUnreachable, AgentRefused, AgentProtocolError):
            return None
        running = guest["hardware_status"] == "on"
        if not running:
            Registration.objects.filter(
                vm=vm, vsp=self.migration.require_source(), hardware_status=Registration.HardwareStatus.ON
            ).update(hardware_status=Registration.HardwareStatus.OFF)
        return running

    def command_with_progress(self, command: str) -> dict[str, Any]:
        """Run a blocking source command (``quiesce``, ``freeze``) while reading the source's progress.

        The command answers only when its phase is over; meanwhile this thread polls the snapshot and
        absorbs it (throttled like Copy), so the phase's percentage moves on the page instead of
        jumping from 0 to 100. The command runs on a connection of its own, in a helper thread.
        """
        self.check_stop()
        self.lease.confirm()
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                with agent_for(self.migration.require_source()) as agent:
                    outcome["snapshot"] = getattr(agent, command)(self.agent_id)
            except Exception as error:  # handed to the driving thread below
                outcome["error"] = error
            finally:
                done.set()

        threading.Thread(target=work, name=f"{command}-{self.migration.pk}", daemon=True).start()
        while not done.wait(COMMAND_POLL_INTERVAL_S):
            try:
                snapshot = self.interruptible("source", lambda: self.source.snapshot(self.agent_id))
            except (AgentUnreachable, AgentRefused, AgentProtocolError) as error:
                logger.debug("Progress poll of %s during %s: %s", self.agent_id, command, error)
                continue
            if not done.is_set():
                self.absorb(snapshot)
        self.check_stop()
        if "error" in outcome:
            with self.agent_errors("source"):
                raise outcome["error"]
        return outcome["snapshot"]

    def digests(self, snapshot: ProgressSnapshot) -> tuple[str, str]:
        """Both memory digests (the source's snapshot, else the target's own), stored on the migration."""
        source_digest, target_digest = snapshot.source_digest, snapshot.target_digest
        if not target_digest:
            target_digest = checked_snapshot(
                self.call("target", "snapshot", self.agent_id), self.migration.state
            ).target_digest
        self.migration.source_digest, self.migration.target_digest = source_digest or "", target_digest or ""
        return self.migration.source_digest, self.migration.target_digest

    # --- progress ---------------------------------------------------------------------------------

    def absorb(self, snapshot: Any, *, force: bool = False) -> ProgressSnapshot:
        """Take a progress snapshot into the record: percentages only rise; failures raise.

        Returns the snapshot, checked (``protocol.ProgressSnapshot``).
        """
        checked = checked_snapshot(snapshot, self.migration.state)
        apply_snapshot(self.migration, checked)
        add_round_sample(self.migration, keep_left=checked.state in FREEZE_STATES)
        self.seq = max(self.seq, checked.seq)
        if checked.state in FAILED_STATES:
            self.check_stop()
            raise self.failure_reported(checked)
        self.check_stop()
        self.flush(force=force)
        return checked

    def failure_reported(self, snapshot: ProgressSnapshot) -> MigrationFailed:
        """The source agent's own abort, in the words of the Alerts section, decided by its kind.

        A phase that ran over the VM's limit on the source reads "it ran over its time limit of N s".
        """
        failed = snapshot.failed_phase
        phase = PHASE_BY_AGENT_NAME[failed] if failed else self.migration.state
        kind = snapshot.failure_kind or FailureKind.INTERNAL
        if kind is FailureKind.TIME_LIMIT and snapshot.failed_side in (None, "source"):
            limit = next(p.limit_s(self.migration) for p in PHASES if p.state == phase)
            return MigrationFailed(phase, self.over_time_limit(limit), kind=kind)
        error = snapshot.error or f"the source host reports {snapshot.state}"
        return MigrationFailed(phase, error, kind=kind)

    def over_time_limit(self, limit_s: int | None, silent: str | None = None) -> str:
        """The alert's reason for a phase stopped at its limit, with the real time it had run.

        "it ran over its time limit of 2 s (stopped after 3.1 s; the target host vsp2 did not answer)":
        ``silent`` is the side whose call went unanswered (``silent_host``), if any.
        """
        elapsed = time.monotonic() - self.phase_started
        detail = f"stopped after {elapsed:.1f} s"
        if silent is not None:
            vsp = self.migration.require_source() if silent == "source" else self.migration.target
            detail += f"; the {silent} host {vsp.name} did not answer"
        return f"it ran over its time limit of {limit_s} s ({detail})"

    def flush(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_flush < PUBLISH_INTERVAL_S:
            return
        migration = self.migration
        fields = {**progress_fields(migration), "heartbeat_at": timezone.now()}
        rows = Migration.objects.filter(pk=migration.pk, state=migration.state, **self.lease.where)
        try:
            updated = rows.update(**fields)
        except DATABASE_GONE:
            # The database dropped the connection (a restart, a failover): the next flush records the
            # progress, on a new connection. Percentages only rise, so nothing is lost but this write.
            logger.warning("Migration %s: progress not recorded, the database did not answer", migration.pk)
            connection.close()
            return
        if not updated:
            raise self.lease.superseded()
        self.last_flush = now
        publish_progress(migration.pk)

    # --- phase changes ----------------------------------------------------------------------------

    def enter(self, phase: Phase) -> None:
        self.check_stop()
        fields = {**progress_fields(self.migration), "heartbeat_at": timezone.now()}
        message = f"{phase.label} phase started"
        if not transition(
            self.migration.pk,
            self.migration.state,
            phase.state,
            message=message,
            where=self.lease.where,
            **fields,
        ):
            raise self.lease.superseded()
        self.migration.state = phase.state
        self.last_flush = time.monotonic()
        publish_progress(self.migration.pk)

    def finish(self, phase: Phase) -> None:
        setattr(self.migration, PHASE_PERCENT_FIELD[phase.state], 100)
        self.flush(force=True)


# Agent states from the freeze request on: what is left then shrinks with the last send while the guest is
# paused, and "ready" reports 0 left; taken into the round's sample as they are, they drew a chart whose
# last round left nothing, whatever the freeze moved (``samples.add_round_sample``'s ``keep_left``).
FREEZE_STATES = ("frozen", "ready")


def checked_snapshot(snapshot: Any, phase: Migration.State | str) -> ProgressSnapshot:
    """The agent's snapshot (``protocol.ProgressSnapshot``), or a failure in plain words if it is not one."""
    try:
        return parse(ProgressSnapshot, snapshot, "the progress report")
    except ProtocolViolation:
        raise MigrationFailed(phase, "the source host sent a progress report that makes no sense") from None


def apply_snapshot(migration: Migration, snapshot: ProgressSnapshot) -> None:
    """Copy the snapshot's figures onto the record; each phase's percentage only rises."""
    for agent_phase, state in PHASE_BY_AGENT_NAME.items():
        field = PHASE_PERCENT_FIELD[state]
        setattr(migration, field, max(getattr(migration, field), snapshot.percent[agent_phase]))
    migration.bytes_sent = snapshot.bytes_sent
    migration.bytes_remaining = snapshot.bytes_remaining
    migration.rounds = snapshot.round
    migration.dirty_rate_bytes_s = snapshot.dirty_rate_bytes_s
    migration.throughput_bytes_s = snapshot.throughput_bytes_s
    migration.throttle_pct = snapshot.throttle_pct
    if snapshot.expected_downtime_ms is not None:
        migration.expected_downtime_ms = snapshot.expected_downtime_ms
    if snapshot.downtime_ms is not None:
        migration.downtime_ms = snapshot.downtime_ms


class Watchdog:
    """A thread beside the driving one: heartbeat, prompt cancel, and the phase time-limit backstop.

    Stopping sets ``run.stop_reason``, which the driving thread raises within ``WATCH_INTERVAL_S`` even
    when blocked in a call to a frozen agent (``MigrationRun.interruptible``), and tells the source agent
    to cancel. A phase ends at most its limit + ``BACKSTOP_GRACE_S`` after it began, whatever the agents
    do. ``disarm`` (before the commit)
    holds the lock, so no cancel can reach an agent once the commit has begun.
    """

    def __init__(self, run: MigrationRun) -> None:
        self.run = run
        # Its own connection: the driver's may be streaming.
        self.agent = agent_for(run.migration.require_source())
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.armed = True
        self.phase = run.migration.state
        self.limit_s: int | None = None
        self.deadline: float | None = None
        self.next_heartbeat = 0.0
        self.thread = threading.Thread(target=self.loop, name=f"watchdog-{run.migration.pk}", daemon=True)

    def __enter__(self) -> Watchdog:
        self.beat()  # at once: recovery must never see a claimed migration without a heartbeat
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def arm(self, phase: Phase, limit_s: int | None) -> None:
        self.phase, self.limit_s = phase.state, limit_s
        self.run.phase_started = time.monotonic()
        self.deadline = time.monotonic() + limit_s + BACKSTOP_GRACE_S if limit_s else None

    def disarm(self) -> None:
        with self.lock:
            self.armed = False

    def loop(self) -> None:
        try:
            while not self.stopped.wait(WATCH_INTERVAL_S):
                try:
                    self.tick()
                except DATABASE_GONE as error:
                    logger.warning(
                        "Migration %s: the database did not answer (%s)", self.run.migration.pk, error
                    )
                    connection.close()  # the next tick connects again
                except Exception:
                    logger.exception("Watchdog of migration %s", self.run.migration.pk)
        finally:
            self.agent.close()
            connection.close()

    def tick(self) -> None:
        pk = self.run.migration.pk
        if time.monotonic() >= self.next_heartbeat:
            self.beat()
        if not self.armed or self.run.stop_reason is not None:
            return
        cancelled = Migration.objects.filter(pk=pk, cancel_requested=True).exists()
        with self.lock:  # the phase and its deadline as the driving thread last recorded them
            if not self.armed or self.run.stop_reason is not None:
                return
            if cancelled:
                self.stop(MigrationCancelled(self.phase, cancelled_by(pk)))
            elif self.deadline is not None and time.monotonic() > self.deadline:
                reason = self.run.over_time_limit(self.limit_s, self.run.silent_host())
                self.stop(MigrationFailed(self.phase, reason, kind=FailureKind.TIME_LIMIT))

    def beat(self) -> None:
        """The heartbeat renews the lease: recovery leaves a migration alone while it is younger than the
        stale limit. A renewal that matches no row (recovery took over) stops the run with ``LeaseLost``."""
        self.next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL_S
        if not self.run.lease.renew() and self.run.stop_reason is None:
            self.run.stop(LeaseLost(f"{self.run.lease.owner} lost its lease"))

    def stop(self, reason: MigrationFailed) -> None:
        """Called with ``lock`` held: record why the run must stop and tell the source to cancel."""
        if self.armed:
            self.run.stop(reason)
            if not self.run.lease.renew():  # a decider that took over tells the agents, not this one
                self.run.stop(LeaseLost(f"{self.run.lease.owner} lost its lease"))
                return
            if not cancel_on_source(self.agent, self.run.agent_id):
                logger.warning("The source agent did not take the cancel of %s", self.run.agent_id)
