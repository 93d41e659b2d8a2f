"""Recovery of migrations whose driving worker died, decided by the database state alone.

Before the commit (INIT .. FROZEN): abort, recording first, then discard on the target and resume on the
source. At or after the commit (COMMITTING): roll forward. The compare-and-set on the state means a
worker that was only slow, not dead, loses the race and stops without touching the agents.
The decisions themselves are the worker's own (``decisions``); queues move on through ``scheduling``.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from .decisions import (
    agent_for,
    agent_migration_id,
    cancelled_by,
    load_migration,
    record_abort,
    roll_forward,
    undo_and_mark,
)
from .errors import MigrationCancelled, MigrationFailed
from .models import Migration
from .scheduling import start_idle_queues

logger = logging.getLogger(__name__)

State = Migration.State
UNDO_RETRY_WINDOW_S = 600  # an ended migration's undo is retried this long after it ended, then given up
UNDO_RETRY_TIMEOUT_S = 2.0  # per request: a paused or dead agent must not hold up recovery


def recover_orphans(stale_after_s: float) -> list[int]:
    """Decide every active migration whose worker showed no sign of life for ``stale_after_s``.

    Returns the ids acted on. Also hands idle source VSPs to their oldest queued migration.
    """
    acted = []
    for migration in stale_migrations(stale_after_s):
        if migration.state == State.COMMITTING:
            logger.warning("Recovering migration %s: rolling forward after the commit", migration.pk)
            roll_forward(migration)
        else:
            logger.warning(
                "Recovering migration %s: aborting (its worker stopped in %s)", migration.pk, migration.state
            )
            abort_orphan(migration)
        acted.append(migration.pk)
    retry_pending_undos()
    start_idle_queues()
    return acted


def stale_migrations(stale_after_s: float) -> list[Migration]:
    cutoff = timezone.now() - timedelta(seconds=stale_after_s)
    silent = Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, state_changed_at__lt=cutoff)
    running = [state for state in Migration.ACTIVE_STATES if state != State.QUEUED]
    ids = Migration.objects.filter(silent, state__in=running).values_list("pk", flat=True)
    return [load_migration(pk) for pk in ids]


def abort_orphan(migration: Migration) -> None:
    if migration.cancel_requested:
        failure: MigrationFailed = MigrationCancelled(migration.state, cancelled_by(migration.pk))
    else:
        failure = MigrationFailed(migration.state, "the control-plane worker driving it stopped answering")
    if record_abort(migration, failure):
        agent_id = agent_migration_id(migration)
        with agent_for(migration.source) as source, agent_for(migration.target) as target:
            undo_and_mark(migration.pk, source, target, agent_id)


def retry_pending_undos() -> list[int]:
    """Undo again, once each, on the agents of ended migrations whose undo was not answered.

    A target paused or restarting while its migration was aborted keeps its prepared copy ("ready" waits
    for the control plane's decision for ever); this drops it once the agent answers again, for up to
    ``UNDO_RETRY_WINDOW_S`` after the migration ended. Returns the ids whose undo is now done.
    """
    cutoff = timezone.now() - timedelta(seconds=UNDO_RETRY_WINDOW_S)
    pending = Migration.objects.filter(
        undo_pending=True, state__in=(State.ABORTED, State.CANCELLED), state_changed_at__gte=cutoff
    ).select_related("source", "target")
    done = []
    for migration in pending:
        agent_id = agent_migration_id(migration)
        with (
            agent_for(migration.source, UNDO_RETRY_TIMEOUT_S) as source,
            agent_for(migration.target, UNDO_RETRY_TIMEOUT_S) as target,
        ):
            if undo_and_mark(migration.pk, source, target, agent_id, attempts=1, cancel=False):
                logger.warning("Migration %s: the undo on its agents finished on a later try", migration.pk)
                done.append(migration.pk)
    return done
