"""The data plane's framing: 1..16 TCP connections (streams) from the source agent to the target agent.

Every frame starts with a 13-byte header ``(kind, count, first_page)``:
- PAGES: ``count`` pages starting at ``first_page`` follow, raw;
- ZERO: ``count`` pages starting at ``first_page`` are all zero (no payload);
- PAGE_LIST: ``count`` scattered pages: their numbers (little-endian u64 each),
  then their contents in the same order;
- ROUND_END: this stream has sent all its pages of send batch ``count`` (pass or round) of round
  ``first_page``; no payload;
- the others carry ``count`` bytes of JSON.

Streams: every page belongs to one stream (``stream_of``: blocks of ``PARTITION_PAGES`` pages dealt
round-robin), and travels only on it, in TCP's order. So a page's later version always arrives after its
earlier ones whatever the other streams do, and the target needs no version numbers. Stream 0 also
carries every control frame; the others carry only pages and ROUND_END.

The bytes travel over a ``Channel``: plain TCP (``PlainChannel``, the policy "off") or TLS with
both sides proving a certificate from the deployment CA (``TlsChannel``, the policy "required").
The TLS layer runs over the same non-blocking socket through ``ssl.SSLObject`` and memory BIOs,
so received pages are still decrypted straight into the guest's memory.

The source speaks first (HELLO with the one-time token); the target answers
ACCEPT or REFUSE. Every further stream then opens with the same token, naming its index (HELLO
``stream``) and the count (``streams``); the token admits each index once. Then the source streams
PAGES / ZERO / PROGRESS and finally
FREEZE (vCPU/device state, queued I/O, its digest); the target answers READY or
ABORT. Either side may send ABORT at any time before READY. The target also sends
DIGESTED after hashing a round's pages, so the source does not call Copy converged
while the target still has the first pass to hash (that would be downtime).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Protocol

from pydantic import AfterValidator, Field, StrictBool, StrictFloat, StrictInt

from agentprotocol import (
    MAX_DELAY_MS,
    MAX_STREAMS,
    ByteRate,
    Bytes,
    Message,
    Phase,
    ProtocolViolation,
    between,
    load_json,
    parse,
)
from hostagent.drivers.simulated.memory import PAGE_SIZE

log = logging.getLogger("hostagent.simulated.wire")
HEADER = struct.Struct("!BIQ")
(HELLO, ACCEPT, REFUSE, PAGES, ZERO, PROGRESS, FREEZE, READY, ABORT, PAGE_LIST, DIGESTED, ROUND_END) = range(
    1, 13
)
FILLER = 13  # a link probe's filler: ``count`` bytes that mean nothing (``hostagent/probe.py``)
# The disk stream of a local-disk mirror (``diskmirror``): DISK_DATA carries ``count`` bytes of disk
# ``first >> DISK_SHIFT`` at byte offset ``first & DISK_OFFSET_MASK``; DISK_END (no payload) says every
# write before the freeze was sent.
DISK_DATA, DISK_END = 14, 15
DISK_SHIFT = 56
DISK_OFFSET_MASK = (1 << DISK_SHIFT) - 1
MAX_DISK_FRAME = 4 << 20
PAGE_KINDS = frozenset({PAGES, ZERO, PAGE_LIST, ROUND_END})  # what streams other than 0 may carry
MAX_PAGE_LIST = 4096
JSON_KINDS = frozenset({HELLO, ACCEPT, REFUSE, PROGRESS, FREEZE, READY, ABORT, DIGESTED})
MAX_JSON_BYTES = 1 << 20  # a HELLO lists the written 1 MiB chunks: 1 MiB holds ~70,000 runs
MAX_ROUND = 10_000_000
TLS_RECORD_BATCH = 1 << 20  # plaintext encrypted per ssl write before the ciphertext is sent
TLS_RECEIVE_BUFFER = 1 << 20
SMALL_PAYLOAD = 64 * 1024
FLUSH_AT = 1 << 20
CAP_SLICE_S = 0.1  # under a bandwidth cap, a send goes out in slices of this many seconds of the cap
CAP_SLICE_MIN_BYTES = 16 * 1024
SOCKET_BUFFER = 4 << 20
# The loop's socket calls return without suspending while the kernel's buffers have room, so a
# sender or receiver faster than its peer would never let the agent answer its API (issue 10: health
# took 10.8 s during an uncapped Copy). Each side yields to the loop at least this often.
YIELD_EVERY_S = 0.005
HELLO_TIMEOUT_S = 5.0  # a data-plane connection must finish TLS and present its token within this
MAX_PENDING_HANDSHAKES = 32  # connections proving themselves at once on one listener; more are closed


class Breather:
    """``await breathe()`` yields to the event loop if ``YIELD_EVERY_S`` passed since any breather did.

    The time of the last yield is shared by every stream's reader and writer in the process: one
    loop iteration runs a step of every stream that is ready, so with per-stream clocks N streams
    would hold the loop N times as long before the API got its turn.
    """

    _last = time.monotonic()  # shared: the agent runs one event loop

    async def breathe(self) -> None:
        if time.monotonic() - Breather._last >= YIELD_EVERY_S:
            await asyncio.sleep(0)
            Breather._last = time.monotonic()


class ProtocolError(Exception):
    """The peer sent something the data plane does not allow (the connection is dropped)."""


PARTITION_PAGES = 1024  # 4 MiB: a full pass's runs (source.RUN_PAGES) stay whole on one stream


def stream_of(page: int, streams: int) -> int:
    """The stream page ``page`` always travels on (of ``streams``)."""
    return (page // PARTITION_PAGES) % streams


def split_by_stream(first: int, count: int, streams: int) -> list[list[tuple[int, int]]]:
    """The run ``first``+``count`` cut at partition edges: per stream, its (first, count) pieces."""
    pieces: list[list[tuple[int, int]]] = [[] for _ in range(streams)]
    if streams == 1:
        pieces[0].append((first, count))
        return pieces
    end = first + count
    while first < end:
        edge = min(end, (first // PARTITION_PAGES + 1) * PARTITION_PAGES)
        pieces[stream_of(first, streams)].append((first, edge - first))
        first = edge
    return pieces


# -- control frames the receiver trusts only after checking them ----------------------------------

Round = Annotated[StrictInt, AfterValidator(between(0, MAX_ROUND))]


PercentValue = Annotated[StrictInt | StrictFloat, Field(ge=0, le=100, allow_inf_nan=False)]


class ProgressFrame(Message):
    """PROGRESS from the source: the figures the target mirrors, each bounded like the snapshot's."""

    bytes_sent: Bytes = 0
    bytes_remaining: Bytes = 0
    round: Round = 0
    dirty_rate_bytes_s: ByteRate = 0
    throughput_bytes_s: ByteRate = 0
    expected_downtime_ms: Bytes | None = None
    converged: StrictBool = False
    disk_bytes_total: Bytes = 0
    disk_bytes_sent: Bytes = 0
    disk_bytes_remaining: Bytes = 0
    disk_dirty_rate_bytes_s: ByteRate = 0
    disk_throughput_bytes_s: ByteRate = 0
    disk_mirror_ready: StrictBool = False
    state: str | None = None
    phase: Phase | None = None
    percent: dict[Phase, PercentValue] = Field(default_factory=dict)
    round_done: Round = 0


