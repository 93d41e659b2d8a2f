"""Migration history: refusals recorded, the filtered history list, its CSV, and a VM's own history.

Every query here is a fixed number of statements whatever the number of migrations: rows are read
with their VSPs and requester joined (``select_related``), never per row.
"""

from __future__ import annotations

import csv
import functools
import io
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any

from django import forms
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Q, QuerySet
from django.urls import reverse
from django.utils import timezone

from vms.models import VSP, VirtualMachine

from .access import hide_unseen
from .downtime import downtime_excess
from .forecast import duration_words
from .models import Migration, MigrationEvent
from .outcomes import record_outcome

State = Migration.State
VIEW_MIGRATION_PERMISSION = "migrations_app.view_migration"
VM_HISTORY_LENGTH = 5  # migrations shown on a VM's General tab

RUNNING = "running"
OUTCOME_CHOICES = [
    ("", "Any outcome"),
    (State.COMPLETED.value, "Completed"),
    (State.ABORTED.value, "Aborted"),
    (State.CANCELLED.value, "Cancelled"),
    (State.REFUSED.value, "Refused"),
    (RUNNING, "Running or queued"),
]


def record_refusal(vm: VirtualMachine, target: VSP, user: Any, reason: str, kind: str = "") -> Migration:
    """Keep a refused attempt (who, what, why) as a Migration in the terminal state REFUSED.

    Created directly in REFUSED (never transitioned), so the transition table and the
    ``one_active_migration_per_vm`` constraint (active states only) are untouched. ``reason`` is the
    sentence the user was shown; ``kind`` (``refusals.KINDS``) is kept as the row's ``failure_kind``.
    Call it outside the refused transaction (that one rolled back): ``refusals.note_refusal`` does.
    """
    actor = user if getattr(user, "is_authenticated", False) else None
    now = timezone.now()
    with transaction.atomic():
        migration = Migration.objects.create(
            vm=vm,
            vm_name=vm.name,
            source=vm.current_vsp,
            target=target,
            requested_by=actor,
            requested_at=now,
            state=State.REFUSED,
            state_changed_at=now,
            alert=reason,
            failure_kind=kind,
        )
        MigrationEvent.objects.create(
            migration=migration, at=now, from_state="", to_state=State.REFUSED, message=reason, actor=actor
        )
        record_outcome(migration.pk, State.REFUSED, now)
    return migration


# --- figures of one migration ------------------------------------------------------------------------


def started_at(migration: Migration) -> datetime | None:
    """When it left the queue (Init began); None if it never did."""
    return migration.init_started_at


def total_seconds(migration: Migration, now: datetime | None = None) -> float | None:
    """Seconds from Init to the end (or to ``now`` while it runs); None if it never started."""
    start = started_at(migration)
    if start is None:
        return None
    end = migration.state_changed_at if migration.is_terminal else (now or timezone.now())
    return max((end - start).total_seconds(), 0.0)


def total_words(migration: Migration, total_s: float | None) -> str:
    """The Total time column: "12.3 s" once over; "running, 3 min 5 s so far" while it runs (the list
    redraws itself then, so it moves on); "—" for one that never started."""
    if total_s is None:
        return "—"
    if not migration.is_terminal:
        return f"running, {duration_words(total_s)} so far"
    return f"{total_s:.1f} s"


def outcome(migration: Migration) -> str:
    """The history's Outcome column: the terminal state's label, or "Running (Copy)" / "Queued"."""
    if migration.is_terminal:
        return str(migration.get_state_display())
    if migration.state == State.QUEUED:
        return "Queued"
    return f"Running ({migration.get_state_display()})"


def failed_phase_label(migration: Migration) -> str:
    return str(State(migration.failed_phase).label) if migration.failed_phase in State.values else ""


