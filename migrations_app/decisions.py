"""The decisions about one migration, shared by its worker and by recovery (``docs/migrations.md``).

Commit (the point of no return: FROZEN -> COMMITTING and the registration flip in one transaction),
abort (record ABORTED/CANCELLED with the alert first, then undo on the agents), and roll forward
(resume on the target, release on the source, then COMPLETED). Every state change is a compare-and-set
with an event row (``transitions.transition``), so two deciders never both act.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from vms.agent_client import AgentClient, AgentProtocolError, AgentRefused, AgentUnreachable
from vms.models import VSP, Registration

from .errors import MigrationCancelled, MigrationFailed, Superseded
from .models import PHASE_PERCENT_FIELD, Migration
from .progress import publish_progress
from .transitions import transition

logger = logging.getLogger(__name__)

State = Migration.State
UNDO_ATTEMPTS = 3
CANCEL_TIMEOUT_S = 1.0  # per attempt: a cancel that does not land at once is tried again, not waited on
CANCEL_ATTEMPTS = 4
ROLL_FORWARD_ATTEMPTS = 6
NO_ONE_NAMED = "an administrator"

PROGRESS_FIELDS = (
    *PHASE_PERCENT_FIELD.values(),
    "bytes_sent",
    "bytes_remaining",
    "rounds",
    "dirty_rate_bytes_s",
    "throughput_bytes_s",
    "expected_downtime_ms",
    "downtime_ms",
    "source_digest",
    "target_digest",
    "round_samples",
)


def agent_for(vsp: VSP) -> AgentClient:
    """A client of ``vsp``'s host agent (close it, or use it as a context manager)."""
    return AgentClient(vsp.agent_url, vsp.agent_secret)


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


def commit(migration: Migration, check_stop: Callable[[], None]) -> None:
    """FROZEN -> COMMITTING and the registration flip, in one transaction (the point of no return).

    ``check_stop`` raises the worker's stop reason, if any. Raises ``MigrationCancelled`` when a cancel
    was requested first, ``MigrationFailed`` when the source copy is no longer runnable, ``Superseded``
    when another decider moved the migration.
    """
    check_stop()
    message = f"Committing: {migration.vm} becomes runnable on {migration.target} only"
    fields = {**progress_fields(migration), "heartbeat_at": timezone.now()}
    try:
        with transaction.atomic():
            won = transition(
                migration.pk,
                State.FROZEN,
                State.COMMITTING,
                message=message,
                where={"cancel_requested": False},
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
        raise Superseded
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
    migration: Migration, failure: MigrationFailed, source: AgentClient, target: AgentClient, agent_id: str
) -> None:
    """Record the failure (the record decides), then undo on the agents if this decider won or it ended."""
    recorded = record_abort(migration, failure, fields=progress_fields(migration))
    ended = (State.ABORTED, State.CANCELLED)
    if recorded or Migration.objects.filter(pk=migration.pk, state__in=ended).exists():
        undo_on_agents(source, target, agent_id)


def record_abort(
    migration: Migration, failure: MigrationFailed, *, fields: dict[str, Any] | None = None
) -> bool:
    """Record ABORTED/CANCELLED with the alert and the failure's kind, before any agent is told.

    Returns False when another decider changed the state first (nothing recorded then).
    """
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
        **(fields or {}),
    )
    if won:
        logger.info("Migration %s %s: %s", migration.pk, outcome, alert)
        migration.state = outcome
        publish_progress(migration.pk)
    return won


def where_the_vm_stays(migration: Migration, failure: MigrationFailed) -> str:
    """The alert's last sentence: "keeps running" only for a guest that was running on the source."""
    running = failure.source_running
    source = migration.require_source()
    if running is None:
        running = Registration.objects.filter(
            vm_id=migration.vm_id, vsp=source, hardware_status=Registration.HardwareStatus.ON
        ).exists()
    if running:
        return f"The VM keeps running on {source.name}."
    return f"The VM stays on {source.name}, where it was not running."


def cancel_on_source(source: AgentClient, agent_id: str) -> bool:
    """Tell the source to stop sending, promptly: short attempts, retried (a refusal: nothing to stop)."""
    return retry_agent(lambda: source.cancel(agent_id, CANCEL_TIMEOUT_S), CANCEL_ATTEMPTS, delay=0.1)


def undo_on_agents(source: AgentClient, target: AgentClient, agent_id: str) -> None:
    """After an abort: stop the source's sending, drop the target's copy, make sure the source runs."""
    cancel_on_source(source, agent_id)
    retry_agent(lambda: target.discard(agent_id), UNDO_ATTEMPTS)
    retry_agent(lambda: source.resume(agent_id), UNDO_ATTEMPTS)


def roll_forward(migration: Migration) -> bool:
    """After the commit only forward: resume the target, release the source, then COMPLETED.

    Both commands are idempotent, so a recovering worker may repeat what a dead one already did.
    Returns False (still COMMITTING, for recovery to finish) if an agent cannot be reached.
    """
    agent_id = agent_migration_id(migration)
    with agent_for(migration.require_source()) as source, agent_for(migration.target) as target:
        if not retry_agent(lambda: target.resume(agent_id), ROLL_FORWARD_ATTEMPTS):
            return False
        if not retry_agent(lambda: source.release(agent_id), ROLL_FORWARD_ATTEMPTS):
            return False
    migration.refresh_from_db()
    message = f"Completed: {migration.vm} runs on {migration.target}"
    if migration.downtime_ms is not None:
        message += f" (downtime {migration.downtime_ms} ms)"
    if transition(migration.pk, State.COMMITTING, State.COMPLETED, message=message):
        publish_progress(migration.pk)
    return True


def retry_agent(command: Callable[[], Any], attempts: int, *, delay: float = 0.2) -> bool:
    """Run an idempotent agent command until it answers; a refusal is final (logged), not retried.

    ``attempts`` tries, ``delay`` seconds apart at first, doubling up to 5 s. True once it answered.
    """
    for attempt in range(1, attempts + 1):
        try:
            command()
            return True
        except AgentRefused as refusal:
            logger.warning("Agent refused a clean-up command: %s", refusal)
            return True
        except (AgentUnreachable, AgentProtocolError) as error:
            logger.warning("Agent command failed (attempt %s of %s): %s", attempt, attempts, error)
            if attempt < attempts:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
    return False
