"""What the database records of one migration: every state change of its deciders, and nothing else.

Each change is a compare-and-set with an event row (``transitions.transition``) that also compares the
decider's lease (``lease.Lease.where``): a decider that lost its lease changes nothing
(``lease.superseded`` says why). The phases and their progress (``ProgressRecord``: what the worker
holds in memory, written throttled), the commit (the point of no return: FROZEN -> COMMITTING and the
registration flip in one transaction), the abort (recorded before any agent is told), the completion,
the flip turned back when the target never ran the guest, and an alert restated once the source
answered again. Each change is pushed to the pages (``progress.publish_progress``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from agentprotocol import FailureKind, ProgressSnapshot
from agentprotocol import Phase as AgentPhase
from vms.models import AuditEvent, Registration

from .alerts import cancelled_by
from .downtime import downtime_excess
from .errors import MigrationCancelled, MigrationFailed
from .lease import DATABASE_GONE, Lease
from .models import PHASE_PERCENT_FIELD, Migration, MigrationEvent
from .progress import publish_progress
from .samples import RecentRate, add_round_sample
from .transitions import transition

logger = logging.getLogger(__name__)

State = Migration.State

# The local-disk mirror's figures, the same names on the snapshot and the row.
DISK_FIELDS = (
    "disk_bytes_total",
    "disk_bytes_sent",
    "disk_bytes_remaining",
    "disk_dirty_rate_bytes_s",
    "disk_throughput_bytes_s",
)
PROGRESS_FIELDS = (
    *PHASE_PERCENT_FIELD.values(),
    "bytes_sent",
    "bytes_remaining",
    "rounds",
    "dirty_rate_bytes_s",
    "throughput_bytes_s",
    "recent_throughput_bytes_s",
    "throttle_pct",
    "expected_downtime_ms",
    "downtime_ms",
    "io_outstanding",
    "io_drain_ms",
    "network_blackout_ms",
    "source_digest",
    "target_digest",
    "round_samples",
    *DISK_FIELDS,
    "disk_ready_at",
)


def load_migration(migration_id: int) -> Migration:
    """The migration with its VM and both VSPs (raises ``Migration.DoesNotExist``)."""
    return Migration.objects.select_related("vm", "source", "target").get(pk=migration_id)


def progress_fields(migration: Migration) -> dict[str, Any]:
    """The progress columns of ``migration`` as held in memory, for a compare-and-set update."""
    return {name: getattr(migration, name) for name in PROGRESS_FIELDS}


# --- the phases ------------------------------------------------------------------------------------

PUBLISH_INTERVAL_S = 0.2  # at most ~5 progress updates a second within a phase
# The agent's phase names (``agentprotocol.PHASES``) -> this console's states.
PHASE_BY_AGENT_NAME: dict[AgentPhase, Migration.State] = {
    "init": State.INIT,
    "copy": State.COPY,
    "quiesce": State.IO_QUIESCE,
    "frozen": State.FROZEN,
}
# Agent states from the freeze request on: what is left then shrinks with the last send while the guest is
# paused, and "ready" reports 0 left; taken into the round's sample as they are, they drew a chart whose
# last round left nothing, whatever the freeze moved (``samples.add_round_sample``'s ``keep_left``).
FREEZE_STATES = ("frozen", "ready")


class ProgressRecord:
    """The progress of one running migration as its worker holds it: taken from the source's snapshots in
    memory (``take``: each phase's percentage only rises), written with a heartbeat at most every
    ``PUBLISH_INTERVAL_S`` or when forced (``flush``), each phase's start recorded (``enter``)."""

    def __init__(self, migration: Migration, lease: Lease) -> None:
        self.migration = migration
        self.lease = lease
        self.seq = 0  # the last snapshot's sequence number: the stream goes on from there
        self.last_flush = 0.0
        self.phase_started = time.monotonic()
        self.recent = RecentRate()

    def take(self, snapshot: ProgressSnapshot) -> None:
        apply_snapshot(self.migration, snapshot)
        add_round_sample(self.migration, keep_left=snapshot.state in FREEZE_STATES)
        self.seq = max(self.seq, snapshot.seq)
        # The live rate from the bytes sent over the last few seconds; until the window means something,
        # the agent's own figure (over so short a time it is as recent).
        rate = self.recent.add(time.monotonic(), snapshot.bytes_sent)
        self.migration.recent_throughput_bytes_s = (
            round(rate) if rate is not None else snapshot.throughput_bytes_s
        )

    def flush(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_flush < PUBLISH_INTERVAL_S:
            return
        if save_progress(self.migration, self.lease):
            self.last_flush = now

    def enter(self, state: Migration.State, label: str) -> None:
        enter_phase(self.migration, state, label, self.lease)
        self.last_flush = time.monotonic()

    def finish(self, state: Migration.State) -> None:
        setattr(self.migration, PHASE_PERCENT_FIELD[state], 100)
        self.flush(force=True)

    def elapsed_s(self) -> float:
        """Seconds since the current phase began (``phase_started``, set by the watchdog as it arms it)."""
        return time.monotonic() - self.phase_started


def apply_snapshot(migration: Migration, snapshot: ProgressSnapshot) -> None:
    """Copy the snapshot's figures onto the record; each phase's percentage only rises. A local-disk
    mirror's figures too (``DISK_FIELDS``), and the moment it first said ready (``disk_ready_at``)."""
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
    for figure in ("io_outstanding", "io_drain_ms", "network_blackout_ms"):  # I/O Quiesce, blackout
        if (value := getattr(snapshot, figure)) is not None:
            setattr(migration, figure, value)
    if snapshot.disk_bytes_total or snapshot.disk_mirror_ready:  # a local-disk mirror
        for figure in DISK_FIELDS:
            setattr(migration, figure, getattr(snapshot, figure))
        if snapshot.disk_mirror_ready and migration.disk_ready_at is None:
            migration.disk_ready_at = timezone.now()


def save_progress(migration: Migration, lease: Lease) -> bool:
    """Store the progress held in memory, with a heartbeat, while the state and the lease are unchanged;
    raises ``lease.superseded()`` otherwise. False when the database dropped the connection (a restart,
    a failover): the next save records the progress, on a new connection; percentages only rise, so
    nothing is lost but this write."""
    fields = {**progress_fields(migration), "heartbeat_at": timezone.now()}
    rows = Migration.objects.filter(pk=migration.pk, state=migration.state, **lease.where)
    try:
        updated = rows.update(**fields)
    except DATABASE_GONE:
        logger.warning("Migration %s: progress not recorded, the database did not answer", migration.pk)
        connection.close()
        return False
    if not updated:
        raise lease.superseded()
    publish_progress(migration.pk)
    return True


def enter_phase(migration: Migration, state: Migration.State, label: str, lease: Lease) -> None:
    """The next phase begins (``state``), recorded with its progress so far; raises ``lease.superseded()``
    when the state or the lease moved."""
    fields = {**progress_fields(migration), "heartbeat_at": timezone.now()}
    message = f"{label} phase started"
    if not transition(migration.pk, migration.state, state, message=message, where=lease.where, **fields):
        raise lease.superseded()
    migration.state = state
    publish_progress(migration.pk)


def record_warning(migration: Migration, lease: Lease, warning: str, event: str) -> bool:
    """Set the running migration's page warning (``Migration.warning``; "" withdraws it) with a timeline
    ``event``, while its state and the lease are unchanged; False (nothing written) otherwise."""
    with transaction.atomic():
        rows = Migration.objects.filter(pk=migration.pk, state=migration.state, **lease.where)
        if not rows.update(warning=warning):
            return False
        MigrationEvent.objects.create(
            migration_id=migration.pk, from_state=migration.state, to_state=migration.state, message=event
        )
    migration.warning = warning
    logger.warning("Migration %s: %s", migration.pk, event)
    publish_progress(migration.pk)
    return True


# --- the commit ------------------------------------------------------------------------------------


def commit(migration: Migration, lease: Lease, *, committed_by_source: str = "") -> None:
    """FROZEN -> COMMITTING and the registration flip, in one transaction (the point of no return).

    ``committed_by_source``: the source's hypervisor already committed the migration itself at its
    switchover (libvirt's peer-to-peer migration: ``agents.MigrationAgents.settle_source``), in words for
    the timeline; the record then follows it even if a cancel was requested (too late: it could not
    stop the switchover any more).

    Raises ``MigrationCancelled`` when a cancel was requested first (and the source did not commit by
    itself), ``MigrationFailed`` when the source copy is no longer runnable, ``LeaseLost`` when another
    decider took the lease, ``Superseded`` when the state moved otherwise.
    """
    lease.check()
    message = f"Committing: {migration.vm} becomes runnable on {migration.target} only"
    if committed_by_source:
        message = f"{message}. {committed_by_source}"
    fields = {**progress_fields(migration), "heartbeat_at": timezone.now()}
    where = lease.where if committed_by_source else {"cancel_requested": False, **lease.where}
    try:
        with transaction.atomic():
            won = transition(
                migration.pk, State.FROZEN, State.COMMITTING, message=message, where=where, **fields
            )
            if won:
                flip_registrations(migration)
    except (IntegrityError, Registration.DoesNotExist):
        logger.exception("Registration flip of migration %s refused", migration.pk)
        raise MigrationFailed(State.FROZEN, "the VM is no longer runnable on the source host") from None
    if not won:
        if Migration.objects.filter(pk=migration.pk, state=State.FROZEN, cancel_requested=True).exists():
            raise MigrationCancelled(State.FROZEN, cancelled_by(migration.pk))
        raise lease.superseded()
    migration.state = State.COMMITTING
    publish_progress(migration.pk)


PHASE_ORDER = (State.INIT, State.COPY, State.IO_QUIESCE, State.FROZEN)


def walk_to_frozen(progress: ProgressRecord) -> None:
    """Record the phases the source's hypervisor went through by itself (libvirt switched over and
    committed while the control plane was stopping or checking): each phase left from the current one
    finished (100 %), the next entered, up to Frozen, finished too. Raises ``lease.superseded()`` when
    the state or the lease moved."""
    migration = progress.migration
    while migration.state != State.FROZEN:
        progress.finish(Migration.State(migration.state))
        following = PHASE_ORDER[PHASE_ORDER.index(Migration.State(migration.state)) + 1]
        progress.enter(following, str(following.label))
    progress.finish(State.FROZEN)


def flip_registrations(migration: Migration) -> None:
    """Source copy Not Runnable (set by Migrate), then target copy runnable and On: never two runnable.

    Both changes go through the ``Registration`` methods, so each leaves an audit event.
    Raises ``Registration.DoesNotExist`` if the source copy is no longer runnable.
    """
    source_copy = Registration.objects.select_for_update().get(
        vm_id=migration.vm_id,
        vsp=migration.require_source(),
        hardware_status__in=[Registration.HardwareStatus.ON, Registration.HardwareStatus.OFF],
    )
    actor = migration.requested_by
    source_copy.mark_not_runnable(
        set_by=Registration.SetBy.MIGRATE,
        reason=f"guest migrated to VSP {migration.target.name}",
        actor=actor,
    )
    target_copy = Registration.objects.select_for_update().filter(
        vm_id=source_copy.vm_id, vsp_id=migration.target_id
    ).first() or Registration(vm_id=source_copy.vm_id, vsp_id=migration.target_id)
    target_copy.mark_runnable(
        Registration.HardwareStatus.ON,
        actor=actor,
        message=f"Migration {migration.pk} committed: the guest runs on VSP {migration.target.name}",
    )


# --- the abort -------------------------------------------------------------------------------------


def record_abort(
    migration: Migration,
    failure: MigrationFailed,
    alert: str,
    lease: Lease,
    *,
    fields: dict[str, Any] | None = None,
) -> bool:
    """Record ABORTED (CANCELLED for a cancel) with ``alert`` and the failure's kind, before any agent is
    told, and with ``undo_pending`` until the agents answered the undo (``mark_undone``).

    Returns False when the state changed first (nothing recorded then); raises ``LeaseLost`` (nothing
    asked, nothing written) when another decider holds the lease.
    """
    lease.confirm()
    outcome = State.CANCELLED if isinstance(failure, MigrationCancelled) else State.ABORTED
    won = transition(
        migration.pk,
        migration.state,
        outcome,
        message=alert,
        alert=alert,
        failed_phase=failure.phase,
        failure_kind=str(failure.kind),
        undo_pending=True,
        warning="",
        where=lease.where,
        **(fields or {}),
    )
    if won:
        logger.info("Migration %s %s: %s", migration.pk, outcome, alert)
        migration.state = outcome
        publish_progress(migration.pk)
    return won


def has_ended_unsuccessfully(migration_id: int) -> bool:
    return Migration.objects.filter(pk=migration_id, state__in=(State.ABORTED, State.CANCELLED)).exists()


def mark_undone(migration_id: int) -> None:
    """Both agents answered the undo: nothing of this migration is left on them."""
    Migration.objects.filter(pk=migration_id).update(undo_pending=False)


def restate_alert(migration: Migration, alert: str, event: str) -> bool:
    """Replace the alert as read (compare-and-set on its text) with ``alert``, with a timeline ``event``;
    False when the alert changed meanwhile."""
    with transaction.atomic():
        if not Migration.objects.filter(pk=migration.pk, alert=migration.alert).update(alert=alert):
            return False
        MigrationEvent.objects.create(
            migration=migration, from_state=migration.state, to_state=migration.state, message=event
        )
        transaction.on_commit(lambda: publish_progress(migration.pk))
    return True


def store_source_guest_off(migration: Migration) -> None:
    """The source said it does not run the guest (stopped, or gone): its copy, if stored On, is Off.

    It stays the runnable copy: the VM is still the source's.
    """
    Registration.objects.filter(
        vm_id=migration.vm_id,
        vsp_id=migration.require_source().pk,
        hardware_status=Registration.HardwareStatus.ON,
    ).update(hardware_status=Registration.HardwareStatus.OFF)


# --- after the commit ------------------------------------------------------------------------------


def record_completed(
    migration: Migration, lease: Lease, message: str, alert: str = "", *, release_pending: bool = False
) -> None:
    """COMMITTING -> COMPLETED, with ``alert`` (the target may have lost the guest; the source's release
    is pending) when there is one; ``release_pending``: the source did not answer its release (recovery
    asks again, ``record_released``). Any warning of the run is withdrawn. A downtime over the allowed
    one is flagged in the alert and the timeline (``downtime.downtime_excess``: by how much and why), so
    the Alerts list shows it.

    Raises ``lease.superseded()`` when it is still COMMITTING but not this decider's to change.
    """
    fields: dict[str, Any] = {"warning": "", "release_pending": release_pending}
    if alert:
        message = f"{message}. {alert}"
        fields |= {"alert": alert, "failure_kind": str(FailureKind.UNREACHABLE)}
        logger.error("Migration %s: %s", migration.pk, alert)
    excess = downtime_excess(migration)
    if excess is not None:
        message = f"{message}. {excess.sentence}"
        fields["alert"] = f"{alert} {excess.sentence}" if alert else excess.sentence
        logger.warning("Migration %s: %s", migration.pk, excess.sentence)
    if transition(
        migration.pk, State.COMMITTING, State.COMPLETED, message=message, where=lease.where, **fields
    ):
        migration.state = State.COMPLETED
        publish_progress(migration.pk)
    elif Migration.objects.filter(pk=migration.pk, state=State.COMMITTING).exists():
        raise lease.superseded()


def record_released(migration: Migration, alert: str, event: str, actor: Any = None) -> bool:
    """A completed migration's pending release is over (the source answered it, or ``actor`` forgot it):
    ``release_pending`` cleared and the alert replaced by ``alert`` (compare-and-set on the flag), with a
    timeline ``event``. False when it was not pending any more."""
    with transaction.atomic():
        rows = Migration.objects.filter(pk=migration.pk, state=State.COMPLETED, release_pending=True)
        cleared = {} if alert else {"failure_kind": ""}  # nothing left to alert about
        if not rows.update(release_pending=False, alert=alert, **cleared):
            return False
        MigrationEvent.objects.create(
            migration_id=migration.pk,
            from_state=State.COMPLETED,
            to_state=State.COMPLETED,
            message=event,
            actor=actor,
        )
        transaction.on_commit(lambda: publish_progress(migration.pk))
    migration.release_pending, migration.alert = False, alert
    return True


def record_source_disks(migration: Migration, message: str, *, deleted: bool) -> None:
    """What became of the source's volumes of a mirrored migration (``endings.note_source_disks``): a
    timeline event with ``message`` and an audit event (``SOURCE_DISKS_DELETED`` or ``_LEFT``) about the
    VM, in one transaction; the state does not change."""
    action = AuditEvent.Action.SOURCE_DISKS_DELETED if deleted else AuditEvent.Action.SOURCE_DISKS_LEFT
    with transaction.atomic():
        MigrationEvent.objects.create(
            migration_id=migration.pk, from_state=migration.state, to_state=migration.state, message=message
        )
        if migration.vm is not None:
            AuditEvent.record(action, migration.vm, after={"migration": migration.pk}, message=message)
        transaction.on_commit(lambda: publish_progress(migration.pk))
    log = logger.info if deleted else logger.warning
    log("Migration %s: %s", migration.pk, message)


def record_kept_on_source(
    migration: Migration,
    failure: MigrationFailed,
    alert: str,
    lease: Lease,
    *,
    discarded: bool,
    running: bool,
    reason: str,
) -> None:
    """COMMITTING -> ABORTED (failed in Committing) with ``alert``, and the registration flip turned back
    (``unflip_registrations``; ``reason``: the target copy's Not Runnable reason), in one transaction, so
    the VM stays runnable on exactly one VSP, the one that has it. ``discarded``: the target answered its
    discard (else the undo stays pending).

    Raises ``lease.superseded()`` when it is still COMMITTING but not this decider's to change.
    """
    with transaction.atomic():
        won = transition(
            migration.pk,
            State.COMMITTING,
            State.ABORTED,
            message=alert,
            alert=alert,
            failed_phase=State.COMMITTING,
            failure_kind=str(failure.kind),
            undo_pending=not discarded,
            warning="",
            where=lease.where,
        )
        if won:
            unflip_registrations(migration, running=running, reason=reason)
    if won:
        logger.error("Migration %s kept on its source after the commit: %s", migration.pk, alert)
        migration.state = State.ABORTED
        publish_progress(migration.pk)
    elif Migration.objects.filter(pk=migration.pk, state=State.COMMITTING).exists():
        raise lease.superseded()


def unflip_registrations(migration: Migration, *, running: bool, reason: str) -> None:
    """The commit's flip undone: the target copy Not Runnable (set by Migrate, with ``reason``:
    ``alerts.kept_on_source_reason``), then the source copy runnable (On if it runs).

    Inside a transaction; each change is an audit event (``Registration`` methods).
    """
    actor = migration.requested_by
    target, source = migration.target.name, migration.require_source().name
    copies = Registration.objects.select_for_update().filter(vm_id=migration.vm_id)
    target_copy = copies.filter(vsp_id=migration.target_id).first()
    if target_copy is not None and target_copy.hardware_status != Registration.HardwareStatus.NOT_RUNNABLE:
        target_copy.mark_not_runnable(
            set_by=Registration.SetBy.MIGRATE,
            reason=reason,
            actor=actor,
        )
    source_copy = copies.get(vsp_id=migration.require_source().pk)
    source_copy.mark_runnable(
        Registration.HardwareStatus.ON if running else Registration.HardwareStatus.OFF,
        actor=actor,
        message=f"Migration {migration.pk} could not finish on VSP {target}: the guest stays on VSP {source}",
    )
