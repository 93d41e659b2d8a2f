"""Migration outcomes as events: an outbox written with the outcome, read by followers.

A migration ends (COMPLETED, ABORTED, CANCELLED, or created REFUSED) in one transaction that also writes
its ``MigrationOutcome`` row (``record_outcome``, called by ``transitions.transition`` and
``history.record_refusal``). Whoever cares about ends (an evacuation that ends after its last step,
...) registers a *follower* (``register_follower``) from its own app's ``ready()``; the migration core
imports none of them.

Delivery (``deliver``) claims the row by compare-and-set, calls every follower with an ``Outcome``
(plain facts: ids and the state), and marks the row delivered once all of them returned. Three paths
deliver, so a process dying between the commit and its follow-up loses nothing:

1. on commit, in the process that recorded the outcome (``transaction.on_commit``), unless the migration
   still has an undo on its agents under way (``Migration.undo_pending``): its guest is not back on its
   source yet, so the decider delivers once it has tried the undo (2);
2. the decider (the worker's driving loop, recovery) at the end of its run: ``deliver_outcome_of``;
3. a periodic pass (``deliver_pending``, with recovery's beat task) for any row still undelivered
   ``PENDING_AFTER_S`` after the outcome whose decider's lease has expired (it died), and for any row
   whose delivery failed or whose deliverer died mid-way, once its ``retry_at`` has come.

So a follower may be called more than once for one outcome (at least once, never never): followers
must be idempotent, e.g. a compare-and-set (``evacuations.actions.settle``). A follower that raises is
logged; the row stays undelivered and is offered again (to every follower) after a back-off.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from .models import Migration, MigrationOutcome

logger = logging.getLogger(__name__)

PENDING_AFTER_S = 5  # the periodic pass leaves a fresh outcome to the process that recorded it
RETRY_AFTER_S = 10  # a claimed delivery not finished by then may be claimed again (doubling, up to ...)
RETRY_MAX_S = 300
PASS_LIMIT = 200  # rows a periodic pass delivers at most (the next pass takes the rest)


@dataclass(frozen=True)
class Outcome:
    """What a follower is told: the migration ``migration_id`` ended in ``state`` (a terminal
    ``Migration.State`` value) at ``at``; its VM (None once deleted), source (None for a refusal of a VM
    runnable nowhere) and target VSP ids."""

    migration_id: int
    state: str
    at: datetime
    vm_id: int | None
    source_id: int | None
    target_id: int


Follower = Callable[[Outcome], None]
_followers: dict[str, Follower] = {}


def register_follower(name: str, follower: Follower) -> None:
    """Call ``follower(outcome)`` for every migration outcome from now on; ``name`` identifies it in
    logs (registering a name again replaces its follower, so ``ready()`` may run twice)."""
    _followers[name] = follower


def record_outcome(migration_id: int, state: str, at: datetime) -> MigrationOutcome:
    """Write the outcome event of migration ``migration_id``; call it inside the transaction that
    records ``state``. Delivered once that transaction commits (unless an undo is under way: see the
    module's docstring)."""
    row = MigrationOutcome.objects.create(migration_id=migration_id, outcome=state, at=at)
    transaction.on_commit(functools.partial(deliver, row.pk, unless_undo_pending=True), robust=True)
    return row


def deliver_outcome_of(migration_id: int) -> bool:
    """The decider's delivery at the end of its run (path 2): the migration's outcome, if it ended and
    was not delivered yet; whether this call delivered it."""
    row_id = (
        MigrationOutcome.objects.filter(migration_id=migration_id, delivered_at=None)
        .values_list("pk", flat=True)
        .first()
    )
    return row_id is not None and deliver(row_id)


def deliver(outcome_id: int, *, unless_undo_pending: bool = False, now: datetime | None = None) -> bool:
    """Claim the outcome row ``outcome_id`` and call every follower; True once it is delivered by this
    call. False: delivered already, claimed by another deliverer, left to the decider
    (``unless_undo_pending`` and its undo is under way), or a follower failed (retried later)."""
    undelivered = MigrationOutcome.objects.select_related("migration").filter(delivered_at=None)
    row = undelivered.filter(pk=outcome_id).first()
    if row is None:
        return False
    if unless_undo_pending and row.migration.undo_pending:
        return False
    if not _claim(row, now or timezone.now()):
        return False
    failed = _call_followers(_facts(row))
    if failed:
        logger.warning("Outcome of migration %s: %s failed; offered again later", row.migration_id, failed)
        return False
    MigrationOutcome.objects.filter(pk=row.pk).update(delivered_at=timezone.now())
    return True


def deliver_pending(now: datetime | None = None) -> list[int]:
    """The periodic pass (path 3): deliver what the recording process and the decider did not. Returns
    the migration ids delivered. ``now``: the time the pass acts at (default: now)."""
    now = now or timezone.now()
    lease_expired = now - timedelta(seconds=settings.MIGRATION_HEARTBEAT_STALE_S)
    # Never claimed: its decider is dead (lease expired) or there was none. Claimed: its claim ran out.
    no_decider = Q(migration__heartbeat_at__isnull=True) | Q(migration__heartbeat_at__lte=lease_expired)
    left_over = Q(attempts__gt=0) | no_decider
    due = (
        MigrationOutcome.objects.filter(delivered_at=None, at__lte=now - timedelta(seconds=PENDING_AFTER_S))
        .filter(Q(retry_at__isnull=True) | Q(retry_at__lte=now))
        .filter(left_over)
        .order_by("at", "pk")
        .values_list("pk", "migration_id")[:PASS_LIMIT]
    )
    return [migration_id for outcome_id, migration_id in list(due) if deliver(outcome_id, now=now)]


def undelivered_count() -> tuple[int, datetime | None]:
    """How many outcomes no follower has taken yet, and when the oldest of them happened (None: none)."""
    pending = MigrationOutcome.objects.filter(delivered_at=None)
    oldest = pending.order_by("at").values_list("at", flat=True).first()
    return pending.count(), oldest


def _claim(row: MigrationOutcome, now: datetime) -> bool:
    """Compare-and-set on ``attempts``: of two deliverers at once, one delivers; the claim holds until
    ``retry_at`` (a deliverer that died mid-way is replaced then)."""
    wait_s = min(RETRY_AFTER_S * 2 ** min(row.attempts, 16), RETRY_MAX_S)
    claimed = (
        MigrationOutcome.objects.filter(pk=row.pk, delivered_at=None, attempts=row.attempts)
        .filter(Q(retry_at__isnull=True) | Q(retry_at__lte=now))
        .update(attempts=F("attempts") + 1, retry_at=now + timedelta(seconds=wait_s))
    )
    return claimed == 1


def _facts(row: MigrationOutcome) -> Outcome:
    migration: Migration = row.migration
    return Outcome(
        migration_id=migration.pk,
        state=row.outcome,
        at=row.at,
        vm_id=migration.vm_id,
        source_id=migration.source_id,
        target_id=migration.target_id,
    )


def _call_followers(outcome: Outcome) -> list[str]:
    """Every follower, each on its own (one's failure does not keep the others from the outcome); the
    names of those that raised."""
    failed = []
    for name, follower in list(_followers.items()):
        try:
            follower(outcome)
        except Exception:
            logger.exception("Follower %s failed on the outcome of migration %s", name, outcome.migration_id)
            failed.append(name)
    return failed
