"""The decisions about one migration, shared by its worker and by recovery (``docs/migrations.md``).

Commit (the point of no return: FROZEN -> COMMITTING and the registration flip in one transaction),
abort (record ABORTED/CANCELLED with the alert first, then undo on the agents), and roll forward
(resume on the target, release on the source, then COMPLETED). Every state change is a compare-and-set
with an event row (``transitions.transition``) that also compares the decider's lease (``lease``), so two
deciders never both act: a decider that lost its lease raises ``LeaseLost`` before any agent command.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from django.db import IntegrityError, transaction
from django.utils import timezone

from agentprotocol import FailureKind, ProgressSnapshot
from vms.agent_client import (
    AgentClient,
    AgentError,
    AgentProtocolError,
    AgentRefused,
    AgentUnreachable,
    UnknownGuest,
    UnknownMigration,
)
from vms.models import VSP, Registration

from .errors import MigrationCancelled, MigrationFailed
from .lease import Lease
from .models import PHASE_PERCENT_FIELD, Migration, MigrationEvent
from .progress import publish_progress
from .transitions import transition

logger = logging.getLogger(__name__)

State = Migration.State
UNDO_ATTEMPTS = 3
CANCEL_TIMEOUT_S = 1.0  # per attempt: a cancel that does not land at once is tried again, not waited on
CANCEL_ATTEMPTS = 4
ROLL_FORWARD_ATTEMPTS = 6
SOURCE_ASK_TIMEOUT_S = 2.0  # per attempt: how long the alert waits for the source to say whether the VM runs
SOURCE_ASK_ATTEMPTS = 2
NO_ONE_NAMED = "an administrator"
T = TypeVar("T")

PROGRESS_FIELDS = (
    *PHASE_PERCENT_FIELD.values(),
    "bytes_sent",
    "bytes_remaining",
    "rounds",
    "dirty_rate_bytes_s",
    "throughput_bytes_s",
    "throttle_pct",
    "expected_downtime_ms",
    "downtime_ms",
    "source_digest",
    "target_digest",
    "round_samples",
)


def agent_for(vsp: VSP, timeout_s: float | None = None) -> AgentClient:
    """A client of ``vsp``'s host agent (close it, or use it as a context manager).

    ``timeout_s``: per request (s); the ``AGENT_TIMEOUT_S`` setting when None.
    """
    return AgentClient.for_vsp(vsp, timeout_s=timeout_s)


def agent_migration_id(migration: Migration) -> str:
    """The id both agents know this attempt by; derived from the row so recovery can name it too."""
    return f"m{migration.pk}-{migration.requested_at:%Y%m%d%H%M%S%f}"


def load_migration(migration_id: int) -> Migration:
    """The migration with its VM and both VSPs (raises ``Migration.DoesNotExist``)."""
    return Migration.objects.select_related("vm", "source", "target").get(pk=migration_id)


def progress_fields(migration: Migration) -> dict[str, Any]:
    """The progress columns of ``migration`` as held in memory, for a compare-and-set update."""
    return {name: getattr(migration, name) for name in PROGRESS_FIELDS}


def cancelled_by(migration_id: int) -> str:
    """Who asked to cancel, for the alert: ``Migration.cancel_requested_by``, or "an administrator"."""
    requester = Migration.objects.filter(pk=migration_id).select_related("cancel_requested_by").first()
    if requester is None or requester.cancel_requested_by is None:
        return NO_ONE_NAMED
    return str(requester.cancel_requested_by)


def commit(migration: Migration, check_stop: Callable[[], None], lease: Lease) -> None:
    """FROZEN -> COMMITTING and the registration flip, in one transaction (the point of no return).

    ``check_stop`` raises the worker's stop reason, if any. Raises ``MigrationCancelled`` when a cancel
    was requested first, ``MigrationFailed`` when the source copy is no longer runnable, ``LeaseLost``
    when another decider took the lease, ``Superseded`` when the state moved otherwise.
    """
    check_stop()
    lease.check()
    message = f"Committing: {migration.vm} becomes runnable on {migration.target} only"
    fields = {**progress_fields(migration), "heartbeat_at": timezone.now()}
    try:
        with transaction.atomic():
            won = transition(
                migration.pk,
                State.FROZEN,
                State.COMMITTING,
                message=message,
                where={"cancel_requested": False, **lease.where},
                **fields,
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


def abort(
    migration: Migration,
    failure: MigrationFailed,
    source: AgentClient,
    target: AgentClient,
    agent_id: str,
    lease: Lease,
) -> None:
    """Record the failure (the record decides), then undo on the agents if this decider won or it ended
    under this decider's lease; ``LeaseLost`` (nothing done) when another decider holds the lease."""
    recorded = record_abort(migration, failure, lease, fields=progress_fields(migration))
    ended = (State.ABORTED, State.CANCELLED)
    if not recorded:
        lease.confirm()
    if recorded or Migration.objects.filter(pk=migration.pk, state__in=ended).exists():
        undo_and_mark(migration.pk, source, target, agent_id)


