"""Recovery of migrations whose driving worker died, decided by the database state alone.

Before the commit (INIT .. FROZEN): abort, recording first, then discard on the target and resume on the
source. At or after the commit (COMMITTING): roll forward. The compare-and-set on the state means a
worker that was only slow, not dead, loses the race and stops without touching the agents.
The decisions themselves are the worker's own (``decisions``); queues move on through ``scheduling``.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from vms.agent_client import AgentClient
from vms.inventory import AGENT_ERRORS
from vms.models import VSP

from .decisions import (
    agent_for,
    agent_migration_id,
    cancel_on_source,
    cancelled_by,
    load_migration,
    record_abort,
    roll_forward,
    undo_on_agents,
)
from .errors import MigrationCancelled, MigrationFailed
from .models import Migration
from .scheduling import start_idle_queues

logger = logging.getLogger(__name__)

State = Migration.State


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
    undo_leftovers()
    start_idle_queues()
    return acted


AGENT_ID = re.compile(r"m(\d+)-\d{20}")  # ``decisions.agent_migration_id``
LEFTOVER_TIMEOUT_S = 3.0


def undo_leftovers() -> list[str]:
    """Guests an agent still shows ``migrating`` for a migration the database says ended unsuccessfully.

    The undo after an abort is retried a few times only: a target paused (SIGSTOP) longer than that
    kept its prepared copy "migrating" for ever (soak, ``SEED=5109``). Every recovery pass asks each
    reachable agent again: a prepared copy is discarded, a source guest resumed. Returns the agent
    migration ids undone. Agents that do not answer are skipped (inventory marks them unreachable).
    """
    ended = (State.ABORTED, State.CANCELLED)
    undone = []
    for vsp in VSP.objects.filter(agent_reachable=True):
        with AgentClient(vsp.agent_url, vsp.agent_secret, timeout_s=LEFTOVER_TIMEOUT_S) as agent:
            try:
                guests = agent.list_guests()
            except AGENT_ERRORS as error:
                logger.warning("Leftover check on %s: %s", vsp, error)
                continue
            for guest in guests:
                agent_id = guest.get("migrating") or ""
                match = AGENT_ID.fullmatch(agent_id)
                migration = match and Migration.objects.filter(pk=int(match[1]), state__in=ended).first()
                if not migration or agent_migration_id(migration) != agent_id:
                    continue
                logger.warning("Undoing leftover %s of migration %s on %s", agent_id, migration.pk, vsp)
                try:
                    if vsp.pk == migration.target_id:
                        agent.discard(agent_id)
                    else:
                        cancel_on_source(agent, agent_id)
                        agent.resume(agent_id)
                except AGENT_ERRORS as error:
                    logger.warning("Leftover %s on %s: %s", agent_id, vsp, error)
                    continue
                undone.append(agent_id)
    return undone


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
            undo_on_agents(source, target, agent_id)