@dataclass(frozen=True)
class HistoryRow:
    """One line of the history (and of its CSV), computed from the row alone."""

    migration: Migration
    vm_name: str
    source: str
    target: str
    requested_by: str
    outcome: str
    failed_phase: str
    total_s: float | None
    downtime_ms: int | None
    # Prepared once here: a page of 50 rows otherwise spends most of its time in template lookups.
    requested_at_text: str = ""  # "2026-11-29 17:03" (UTC)
    total_text: str = "—"  # "12.3 s"
    downtime_text: str = "—"  # "85 ms"
    report_url: str = ""
    vm_url: str = ""  # "" when the VM was deleted
    # A downtime over the allowed one (``downtime.downtime_excess``): "3.7 s over the allowed 300 ms",
    # and the whole sentence with why; "" when it was within it.
    downtime_over_text: str = ""
    downtime_why: str = ""

    @classmethod
    def of(cls, migration: Migration, now: datetime | None = None) -> HistoryRow:
        user = migration.requested_by
        total_s = total_seconds(migration, now)
        excess = downtime_excess(migration) if migration.state == State.COMPLETED else None
        return cls(
            migration=migration,
            vm_name=migration.vm_name or (migration.vm.name if migration.vm else ""),
            source=migration.source.name if migration.source else "",
            target=migration.target.name,
            requested_by=user.get_username() if user else "",
            outcome=outcome(migration),
            failed_phase=failed_phase_label(migration),
            total_s=total_s,
            downtime_ms=migration.downtime_ms,
            requested_at_text=f"{timezone.localtime(migration.requested_at):%Y-%m-%d %H:%M}",
            total_text=total_words(migration, total_s),
            downtime_text="—" if migration.downtime_ms is None else f"{migration.downtime_ms} ms",
            report_url=_url_with_id("migration_history:report", migration.pk),
            vm_url=_url_with_id("vms:vm_general", migration.vm_id) if migration.vm_id else "",
            downtime_over_text=excess.short if excess else "",
            downtime_why=excess.sentence if excess else "",
        )


@functools.cache
def _url_prefix_suffix(name: str) -> tuple[str, str]:
    prefix, _, suffix = reverse(name, args=[987654321]).partition("987654321")
    return prefix, suffix


def _url_with_id(name: str, pk: int) -> str:
    """``reverse(name, args=[pk])`` without resolving the pattern once per row."""
    prefix, suffix = _url_prefix_suffix(name)
    return f"{prefix}{pk}{suffix}"


# --- the history list and its filters ------------------------------------------------------------------


class HistoryFilterForm(forms.Form):
    """The history's filters (GET). Every field optional; an invalid one is an error, nothing filtered."""

    vm = forms.CharField(required=False, max_length=255, label="VM", help_text="Exact VM name")
    vsp = forms.ModelChoiceField(
        queryset=VSP.objects.only("id", "name").order_by("name"),
        required=False,
        label="VSP",
        empty_label="Any VSP",
    )
    outcome = forms.ChoiceField(choices=OUTCOME_CHOICES, required=False)
    user = forms.ModelChoiceField(
        queryset=get_user_model().objects.order_by("username"),
        required=False,
        label="Requested by",
        empty_label="Anyone",
        to_field_name="username",
    )
    since = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))
    page = forms.IntegerField(min_value=1, required=False, widget=forms.HiddenInput)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        if since and until and since > until:
            raise forms.ValidationError("The From date must not be after the To date.")
        return data


def filter_migrations(data: dict[str, Any]) -> QuerySet[Migration]:
    """Newest first, filtered by a valid ``HistoryFilterForm``'s ``cleaned_data`` (UTC dates, inclusive)."""
    migrations = Migration.objects.select_related(
        "source", "target", "requested_by", "cancel_requested_by"
    ).order_by("-requested_at", "-id")
    if data.get("vm"):
        migrations = migrations.filter(vm_name=data["vm"].strip())
    if data.get("vsp"):
        migrations = migrations.filter(Q(source=data["vsp"]) | Q(target=data["vsp"]))
    if data.get("outcome") == RUNNING:
        migrations = migrations.filter(state__in=Migration.ACTIVE_STATES)
    elif data.get("outcome"):
        migrations = migrations.filter(state=data["outcome"])
    if data.get("user"):
        migrations = migrations.filter(requested_by=data["user"])
    if data.get("since"):
        migrations = migrations.filter(requested_at__gte=_day_start(data["since"]))
    if data.get("until"):
        migrations = migrations.filter(requested_at__lt=_day_start(data["until"]) + timedelta(days=1))
    return migrations


