"""Live migration progress for programs: server-sent events of JSON (``GET /api/v1/migrations/{id}/events``).

Same source as the page: the worker's ``publish_progress`` pushes to the VM's channel group; this stream
joins that group through the process fan-out (``migrations_app.fanout``), and on each push re-reads the
migration from the database and sends it as the API's ``MigrationOut`` JSON. Order of events:

1. join the group FIRST, then send the current state (``event: progress``), so a push meanwhile is not lost;
2. one ``event: progress`` per change (pushes that change nothing visible are skipped);
3. ``event: end`` with the final state once the migration has ended, then the stream closes.

A comment line every ``KEEPALIVE_S`` keeps proxies from closing an idle stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse

from migrations_app.access import hide_unseen, visible_migration_condition
from migrations_app.fanout import get_fanout
from migrations_app.models import Migration
from migrations_app.progress import vm_group
from vms.access import role_vsp_ids

from .problems import problem_response
from .schemas import migration_out
from .tokens import user_for_token

KEEPALIVE_S = 15.0
VIEW_MIGRATION = "migrations_app.view_migration"


class _Signal:
    """A fan-out watcher that only notes that something was pushed (the HTML itself is not used)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def deliver(self, html: str) -> None:
        self.event.set()


def _authenticate(request: HttpRequest) -> Any | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return user_for_token(header[7:].strip())
    user = request.user  # the session (SessionMiddleware + AuthenticationMiddleware resolved it lazily)
    return user if user.is_authenticated else None


def _state(migration_id: int, seen: frozenset[int] | None) -> tuple[dict, bool] | None:
    """The migration as the API gives it to a user who sees the VSPs ``seen`` (``access.hide_unseen``),
    and whether it ended; None once it is gone."""
    migration = (
        Migration.objects.select_related("vm", "source", "target", "requested_by", "cancel_requested_by")
        .filter(pk=migration_id)
        .first()
    )
    if migration is None:
        return None
    shown = hide_unseen(migration, seen) or migration
    return migration_out(shown).model_dump(mode="json"), migration.is_terminal


def _frame(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@login_not_required
async def migration_events(request: HttpRequest, migration_id: int) -> HttpResponse | StreamingHttpResponse:
    user = await sync_to_async(_authenticate)(request)
    if user is None:
        return problem_response(401, "Log in first: send 'Authorization: Bearer <token>'.")
    if not await sync_to_async(user.has_perm)(VIEW_MIGRATION):
        return problem_response(403, "Your account lacks the permission to see this.")
    visible = Migration.objects.filter(visible_migration_condition(user), pk=migration_id)
    seen = await sync_to_async(role_vsp_ids)(user)
    first = await sync_to_async(_state)(migration_id, seen) if await visible.aexists() else None
    if first is None:
        return problem_response(404, f"No migration with the id {migration_id}.")
    vm_id = first[0]["vm_id"]
    response = StreamingHttpResponse(_stream(migration_id, vm_id, seen), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


async def _stream(migration_id: int, vm_id: int, seen: frozenset[int] | None) -> AsyncIterator[bytes]:
    signal = _Signal()
    group = vm_group(vm_id)
    fanout = get_fanout()
    await fanout.join(group, signal)
    try:
        sent: dict | None = None
        while True:
            signal.event.clear()
            state = await sync_to_async(_state)(migration_id, seen)
            if state is None:
                return
            data, ended = state
            if ended:
                yield _frame("end", data)
                return
            if data != sent:
                yield _frame("progress", data)
                sent = data
            try:
                await asyncio.wait_for(signal.event.wait(), KEEPALIVE_S)
            except TimeoutError:
                yield b": keepalive\n\n"
    finally:
        fanout.leave(group, signal)
