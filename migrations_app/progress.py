"""Live migration progress for browsers: what the page shows, and pushing it to websocket groups.

The General tab, Refresh Data, the websocket's first message and every pushed update all render the
same partials (``migrations_app/progress.html``) from the same display functions, so what is pushed
and what is refreshed never disagree.

Groups: ``vm-<vm_id>`` (the VM's General tab) and ``vsp-<vsp_id>`` (a VSP's Virtual Machines tab).
Each update is rendered once per group (not per watcher) and sent with one ``group_send`` per group;
each server process receives it once and hands it to its own sockets (``fanout.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal, NotRequired, TypedDict

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db.models import Q
from django.http import HttpRequest
from django.template.loader import render_to_string

from vms.models import VSP, VirtualMachine

from .controls import ControlVSPs
from .history import last_completed_seconds
from .models import Migration

logger = logging.getLogger(__name__)

PROGRESS_TEMPLATE = "migrations_app/progress.html"
MESSAGE_TYPE: Literal["migration.progress"] = "migration.progress"


class ProgressMessage(TypedDict):
    """A channel-layer message to a group (read by each server process's ``fanout``)."""

    type: Literal["migration.progress"]
    group: str  # the group it was sent to: the server process hands it to that group's sockets
    html: str  # top-level elements with ids, swapped out of band by the htmx ws extension
    vm_id: NotRequired[int]  # a VSP tab's row update: only sockets of pages showing this VM's row take it
    # A VM's fragments: the VSPs deciding its marked controls; each socket strips what its user may not use
    controls: NotRequired[ControlVSPs]


def vm_group(vm_id: int) -> str:
    return f"vm-{vm_id}"


def vsp_group(vsp_id: int) -> str:
    return f"vsp-{vsp_id}"


@dataclass(frozen=True)
class MigrationDisplay:
    """What a VM's General tab shows about migrations."""

    vm: VirtualMachine
    migration: Migration | None  # Online Migration Phases: the active attempt, else the last if completed
    failed: Migration | None  # Alerts: the last attempt, if it was aborted or cancelled
    last_took_s: float | None = None  # beside Migrate…: how long the last completed migration took (s)
    latest: Migration | None = None  # the latest attempt that started, whatever its state (history's top row)

    def context(self, *, oob: bool = False, refetch_tab: bool = False) -> dict[str, object]:
        """``refetch_tab``: when the shown migration has ended, make the browser re-fetch the whole tab."""
        return {
            "vm": self.vm,
            "migration": self.migration,
            "failed_migration": self.failed,
            "last_took_s": self.last_took_s,
            "oob": oob,
            "refetch_tab": refetch_tab,
            "latest_ended": self.latest_ended,
        }

    @property
    def latest_ended(self) -> bool:
        """Whether the latest attempt is over (completed, aborted or cancelled)."""
        return self.latest is not None and self.latest.is_terminal

    @property
    def seen_key(self) -> str:
        """What a page rendered from this display has seen, so a reconnect re-fetches only if it changed.

        The latest attempt and its state (``"<id>-<state>"``, empty if none): the history table shows
        every attempt, so any end (a cancel too, which the phases panel does not show) changes it.
        """
        return f"{self.latest.pk}-{self.latest.state}" if self.latest else ""


def control_vsps(display: MigrationDisplay) -> ControlVSPs:
    """The VSPs deciding the controls of ``display``'s fragments (``controls.WatcherRights.allowed``)."""
    migration = display.migration
    current = display.vm.current_vsp
    return {
        "source_id": migration.source_id if migration is not None else None,
        "target_id": migration.target_id if migration is not None else None,
        "current_id": current.pk if current is not None else None,
    }


def get_migration_display(vm: VirtualMachine) -> MigrationDisplay:
    """The latest attempt that started (refusals are history, not state); when none runs, a second query:
    how long the last completed one took (shown beside Migrate…, which a running migration replaces)."""
    attempts = Migration.objects.filter(vm=vm).exclude(state=Migration.State.REFUSED)
    latest = (
        attempts.select_related("source", "target", "requested_by").order_by("-requested_at", "-pk").first()
    )
    if latest is not None and latest.is_active:
        return MigrationDisplay(vm=vm, migration=latest, failed=None, latest=latest)
    last_took_s = last_completed_seconds(vm)
    if latest is None:
        return MigrationDisplay(vm=vm, migration=None, failed=None, last_took_s=last_took_s)
    shown = latest if latest.is_active or latest.state == Migration.State.COMPLETED else None
    # Alerts: an attempt that failed, or one that completed with an alert (the target lost the guest).
    ended_badly = latest.state in (Migration.State.ABORTED, Migration.State.CANCELLED) or bool(latest.alert)
    failed = latest if ended_badly else None
    return MigrationDisplay(vm=vm, migration=shown, failed=failed, last_took_s=last_took_s, latest=latest)


def get_row_migrations(vsp: VSP, vm_ids: Collection[int] | None = None) -> dict[int, Migration]:
    """For a VSP's Virtual Machines tab: each VM's latest migration from or to this VSP, in one query.

    ``vm_ids``: only these VMs (the rows the page shows), so nothing is pushed for a missing row.
    """
    rows: dict[int, Migration] = {}
    migrations = Migration.objects.filter(Q(source=vsp) | Q(target=vsp)).exclude(
        state=Migration.State.REFUSED
    )
    if vm_ids is not None:
        migrations = migrations.filter(vm_id__in=vm_ids)
    migrations = migrations.select_related("source", "target").order_by("requested_at", "pk")
    for migration in migrations:
        if migration.vm_id is not None:  # a deleted VM has no row
            rows[migration.vm_id] = migration  # later ones overwrite earlier ones
    return rows


def render_vm_fragments(
    display: MigrationDisplay,
    *,
    oob: bool,
    refetch_tab: bool = True,
    request: HttpRequest | None = None,
    keep_migrate_control: bool = False,
) -> str:
    """Phases, alerts, the OS-status icon and the Migrate… control of one VM, as one HTML string.

    ``refetch_tab`` (pushed copies): once the latest attempt has ended, however it ended, the copy
    also makes the browser re-fetch the whole General tab, whose history row, VSP and statuses changed.
    ``request``: draw only the controls its user may use; without one (a push), every control is drawn
    between markers that each socket strips for its user (``controls.py``).
    ``keep_migrate_control``: leave the page's Migrate… control out (a socket's first message to a page
    that shows it as it is): replacing it would drop a click made just before the message came.
    """
    context = display.context(oob=oob, refetch_tab=refetch_tab)
    context["keep_migrate_control"] = keep_migrate_control
    return render_to_string(f"{PROGRESS_TEMPLATE}#vm_fragments", context, request=request)


def render_row_fragments(
    vsp: VSP, row_migrations: dict[int, Migration], *, oob: bool, refetch_tab: bool = True
) -> str:
    """The migration cell of each given VM's row on ``vsp``'s Virtual Machines tab.

    ``refetch_tab``: a row whose migration ended makes the browser re-fetch the tab (hardware status).
    """
    context = {"vsp": vsp, "rows": list(row_migrations.items()), "oob": oob, "refetch_tab": refetch_tab}
    return render_to_string(f"{PROGRESS_TEMPLATE}#row_fragments", context)


def build_progress_messages(migration_id: int) -> dict[str, ProgressMessage]:
    """The message for each group interested in this migration, read fresh from the database."""
    migration = Migration.objects.select_related("vm", "source", "target").get(pk=migration_id)
    vm = migration.vm
    if vm is None:  # the VM was deleted: no page shows it any more
        return {}
    display = get_migration_display(vm)
    group = vm_group(vm.pk)
    vm_message = _message(group, render_vm_fragments(display, oob=True))
    vm_message["controls"] = control_vsps(display)
    messages: dict[str, ProgressMessage] = {group: vm_message}
    for vsp in (migration.source, migration.target):
        if vsp is None:
            continue
        group = vsp_group(vsp.pk)
        html = render_row_fragments(vsp, {vm.pk: migration}, oob=True)
        messages[group] = {**_message(group, html), "vm_id": vm.pk}
    if migration.state == Migration.State.COMPLETED:
        # The VM arrived: the target's open pages lack its row, so every one of them re-fetches its tab.
        group = vsp_group(migration.target_id)
        arrival = render_to_string(f"{PROGRESS_TEMPLATE}#vsp_arrival", {"migration": migration})
        # (Without vm_id, so sockets of pages lacking the row take it; the re-fetch brings the row too.)
        messages[group] = _message(group, arrival)
    return messages


def publish_progress(migration: Migration | int) -> None:
    """Render this migration's state once and push it to every watching browser.

    Best effort: the database is the truth and a browser that reconnects gets the current state,
    so a channel-layer failure is logged and never breaks the migration that called this.
    """
    migration_id = migration if isinstance(migration, int) else migration.pk
    try:
        messages = build_progress_messages(migration_id)
        async_to_sync(send_messages)(messages)
    except Exception:
        logger.exception("Could not publish progress of migration %s", migration_id)


def publish_vsp_overview(vsp_id: int) -> None:
    """Make every open page of VSP ``vsp_id`` re-fetch its overview (the evacuation panel, the
    maintenance flag, Evacuate… / Leave maintenance): pushed when an evacuation starts, is cancelled or
    ends, and when the VSP leaves maintenance, so a page opened before sees it live. Each browser
    re-fetches with its own session, so the buttons it gets are its user's. Best effort, as
    ``publish_progress``: a page reloaded shows the same from the database.
    """
    group = vsp_group(vsp_id)
    html = render_to_string(f"{PROGRESS_TEMPLATE}#vsp_overview_refetch", {})
    try:
        async_to_sync(send_messages)({group: _message(group, html)})
    except Exception:
        logger.exception("Could not push the overview of VSP %s", vsp_id)


async def send_messages(messages: dict[str, ProgressMessage]) -> None:
    # One coroutine for all groups, so the layer reuses one Redis connection.
    layer = get_channel_layer()
    for group, message in messages.items():
        await layer.group_send(group, message)


def _message(group: str, html: str) -> ProgressMessage:
    return {"type": MESSAGE_TYPE, "group": group, "html": html}


def general_tab_context(vm: VirtualMachine) -> dict[str, object]:
    """Context provider for ``vms.general_tab``: the page and Refresh Data render what pushes render."""
    display = get_migration_display(vm)
    return {
        "migration": display.migration,
        "failed_migration": display.failed,
        "alerts": [display.failed] if display.failed else [],
        "migration_seen": display.seen_key,
        "last_took_s": display.last_took_s,
    }
