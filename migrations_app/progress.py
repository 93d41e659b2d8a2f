"""Live migration progress: the facts the worker publishes, and how each web process renders them.

The worker publishes FACTS, never HTML: after each change it bumps the migration's ``progress_version``
and sends a ``ProgressMessage`` (ids, state, numbers, that version) with one ``group_send`` per group.
Each web process receives it once (``fanout.py``) and renders it once per (migration, version,
``controls.ViewClass``) for its sockets (``render_message``, cached per process), so every watcher gets
only what his user may see and use, without a render or a string cut per socket.

One renderer for all: the General tab and Refresh Data (``general_tab_context``, by the request's user),
the websocket's first message (``consumers``) and every push render the same partials
(``migrations_app/progress.html``) from the same display (``MigrationDisplay.for_view`` hides a
migration a watcher may not see and never names a VSP he may not see).

Groups: ``vm-<vm_id>`` (the VM's General tab) and ``vsp-<vsp_id>`` (a VSP's Virtual Machines tab).
Every frame with a migration starts with ``<!--push:<migration id>:<version>-->``: the page
(``static/js/console.js``) notices a jump in versions (a dropped message) and re-fetches its state.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from typing import Literal, NotRequired, TypedDict

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db.models import F, Q
from django.http import HttpRequest
from django.template.loader import render_to_string

from vms.models import VSP, Registration, VirtualMachine

from .access import hide_unseen
from .controls import EVERYTHING, ControlVSPs, ViewClass, watcher_rights
from .history import last_completed_seconds
from .models import Migration

logger = logging.getLogger(__name__)

PROGRESS_TEMPLATE = "migrations_app/progress.html"
MESSAGE_TYPE: Literal["migration.progress"] = "migration.progress"

MessageKind = Literal["vm", "row", "arrival", "overview", "link"]


@dataclass(frozen=True)
class ProgressFacts:
    """One migration's state as pushed: ids, state, numbers (bytes, %), and its ``version``.

    ``version``: ``Migration.progress_version`` after this push's bump (1 for its first push), one more
    than the previous push of the same migration. ``current_vsp_id``: where the guest runs (Migrate…).
    """

    migration_id: int
    vm_id: int
    version: int
    state: str
    source_id: int | None
    target_id: int | None
    current_vsp_id: int | None
    phase_percents: tuple[int, int, int, int]  # Init, Copy, I/O Quiesce, Frozen (0-100)
    bytes_sent: int
    bytes_remaining: int
    rounds: int
    cancel_requested: bool

    @classmethod
    def of(cls, migration: Migration, current_vsp_id: int | None) -> ProgressFacts:
        """The facts of ``migration`` (its VM not None) as read now."""
        assert migration.vm_id is not None
        return cls(
            migration_id=migration.pk,
            vm_id=migration.vm_id,
            version=migration.progress_version,
            state=migration.state,
            source_id=migration.source_id,
            target_id=migration.target_id,
            current_vsp_id=current_vsp_id,
            phase_percents=(
                migration.init_percent,
                migration.copy_percent,
                migration.quiesce_percent,
                migration.frozen_percent,
            ),
            bytes_sent=migration.bytes_sent,
            bytes_remaining=migration.bytes_remaining,
            rounds=migration.rounds,
            cancel_requested=migration.cancel_requested,
        )

    def as_message(self) -> dict[str, object]:
        """Plain types for the channel layer (msgpack): the tuple becomes a list."""
        fields = asdict(self)
        fields["phase_percents"] = list(self.phase_percents)
        return fields

    @classmethod
    def from_message(cls, fields: dict) -> ProgressFacts:
        """Raises ``TypeError``/``ValueError`` for a message that is not one of ours."""
        percents = tuple(int(value) for value in fields["phase_percents"])
        if len(percents) != 4:
            raise ValueError("phase_percents needs four values")
        return cls(**{**fields, "phase_percents": percents})

    @property
    def vsps(self) -> ControlVSPs:
        """The VSPs deciding what a watcher sees and uses of this message (``controls.ViewClass``)."""
        return {"source_id": self.source_id, "target_id": self.target_id, "current_id": self.current_vsp_id}


class ProgressMessage(TypedDict):
    """A channel-layer message to a group (read by each server process's ``fanout``); no HTML."""

    type: Literal["migration.progress"]
    group: str  # the group it was sent to: the server process hands it to that group's sockets
    # vm: a VM's General tab; row: a VSP tab's row; arrival; overview: re-fetch it; link: a link probe of
    # the VM's host ended (an open migrate dialog asks for its forecasts again)
    kind: MessageKind
    facts: NotRequired[dict]  # ProgressFacts.as_message() (not for "overview")
    vm_id: NotRequired[int]  # a VSP tab's row update: only sockets of pages showing this VM's row take it


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

    def for_view(self, view: ViewClass) -> MigrationDisplay:
        """This display as watchers of class ``view`` may see it (``hide_unseen`` on each migration; a
        hidden latest attempt leaves nothing of it, "last time this took" included)."""
        if view.seen_vsp_ids is None:
            return self
        latest = hide_unseen(self.latest, view.seen_vsp_ids)
        return replace(
            self,
            migration=hide_unseen(self.migration, view.seen_vsp_ids),
            failed=hide_unseen(self.failed, view.seen_vsp_ids),
            latest=latest,
            last_took_s=self.last_took_s if latest is not None or self.latest is None else None,
        )

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

    @property
    def version_mark(self) -> str:
        """``<!--push:<id>:<version>-->`` for the latest attempt (empty without one): the page's baseline."""
        return push_mark(self.latest) if self.latest is not None else ""


def push_mark(migration: Migration) -> str:
    """The comment a frame about ``migration`` starts with: the page checks versions follow each other."""
    return f"<!--push:{migration.pk}:{migration.progress_version}-->"


def control_vsps(display: MigrationDisplay) -> ControlVSPs:
    """The VSPs deciding what ``display``'s watchers see and use (``controls.WatcherRights.view_class``)."""
    migration = display.latest or display.migration
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
    if latest is not None:
        latest.vm = vm  # the template's tags read it: no second query for the VM at hand
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


def user_view(user: object, display: MigrationDisplay) -> ViewClass:
    """What ``user`` may see and use of ``display`` (for an htmx answer: as a socket of his would get)."""
    return watcher_rights(user).view_class(control_vsps(display))


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
    view: ViewClass | None = None,
) -> str:
    """Phases, alerts, the OS-status icon and the Migrate… control of one VM, as one HTML string.

    ``refetch_tab`` (pushed copies): once the latest attempt has ended, however it ended, the copy
    also makes the browser re-fetch the whole General tab, whose history row, VSP and statuses changed.
    ``request``: draw only what its user may see and use; else ``view`` (a push's watchers' class),
    else everything (``controls.EVERYTHING``: tests, a superuser).
    ``keep_migrate_control``: leave the page's Migrate… control out (a socket's first message to a page
    that shows it as it is): replacing it would drop a click made just before the message came.
    """
    if view is None and request is None:
        view = EVERYTHING
    if view is not None:
        display = display.for_view(view)
    context = display.context(oob=oob, refetch_tab=refetch_tab)
    context["keep_migrate_control"] = keep_migrate_control
    if view is not None:
        context["view_controls"] = view.controls
    html = render_to_string(f"{PROGRESS_TEMPLATE}#vm_fragments", context, request=request)
    return display.version_mark + html if oob else html


