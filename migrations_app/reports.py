"""One migration's report: its timeline, each phase against its time limit, downtime against the
allowed downtime, and the convergence samples for the chart.

Reading a report is three queries whatever the size of the history: the migration (with VM, VSPs and
users joined), its events (with their actors), and nothing per row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.utils import timezone

from . import migration_policy
from .access import hide_unseen, hide_unseen_events
from .downtime import allowed_for, downtime_excess
from .history import HistoryRow, total_seconds
from .limits import phase_limits_of
from .models import PHASE_FIELD_PREFIX, Migration, MigrationEvent
from .samples import samples_as_series

State = Migration.State


RUNNING_IN_FROZEN_NOTE_S = 1.0


def running_in_frozen_s(migration: Migration, timings: list[PhaseTiming]) -> float | None:
    """Seconds of the Frozen phase the guest still ran, when that is over ``RUNNING_IN_FROZEN_NOTE_S``.

    The Frozen phase lasts from the freeze request to the target's READY; the source first finishes the
    round under way (the simulated driver; on a forced switch-over that can be a whole stalled round)
    and pauses the guest only then. ``downtime_ms`` is the pause itself, so the phase is longer; the
    report says by how much instead of showing two "frozen" times that disagree.
    """
    frozen = next((timing for timing in timings if timing.label == str(State.FROZEN.label)), None)
    if frozen is None or frozen.seconds is None or migration.downtime_ms is None:
        return None
    running = frozen.seconds - migration.downtime_ms / 1000
    return running if running > RUNNING_IN_FROZEN_NOTE_S else None


def disk_copy_s(migration: Migration) -> float | None:
    """Seconds of Copy the local disks' mirror took until it was in step (the memory's rounds came after);
    None without a mirror or before it was."""
    if migration.disk_ready_at is None or migration.copy_started_at is None:
        return None
    return max(0.0, (migration.disk_ready_at - migration.copy_started_at).total_seconds())


@dataclass(frozen=True)
class PhaseTiming:
    """A phase's time (s) against the limit it ran under (s; None = unlimited, or not known).

    ``limit_recorded``: False for a migration recorded before its limits were kept: ``limit_s`` is then
    the VM's limit of today (None once the VM is gone), which the page marks as such.
    """

    label: str
    started_at: datetime | None
    ended_at: datetime | None
    seconds: float | None
    limit_s: int | None
    running: bool
    limit_recorded: bool = True

    @property
    def over_limit(self) -> bool:
        return self.seconds is not None and self.limit_s is not None and self.seconds > self.limit_s

    @property
    def percent_of_limit(self) -> int | None:
        if self.seconds is None or not self.limit_s:
            return None
        return min(round(100 * self.seconds / self.limit_s), 999)


def phase_timings(migration: Migration, now: datetime | None = None) -> list[PhaseTiming]:
    now = now or timezone.now()
    limits = phase_limits_of(migration)
    timings = []
    for phase, prefix in PHASE_FIELD_PREFIX.items():
        started = getattr(migration, f"{prefix}_started_at")
        ended = getattr(migration, f"{prefix}_ended_at")
        running = migration.state == phase and started is not None and ended is None
        end = ended or (now if running else None)
        seconds = (end - started).total_seconds() if started and end else None
        label = str(State(phase).label)
        timing = PhaseTiming(label, started, ended, seconds, limits.of(phase), running, limits.recorded)
        timings.append(timing)
    return timings


@dataclass(frozen=True)
class TimelineEntry:
    at: datetime
    text: str
    actor: str
    kind: str  # "request", "phase", "cancel", "abort", "commit", "complete", "refused", "other"


def timeline(events: list[MigrationEvent]) -> list[TimelineEntry]:
    """The events in order, each with who did it and a kind for the page's marker."""
    entries = []
    for event in events:
        text = event.message or _state_words(event)
        entries.append(TimelineEntry(event.at, text, _actor(event, text), _kind(event)))
    return entries


def _actor(event: MigrationEvent, text: str) -> str:
    """Who did it, for the page's "by ..."; "" when nobody did or the text already names them
    ("admin asked to switch over now", "Cancel requested by admin"): once is enough."""
    name = event.actor.get_username() if event.actor_id and event.actor else ""
    if name and re.search(rf"(?<![\w.@+-]){re.escape(name)}(?![\w.@+-])", text):
        return ""
    return name


def _state_words(event: MigrationEvent) -> str:
    return f"{State(event.to_state).label}" if event.to_state in State.values else event.to_state


def _kind(event: MigrationEvent) -> str:
    if not event.from_state:
        return "refused" if event.to_state == State.REFUSED else "request"
    if event.from_state == event.to_state:
        return "cancel" if "cancel" in event.message.lower() else "other"
    return {
        State.ABORTED: "abort",
        State.CANCELLED: "cancel",
        State.COMMITTING: "commit",
        State.COMPLETED: "complete",
    }.get(State(event.to_state), "phase")


def chart_data(migration: Migration) -> dict[str, Any]:
    """What the report's script draws and polls: JSON-ready, columns of equal length (see samples.py)."""
    return {
        "id": migration.pk,
        "state": migration.state,
        "active": migration.is_active,
        "series": samples_as_series(migration.round_samples or []),
        "stats": {
            "bytes_sent": migration.bytes_sent,
            "bytes_remaining": migration.bytes_remaining,
            "rounds": migration.rounds,
            "dirty_rate_bytes_s": migration.dirty_rate_bytes_s,
            "throughput_bytes_s": migration.throughput_bytes_s,
            "disk_bytes_sent": migration.disk_bytes_sent,
            "disk_bytes_remaining": migration.disk_bytes_remaining,
            "downtime_ms": migration.downtime_ms,
            "state_label": str(migration.get_state_display()),
        },
    }


def get_report_migration(migration_id: int) -> Migration | None:
    return (
        Migration.objects.select_related("vm", "source", "target", "requested_by", "cancel_requested_by")
        .filter(pk=migration_id)
        .first()
    )


def report_context(migration: Migration, seen_vsp_ids: frozenset[int] | None = None) -> dict[str, Any]:
    """Everything the report page shows (one more query: the events with their actors), as a user who
    sees the VSPs ``seen_vsp_ids`` (``None``: all) may see it: where he sees one end only, the other end's
    VSP and who acted are not named, in the summary or the timeline (``access.hide_unseen``,
    ``hide_unseen_events``)."""
    events = hide_unseen_events(
        migration,
        MigrationEvent.objects.filter(migration=migration).select_related("actor").order_by("at", "pk"),
        seen_vsp_ids,
    )
    migration = hide_unseen(migration, seen_vsp_ids) or migration
    now = timezone.now()
    allowed = allowed_for(migration)
    phases = phase_timings(migration, now)
    return {
        "migration": migration,
        "row": HistoryRow.of(migration, now),
        "timeline": timeline(events),
        "phases": phases,
        "frozen_running_s": running_in_frozen_s(migration, phases),
        "disk_copy_s": disk_copy_s(migration),
        "total_s": total_seconds(migration, now),
        "allowed_downtime_ms": allowed,
        "policy_words": migration_policy.describe(migration.policy) if migration.policy else "",
        "downtime_over": migration.downtime_ms is not None and migration.downtime_ms > allowed,
        "downtime_excess": downtime_excess(migration),
        "chart": chart_data(migration),
        "no_progress_s": migration_policy.no_progress_limit_s(migration.policy),
    }
