"""Websockets that push migration progress: one per watched VM, one per watched VSP tab.

On connect a socket joins its group FIRST (see ``fanout.py``) and then sends the current state,
so an update published meanwhile is not lost: it follows the snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from vms.models import VSP, VirtualMachine

from .fanout import get_fanout
from .progress import (
    get_migration_display,
    get_row_migrations,
    render_row_fragments,
    render_vm_fragments,
    vm_group,
    vsp_group,
)

logger = logging.getLogger(__name__)

VIEW_PERMISSION = "vms.view_virtualmachine"


def user_may_watch(user: Any) -> bool:
    return bool(user is not None and user.is_authenticated and user.has_perm(VIEW_PERMISSION))


def render_vm_state(vm_id: int, seen: str = "") -> str | None:
    """The VM's state; the tab is re-fetched only if the page was rendered before its migration ended."""
    vm = VirtualMachine.objects.filter(pk=vm_id).first()
    if vm is None:
        return None
    display = get_migration_display(vm)
    return render_vm_fragments(display, oob=True, refetch_tab=display.seen_key != seen)


def render_vsp_state(vsp_id: int, vm_ids: frozenset[int] | None = None) -> str | None:
    vsp = VSP.objects.filter(pk=vsp_id).first()
    if vsp is None:
        return None
    return render_row_fragments(vsp, get_row_migrations(vsp, vm_ids), oob=True, refetch_tab=False)


def parse_vm_ids(query_string: bytes) -> frozenset[int] | None:
    """``?vms=3,5,8``: the VMs whose rows the page shows; None (every VM) when not given."""
    values = parse_qs(query_string.decode("latin-1")).get("vms")
    if values is None:
        return None
    return frozenset(int(part) for part in values[0].split(",") if part.strip().isdigit())


class ProgressConsumer(AsyncWebsocketConsumer):
    """Refuses anonymous users and users who may not view VMs; then pushes the group's HTML."""

    subject_kwarg = ""
    group = ""
    snapshot_sent = False
    pending_html: str | None = None

    def group_name(self, subject_id: int) -> str:
        raise NotImplementedError

    def render_state(self, subject_id: int) -> str | None:
        raise NotImplementedError

    async def connect(self) -> None:
        subject_id = self.scope["url_route"]["kwargs"][self.subject_kwarg]
        if not await database_sync_to_async(user_may_watch)(self.scope.get("user")):
            await self.close()  # before accept: the handshake is refused (HTTP 403)
            return
        self.group = self.group_name(subject_id)
        await get_fanout().join(self.group, self)
        html = await database_sync_to_async(self.render_state)(subject_id)
        if html is None:
            await self.close()
            return
        await self.accept()
        await self.send(text_data=html)
        self.snapshot_sent = True
        if self.pending_html is not None:
            html, self.pending_html = self.pending_html, None
            await self.send(text_data=html)

    def deliver(self, html: str) -> None:
        """Called by the process fan-out for each update of this socket's group."""
        if self.snapshot_sent:
            asyncio.get_running_loop().create_task(self._send_quietly(html))
        else:
            self.pending_html = html  # newer than anything held before; sent after the snapshot

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
    subject_kwarg = "vm_id"

    def group_name(self, subject_id: int) -> str:
        return vm_group(subject_id)

    def render_state(self, subject_id: int) -> str | None:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        return render_vm_state(subject_id, seen=query.get("seen", [""])[0])


class VSPProgressConsumer(ProgressConsumer):
    """A VSP's Virtual Machines tab shows one page of rows: it gets updates for those rows only
    (an out-of-band swap for a row the page lacks is an ``htmx:oobErrorNoTarget`` in the browser)."""

    subject_kwarg = "vsp_id"

    @property
    def vm_ids(self) -> frozenset[int] | None:
        return parse_vm_ids(self.scope.get("query_string", b""))

    def group_name(self, subject_id: int) -> str:
        return vsp_group(subject_id)

    def render_state(self, subject_id: int) -> str | None:
        return render_vsp_state(subject_id, self.vm_ids)

    def wants(self, message: dict[str, Any]) -> bool:
        vm_ids = self.vm_ids
        return vm_ids is None or message.get("vm_id") is None or message["vm_id"] in vm_ids