def record_abort(
    migration: Migration, failure: MigrationFailed, lease: Lease, *, fields: dict[str, Any] | None = None
) -> bool:
    """Record ABORTED/CANCELLED with the alert and the failure's kind, before any agent is told.

    Returns False when the state changed first (nothing recorded then); raises ``LeaseLost`` (nothing
    asked, nothing written) when another decider holds the lease.
    """
    lease.confirm()
    outcome = State.CANCELLED if isinstance(failure, MigrationCancelled) else State.ABORTED
    alert = f"{failure.alert} {where_the_vm_stays(migration, failure)}"
    won = transition(
        migration.pk,
        migration.state,
        outcome,
        message=alert,
        alert=alert,
        failed_phase=failure.phase,
        failure_kind=str(failure.kind),
        undo_pending=True,
        where=lease.where,
        **(fields or {}),
    )
    if won:
        logger.info("Migration %s %s: %s", migration.pk, outcome, alert)
        migration.state = outcome
        publish_progress(migration.pk)
    return won


def where_the_vm_stays(migration: Migration, failure: MigrationFailed) -> str:
    """The alert's last sentence, from the source agent's own answer (the database may be out of date).

    "keeps running" only for a guest the source reports running (or ``failure.source_running`` True).
    A source that no longer has the guest lost it (a simulated host's guests die with its agent: a host
    crash); one that does not answer is named, and nothing is claimed about the VM.
    """
    running: bool | str | None = failure.source_running
    if running is None:
        with agent_for(migration.require_source()) as source_agent:
            running = source_guest_status(migration, source_agent)
    return stays_sentence(migration, running)


def stays_sentence(migration: Migration, status: bool | str | None) -> str:
    """Where the VM is, in the alert's words; ``status`` as ``source_guest_status`` gives it (or a bool)."""
    source = migration.require_source().name
    if status is True or status == "running":
        return f"The VM keeps running on {source}."
    if status is False or status == "stopped":
        return f"The VM stays on {source}, where it was not running."
    if status == "gone":
        return (
            f"The VM is not running: {source} no longer has it (its host agent restarted, and a simulated "
            "host's guests die with its agent: a host crash). Start it again on "
            f"{source}."
        )
    return f"The VM stays on {source}, which did not answer: if its host crashed, the VM is down there."