def _day_start(day: Any) -> datetime:
    return datetime.combine(day, time.min, tzinfo=timezone.get_current_timezone())


# --- CSV export ----------------------------------------------------------------------------------------

CSV_HEADER = (
    "id",
    "vm",
    "source",
    "target",
    "requested_by",
    "requested_at_utc",
    "outcome",
    "failed_phase",
    "total_s",
    "downtime_ms",
    "reason",
)
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: object) -> str:
    """A cell a spreadsheet will not run: text starting like a formula gets a leading apostrophe.

    Source: OWASP "CSV Injection" (prefix cells beginning with = + - @ tab or carriage return).
    """
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def csv_lines(migrations: Iterable[Migration], seen_vsp_ids: frozenset[int] | None = None) -> Iterator[str]:
    """The header then one CSV line per migration (for a streaming response), each as a user who sees
    the VSPs ``seen_vsp_ids`` (``None``: all) may see it (``access.hide_unseen``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def line(cells: Iterable[object]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow([csv_safe(cell) for cell in cells])
        return buffer.getvalue()

    yield line(CSV_HEADER)
    now = timezone.now()
    for found in migrations:
        migration = hide_unseen(found, seen_vsp_ids) or found
        row = HistoryRow.of(migration, now)
        yield line(
            (
                migration.pk,
                row.vm_name,
                row.source,
                row.target,
                row.requested_by,
                migration.requested_at.strftime("%Y-%m-%d %H:%M:%S"),
                row.outcome,
                row.failed_phase,
                "" if row.total_s is None else f"{row.total_s:.1f}",
                "" if row.downtime_ms is None else row.downtime_ms,
                migration.alert,
            )
        )


# --- a VM's own history (General tab) --------------------------------------------------------------------


def vm_history(vm: VirtualMachine, visible_vsp_ids: Collection[int] | None = None) -> list[HistoryRow]:
    """The VM's last ``VM_HISTORY_LENGTH`` migrations, refusals included, newest first (one query).

    ``visible_vsp_ids`` (``None``: all): only migrations from or to these VSPs, others' VSPs unnamed.
    """
    migrations = Migration.objects.filter(vm=vm)
    if visible_vsp_ids is not None:
        seen = frozenset(visible_vsp_ids)
        migrations = migrations.filter(Q(source_id__in=seen) | Q(target_id__in=seen))
    latest = migrations.select_related("source", "target", "requested_by", "cancel_requested_by").order_by(
        "-requested_at", "-id"
    )
    now = timezone.now()
    hidden = None if visible_vsp_ids is None else frozenset(visible_vsp_ids)
    rows = (hide_unseen(migration, hidden) for migration in latest[:VM_HISTORY_LENGTH])
    return [HistoryRow.of(row, now) for row in rows if row is not None]


def last_completed_seconds(vm: VirtualMachine) -> float | None:
    """How long the VM's last completed migration took (Init to the end, s), or None (one query)."""
    last = (
        Migration.objects.filter(vm=vm, state=State.COMPLETED)
        .order_by("-requested_at", "-id")
        .only("init_started_at", "state_changed_at", "state")
        .first()
    )
    return total_seconds(last) if last else None


def general_tab_context(
    vm: VirtualMachine, visible_vsp_ids: Collection[int] | None = None
) -> dict[str, object]:
    """Context provider for ``vms.general_tab``: the VM's recent migrations (one query).

    ``visible_vsp_ids``: the VSPs the viewer sees (``None``: all): a migration touching none of them is
    left out; in the others a VSP he does not see is not named (``access.hide_unseen``).
    """
    return {"vm_history": vm_history(vm, visible_vsp_ids)}