class DigestedFrame(Message):
    """DIGESTED from the target: the last round it has hashed."""

    round: Round


Count = Annotated[StrictInt, AfterValidator(between(0, 1 << 62))]


class WorkloadState(Message):
    write_counter: Count
    dirty_pages_per_s: Annotated[StrictInt, AfterValidator(between(0, 1_000_000))]
    io_latency_ms: Annotated[StrictInt, AfterValidator(between(0, MAX_DELAY_MS))]
    working_set_pages: Count | None = None


class DiskState(Message):
    io_issued: Count
    io_completed: Count


class DevicesState(Message):
    disk0: DiskState


class GuestState(Message):
    """The vCPU/device state FREEZE carries: the workload's rate is bounded like ``GuestSpec``'s."""

    workload: WorkloadState
    devices: DevicesState
    io_queued: Annotated[list[Count], Field(max_length=100_000)]
    vcpus: list[Any] = Field(default_factory=list)


class FreezeFrame(Message):
    """FREEZE: the guest's state, the source's digest, and how many send batches each stream carried
    (the target checks its digest only once every stream's ROUND_END reached ``batches``)."""

    state: GuestState
    source_digest: Annotated[str, Field(max_length=256)] | None = None
    batches: Round = 0
    # device -> SHA-256 of each mirrored disk once the source let go of it (``diskmirror``)
    disk_digests: Annotated[dict[str, Annotated[str, Field(max_length=256)]], Field(max_length=64)] = Field(
        default_factory=dict
    )


