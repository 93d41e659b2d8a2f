"""Recovery of migrations whose driving worker died, decided by the database state alone.

Before the commit (INIT .. FROZEN): abort, recording first, then discard on the target and resume on the
source (unless the source's driver commits at the switchover and already did: libvirt; then the record
follows it and it rolls forward). At or after the commit (COMMITTING): roll forward. Recovery first takes
over the migration's expired lease (``lease.take_over_expired``, a compare-and-set): a worker that was only
slow, not dead, finds its lease gone at its next renewal and stands down without touching the agents again.
It ends a migration as its worker would (``endings``, through ``agents.MigrationAgents``); queues move on
through ``scheduling``.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta

from django.db.models import F, Q
from django.utils import timezone

from vms.inventory import AGENT_ERRORS
from vms.models import VSP

from .agents import MigrationAgents, agent_for, agent_migration_id
from .alerts import cancelled_by
from .endings import (
    abort,
    committed_by_source,
    finish_release,
    restate_target_back,
    restate_where_the_vm_is,
    roll_forward,
    undo_and_mark,
)
from .errors import MigrationCancelled, MigrationFailed
from .lease import Lease, LeaseLost, new_owner, record_stood_down, take_over_expired
from .models import Migration
from .outcomes import deliver_outcome_of
from .records import ProgressRecord, load_migration
from .scheduling import start_idle_queues

logger = logging.getLogger(__name__)

State = Migration.State
UNDO_RETRY_WINDOW_S = 600  # an ended migration's undo is retried this long after it ended, then given up
UNDO_RETRY_AFTER_S = 5  # the decider's own undo (retried a few seconds) goes first
UNDO_RETRY_TIMEOUT_S = 2.0  # per request: a paused or dead agent must not hold up recovery
UNDO_BACKOFF_MAX_S = 60  # the wait between two undo tries of one migration doubles up to this


def claim_undo_try(migration: Migration) -> bool:
    """Claim recovery's next undo try of ``migration`` (as read): False while its back-off runs.

    The tries of one migration are ``UNDO_RETRY_AFTER_S`` apart, doubling each time up to
    ``UNDO_BACKOFF_MAX_S``, however often recovery passes run (every second in the soak: a target
    that dropped every discard got ~4 a second for 6 minutes). The claim is a compare-and-set on
    ``undo_tries``: of two passes at once, one tries.
    """
    now = timezone.now()
    if migration.undo_retry_at is not None and migration.undo_retry_at > now:
        return False
    wait_s = min(UNDO_RETRY_AFTER_S * 2 ** min(migration.undo_tries, 16), UNDO_BACKOFF_MAX_S)
    claimed = Migration.objects.filter(pk=migration.pk, undo_tries=migration.undo_tries).update(
        undo_tries=F("undo_tries") + 1, undo_retry_at=now + timedelta(seconds=wait_s)
    )
    return claimed == 1


def recover_orphans(stale_after_s: float) -> list[int]:
    """Decide every active migration whose worker showed no sign of life for ``stale_after_s``.

    Returns the ids acted on. Also hands idle source VSPs to their oldest queued migration.
    """
    acted = []
    for migration in stale_migrations(stale_after_s):
        try:
            if recover_one(migration, stale_after_s):
                acted.append(migration.pk)
        except Exception:  # one migration's trouble must not leave the others undecided
            logger.exception("Recovery of migration %s failed; the next pass tries again", migration.pk)
    retry_pending_undos()
    retry_pending_releases()
    undo_leftovers()
    start_idle_queues()
    return acted


def recover_one(migration: Migration, stale_after_s: float) -> bool:
    """Decide one silent migration; False (nothing done) when another decider got there first.

    Recovery takes over the lease only once it expired (no renewal for ``stale_after_s``), by a
    compare-and-set from the state this pass read: a worker that renewed meanwhile keeps it, and of two
    recovery passes at once the one that loses skips the migration instead of failing.
    """
    lease = take_over_expired(migration, stale_after_s, new_owner("recovery"))
    if lease is None:
        logger.info("Migration %s: its lease was renewed or taken first; recovery skips it", migration.pk)
        return False
    try:
        with MigrationAgents(migration, lease) as agents:
            if migration.state == State.COMMITTING:
                logger.warning("Recovering migration %s: rolling forward after the commit", migration.pk)
                roll_forward(agents, lease)
            else:
                logger.warning(
                    "Recovering migration %s: aborting (its worker stopped in %s)",
                    migration.pk,
                    migration.state,
                )
                if not abort_orphan(agents, lease):
                    return False
    except LeaseLost:  # this pass itself stalled past the limit and a later pass took over
        record_stood_down(lease)
        return False
    deliver_outcome_of(migration.pk)  # as the worker would have: its followers (an evacuation...) learn it
    return True


RUNNING = [state for state in Migration.ACTIVE_STATES if state != State.QUEUED]


AGENT_ID = re.compile(r"m(\d+)-\d{20}")  # ``agents.agent_migration_id``
LEFTOVER_TIMEOUT_S = 3.0


def undo_leftovers() -> list[str]:
    """Guests an agent still shows ``migrating`` for a migration the database says ended unsuccessfully.

    The undo after an abort is retried a few times only: a target paused (SIGSTOP) longer than that
    kept its prepared copy "migrating" for ever (soak, ``SEED=5109``). Every recovery pass asks each
    reachable agent again (backed off per migration, ``claim_undo_try``): a prepared copy is discarded,
    a source guest resumed. Returns the agent migration ids undone. Agents that do not answer are
    skipped (inventory marks them unreachable).
    """
    ended = (State.ABORTED, State.CANCELLED)
    undone = []
    claimed: dict[int, bool] = {}  # migration id -> this pass may try it
    for vsp in VSP.objects.filter(agent_reachable=True):
        with agent_for(vsp, timeout_s=LEFTOVER_TIMEOUT_S) as agent:
            try:
                guests = agent.list_guests()
            except AGENT_ERRORS as error:
                logger.warning("Leftover check on %s: %s", vsp, error)
                continue
            for guest in guests:
                agent_id = guest.migrating or ""
                match = AGENT_ID.fullmatch(agent_id)
                migration = match and Migration.objects.filter(pk=int(match[1]), state__in=ended).first()
                if not migration or agent_migration_id(migration) != agent_id:
                    continue
                if migration.pk not in claimed:  # one claim a pass: this try covers each agent it is on
                    claimed[migration.pk] = claim_undo_try(migration)
                if not claimed[migration.pk]:  # tried a moment ago (here or by the retry above)
                    continue
                logger.warning("Undoing leftover %s of migration %s on %s", agent_id, migration.pk, vsp)
                if not undo_leftover(migration, vsp):
                    logger.warning("Leftover %s on %s: its agent did not answer", agent_id, vsp)
                    continue
                undone.append(agent_id)
    return undone


def undo_leftover(migration: Migration, vsp: VSP) -> bool:
    """One try of the undo on ``vsp``, the ended ``migration``'s target (drop its copy) or source (stop
    sending, run the guest on, and restate an alert that said it did not answer); True once it answered."""
    with MigrationAgents(migration, timeout_s=LEFTOVER_TIMEOUT_S) as agents:
        if vsp.pk == migration.target_id:
            if not agents.discard_target(attempts=1):
                return False
            restate_target_back(agents)
            return True
        agents.cancel_source()
        if agents.resume_source(attempts=1) is None:
            return False
        restate_where_the_vm_is(agents)
        return True


def stale_migrations(stale_after_s: float) -> list[Migration]:
    """The running migrations silent for ``stale_after_s`` (one that ended while loading is left out)."""
    cutoff = timezone.now() - timedelta(seconds=stale_after_s)
    silent = Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, state_changed_at__lt=cutoff)
    ids = Migration.objects.filter(silent, state__in=RUNNING).values_list("pk", flat=True)
    loaded = [load_migration(pk) for pk in ids]
    return [migration for migration in loaded if migration.state in RUNNING]


def abort_orphan(agents: MigrationAgents, lease: Lease) -> bool:
    """Record the abort (from the state read), then undo on the agents; False if the state moved first.

    A source whose driver commits at the switchover (libvirt) and did so while no worker watched is not
    aborted: the record follows it and the migration rolls forward (``endings.committed_by_source``).
    """
    migration = agents.migration
    if migration.cancel_requested:
        failure: MigrationFailed = MigrationCancelled(migration.state, cancelled_by(migration.pk))
    else:
        failure = MigrationFailed(migration.state, "the control-plane worker driving it stopped answering")
    if committed_by_source(agents, ProgressRecord(migration, lease), failure):
        logger.warning("Recovering migration %s: its source committed it; rolling forward", migration.pk)
        roll_forward(agents, lease)
        return True
    if not abort(agents, lease, failure):
        logger.info("Migration %s was decided by another decider first; recovery skips it", migration.pk)
        return False
    return True


def retry_pending_undos() -> list[int]:
    """Undo again, once each, on the agents of ended migrations whose undo was not answered.

    A target paused or restarting while its migration was aborted keeps its prepared copy ("ready" waits
    for the control plane's decision for ever); this drops it once the agent answers again, for up to
    ``UNDO_RETRY_WINDOW_S`` after the migration ended (from ``UNDO_RETRY_AFTER_S`` on: the decider's own
    undo goes first), backed off per migration (``claim_undo_try``). Returns the ids whose undo is now done.
    """
    now = timezone.now()
    pending = Migration.objects.filter(
        undo_pending=True,
        state__in=(State.ABORTED, State.CANCELLED),
        state_changed_at__gte=now - timedelta(seconds=UNDO_RETRY_WINDOW_S),
        state_changed_at__lt=now - timedelta(seconds=UNDO_RETRY_AFTER_S),
    ).select_related("source", "target")
    done = []
    for migration in pending:
        if not claim_undo_try(migration):
            continue
        with MigrationAgents(migration, timeout_s=UNDO_RETRY_TIMEOUT_S) as agents:
            if undo_and_mark(agents, attempts=1, cancel=False):
                logger.warning("Migration %s: the undo on its agents finished on a later try", migration.pk)
                done.append(migration.pk)
    return done


def retry_pending_releases() -> list[int]:
    """Ask again, once each, the sources of completed migrations whose release was not answered (their
    host died or hung after the commit: ``Migration.release_pending``), backed off per migration as the
    undos are (``claim_undo_try``: 5 s, doubling up to 60 s), with no end: the target runs the guest and
    the source's copy stays paused and Not Runnable until its host answers or an administrator forgets it
    (docs/migrations.md). Returns the ids whose release is now done."""
    done = []
    pending = Migration.objects.filter(release_pending=True, state=State.COMPLETED)
    for migration in pending.select_related("vm", "source", "target"):
        if not claim_undo_try(migration):
            continue
        try:
            with MigrationAgents(migration, timeout_s=UNDO_RETRY_TIMEOUT_S) as agents:
                if finish_release(agents):
                    done.append(migration.pk)
        except Exception:  # one migration's trouble must not keep recovery from the rest of its pass
            logger.exception("Pending release of migration %s: the next pass tries again", migration.pk)
    return done