def render_row_fragments(
    vsp: VSP,
    row_migrations: dict[int, Migration],
    *,
    oob: bool,
    refetch_tab: bool = True,
    view_of: dict[int, ViewClass] | None = None,
) -> str:
    """The migration cell of each given VM's row on ``vsp``'s Virtual Machines tab.

    ``refetch_tab``: a row whose migration ended makes the browser re-fetch the tab (hardware status).
    ``view_of``: per VM, what the watchers may see of its migration (absent: everything).
    """
    rows: list[tuple[int, Migration | None]] = []
    marks: list[str] = []
    for vm_id, migration in row_migrations.items():
        view = (view_of or {}).get(vm_id, EVERYTHING)
        shown = hide_unseen(migration, view.seen_vsp_ids)
        rows.append((vm_id, shown))
        marks.append(push_mark(migration))
    context = {"vsp": vsp, "rows": rows, "oob": oob, "refetch_tab": refetch_tab}
    html = render_to_string(f"{PROGRESS_TEMPLATE}#row_fragments", context)
    return "".join(marks) + html if oob else html


def build_progress_messages(migration_id: int) -> dict[str, ProgressMessage]:
    """The facts for each group interested in this migration, read fresh from the database, after
    bumping its ``progress_version`` (so each call is one new version). No HTML: web processes render."""
    Migration.objects.filter(pk=migration_id).update(progress_version=F("progress_version") + 1)
    migration = Migration.objects.select_related("vm").get(pk=migration_id)
    vm = migration.vm
    if vm is None:  # the VM was deleted: no page shows it any more
        return {}
    facts = ProgressFacts.of(migration, vm.current_vsp_id).as_message()
    group = vm_group(vm.pk)
    messages: dict[str, ProgressMessage] = {group: _message(group, "vm", facts)}
    for vsp_id in (migration.source_id, migration.target_id):
        if vsp_id is None:
            continue
        group = vsp_group(vsp_id)
        messages[group] = {**_message(group, "row", facts), "vm_id": vm.pk}
    if migration.state == Migration.State.COMPLETED:
        # The VM arrived: the target's open pages lack its row, so every one of them re-fetches its tab.
        # (Without vm_id, so sockets of pages lacking the row take it; the re-fetch brings the row too.)
        group = vsp_group(migration.target_id)
        messages[group] = _message(group, "arrival", facts)
    return messages