class HelloFrame(Message):
    """HELLO from the source (its token is checked before anything else is looked at)."""

    token: Annotated[str, Field(max_length=512)]
    migration_id: Annotated[str, Field(max_length=128)]
    guest: Annotated[str, Field(max_length=64)]
    memory_mib: StrictInt
    populate: list[Any] = Field(default_factory=list)
    streams: Annotated[StrictInt, AfterValidator(between(1, MAX_STREAMS))] = 1
    stream: Annotated[StrictInt, AfterValidator(between(0, MAX_STREAMS - 1))] = 0
    # A local-disk mirror: the devices mirrored, in order (stream 0 names them), and whether this
    # connection is the mirror's disk stream (admitted once, besides the ``streams`` page streams).
    mirror: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=64)] = Field(
        default_factory=list
    )
    disk_stream: StrictBool = False


def check(model: type[Any], body: dict[str, Any], what: str) -> Any:
    """``body`` as the frame ``model``; a value out of bounds is ``ProtocolError`` in plain words."""
    try:
        return parse(model, body, what)
    except ProtocolViolation as violation:
        raise ProtocolError(f"{what}: {violation}") from None


# -- channels: plain TCP or TLS over the same non-blocking socket ----------------------------------


class Channel(Protocol):
    """A connected byte stream; ``recv_into`` returns 0 when the peer closed it."""

    sock: socket.socket

    async def sendall(self, data: bytes | bytearray | memoryview) -> None: ...

    async def recv_into(self, view: memoryview) -> int: ...

    def close(self) -> None: ...


