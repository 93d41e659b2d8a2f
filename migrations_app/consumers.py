"""Websockets that push migration progress: one per watched VM, one per watched VSP tab.

On connect a socket joins its group FIRST (see ``fanout.py``) and then sends the current state,
so an update published meanwhile is not lost: it follows the snapshot. The snapshot and every push are
rendered by ``progress`` for the socket's class of view (``controls.WatcherRights.view_class``: what its
user may see of that migration and which controls he may use), once per class in this process
(``fanout.RenderCache``): no per-socket render, no string cut out of shared HTML.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any
from urllib.parse import parse_qsl

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from vms.access import can_view_vm, can_view_vsp
from vms.models import VSP, VirtualMachine

from .controls import NO_RIGHTS, WatcherRights, watcher_rights
from .fanout import get_fanout
from .progress import (
    control_vsps,
    get_migration_display,
    get_row_migrations,
    message_version,
    message_vsps,
    render_message,
    render_row_fragments,
    render_vm_fragments,
    vm_group,
    vsp_group,
)

logger = logging.getLogger(__name__)

BAD_REQUEST = 4400
MAX_PAGE_VMS = 1000  # a VSP tab shows one page of rows; more ids than this is not a page
_SEEN_RE = re.compile(r"[0-9]{1,18}-[a-z_]{1,32}")
_ID_RE = re.compile(r"[0-9]{1,18}")


class BadQuery(ValueError):
    """A websocket's query string is malformed; the socket is closed with ``BAD_REQUEST``."""


def vm_state_key(vm_id: int, seen: str = "", rights: WatcherRights | None = None) -> tuple | None:
    """The render-cache key of VM ``vm_id``'s first message to a socket (``None``: no such VM), and
    what rendering it needs: (key, display, view, refetch_tab, keep_migrate_control)."""
    vm = VirtualMachine.objects.filter(pk=vm_id).first()
    if vm is None:
        return None
    display = get_migration_display(vm)
    view = (rights or NO_RIGHTS).view_class(control_vsps(display))
    shown = display.for_view(view)
    unchanged = shown.seen_key == seen
    idle = shown.latest is None or shown.latest.is_terminal
    latest = display.latest
    version = (latest.pk, latest.progress_version, latest.state) if latest is not None else None
    vsps = control_vsps(display)  # where it runs too: Migrate… may change without a new version
    key = ("vm-state", vm_id, version, vsps["current_id"], view, not unchanged, unchanged and idle)
    return key, display, view, not unchanged, unchanged and idle


def render_vm_state(vm_id: int, seen: str = "", rights: WatcherRights | None = None) -> str | None:
    """The VM's state; the tab is re-fetched only if the page was rendered before its migration ended.

    ``rights``: the watcher's, so only what its user may see and use is drawn (``None``: no control).
    A page that shows the latest attempt as it is now, with none running (``seen``), keeps its Migrate…
    control: it depends on nothing else, and replacing it would drop a click made a moment before.
    """
    state = vm_state_key(vm_id, seen, rights)
    if state is None:
        return None
    _, display, view, refetch_tab, keep = state
    return render_vm_fragments(
        display, oob=True, refetch_tab=refetch_tab, keep_migrate_control=keep, view=view
    )


def render_vsp_state(
    vsp_id: int, vm_ids: frozenset[int] | None = None, rights: WatcherRights | None = None
) -> str | None:
    """A VSP tab's rows as ``rights``' user may see them (``None``: everything, for tests)."""
    vsp = VSP.objects.filter(pk=vsp_id).first()
    if vsp is None:
        return None
    rows = get_row_migrations(vsp, vm_ids)
    view_of = None
    if rights is not None:
        view_of = {
            vm_id: rights.view_class(
                {"source_id": row.source_id, "target_id": row.target_id, "current_id": None}
            )
            for vm_id, row in rows.items()
        }
    return render_row_fragments(vsp, rows, oob=True, refetch_tab=False, view_of=view_of)


