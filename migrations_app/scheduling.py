"""Who runs when: claim a slot of a source VSP, hand free slots to queued migrations, enqueue a run.

A source VSP lets ``VSP.max_concurrent_migrations`` migrations (N, default 1) leave it at once; the
others wait QUEUED (the hourglass on the pages) and take the slots in the order they were requested.
Evacuations go through the same queue, so they honour N too.
The worker's job is sent by task name through the Celery app, so this module imports neither the
tasks nor the driving loop (``docs/architecture.md``, "Imports point one way").
"""

from __future__ import annotations

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from vms.models import VSP

from .models import Migration
from .transitions import transition

RUN_MIGRATION_TASK = "migrations_app.tasks.run_migration"


def enqueue_run(migration_id: int) -> None:
    """Queue the Celery task that drives ``migration_id`` (a no-op there if it is not its turn)."""
    current_app.send_task(RUN_MIGRATION_TASK, args=(migration_id,), queue=settings.MIGRATION_QUEUE)


def enqueue_next_for_source(source_id: int) -> None:
    """Hand the source VSP's free slots to its oldest queued migrations, if any (the hourglass moves on).

    A run enqueued when it is not its turn (another worker took the slot meanwhile) claims nothing.
    """
    limit = VSP.objects.filter(pk=source_id).values_list("max_concurrent_migrations", flat=True).first()
    free = (limit or 1) - leaving(source_id).count()
    for next_id in next_queued_for_source(source_id, free):
        enqueue_run(next_id)


def leaving(source_id: int) -> QuerySet[Migration]:
    """The migrations that hold one of the source's slots: active and past QUEUED."""
    return Migration.objects.filter(source_id=source_id, state__in=Migration.ACTIVE_STATES).exclude(
        state=Migration.State.QUEUED
    )


def next_queued_for_source(source_id: int, count: int = 1) -> list[int]:
    """The ids of the ``count`` oldest QUEUED migrations leaving ``source_id`` (none when ``count`` < 1)."""
    if count < 1:
        return []
    return list(
        Migration.objects.filter(source_id=source_id, state=Migration.State.QUEUED)
        .order_by("pk")
        .values_list("pk", flat=True)[:count]
    )


def do_claim_source(migration_id: int, lease_owner: str) -> bool:
    """QUEUED -> INIT if its source has a free slot and it is among the source's oldest queued ones.

    With N = ``VSP.max_concurrent_migrations`` and R migrations leaving the source now, the N - R
    oldest queued ones may start; the others stay QUEUED (the hourglass). The source VSP row lock
    serializes claims per source (SQLite serializes all writers anyway), so never more than N leave.
    The claim takes the decider's lease for ``lease_owner`` (``lease.new_owner``) with its first heartbeat.
    """
    with transaction.atomic():
        migration = Migration.objects.filter(pk=migration_id).select_related("source").first()
        if migration is None or migration.state != Migration.State.QUEUED:
            return False
        source_id = migration.require_source().pk
        source = VSP.objects.select_for_update().filter(pk=source_id).first()
        limit = source.max_concurrent_migrations if source is not None else 1
        free = limit - leaving(source_id).count()
        if migration_id not in next_queued_for_source(source_id, free):
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
    """A queued migration whose task was lost would wait for ever: re-hand each source with queued
    migrations its free slots (a source with none free is handed nothing)."""
    waiting = (
        Migration.objects.filter(state=Migration.State.QUEUED)
        .order_by()
        .values_list("source_id", flat=True)
        .distinct()
    )
    for source_id in waiting:
        if source_id is not None:
            enqueue_next_for_source(source_id)


def on_vsp_saved(sender: type[VSP], instance: VSP, created: bool = False, **kwargs: object) -> None:
    """``post_save`` of a VSP (the admin may have raised its migrations at once): once committed, hand
    its free slots to its queued migrations. Nothing is sent for a VSP without queued migrations."""
    if created:
        return
    source_id = instance.pk
    if Migration.objects.filter(source_id=source_id, state=Migration.State.QUEUED).exists():
        transaction.on_commit(lambda: enqueue_next_for_source(source_id))