def restate_where_the_vm_stays(migration_id: int, source: AgentClient) -> bool:
    """The source answered again (its undo went through): an alert that ends "which did not answer: ...
    the VM is down there" is restated with where the VM is now, as the source reports it.

    QA: a QEMU source agent killed mid-migration, restarted, re-adopted its guest and resumed it, and the
    alert still said the VM was down there. Compare-and-set on the alert text, with an event row and a
    push; returns whether it was restated (False: nothing to restate, or the source still says nothing).
    """
    migration = Migration.objects.select_related("vm", "source").get(pk=migration_id)
    unanswered = stays_sentence(migration, "unknown") if migration.source_id else ""
    if not unanswered or migration.vm_id is None or not migration.alert.endswith(unanswered):
        return False
    status = source_guest_status(migration, source)
    if status == "unknown":
        return False
    now = stays_sentence(migration, status).removesuffix(".")
    again = "its host agent answered again after the abort"
    alert = f"{migration.alert.removesuffix(unanswered)}{now} ({again})."
    with transaction.atomic():
        if not Migration.objects.filter(pk=migration.pk, alert=migration.alert).update(alert=alert):
            return False
        MigrationEvent.objects.create(
            migration=migration,
            from_state=migration.state,
            to_state=migration.state,
            message=f"{migration.source} answered again: {now[0].lower()}{now[1:]}.",
        )
        transaction.on_commit(lambda: publish_progress(migration.pk))
    logger.info("Migration %s: alert restated after its source answered again: %s", migration.pk, now)
    return True


def source_guest_status(migration: Migration, source: AgentClient) -> str:
    """ "running", "stopped", "gone" (the source does not know the guest) or "unknown" (no answer).

    A guest found stopped or gone is stored Off on the source copy if that copy was On (it stays the
    runnable copy: the VM is still the source's).
    """
    vm = migration.require_vm()
    status = "unknown"
    for attempt in range(SOURCE_ASK_ATTEMPTS):
        try:
            guest = source.get_guest(str(vm.guest_id), timeout_s=SOURCE_ASK_TIMEOUT_S)
        except UnknownGuest:
            status = "gone"
            break
        except AgentError as error:
            logger.info("Asking %s about %s (attempt %s): %s", migration.source, vm, attempt + 1, error)
            time.sleep(0.5)
            continue
        status = "running" if guest.hardware_status == "on" else "stopped"
        break
    if status in ("stopped", "gone"):
        Registration.objects.filter(
            vm=vm, vsp_id=migration.require_source().pk, hardware_status=Registration.HardwareStatus.ON
        ).update(hardware_status=Registration.HardwareStatus.OFF)
    return status


def cancel_on_source(source: AgentClient, agent_id: str) -> bool:
    """Tell the source to stop sending, promptly: short attempts, retried (a refusal: nothing to stop)."""
    return retry_agent(lambda: source.cancel(agent_id, CANCEL_TIMEOUT_S), CANCEL_ATTEMPTS, delay=0.1)


def undo_on_agents(
    source: AgentClient,
    target: AgentClient,
    agent_id: str,
    attempts: int = UNDO_ATTEMPTS,
    *,
    cancel: bool = True,
) -> bool:
    """After an abort: stop the source's sending, drop the target's copy, make sure the source runs.

    True once both the target's discard and the source's resume were answered (a refusal is an answer:
    that agent holds nothing of this migration any more); False leaves it for ``retry_pending_undos``.
    """
    if cancel:  # a later try skips it: the source's resume stops any sending as well
        cancel_on_source(source, agent_id)
    discarded = retry_agent(lambda: target.discard(agent_id), attempts)
    resumed = retry_agent(lambda: source.resume(agent_id), attempts)
    return discarded and resumed


def undo_and_mark(
    migration_id: int,
    source: AgentClient,
    target: AgentClient,
    agent_id: str,
    attempts: int = UNDO_ATTEMPTS,
    *,
    cancel: bool = True,
) -> bool:
    """``undo_on_agents``, then clear the migration's ``undo_pending`` if both agents answered."""
    done = undo_on_agents(source, target, agent_id, attempts, cancel=cancel)
    if done:
        Migration.objects.filter(pk=migration_id).update(undo_pending=False)
        restate_where_the_vm_stays(migration_id, source)
    else:
        logger.warning("Undo of %s not finished: an agent did not answer; recovery tries again", agent_id)
    return done


