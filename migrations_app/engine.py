"""The driving loop of one migration against its two host agents (``docs/migrations.md``).

1. Claim the source VSP: QUEUED -> INIT only when it has a free slot (``scheduling.do_claim_source``);
   the claim takes the decider's lease (``lease``).
2. Run the phases in order (``phases.PHASES``), recording each in the database before acting on the
   agents (``records``). Progress from the source agent is recorded (percentages never decrease) and
   published, throttled (``records.ProgressRecord``); a watchdog thread beats the heartbeat, notices a
   cancel request, backs up the phase limits and keeps the no-progress limit (``NoProgress``): a phase
   in which nothing moves warns on the page from half of it, then is aborted with the reason.
3. Commit (``records.commit``): in one transaction, FROZEN -> COMMITTING (only if no cancel was
   requested) and the registration flip. This is the point of no return.
4. Roll forward (``endings.roll_forward``): resume on the target, release on the source, then COMPLETED.
Any failure before step 3 ends in ``endings.abort``: ABORTED/CANCELLED recorded with the alert first,
then the target discards and the source resumes: the guest never stopped belonging to the source.
Except where the source's driver commits by itself at the switchover (``Health.switchover_commits``:
libvirt's peer-to-peer migration): there the switchover is the commit, and a failure or stop that comes
after it (a cancel answered 409, a limit, a check) cannot undo it: the source is told to stop, its
outcome awaited, and if it committed the record follows it to step 3 and 4 (``endings.committed_by_source``);
Frozen's check for such a source is its completed job, not memory digests (``phases.check_switched_over``).
The watchdog renews the lease with each heartbeat, from the claim to the end of the roll forward. A
renewal that matches no row (recovery took over a worker silent past the limit, e.g. SIGSTOPped) stops
the run at once: it raises ``LeaseLost``, sends no further agent command, and writes only the event
saying it stood down (``lease.record_stood_down``); the new decider moves the queue on.

Every call to the agents goes through the run's one ``agents.MigrationAgents``; recovery ends a
migration with the same ``endings``. Only ``tasks`` imports this module.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime

from django.db import connection
from django.utils import timezone

from agentprotocol import FailureKind

from . import alerts, migration_policy, records
from .agents import MigrationAgents, Side
from .endings import abort, committed_by_source, roll_forward
from .errors import MigrationCancelled, MigrationFailed, Superseded
from .lease import DATABASE_GONE, Lease, LeaseLost, new_owner, record_stood_down
from .models import Migration
from .outcomes import deliver_outcome_of
from .phases import PHASES, Phase
from .progress import publish_progress
from .records import ProgressRecord
from .scheduling import do_claim_source, enqueue_next_for_source

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.1
HEARTBEAT_INTERVAL_S = 1.0
BACKSTOP_GRACE_S = 1.0  # the agent enforces each limit; the worker stops the phase this much after it


def drive_migration(migration_id: int) -> bool:
    """The whole life of one migration, from its claim of the source to COMPLETED, ABORTED or CANCELLED.

    False, with nothing done, when it could not claim the migration: not its source's turn yet, or no
    longer QUEUED (another delivery of its task claimed it, or it was decided or cancelled).
    """
    lease = Lease(migration_id, new_owner("worker"))
    if not do_claim_source(migration_id, lease.owner):
        return False
    run = MigrationRun(records.load_migration(migration_id), lease)
    stood_down = False
    try:
        # The watchdog's first heartbeat before anything that may block (a slow Redis); it renews the
        # lease until the roll forward is over.
        with Watchdog(run) as watchdog:
            if run_until_committed(run, watchdog):
                roll_forward(run.agents, lease)
    except LeaseLost:
        stood_down = True
        record_stood_down(lease)
    finally:
        run.close()
        if not stood_down:  # the decider that took over moves the queue on and delivers the outcome
            enqueue_next_for_source(run.migration.require_source().pk)
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
        run.agents.check_stop()
        records.commit(run.migration, run.lease)
        return True
    except LeaseLost:
        raise
    except MigrationFailed as failure:
        return end_before_commit(run, watchdog, failure)
    except Superseded:
        logger.info("Migration %s was decided elsewhere; this worker stops", run.migration.pk)
    except Exception:
        run.lease.check()
        logger.exception("Migration %s hit an unexpected error before the commit", run.migration.pk)
        internal = MigrationFailed(run.migration.state, "an internal error in the control plane")
        return end_before_commit(run, watchdog, internal)
    return False


def end_before_commit(run: MigrationRun, watchdog: Watchdog, failure: MigrationFailed) -> bool:
    """A failure (a stop, an agent's error, a check) before the commit: the abort (``endings.abort``),
    unless the source's driver commits at the switchover and already did (``committed_by_source``:
    libvirt; then True, committed, and the caller rolls forward). For such a source the watchdog is
    disarmed first: nothing may stop it any more once its outcome is being settled.

    Raises ``LeaseLost`` (nothing recorded) once another decider took the lease.
    """
    commits = run.agents.switchover_commits
    if commits is None and run.agents.source_started:  # started, but Init did not learn it
        commits = run.agents.source_commits_at_switchover()
    if commits:
        watchdog.disarm()
        try:
            if committed_by_source(run.agents, run.progress, failure):
                return True
        except LeaseLost:
            raise
        except Superseded:
            logger.info("Migration %s was decided elsewhere; this worker stops", run.migration.pk)
            return False
        except Exception:
            logger.exception("Migration %s: recording its source's own commit failed", run.migration.pk)
    abort(run.agents, run.lease, failure, records.progress_fields(run.migration))
    return False


def run_phases(run: MigrationRun, watchdog: Watchdog) -> None:
    for index, phase in enumerate(PHASES):
        # Recorded and armed under the watchdog's lock: a cancel or time-out is blamed on the phase the
        # record shows (armed first, a stop before the record would blame a phase that never started).
        with watchdog.lock:
            if index:
                run.agents.check_stop()
                run.progress.enter(phase.state, phase.label)
            watchdog.arm(phase, phase.limit_s(run.migration))
        try:
            phase.run(run)
        finally:
            phase.cleanup(run)
        run.progress.finish(phase.state)


class MigrationRun:
    """One worker's hold on one migration: its agents (which the watchdog interrupts to stop the run) and
    the progress it recorded (``phases.PhaseRun``)."""

    def __init__(self, migration: Migration, lease: Lease) -> None:
        self.migration = migration
        self.lease = lease
        self.agents = MigrationAgents(migration, lease)
        self.progress = ProgressRecord(migration, lease)

    def close(self) -> None:
        self.agents.close()


class Watchdog:
    """A thread beside the driving one: heartbeat, prompt cancel, and the phase time-limit backstop.

    Stopping interrupts the run's agents (``MigrationAgents.interrupt``): the driving thread raises the
    reason within ``WATCH_INTERVAL_S`` even when blocked in a call to a frozen agent; and it tells the
    source agent to cancel. A phase ends at most its limit + ``BACKSTOP_GRACE_S`` after it began, whatever
    the agents do. ``disarm`` (before the commit) holds the lock, so no cancel can reach an agent once the
    commit has begun.
    """

    def __init__(self, run: MigrationRun) -> None:
        self.run = run
        # Connections of its own: the driving thread's may be streaming.
        self.agents = MigrationAgents(run.migration, run.lease)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.armed = True
        self.phase = run.migration.state
        self.limit_s: int | None = None
        self.deadline: float | None = None
        self.no_progress = NoProgress(migration_policy.no_progress_limit_s(run.migration.policy))
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
        self.run.progress.phase_started = time.monotonic()
        self.deadline = time.monotonic() + limit_s + BACKSTOP_GRACE_S if limit_s else None
        self.no_progress.new_phase()

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
            self.agents.close()
            connection.close()

    def tick(self) -> None:
        pk = self.run.migration.pk
        if time.monotonic() >= self.next_heartbeat:
            self.beat()
        if not self.armed or self.run.agents.stop_reason is not None:
            return
        cancelled = Migration.objects.filter(pk=pk, cancel_requested=True).exists()
        with self.lock:  # the phase and its deadline as the driving thread last recorded them
            if not self.armed or self.run.agents.stop_reason is not None:
                return
            if cancelled:
                self.stop(MigrationCancelled(self.phase, alerts.cancelled_by(pk)))
            elif self.deadline is not None and time.monotonic() > self.deadline:
                self.stop(MigrationFailed(self.phase, self.over_time_limit(), kind=FailureKind.TIME_LIMIT))
            else:
                self.watch_progress()

    def watch_progress(self) -> None:
        """Called with ``lock`` held: the no-progress limit. Warn on the page (a timeline event) once nothing
        moved for half of it, withdraw the warning when something moves again, stop the run at the limit."""
        watch, migration = self.no_progress, self.run.migration
        verdict = watch.see(progress_key(migration))
        if verdict == "moving again":
            records.record_warning(
                migration, self.run.lease, "", alerts.no_progress_moving_again(watch.shown_s)
            )
        elif verdict == "warn":
            warning = alerts.no_progress_warning(
                Migration.State(self.phase).label,
                watch.stalled_s(),
                watch.limit_s,
                watch.since,
                self.silent_host(),
            )
            records.record_warning(migration, self.run.lease, warning, warning)
        elif verdict == "stop":
            reason = alerts.over_no_progress_limit(
                watch.limit_s, watch.stalled_s(), watch.since, self.silent_host()
            )
            self.stop(MigrationFailed(self.phase, reason, kind=FailureKind.NO_PROGRESS))

    def silent_host(self) -> tuple[str, str] | None:
        """(side, VSP name) of the agent that does not answer a short health question, if one does not (it
        is marked unreachable; one that answers, reachable): who holds the migration up."""
        side: Side | None = self.agents.silent_agent()
        return (side, self.agents.vsp(side).name) if side else None

    def over_time_limit(self) -> str:
        """The alert's reason, with the real time the phase ran and the host that did not answer, if any."""
        silent = self.run.agents.silent_side()
        named = (silent, self.run.agents.vsp(silent).name) if silent else None
        return alerts.over_time_limit(self.limit_s, self.run.progress.elapsed_s(), named)

    def beat(self) -> None:
        """The heartbeat renews the lease: recovery leaves a migration alone while it is younger than the
        stale limit. A renewal that matches no row (recovery took over) stops the run with ``LeaseLost``."""
        self.next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL_S
        if not self.run.lease.renew() and self.run.agents.stop_reason is None:
            self.run.agents.interrupt(LeaseLost(f"{self.run.lease.owner} lost its lease"))

    def stop(self, reason: MigrationFailed) -> None:
        """Called with ``lock`` held: record why the run must stop and tell the source to cancel."""
        if self.armed:
            self.run.agents.interrupt(reason)
            if not self.run.lease.renew():  # a decider that took over tells the agents, not this one
                self.run.agents.interrupt(LeaseLost(f"{self.run.lease.owner} lost its lease"))
                return
            if not self.agents.cancel_source():
                logger.warning("The source agent did not take the cancel of %s", self.agents.agent_id)


