"""Per-process fan-out of progress to the websockets of this server process, rendered once per class.

Stock Channels puts every group member's copy of a message through its own queue and dispatch
task; with 1,000 browsers on one VM that costs ~0.3 ms per socket and pushes p99 past 250 ms. Here
each server process joins a channel group ONCE, with one process channel, and one reader task hands
each message to the local sockets of that group (one small send task each).

Messages carry facts, not HTML (``progress.ProgressMessage``). Each watcher says which class of view it
is in for a message (``view_key(message)``, e.g. (migration, version, what its user may see and use)),
asked once per ``view_token`` (watchers with equal tokens, e.g. the same rights, are in the same class
of every message: a thousand sockets of one team cost one ``view_key`` call, not a thousand);
the reader renders each class once (``render_view(message, key)``, in a thread: it reads the database)
through the process's ``RenderCache`` and hands every watcher of that class the same string. The
websocket's first message goes through the same cache (``ProcessFanout.render``).

Correctness:
- a socket joins (locally, and the process joins the group in the channel layer) BEFORE it reads the
  state it sends first, so an update published meanwhile is delivered after that snapshot;
- until its snapshot is sent, a socket keeps only the newest pushed HTML and sends it right after;
- messages are rendered and handed out one after the other, in the order received; sends to one socket
  run in the order they were created (uvicorn's send only waits when the socket's buffer is full, and
  waiters resume first-in first-out);
- group memberships in the layer expire (``group_expiry``), so they are renewed on every join and
  every ``REFRESH_S``; groups without local sockets are left then, under the same lock as joins.

Isolation: one watcher's fault (its ``wants``, ``view_key`` or ``deliver`` raising) is logged and drops
only that watcher (its ``drop()`` is called when it has one); a render that fails is logged and its
class gets nothing of that message (the next one, or the page's version check, catches up); the reader
itself is supervised: should it ever end, it is logged and started again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable
from typing import Protocol

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)

REFRESH_S = 600.0


class Watcher(Protocol):
    def deliver(self, html: str) -> None: ...


READER_RESTART_DELAY_S = 0.1


def wanted_by(watcher: Watcher, message: dict) -> bool:
    """A watcher may define ``wants(message)`` to skip updates its page has no place for."""
    wants = getattr(watcher, "wants", None)
    return wants is None or wants(message)


def view_key_of(watcher: Watcher, message: dict) -> Hashable:
    """The class of view ``watcher`` gets of ``message`` (``view_key``); ``None`` for a watcher that only
    wants to know something was pushed (the API's event stream): it is handed an empty string."""
    view_key = getattr(watcher, "view_key", None)
    return None if view_key is None else view_key(message)


class RenderCache:
    """The last ``size`` renders of this process, by key (e.g. (migration, version, view class)).

    Thread-safe enough for its use: renders run in the one database thread, lookups on the loop; a
    race at worst renders a key twice.
    """

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self.entries: OrderedDict[Hashable, str] = OrderedDict()
        self.renders = 0  # how many renders ran (tests check one per class)

    def get(self, key: Hashable, render: Callable[[], str]) -> str:
        """The HTML for ``key``, rendered by ``render()`` (sync, may query) if not cached."""
        html = self.entries.get(key)
        if html is None:
            html = render()
            self.renders += 1
            self.entries[key] = html
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return html


class ProcessFanout:
    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.channel: str | None = None
        self.members: dict[str, set[Watcher]] = defaultdict(set)
        self.lock = asyncio.Lock()
        self.tasks: list[asyncio.Task] = []
        self.reader: asyncio.Task | None = None
        self.reader_restarts = 0
        self.cache = RenderCache()

    async def render(self, key: Hashable, render: Callable[[], str]) -> str:
        """The cached HTML for ``key`` or ``render()`` run in the database thread (first messages and
        pushes share this cache)."""
        cached = self.cache.entries.get(key)
        if cached is not None:
            return cached
        return await database_sync_to_async(self.cache.get)(key, render)

    async def join(self, group: str, watcher: Watcher) -> None:
        async with self.lock:
            if self.channel is None:
                self.channel = await self.layer.new_channel()
                self.reader = self._start_reader()
                self.tasks = [self.reader, asyncio.create_task(self._refresh())]
            self.members[group].add(watcher)
            await self.layer.group_add(group, self.channel)

    def leave(self, group: str, watcher: Watcher) -> None:
        self.members.get(group, set()).discard(watcher)

    def _start_reader(self) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self._read())
        task.add_done_callback(self._reader_ended)
        return task

    def _reader_ended(self, task: asyncio.Task) -> None:
        """Start the reader again unless it was cancelled (the loop or the test shutting down)."""
        if task.cancelled():
            return
        error = task.exception()
        logger.error(
            "Progress fan-out reader stopped; restarting it", exc_info=error if error is not None else None
        )
        self.reader_restarts += 1
        loop = task.get_loop()
        if loop.is_closed():
            return
        loop.call_later(READER_RESTART_DELAY_S, self._restart_reader)

    def _restart_reader(self) -> None:
        self.reader = self._start_reader()
        self.tasks = [self.reader, *self.tasks[1:]]

    async def _read(self) -> None:
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Progress fan-out could not read from the channel layer; retrying")
                await asyncio.sleep(1)
                continue
            await self._dispatch(message)

    def _drop(self, group: str, watcher: Watcher) -> None:
        logger.exception("Progress socket %r failed to take an update; dropping it", watcher)
        self.leave(group, watcher)
        drop = getattr(watcher, "drop", None)
        if drop is not None:
            try:
                drop()
            except Exception:
                logger.exception("Could not close the failed progress socket %r", watcher)

    async def _dispatch(self, message: dict) -> None:
        """Render ``message`` once per class of view among the local watchers of its group and hand each
        its class's HTML; a faulty watcher is dropped alone, a failed render skips its class."""
        group = message.get("group", "")
        classes: dict[Hashable, list[Watcher]] = {}
        key_of_token: dict[Hashable, Hashable] = {}
        for watcher in tuple(self.members.get(group, ())):
            try:
                if not wanted_by(watcher, message):
                    continue
                token = getattr(watcher, "view_token", None)
                if token is None:
                    key = view_key_of(watcher, message)
                elif token in key_of_token:
                    key = key_of_token[token]
                else:
                    key = key_of_token[token] = view_key_of(watcher, message)
                classes.setdefault(key, []).append(watcher)
            except Exception:
                self._drop(group, watcher)
        for key, watchers in classes.items():
            html = ""
            if key is not None:
                render_view = watchers[0].render_view  # type: ignore[attr-defined]
                try:
                    html = await self.render(key, functools.partial(render_view, message, key))
                except Exception:
                    logger.exception("Could not render a progress update for %r", key)
                    continue
            for watcher in watchers:
                try:
                    watcher.deliver(html)
                except Exception:
                    self._drop(group, watcher)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            async with self.lock:
                for group, watchers in list(self.members.items()):
                    if watchers:
                        await self.layer.group_add(group, self.channel)
                    else:
                        del self.members[group]
                        await self.layer.group_discard(group, self.channel)


_fanouts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ProcessFanout] = weakref.WeakKeyDictionary()


def get_fanout() -> ProcessFanout:
    """The fan-out of the running event loop (one per server process; one per test's loop)."""
    loop = asyncio.get_running_loop()
    if loop not in _fanouts:
        _fanouts[loop] = ProcessFanout()
    return _fanouts[loop]


def watcher_count() -> int:
    """Progress sockets open in this process (each counted once, whatever groups it joined).

    Read from another thread (the metrics view) without the loop's lock: a momentary snapshot.
    """
    watchers: set[int] = set()
    for fanout in list(_fanouts.values()):
        for members in list(fanout.members.values()):
            watchers.update(id(watcher) for watcher in list(members))
    return len(watchers)