def query_params(query_string: bytes, allowed: frozenset[str]) -> dict[str, str]:
    """The socket's query parameters, each at most once; raises BadQuery for anything else.

    Strict on purpose: a string that is not ASCII, an unknown or repeated name, or a blank pair is
    refused rather than guessed at (``?vms=%C2%B2`` once crashed the process's progress reader).
    """
    try:
        text = query_string.decode("ascii")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=10)
    except (UnicodeDecodeError, ValueError) as error:
        raise BadQuery(f"malformed query string: {error}") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed or name in params:
            raise BadQuery(f"unexpected or repeated parameter {name!r}")
        params[name] = value
    return params


def parse_vm_ids(query_string: bytes) -> frozenset[int] | None:
    """``?vms=3,5,8``: the VMs whose rows the page shows; None (every VM) when not given.

    Raises BadQuery unless every item is an ASCII decimal id (at most ``MAX_PAGE_VMS``); an empty
    value is an empty page.
    """
    value = query_params(query_string, frozenset({"vms"})).get("vms")
    if value is None:
        return None
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if len(parts) > MAX_PAGE_VMS or not all(_ID_RE.fullmatch(part) for part in parts):
        raise BadQuery("vms must be a comma-separated list of VM ids")
    return frozenset(int(part) for part in parts)


def parse_seen(query_string: bytes) -> str:
    """``?seen=<migration id>-<state>`` (or empty): what the page already showed. Raises BadQuery."""
    seen = query_params(query_string, frozenset({"seen"})).get("seen", "")
    if seen and not _SEEN_RE.fullmatch(seen):
        raise BadQuery("seen must look like '<migration id>-<state>'")
    return seen


