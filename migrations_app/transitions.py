"""Changing a migration's state: compare-and-set plus an event row, in one transaction."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from .models import PHASE_FIELD_PREFIX, TRANSITIONS, Migration, MigrationEvent
from .outcomes import record_outcome


class IllegalTransition(ValueError):
    """The transition table does not allow this change (a programming error, not a race)."""


def transition(
    migration_id: int,
    expected: Migration.State | str,
    new: Migration.State | str,
    *,
    message: str,
    actor: Any = None,
    where: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Move the migration from ``expected`` to ``new`` if it is still in ``expected``.

    Returns False when 0 rows matched: another worker (or a cancel, or recovery) changed it first.
    ``where`` adds conditions to the compare (e.g. ``{"cancel_requested": False}`` for the commit).
    Leaving a phase stamps its ``*_ended_at``; entering one stamps ``*_started_at`` (unless given).
    Entering a terminal state also writes the outcome event (``outcomes.record_outcome``), in the same
    transaction: whoever follows migration ends learns of this one.
    """
    expected, new = Migration.State(expected), Migration.State(new)
    if new not in TRANSITIONS[expected]:
        raise IllegalTransition(f"{expected} -> {new} is not an allowed migration transition")
    now = timezone.now()
    updates = {**_phase_stamps(expected, new, now), **fields, "state": new, "state_changed_at": now}
    with transaction.atomic():
        changed = Migration.objects.filter(pk=migration_id, state=expected, **(where or {})).update(**updates)
        if not changed:
            return False
        MigrationEvent.objects.create(
            migration_id=migration_id, at=now, from_state=expected, to_state=new, message=message, actor=actor
        )
        if new in Migration.TERMINAL_STATES:
            record_outcome(migration_id, new, now)
    return True


def _phase_stamps(expected: Migration.State, new: Migration.State, now: Any) -> dict[str, Any]:
    stamps: dict[str, Any] = {}
    if expected in PHASE_FIELD_PREFIX:
        stamps[f"{PHASE_FIELD_PREFIX[expected]}_ended_at"] = now
    if new in PHASE_FIELD_PREFIX:
        stamps[f"{PHASE_FIELD_PREFIX[new]}_started_at"] = now
    return stamps


def record_created(migration: Migration, *, actor: Any = None, message: str = "Migration requested") -> None:
    """The first event of a migration (it is created QUEUED, not transitioned into it)."""
    MigrationEvent.objects.create(
        migration=migration,
        at=migration.requested_at,
        from_state="",
        to_state=migration.state,
        message=message,
        actor=actor,
    )
