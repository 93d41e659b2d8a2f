"""A TCP proxy for the data plane between two host agents, that a test can cut or stall.

The proxy runs an asyncio loop in a thread of the process that controls it (the soak harness). A control
socket takes one JSON line ``{"host": H, "port": P}`` (a target agent's prepared data-plane endpoint) and
answers ``{"host": "127.0.0.1", "port": Q}``: a new listener on Q that forwards every connection to H:P.
The console reaches the control socket through ``route_via_proxy``, named by the setting
``MIGRATION_DATA_ENDPOINT_HOOK`` (see ``migrations_app/dataplane.py``), with the control address in the
environment variable ``DATA_PLANE_PROXY``.

Faults: ``cut(hold_s)`` closes every forwarded connection and closes new ones at once for ``hold_s``
seconds; ``cut_one(index)`` closes only the ``index``-th connection forwarded (one data-plane stream);
``stall(hold_s)`` stops forwarding bytes in both directions for ``hold_s`` seconds (the sockets stay
open, TCP back-pressure holds the senders). Nothing from the console or the agent is imported.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from typing import Any

CHUNK_BYTES = 256 * 1024
CONTROL_ENV = "DATA_PLANE_PROXY"


class DataPlaneProxy:
    """Start with ``start()`` (returns the control port); ``cut``/``stall`` may be called from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="data-plane-proxy", daemon=True)
        self.control_port = 0
        self.links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.arrivals: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []  # every link, in order
        self.listeners: list[asyncio.Server] = []
        self.flowing = asyncio.Event()
        self.cut_until = 0.0  # monotonic seconds: new connections are closed at once until then
        self.routed = 0  # endpoints handed out

    def start(self) -> int:
        self.thread.start()
        self.control_port = self._call(self._start_control())
        return self.control_port

    def stop(self) -> None:
        self._call(self._close_all(listeners=True))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    def cut(self, hold_s: float) -> int:
        """Close every forwarded connection now, and new ones for ``hold_s`` s; returns how many were cut."""
        self.cut_until = time.monotonic() + hold_s
        return self._call(self._close_all(listeners=False))

    def cut_one(self, index: int) -> bool:
        """Close only the ``index``-th connection forwarded (0: the first); False if it is not open."""
        return bool(self._call(self._cut_one(index)))

    def stall(self, hold_s: float) -> None:
        """No byte moves either way for ``hold_s`` seconds; returns once the stall has begun."""
        self._call(self._stall(hold_s))

    # -- inside the loop -----------------------------------------------------------------
    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    async def _start_control(self) -> int:
        self.flowing.set()
        server = await asyncio.start_server(self._control, "127.0.0.1", 0)
        self.listeners.append(server)
        return server.sockets[0].getsockname()[1]

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            host, port = str(request["host"]), int(request["port"])

            async def forward(
                client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
            ) -> None:
                await self._forward(client_reader, client_writer, host, port)

            listener = await asyncio.start_server(forward, "127.0.0.1", 0)
            self.listeners.append(listener)
            self.routed += 1
            answer = {"host": "127.0.0.1", "port": listener.sockets[0].getsockname()[1]}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    async def _forward(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, host: str, port: int
    ) -> None:
        if time.monotonic() < self.cut_until:
            client_writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
        except OSError:
            client_writer.transport.abort()
            return
        link = (client_writer, upstream_writer)
        self.links.add(link)
        self.arrivals.append(link)
        try:
            await asyncio.gather(
                self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer)
            )
        finally:
            self.links.discard(link)
            for writer in link:
                writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK_BYTES):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    async def _stall(self, hold_s: float) -> None:
        self.flowing.clear()
        self.loop.call_later(hold_s, self.flowing.set)

    async def _cut_one(self, index: int) -> bool:
        if index >= len(self.arrivals) or self.arrivals[index] not in self.links:
            return False
        for writer in self.arrivals[index]:
            writer.transport.abort()
        return True

    async def _close_all(self, *, listeners: bool) -> int:
        cut = len(self.links)
        for link in list(self.links):
            for writer in link:
                writer.transport.abort()
        if listeners:
            for listener in self.listeners:
                listener.close()
        return cut


def route_via_proxy(endpoint: dict[str, Any]) -> dict[str, Any]:
    """The hook for ``MIGRATION_DATA_ENDPOINT_HOOK``: the same endpoint (token included) behind the proxy.

    ``endpoint``: ``{"host", "port", "token"}`` as the target agent prepared it. Raises ``OSError`` or
    ``ValueError`` if the proxy named by ``$DATA_PLANE_PROXY`` (``host:port``) does not answer properly.
    """
    control_host, _, control_port = os.environ[CONTROL_ENV].rpartition(":")
    with socket.create_connection((control_host, int(control_port)), timeout=5) as sock:
        sock.sendall(json.dumps({"host": endpoint["host"], "port": endpoint["port"]}).encode() + b"\n")
        answer = json.loads(sock.makefile("rb").readline())
    return {**endpoint, "host": str(answer["host"]), "port": int(answer["port"])}