def roll_forward(migration: Migration, lease: Lease) -> bool:
    """After the commit: resume the target, and only once it confirmed it runs the guest, release the source.

    Both commands are idempotent, so a recovering worker may repeat what a dead one already did; each is
    sent only while ``lease`` is still this decider's (``LeaseLost`` otherwise, nothing more done).
    Returns False (still COMMITTING, for recovery to finish) if an agent cannot be reached.
    A target that does not run the guest after ``resume`` (it restarted and forgot the migration, or
    refuses) never gets it: the source, never released, resumes it (``keep_on_source``). A target that
    stops answering or forgets the migration right after it took over still ends COMPLETED (the source
    copy is gone), with an alert saying so: never COMPLETED in silence about a lost guest.
    """
    agent_id = agent_migration_id(migration)
    with agent_for(migration.require_source()) as source, agent_for(migration.target) as target:
        resumed = ask_agent(leased(lease, lambda: target.resume(agent_id)), ROLL_FORWARD_ATTEMPTS)
        if resumed is None:
            return False
        if not runs_the_guest(resumed):
            return keep_on_source(migration, source, target, agent_id, resumed, lease)
        released = ask_agent(leased(lease, lambda: source.release(agent_id)), ROLL_FORWARD_ATTEMPTS)
        if released is None:
            return False
        if isinstance(released, AgentRefused):
            logger.warning("Source of %s refused the release (no copy left): %s", agent_id, released)
        alert = alert_if_target_lost_it(migration, ask_agent(lambda: target.snapshot(agent_id), 2))
    migration.refresh_from_db()
    message = f"Completed: {migration.vm} runs on {migration.target}"
    if migration.downtime_ms is not None:
        message += f" (downtime {migration.downtime_ms} ms)"
    fields: dict[str, Any] = {}
    if alert:
        message = f"{message}. {alert}"
        fields = {"alert": alert, "failure_kind": str(FailureKind.UNREACHABLE)}
        logger.error("Migration %s: %s", migration.pk, alert)
    if transition(
        migration.pk, State.COMMITTING, State.COMPLETED, message=message, where=lease.where, **fields
    ):
        publish_progress(migration.pk)
    elif Migration.objects.filter(pk=migration.pk, state=State.COMMITTING).exists():
        raise lease.superseded()
    return True


def leased(lease: Lease, command: Callable[[], T]) -> Callable[[], T]:
    """``command`` sent only after ``lease.confirm()`` (each retry confirms again)."""

    def confirmed() -> T:
        lease.confirm()
        return command()

    return confirmed


def runs_the_guest(answer: Answer) -> bool:
    """The target's answer to ``resume`` (or ``snapshot``) says it holds the guest and runs it."""
    return isinstance(answer, ProgressSnapshot) and answer.state == "completed"


def alert_if_target_lost_it(migration: Migration, answer: Answer) -> str:
    """After the release: the critical alert if the target no longer confirms it runs the guest, else ""."""
    if runs_the_guest(answer):
        return ""
    target, vm = migration.target.name, migration.vm
    if isinstance(answer, UnknownMigration):
        why = (
            "its host agent restarted right after it took over, and a simulated host's guests die with "
            "its agent (a host crash)"
        )
    elif answer is None:
        why = "it stopped answering right after it took over; if its host crashed, the VM is down"
    else:
        why = f"it reports {answer.state if isinstance(answer, ProgressSnapshot) else answer}"
    released = f"The source copy on {migration.require_source().name} was released."
    return f"{vm} may not be running on {target}: {why}. {released}"