class ProgressConsumer(AsyncWebsocketConsumer):
    """Refuses anonymous users and users who may not see the subject (``may_watch``, from ``vms.access``:
    the same 'not found' for another host group's VM or VSP as for a missing one); closes with 4400 on
    a malformed query; then pushes the group's progress, rendered for its class of view. Parameters are
    parsed once, before the socket joins anything."""

    subject_kwarg = ""
    group = ""
    snapshot_sent = False
    pending_html: str | None = None
    rights = NO_RIGHTS  # read at connect (``may_watch``)

    def group_name(self, subject_id: int) -> str:
        raise NotImplementedError

    def may_watch(self, user: Any, subject_id: int) -> bool:
        """Whether ``user`` may see the subject (runs in a thread: it queries the database)."""
        raise NotImplementedError

    def parse_query(self, query_string: bytes) -> None:
        """Read this socket's query parameters into attributes; raises BadQuery."""
        query_params(query_string, frozenset())

    async def first_message(self, subject_id: int) -> str | None:
        """The current state, rendered for this socket's user (``None``: the subject is gone)."""
        raise NotImplementedError

    async def connect(self) -> None:
        subject_id = int(self.scope["url_route"]["kwargs"][self.subject_kwarg])
        if not await database_sync_to_async(self.may_watch)(self.scope.get("user"), subject_id):
            await self.close()  # before accept: the handshake is refused (HTTP 403)
            return
        try:
            self.parse_query(self.scope.get("query_string", b""))
        except BadQuery as error:
            logger.info("Websocket %s refused with %s: %s", self.scope.get("path"), BAD_REQUEST, error)
            await self.accept()  # accepted first so the browser sees the close code
            await self.close(code=BAD_REQUEST)
            return
        self.group = self.group_name(subject_id)
        await get_fanout().join(self.group, self)
        html = await self.first_message(subject_id)
        if html is None:
            await self.close()
            return
        await self.accept()
        await self.send(text_data=html)
        self.snapshot_sent = True
        if self.pending_html is not None:
            html, self.pending_html = self.pending_html, None
            await self.send(text_data=html)

    @property
    def view_token(self) -> tuple:
        """Sockets with equal tokens have the same ``view_key`` of every message (``fanout``): the
        consumer's class and its user's rights, read at connect."""
        return (type(self), self.rights)

    def view_key(self, message: dict[str, Any]) -> tuple:
        """This socket's class of view of ``message``: (kind, group, migration/version, ``ViewClass``)."""
        view = self.rights.view_class(message_vsps(message))
        return (message["kind"], message["group"], message_version(message), view)

    def render_view(self, message: dict[str, Any], key: tuple) -> str:
        """Render ``message`` for this socket's class (``key[3]``); the fan-out caches it for the class."""
        return render_message(message, key[3])

    def deliver(self, html: str) -> None:
        """Called by the process fan-out for each update of this socket's group."""
        if self.snapshot_sent:
            asyncio.get_running_loop().create_task(self._send_quietly(html))
        else:
            self.pending_html = html  # newer than anything held before; sent after the snapshot

    def drop(self) -> None:
        """Called by the fan-out when delivering to this socket failed: close it (the page reconnects)."""
        self.group = ""
        asyncio.get_running_loop().create_task(self._close_quietly())

    async def _close_quietly(self) -> None:
        try:
            await self.close(code=1011)
        except Exception:
            logger.debug("Could not close a failed progress socket", exc_info=True)

    async def _send_quietly(self, html: str) -> None:
        try:
            await self.send(text_data=html)
        except Exception:  # the browser went away meanwhile; its disconnect cleans up
            logger.debug("Dropped a progress frame for a closed socket", exc_info=True)

    async def disconnect(self, code: int) -> None:
        if self.group:
            get_fanout().leave(self.group, self)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Browsers only listen; anything they send is ignored."""


class UnknownRouteConsumer(AsyncWebsocketConsumer):
    """A websocket path that names nothing (``/ws/vms/abc/``, ``/ws/nonsense/``): close with 4404.

    Accepted first so the browser gets the close code (a refused handshake only says "failed").
    """

    NOT_FOUND = 4404

    async def connect(self) -> None:
        logger.info("Websocket to unknown path %s closed with %s", self.scope.get("path"), self.NOT_FOUND)
        await self.accept()
        await self.close(code=self.NOT_FOUND)


class VMProgressConsumer(ProgressConsumer):
    """A VM's General tab: ``?seen=<migration id>-<state>`` says what the page already showed."""

    subject_kwarg = "vm_id"
    seen = ""

    def group_name(self, subject_id: int) -> str:
        return vm_group(subject_id)

    def may_watch(self, user: Any, subject_id: int) -> bool:
        if not can_view_vm(user, subject_id):
            return False
        self.rights = watcher_rights(user)  # what this user is shown of each migration (controls.py)
        return True

    def parse_query(self, query_string: bytes) -> None:
        self.seen = parse_seen(query_string)

    async def first_message(self, subject_id: int) -> str | None:
        state = await database_sync_to_async(vm_state_key)(subject_id, self.seen, self.rights)
        if state is None:
            return None
        key, display, view, refetch_tab, keep = state
        return await get_fanout().render(
            key,
            lambda: render_vm_fragments(
                display, oob=True, refetch_tab=refetch_tab, keep_migrate_control=keep, view=view
            ),
        )


class VSPProgressConsumer(ProgressConsumer):
    """A VSP's Virtual Machines tab shows one page of rows: it gets updates for those rows only
    (an out-of-band swap for a row the page lacks is an ``htmx:oobErrorNoTarget`` in the browser).
    It shows the VSP, so it needs the right to see that VSP."""

    subject_kwarg = "vsp_id"
    vm_ids: frozenset[int] | None = None

    def group_name(self, subject_id: int) -> str:
        return vsp_group(subject_id)

    def may_watch(self, user: Any, subject_id: int) -> bool:
        if not can_view_vsp(user, subject_id):
            return False
        self.rights = watcher_rights(user)
        return True

    def parse_query(self, query_string: bytes) -> None:
        self.vm_ids = parse_vm_ids(query_string)

    async def first_message(self, subject_id: int) -> str | None:
        return await database_sync_to_async(render_vsp_state)(subject_id, self.vm_ids, self.rights)

    def wants(self, message: dict[str, Any]) -> bool:
        vm_ids = self.vm_ids
        return vm_ids is None or message.get("vm_id") is None or message["vm_id"] in vm_ids