class PlainChannel:
    """Plain TCP (the encryption policy "off")."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()

    async def sendall(self, data: bytes | bytearray | memoryview) -> None:
        await self._loop.sock_sendall(self.sock, data)

    async def recv_into(self, view: memoryview) -> int:
        return await self._loop.sock_recv_into(self.sock, view)

    def close(self) -> None:
        self.sock.close()


class TlsChannel:
    """TLS through ``ssl.SSLObject`` over a non-blocking socket (``handshake`` builds one).

    Sends are serialised by a lock: ciphertext must leave in the order it was encrypted, and the
    target sends DIGESTED from a hashing task while its main task may answer too.
    """

    def __init__(
        self, sock: socket.socket, ssl_object: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._ssl = ssl_object
        self._incoming = incoming
        self._outgoing = outgoing
        self._raw = bytearray(TLS_RECEIVE_BUFFER)
        self._raw_view = memoryview(self._raw)
        self._send_lock = asyncio.Lock()

    @classmethod
    async def handshake(cls, sock: socket.socket, context: ssl.SSLContext, server_side: bool) -> TlsChannel:
        """Run the TLS handshake; ``ssl.SSLError`` (e.g. no or a foreign certificate) if it fails."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ssl_object = context.wrap_bio(incoming, outgoing, server_side=server_side)
        channel = cls(sock, ssl_object, incoming, outgoing)
        while True:
            try:
                ssl_object.do_handshake()
                break
            except ssl.SSLWantReadError:
                await channel._flush()
                if not await channel._fill():
                    raise ConnectionError("the peer closed the connection during the TLS handshake") from None
        await channel._flush()
        return channel

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            await self._loop.sock_sendall(self.sock, data)

    async def _fill(self) -> bool:
        received = await self._loop.sock_recv_into(self.sock, self._raw_view)
        if received == 0:
            self._incoming.write_eof()
            return False
        self._incoming.write(self._raw_view[:received])
        return True

    async def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        async with self._send_lock:
            for start in range(0, len(view), TLS_RECORD_BATCH):
                self._ssl.write(view[start : start + TLS_RECORD_BATCH])
                await self._flush()

    async def recv_into(self, view: memoryview) -> int:
        """Decrypt into ``view`` every record already received (one ``ssl.read`` gives one 16 KiB
        record: returning after each made the receiver spend a Python round trip per record, 0.24 of
        the plain data plane); wait for the network only when nothing is buffered. 0: the peer closed."""
        filled, wanted = 0, len(view)
        while filled < wanted:
            try:
                read: int = self._ssl.read(wanted - filled, view[filled:])  # type: ignore[arg-type, assignment]
            except ssl.SSLWantReadError:
                if filled:
                    return filled
                if not await self._fill():
                    return 0
                continue
            except ssl.SSLZeroReturnError:
                return filled
            if not read:
                return filled
            filled += read
        return filled

    def close(self) -> None:
        self.sock.close()


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

    def __init__(self, channel: Channel, bandwidth_bytes_s: float | None = None) -> None:
        self._channel = channel
        self._buffer = bytearray()
        self._cap = bandwidth_bytes_s
        self._cap_started = time.monotonic()
        self._cap_base = 0
        self._breather = Breather()
        self.bytes_sent = 0
        self.send_seconds = 0.0
        # Called after each slice sent (no arguments; must not block): the source notes its progress.
        self.on_sent: Callable[[], None] | None = None

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

    async def filler(self, payload: bytes | memoryview) -> None:
        """A link probe's FILLER frame of ``len(payload)`` bytes (0: the end of the filler)."""
        self._buffer += HEADER.pack(FILLER, len(payload), 0)
        await self.flush()
        if payload:
            await self._send(payload)

    async def round_end(self, batch: int, round_number: int) -> None:
        """Mark the end of this stream's share of a send batch, and send what is buffered."""
        self._buffer += HEADER.pack(ROUND_END, batch, round_number)
        await self.flush()

    async def disk(self, disk: int, offset: int, data: bytes | memoryview) -> None:
        """DISK_DATA: ``data`` (at most ``MAX_DISK_FRAME`` bytes) of disk ``disk`` at byte ``offset``."""
        header = HEADER.pack(DISK_DATA, len(data), disk << DISK_SHIFT | offset)
        if len(data) < SMALL_PAYLOAD:
            self._buffer += header + data
            if len(self._buffer) >= FLUSH_AT:
                await self.flush()
        else:
            self._buffer += header
            await self.flush()
            await self._send(data)

    def disk_now(self, disk: int, offset: int, data: bytes) -> None:
        """DISK_DATA into the buffer at once, without waiting (a guest's write in the mirror's
        write-blocking mode): it leaves with the next flush, after every frame queued before it, even
        while a large frame is being sent (``flush`` swaps the buffer before it awaits)."""
        self._buffer += HEADER.pack(DISK_DATA, len(data), disk << DISK_SHIFT | offset) + data

    def disk_end(self) -> None:
        """DISK_END into the buffer: every disk write before it was queued (sent with the next flush)."""
        self._buffer += HEADER.pack(DISK_END, 0, 0)

    async def zero(self, first_page: int, count: int) -> None:
        self._buffer += HEADER.pack(ZERO, count, first_page)
        if len(self._buffer) >= FLUSH_AT:
            await self.flush()
        else:
            await self._breather.breathe()

    async def message(self, kind: int, body: dict[str, Any], flush: bool = True) -> None:
        data = json_bytes(body)
        self._buffer += HEADER.pack(kind, len(data), 0) + data
        if flush:
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            data, self._buffer = self._buffer, bytearray()
            await self._send(data)

    async def _send(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` whole; under a cap, in slices of ``CAP_SLICE_S`` of the cap, each followed by its
        wait, so ``bytes_sent`` (and the progress ``on_sent`` reports) moves several times a second
        even on a slow link: a 4 MiB run at 1 MB/s otherwise jumped once every 4 s (issue 21.2)."""
        started = time.monotonic()
        view = memoryview(data)
        step = max(CAP_SLICE_MIN_BYTES, int(self._cap * CAP_SLICE_S)) if self._cap else len(view)
        for offset in range(0, len(view), max(step, 1)):
            piece = view[offset : offset + step]
            await self._channel.sendall(piece)
            self.bytes_sent += len(piece)
            if self._cap:
                ahead = (self.bytes_sent - self._cap_base) / self._cap - (
                    time.monotonic() - self._cap_started
                )
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if self.on_sent is not None:
                self.on_sent()
        self.send_seconds += time.monotonic() - started
        await self._breather.breathe()


class FrameReader:
    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._header = bytearray(HEADER.size)
        self._breather = Breather()
        self.bytes_received = 0

    async def header(self) -> tuple[int, int, int]:
        await self.into(memoryview(self._header))
        return HEADER.unpack(self._header)

    async def into(self, view: memoryview) -> None:
        """Fill ``view``; yields to the loop within a large frame too (a 4 MiB TLS frame is 256 records)."""
        while view:
            received = await self._channel.recv_into(view)
            if received == 0:
                raise ConnectionError("the peer closed the data-plane connection")
            self.bytes_received += received
            view = view[received:]
            await self._breather.breathe()

    async def json_body(self, size: int, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
        """``size`` bytes of JSON object; too large, not JSON, too deeply nested: ``ProtocolError``."""
        if size > limit:
            raise ProtocolError(f"control message of {size} bytes is too large")
        body = bytearray(size)
        await self.into(memoryview(body))
        try:
            decoded = load_json(body, "control message")
        except ProtocolViolation as violation:
            raise ProtocolError(str(violation)) from None
        if not isinstance(decoded, dict):
            raise ProtocolError("control message is not a JSON object")
        return decoded

    async def message(self, limit: int = MAX_JSON_BYTES) -> tuple[int, dict[str, Any]]:
        """Read one JSON frame (the handshake and the target's answers are only these)."""
        kind, size, _ = await self.header()
        if kind not in JSON_KINDS:
            raise ProtocolError(f"unexpected frame kind {kind}")
        return kind, await self.json_body(size, limit)


def json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


# -- the handshake both sides of every data-plane session share (migrations and link probes) -------


async def connect(host: str, port: int, tls: ssl.SSLContext | None, socks: list[socket.socket]) -> Channel:
    """Source side: connect to a listener and, with ``tls`` (policy "required"), run the TLS handshake.

    The socket is appended to ``socks`` at once, so the caller closes it whatever happens next.
    Raises ``OSError`` (``ssl.SSLError`` is one) when the peer cannot be reached or fails TLS.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    socks.append(sock)
    tune_socket(sock)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    if tls is None:
        return PlainChannel(sock)
    return await TlsChannel.handshake(sock, tls, server_side=False)


async def read_hello(sock: socket.socket, tls: ssl.SSLContext | None) -> tuple[Channel, int, dict[str, Any]]:
    """Listener side: TLS (with ``tls``: the peer must show a certificate from the CA), then the first frame.

    Bounded by ``HELLO_TIMEOUT_S`` and ``MAX_JSON_BYTES``. Raises ``TimeoutError``, ``OSError`` (TLS
    refused, peer gone) or ``ProtocolError`` (not a JSON frame, too large, not JSON).
    """
    async with asyncio.timeout(HELLO_TIMEOUT_S):
        channel: Channel
        if tls is not None:
            channel = await TlsChannel.handshake(sock, tls, server_side=True)
        else:
            channel = PlainChannel(sock)
        kind, hello = await FrameReader(channel).message()
    return channel, kind, hello


def token_refusal(kind: int, hello: dict[str, Any], token: str) -> str | None:
    """Why a first frame does not prove the one-time ``token`` (compared in constant time), or None."""
    presented = hello.get("token")
    if kind != HELLO or not isinstance(presented, str) or len(presented) > 512:
        return "no token presented"
    if not hmac.compare_digest(presented.encode(), token.encode()):
        return "wrong data-plane token"
    return None


Handshake = Callable[[socket.socket, Any, "asyncio.Future[None]"], Coroutine[Any, Any, None]]


async def accept_until(
    listener: socket.socket, handshake: Handshake, won: asyncio.Future[None], what: str
) -> None:
    """Accept connections on ``listener`` until ``won`` is done; each runs ``handshake(sock, peer, won)``.

    A stranger (no certificate from the CA, no or a wrong token, garbage, or silence) is dropped by
    its own handshake task; it never delays the real peer, whose handshakes run beside it. At most
    ``MAX_PENDING_HANDSHAKES`` run at once (more are closed at once). On return (or cancellation) the
    handshakes still pending are cancelled. ``what`` names the session in the log.
    """
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    accept: asyncio.Future[tuple[socket.socket, Any]] | None = None
    try:
        while not won.done():
            accept = asyncio.ensure_future(loop.sock_accept(listener))
            await asyncio.wait({accept, won}, return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
            if not accept.done():
                accept.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await accept
                break
            sock, peer = accept.result()
            if won.done() or len(pending) >= MAX_PENDING_HANDSHAKES:
                log.warning(
                    "refused data-plane connection from %s for %s: too many handshakes at once", peer, what
                )
                sock.close()
                continue
            tune_socket(sock)
            task = asyncio.create_task(handshake(sock, peer, won))
            pending.add(task)
            task.add_done_callback(pending.discard)
    finally:
        # A cancelled wait (a time limit) must not leave an accept registered on the listener's
        # file descriptor: the next listener may get the same number.
        if accept is not None and not accept.done():
            accept.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await accept
        if pending:
            log.info("%s: dropped %d data-plane connection(s) still in their handshake", what, len(pending))
        for task in list(pending):
            task.cancel()
        for task in list(pending):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