def render_message(message: dict, view: ViewClass) -> str:
    """What watchers of class ``view`` are sent of a ``ProgressMessage`` (runs in a web process's
    thread: it reads the database; the caller caches it per (migration, version, view)).

    Read fresh, so a render never shows older than its version. Empty when there is nothing to show
    (the VM or VSP is gone). Raises ``KeyError``/``ValueError`` for a message that is not ours.
    """
    kind = message["kind"]
    if kind == "overview":
        return render_to_string(f"{PROGRESS_TEMPLATE}#vsp_overview_refetch", {})
    if kind == "link":
        return render_to_string(f"{PROGRESS_TEMPLATE}#link_probed", {})
    facts = ProgressFacts.from_message(message["facts"])
    if kind == "arrival":
        return render_to_string(f"{PROGRESS_TEMPLATE}#vsp_arrival", {"vm_id": facts.vm_id})
    if kind == "vm":
        vm = VirtualMachine.objects.filter(pk=facts.vm_id).first()
        if vm is None:
            return ""
        return render_vm_fragments(get_migration_display(vm), oob=True, view=view)
    if kind == "row":
        vsp_id = int(message["group"].removeprefix("vsp-"))
        vsp = VSP.objects.filter(pk=vsp_id).first()
        if vsp is None:
            return ""
        migration = Migration.objects.select_related("source", "target").filter(pk=facts.migration_id).first()
        if migration is None:
            return ""
        return render_row_fragments(vsp, {facts.vm_id: migration}, oob=True, view_of={facts.vm_id: view})
    raise ValueError(f"unknown progress message kind {kind!r}")


def message_vsps(message: dict) -> ControlVSPs | None:
    """The VSPs deciding what a watcher sees of ``message`` (``None``: an overview, the same for all)."""
    facts = message.get("facts")
    if facts is None:
        return None
    return {
        "source_id": facts.get("source_id"),
        "target_id": facts.get("target_id"),
        "current_id": facts.get("current_vsp_id"),
    }


def message_version(message: dict) -> tuple[int, int] | None:
    """(migration id, version) of ``message`` (``None``: an overview), part of its render-cache key."""
    facts = message.get("facts")
    if facts is None:
        return None
    return (int(facts["migration_id"]), int(facts["version"]))


def publish_progress(migration: Migration | int) -> None:
    """Publish this migration's facts to every watching web process (one message per group).

    Best effort: the database is the truth and a browser that reconnects (or notices a version gap)
    re-fetches the current state, so a channel-layer failure is logged and never breaks the migration.
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
    message: ProgressMessage = {"type": MESSAGE_TYPE, "group": group, "kind": "overview"}
    try:
        async_to_sync(send_messages)({group: message})
    except Exception:
        logger.exception("Could not push the overview of VSP %s", vsp_id)


def publish_link_probed(source_id: int) -> None:
    """Tell the open General tabs of the guests runnable on VSP ``source_id`` that a link probe from it
    ended (measured or failed): an open migrate dialog there asks for its forecasts at once instead of
    at its next poll (``static/js/console.js``). A signal without facts: each browser fetches the
    forecast with its own session and rights. Best effort, as ``publish_progress``: the dialog's poll
    (``views.LINK_POLL_S``) stays the fallback."""
    vm_ids = (
        Registration.objects.filter(vsp_id=source_id)
        .exclude(hardware_status=Registration.HardwareStatus.NOT_RUNNABLE)
        .values_list("vm_id", flat=True)
    )
    messages: dict[str, ProgressMessage] = {
        vm_group(vm_id): {"type": MESSAGE_TYPE, "group": vm_group(vm_id), "kind": "link"} for vm_id in vm_ids
    }
    if not messages:
        return
    try:
        async_to_sync(send_messages)(messages)
    except Exception:
        logger.exception("Could not push the end of a link probe from VSP %s", source_id)


async def send_messages(messages: dict[str, ProgressMessage]) -> None:
    # One coroutine for all groups, so the layer reuses one Redis connection.
    layer = get_channel_layer()
    for group, message in messages.items():
        await layer.group_send(group, message)


def _message(group: str, kind: MessageKind, facts: dict) -> ProgressMessage:
    return {"type": MESSAGE_TYPE, "group": group, "kind": kind, "facts": facts}


def general_tab_context(
    vm: VirtualMachine, visible_vsp_ids: Collection[int] | None = None
) -> dict[str, object]:
    """Context provider for ``vms.general_tab``: the page and Refresh Data render what pushes render.

    ``visible_vsp_ids``: the VSPs the viewer sees (``None``: all); a migration he may not see is left out.
    """
    seen = None if visible_vsp_ids is None else frozenset(visible_vsp_ids)
    display = get_migration_display(vm).for_view(ViewClass(seen_vsp_ids=seen, controls=frozenset()))
    return {
        "migration": display.migration,
        "failed_migration": display.failed,
        "alerts": [display.failed] if display.failed else [],
        "migration_seen": display.seen_key,
        "last_took_s": display.last_took_s,
    }