def keep_on_source(
    migration: Migration,
    source: AgentClient,
    target: AgentClient,
    agent_id: str,
    refusal: Answer,
    lease: Lease,
) -> bool:
    """The target did not take the guest after the commit: the source, never released, runs it again.

    Records ABORTED (failed in Committing) with a critical alert, and turns the registration flip back
    (the target copy Not Runnable, the source copy runnable: On if it runs), in one transaction, so the
    VM stays runnable on exactly one VSP, the one that has it. Returns False if the source did not answer.
    """
    discarded = retry_agent(leased(lease, lambda: target.discard(agent_id)), UNDO_ATTEMPTS)
    resumed = ask_agent(leased(lease, lambda: source.resume(agent_id)), ROLL_FORWARD_ATTEMPTS)
    if resumed is None:
        return False
    status = source_guest_status(migration, source)
    if isinstance(refusal, UnknownMigration):
        why = f"{migration.target.name} lost the guest before running it (its host agent restarted)"
    else:
        why = f"{migration.target.name} did not run the guest ({refusal})"
    failure = MigrationFailed(State.COMMITTING, why, kind=FailureKind.UNREACHABLE)
    alert = f"{failure.alert} {stays_sentence(migration, status)}"
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
            where=lease.where,
        )
        if won:
            unflip_registrations(migration, running=status == "running")
    if won:
        logger.error("Migration %s kept on its source after the commit: %s", migration.pk, alert)
        publish_progress(migration.pk)
    elif Migration.objects.filter(pk=migration.pk, state=State.COMMITTING).exists():
        raise lease.superseded()
    return True


def unflip_registrations(migration: Migration, *, running: bool) -> None:
    """The commit's flip undone: the target copy Not Runnable, then the source copy runnable (On if it runs).

    Inside a transaction; each change is an audit event (``Registration`` methods).
    """
    actor = migration.requested_by
    target, source = migration.target.name, migration.require_source().name
    copies = Registration.objects.select_for_update().filter(vm_id=migration.vm_id)
    target_copy = copies.filter(vsp_id=migration.target_id).first()
    if target_copy is not None and target_copy.hardware_status != Registration.HardwareStatus.NOT_RUNNABLE:
        target_copy.mark_not_runnable(
            set_by=Registration.SetBy.MIGRATE,
            reason=f"VSP {target} lost the guest after the commit; it stays on VSP {source}",
            actor=actor,
        )
    source_copy = copies.get(vsp_id=migration.require_source().pk)
    source_copy.mark_runnable(
        Registration.HardwareStatus.ON if running else Registration.HardwareStatus.OFF,
        actor=actor,
        message=f"Migration {migration.pk} could not finish on VSP {target}: the guest stays on VSP {source}",
    )


# What an agent command came to: its snapshot, its refusal (final, not retried), or None (no answer).
Answer = ProgressSnapshot | AgentRefused | None


def ask_agent(command: Callable[[], ProgressSnapshot], attempts: int, *, delay: float = 0.2) -> Answer:
    """Run an idempotent agent command until it answers: its snapshot, or its refusal (not retried).

    ``attempts`` tries, ``delay`` seconds apart at first, doubling up to 5 s; None if it never answered.
    """
    for attempt in range(1, attempts + 1):
        try:
            return command()
        except AgentRefused as refusal:
            return refusal
        except (AgentUnreachable, AgentProtocolError) as error:
            logger.warning("Agent command failed (attempt %s of %s): %s", attempt, attempts, error)
            if attempt < attempts:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
    return None


def retry_agent(command: Callable[[], Any], attempts: int, *, delay: float = 0.2) -> bool:
    """A clean-up command (cancel, discard, resume after an abort): True once the agent answered.

    A refusal (4xx) counts as an answer here (logged): the agent has nothing left to clean up. A 5xx
    (the agent failed to do it) does not: the clean-up is still to be done. Decisions that depend on
    what the agent holds use ``ask_agent`` and go by the refusal's class.
    """
    answer = ask_agent(command, attempts, delay=delay)
    if isinstance(answer, AgentRefused):
        if answer.status >= 500:
            logger.warning("Agent failed a clean-up command: %s", answer)
            return False
        logger.warning("Agent refused a clean-up command: %s", answer)
    return answer is not None
