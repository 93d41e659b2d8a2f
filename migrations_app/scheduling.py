"""Who runs when: claim a source VSP, hand it to its next queued migration, enqueue a worker's run.

One migration leaves a source VSP at a time; the others wait QUEUED (the hourglass on the pages).
The worker's job is sent by task name through the Celery app, so this module imports neither the
tasks nor the driving loop (``docs/architecture.md``, "Imports point one way").
"""

from __future__ import annotations

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from vms.models import VSP

from .models import Migration
from .transitions import transition

RUN_MIGRATION_TASK = "migrations_app.tasks.run_migration"


def enqueue_run(migration_id: int) -> None:
    """Queue the Celery task that drives ``migration_id`` (a no-op there if it is not its turn)."""
    current_app.send_task(RUN_MIGRATION_TASK, args=(migration_id,), queue=settings.MIGRATION_QUEUE)


def enqueue_next_for_source(source_id: int) -> None:
    """Hand the source VSP to its oldest queued migration, if any (the hourglass moves on)."""
    next_id = next_queued_for_source(source_id)
    if next_id is not None:
        enqueue_run(next_id)


def next_queued_for_source(source_id: int) -> int | None:
    """The id of the oldest QUEUED migration leaving ``source_id``, or None."""
    return (
        Migration.objects.filter(source_id=source_id, state=Migration.State.QUEUED)
        .order_by("pk")
        .values_list("pk", flat=True)
        .first()
    )


def do_claim_source(migration_id: int, lease_owner: str) -> bool:
    """QUEUED -> INIT if this migration's source is free and it is the source's oldest queued one.

    The claim takes the decider's lease for ``lease_owner`` (``lease.new_owner``) with its first heartbeat.

    The source VSP row lock serializes claims per source (SQLite serializes all writers anyway), so
    exactly one migration leaves a source at a time; the others stay QUEUED (the hourglass).
    """
    with transaction.atomic():
        migration = Migration.objects.filter(pk=migration_id).select_related("source").first()
        if migration is None or migration.state != Migration.State.QUEUED:
            return False
        source_id = migration.require_source().pk
        VSP.objects.select_for_update().filter(pk=source_id).first()
        busy = (
            Migration.objects.filter(source_id=source_id, state__in=Migration.ACTIVE_STATES)
            .exclude(state=Migration.State.QUEUED)
            .exists()
        )
        if busy or next_queued_for_source(source_id) != migration_id:
            return False
        return transition(
            migration_id,
            Migration.State.QUEUED,
            Migration.State.INIT,
            message=f"Init: {migration.source} and the target host connect",
            heartbeat_at=timezone.now(),
            lease_owner=lease_owner,
        )


def start_idle_queues() -> None:
    """A queued migration whose task was lost would wait for ever: re-hand each idle source its next one."""
    busy = Migration.objects.filter(state__in=Migration.ACTIVE_STATES).exclude(state=Migration.State.QUEUED)
    waiting = (
        Migration.objects.filter(state=Migration.State.QUEUED)
        .exclude(source_id__in=busy.values("source_id"))
        .values_list("source_id", flat=True)
        .distinct()
    )
    for source_id in waiting:
        enqueue_next_for_source(source_id)