def progress_key(migration: Migration) -> tuple[object, ...]:
    """What changes while a migration makes progress: its state, the bytes sent, the round, each phase's
    percentage (bytes left may grow while nothing is sent: a guest dirtying pages; it is left out)."""
    return (
        migration.state,
        migration.bytes_sent,
        migration.rounds,
        migration.init_percent,
        migration.copy_percent,
        migration.quiesce_percent,
        migration.frozen_percent,
    )


class NoProgress:
    """The no-progress limit of one run (``limit_s`` s, from its policy), as the watchdog keeps it.

    ``see(key)`` after each look at the progress (``progress_key``) says what to do: "warn" once, when
    nothing moved for ``migration_policy.no_progress_warn_after_s``; "moving again" when it moves after a
    warning; "stop" at the limit; "" otherwise. ``new_phase`` at each phase's start: a new phase is progress.
    """

    def __init__(self, limit_s: int) -> None:
        self.limit_s = limit_s
        self.warn_after_s = migration_policy.no_progress_warn_after_s(limit_s)
        self.key: tuple[object, ...] = ()
        self.at = time.monotonic()  # when the key last changed (monotonic s)
        self.since: datetime = timezone.now()  # the same moment, for people
        self.warned = False
        self.shown_s = 0.0  # how long it had stalled when it moved again after a warning (s)

    def restart(self, key: tuple[object, ...]) -> None:
        self.key, self.at, self.since = key, time.monotonic(), timezone.now()

    def new_phase(self) -> None:
        """A new phase is progress: the next look sees a change (and withdraws a warning)."""
        self.key = ()

    def stalled_s(self) -> float:
        return time.monotonic() - self.at

    def see(self, key: tuple[object, ...]) -> str:
        if key != self.key:
            self.shown_s = self.stalled_s()
            self.restart(key)
            if self.warned:
                self.warned = False
                return "moving again"
            return ""
        stalled = self.stalled_s()
        if stalled >= self.limit_s:
            return "stop"
        if stalled >= self.warn_after_s and not self.warned:
            self.warned = True
            return "warn"
        return ""
