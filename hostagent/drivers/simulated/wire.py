"""The data plane's framing: one TCP connection from the source agent to the target agent.

Every frame starts with a 13-byte header ``(kind, count, first_page)``:
- PAGES: ``count`` pages starting at ``first_page`` follow, raw;
- ZERO: ``count`` pages starting at ``first_page`` are all zero (no payload);
- PAGE_LIST: ``count`` scattered pages: their numbers (little-endian u64 each),
  then their contents in the same order;
- the others carry ``count`` bytes of JSON.

The source speaks first (HELLO with the one-time token); the target answers
ACCEPT or REFUSE. Then the source streams PAGES / ZERO / PROGRESS and finally
FREEZE (vCPU/device state, queued I/O, its digest); the target answers READY or
ABORT. Either side may send ABORT at any time before READY. The target also sends
DIGESTED after hashing a round's pages, so the source does not call Copy converged
while the target still has the first pass to hash (that would be downtime).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from typing import Any

from hostagent.drivers.simulated.memory import PAGE_SIZE

HEADER = struct.Struct("!BIQ")
HELLO, ACCEPT, REFUSE, PAGES, ZERO, PROGRESS, FREEZE, READY, ABORT, PAGE_LIST, DIGESTED = range(1, 12)
MAX_PAGE_LIST = 4096
JSON_KINDS = frozenset({HELLO, ACCEPT, REFUSE, PROGRESS, FREEZE, READY, ABORT, DIGESTED})
MAX_JSON_BYTES = 1 << 20
SMALL_PAYLOAD = 64 * 1024
FLUSH_AT = 1 << 20
SOCKET_BUFFER = 4 << 20
# The loop's socket calls return without suspending while the kernel's buffers have room, so a
# sender or receiver faster than its peer would never let the agent answer its API (issue 10: health
# took 10.8 s during an uncapped Copy). Each side yields to the loop at least this often.
YIELD_EVERY_S = 0.005


class Breather:
    """``await breathe()`` yields to the event loop if ``YIELD_EVERY_S`` passed since it last did."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    async def breathe(self) -> None:
        now = time.monotonic()
        if now - self._last >= YIELD_EVERY_S:
            await asyncio.sleep(0)
            self._last = time.monotonic()


class ProtocolError(Exception):
    pass


def tune_socket(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass


class FrameWriter:
    """Batches small frames into one buffer; large page runs go straight from guest memory.

    ``bandwidth_bytes_s`` caps the average rate. ``send_seconds`` counts time spent
    sending (including cap waits), so ``bytes_sent / send_seconds`` is the link rate.
    """

    def __init__(self, sock: socket.socket, bandwidth_bytes_s: float | None = None) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._cap = bandwidth_bytes_s
        self._cap_started = time.monotonic()
        self._cap_base = 0
        self._breather = Breather()
        self.bytes_sent = 0
        self.send_seconds = 0.0

    def set_cap(self, bandwidth_bytes_s: float | None) -> None:
        """Change the cap (bytes/s, None: none) from now on, for a running migration."""
        self._cap = bandwidth_bytes_s
        self._cap_started = time.monotonic()
        self._cap_base = self.bytes_sent

    async def pages(self, first_page: int, payload: memoryview) -> None:
        self._buffer += HEADER.pack(PAGES, len(payload) // PAGE_SIZE, first_page)
        if len(payload) < SMALL_PAYLOAD:
            self._buffer += payload
            if len(self._buffer) >= FLUSH_AT:
                await self.flush()
        else:
            await self.flush()
            await self._send(payload)

    async def page_list(self, pages: list[int], view: memoryview) -> None:
        """Scattered pages in one frame: one Python step per page instead of a frame each."""
        self._buffer += HEADER.pack(PAGE_LIST, len(pages), 0)
        self._buffer += struct.pack(f"<{len(pages)}Q", *pages)
        self._buffer += b"".join([view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] for page in pages])
        if len(self._buffer) >= FLUSH_AT:
            await self.flush()

    async def zero(self, first_page: int, count: int) -> None:
        self._buffer += HEADER.pack(ZERO, count, first_page)
        if len(self._buffer) >= FLUSH_AT:
            await self.flush()
        else:
            await self._breather.breathe()

    async def message(self, kind: int, body: dict[str, Any], flush: bool = True) -> None:
        data = json.dumps(body).encode()
        self._buffer += HEADER.pack(kind, len(data), 0) + data
        if flush:
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            data, self._buffer = self._buffer, bytearray()
            await self._send(data)

    async def _send(self, data: bytes | bytearray | memoryview) -> None:
        started = time.monotonic()
        await self._loop.sock_sendall(self._sock, data)
        self.bytes_sent += len(data)
        if self._cap:
            ahead = (self.bytes_sent - self._cap_base) / self._cap - (time.monotonic() - self._cap_started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        self.send_seconds += time.monotonic() - started
        await self._breather.breathe()


class FrameReader:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._header = bytearray(HEADER.size)
        self._breather = Breather()
        self.bytes_received = 0

    async def header(self) -> tuple[int, int, int]:
        await self.into(memoryview(self._header))
        return HEADER.unpack(self._header)

    async def into(self, view: memoryview) -> None:
        while view:
            received = await self._loop.sock_recv_into(self._sock, view)
            if received == 0:
                raise ConnectionError("the peer closed the data-plane connection")
            self.bytes_received += received
            view = view[received:]
        await self._breather.breathe()

    async def json_body(self, size: int) -> dict[str, Any]:
        if size > MAX_JSON_BYTES:
            raise ProtocolError(f"control message of {size} bytes is too large")
        body = bytearray(size)
        await self.into(memoryview(body))
        try:
            decoded = json.loads(body)
        except ValueError as error:
            raise ProtocolError("control message is not JSON") from error
        if not isinstance(decoded, dict):
            raise ProtocolError("control message is not a JSON object")
        return decoded

    async def message(self) -> tuple[int, dict[str, Any]]:
        """Read one JSON frame (the handshake and the target's answers are only these)."""
        kind, size, _ = await self.header()
        if kind not in JSON_KINDS:
            raise ProtocolError(f"unexpected frame kind {kind}")
        return kind, await self.json_body(size)
