"""The ``/metrics`` counts of ended migrations, kept by following migration outcome events.

A migration's end is an event (``migrations_app.outcomes``: an outbox row written in the transaction that
records the terminal state). ``follow_outcome``, registered by ``ApiConfig.ready()`` as a follower, adds
each ended migration to the tallies (``OutcomeTally`` rows); ``/metrics`` (``api.metrics``) reads those few
rows (``totals``), never the migration history, so these counts cost a scrape the same after a million
migrations as after one. The migration core imports none of this (import-linter contract
``migrations-know-no-evacuations``).

Counted exactly once per outcome:
- delivery is at least once (the on-commit delivery, the decider's, recovery's periodic pass; a follower
  that failed gets the outcome again): the additions and a ``TalliedOutcome`` row for the migration are
  written in one transaction, and a second delivery finds that row and adds nothing;
- an outcome whose transaction rolls back leaves no event: nothing is delivered, nothing counted;
- a migration finished by recovery has its outcome delivered by recovery (or its pass): counted then.
A count moves once its outcome is delivered: at once on commit, after the undo was tried for an abort
whose undo is under way, or by recovery's periodic pass for one whose worker died after its commit
(``matrixoe_migration_outcomes_undelivered`` counts those waiting).

What one outcome adds (``observations``):
- ``migrations{outcome, failed_phase}``: 1 (every terminal state, REFUSED included);
- ``refusals{kind}``: 1 for a REFUSED one (``migrations_app.refusals.KINDS``; no kind: a refusal kept
  before kinds were, counted as a pre-check);
- ``phase_seconds{phase}``: each phase it finished (started and ended), its duration in seconds;
- ``downtime_seconds``: the measured downtime (Frozen) of a COMPLETED one, in seconds.
A histogram's observations are kept per bucket (``PHASE_BUCKETS_S``, ``DOWNTIME_BUCKETS_S``), not one by
one: new bounds need the tallies rebuilt from the history (both tables emptied, then ``tally_history``,
as the migration that created them did).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import F

from migrations_app import refusals
from migrations_app.models import PHASE_FIELD_PREFIX, Migration
from migrations_app.outcomes import Outcome

from .models import OutcomeTally, TalliedOutcome

logger = logging.getLogger(__name__)

MIGRATIONS = "migrations"  # label: the outcome (a terminal state); detail: the failed phase ("" none)
REFUSALS = "refusals"  # label: the refusal's kind
PHASE_SECONDS = "phase_seconds"  # label: the phase; detail: a bucket's bound, "+Inf" or SUM
DOWNTIME_SECONDS = "downtime_seconds"  # detail: a bucket's bound, "+Inf" or SUM
SUM = "sum"
INF = "+Inf"
PHASE_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
DOWNTIME_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# What of a migration row the tallies read, besides the outcome itself (``Migration.values(*...)``).
MIGRATION_FIELDS = (
    "failed_phase",
    "failure_kind",
    "downtime_ms",
    *(f"{prefix}_{edge}" for prefix in PHASE_FIELD_PREFIX.values() for edge in ("started_at", "ended_at")),
)

Key = tuple[str, str, str]  # (family, label, detail): one OutcomeTally row


def bucket_of(value: float, bounds: Iterable[float]) -> str:
    """The detail of the (non-cumulative) bucket ``value`` falls in: the first bound it does not exceed
    (as ``str(bound)``, the ``le`` label /metrics shows), or "+Inf"."""
    return next((str(bound) for bound in bounds if value <= bound), INF)


def observations(state: str, row: Mapping[str, Any]) -> dict[Key, float]:
    """What the outcome ``state`` of the migration ``row`` (a mapping with ``MIGRATION_FIELDS``: dates,
    downtime in ms) adds to each tally: counts, and seconds for the histograms' sums. Pure."""
    added: dict[Key, float] = defaultdict(float)
    added[(MIGRATIONS, str(state), row["failed_phase"] or "")] += 1
    if state == Migration.State.REFUSED:
        added[(REFUSALS, row["failure_kind"] or refusals.PRECHECK, "")] += 1
    for phase, prefix in PHASE_FIELD_PREFIX.items():
        started: datetime | None = row[f"{prefix}_started_at"]
        ended: datetime | None = row[f"{prefix}_ended_at"]
        if started and ended:
            seconds = max((ended - started).total_seconds(), 0.0)
            added[(PHASE_SECONDS, str(phase), bucket_of(seconds, PHASE_BUCKETS_S))] += 1
            added[(PHASE_SECONDS, str(phase), SUM)] += seconds
    if state == Migration.State.COMPLETED and row["downtime_ms"] is not None:
        seconds = row["downtime_ms"] / 1000
        added[(DOWNTIME_SECONDS, "", bucket_of(seconds, DOWNTIME_BUCKETS_S))] += 1
        added[(DOWNTIME_SECONDS, "", SUM)] += seconds
    return dict(added)


def add(additions: Mapping[Key, float], model: Any = OutcomeTally) -> None:
    """Add ``additions`` to the tallies (``model``: ``OutcomeTally``, or its historical model in a data
    migration). Inside the caller's transaction; rows are created and updated in one order (sorted
    keys), so two outcomes counted at once wait for each other rather than deadlock."""
    keys = sorted(additions)
    model.objects.bulk_create(
        [model(family=family, label=label, detail=detail) for family, label, detail in keys],
        ignore_conflicts=True,
    )
    for family, label, detail in keys:
        model.objects.filter(family=family, label=label, detail=detail).update(
            value=F("value") + additions[(family, label, detail)]
        )


def follow_outcome(outcome: Outcome) -> None:
    """The outcome follower (``migrations_app.outcomes.register_follower``): the migration's outcome
    added to the tallies once, however many times it is delivered (see the module's docstring)."""
    row = Migration.objects.filter(pk=outcome.migration_id).values(*MIGRATION_FIELDS).first()
    if row is None:
        return  # deleted since it ended (its outcome row went with it): nothing to count
    additions = observations(outcome.state, row)
    with transaction.atomic():
        _, first = TalliedOutcome.objects.get_or_create(migration_id=outcome.migration_id)
        if first:
            add(additions)
    if not first:
        logger.debug("Outcome of migration %s was tallied before; not counted again", outcome.migration_id)


def totals() -> dict[Key, float]:
    """Every tally by (family, label, detail): one query, a few dozen rows whatever the history."""
    return {
        (family, label, detail): value
        for family, label, detail, value in OutcomeTally.objects.values_list(
            "family", "label", "detail", "value"
        )
    }


def tally_history(migration_outcome: Any, tally: Any, tallied: Any, chunk: int = 2000) -> int:
    """Tally every outcome event already recorded (``migration_outcome``, ``tally``, ``tallied``: the
    models ``MigrationOutcome``, ``OutcomeTally``, ``TalliedOutcome``, historical ones in a data
    migration) that is not tallied yet; returns how many were. For a database made before the tallies
    (its counts go on from its history, not from zero), or to rebuild them (new histogram bounds) once
    both tables were emptied."""
    done = set(tallied.objects.values_list("migration_id", flat=True))
    fields = [f"migration__{name}" for name in MIGRATION_FIELDS]
    additions: dict[Key, float] = defaultdict(float)
    batch: list[Any] = []
    count = 0
    rows = migration_outcome.objects.order_by("pk").values("migration_id", "outcome", *fields)
    for row in rows.iterator(chunk_size=chunk):
        if row["migration_id"] in done:
            continue
        facts = {name: row[f"migration__{name}"] for name in MIGRATION_FIELDS}
        for key, value in observations(row["outcome"], facts).items():
            additions[key] += value
        batch.append(tallied(migration_id=row["migration_id"]))
        count += 1
        if len(batch) >= chunk:
            tallied.objects.bulk_create(batch)
            batch = []
    tallied.objects.bulk_create(batch)
    add(additions, tally)
    return count
