"""Link probes: how fast the data plane between two agents carries bytes, with no guest involved.

The console asks the receiving agent to open a probe listener (``POST /v1/probes/incoming``: a
one-time token and port, like ``prepare_incoming``), then the sending agent to probe it
(``POST /v1/probes/outgoing``). The session is authenticated exactly like a migration's stream, with
the same code (``drivers.simulated.wire``): the pair's encryption policy (mutual TLS with the
deployment CA under "required"), then a HELLO with the one-time token, compared in constant time,
each connection's handshake bounded by ``wire.HELLO_TIMEOUT_S`` and run beside any stranger's. The
HELLO says ``"session": "probe"``: a probe listener admits nothing else, and a migration's listener
refuses a probe's HELLO (no migration id), so a probe never touches a guest.

1. The sender connects, proves itself, and waits for ACCEPT.
2. It sends FILLER frames of at most ``FILLER_CHUNK`` random bytes until ``max_bytes`` are sent or
   ``seconds`` have passed, then an empty FILLER (the end).
3. The receiver reads each frame into one reused ``FILLER_CHUNK`` buffer (its memory is that buffer,
   whatever the peer sends) and answers READY with the bytes it received; more than it granted, a
   frame larger than ``FILLER_CHUNK``, any other frame kind, or a session running past ``seconds`` +
   ``GRACE_S`` ends the session (REFUSE, closed).
4. The rate is the bytes the receiver got over the sender's time from the first filler byte to READY
   (so what the socket buffers hold counts only once it arrived).

Both agents refuse a probe (409) while a migration is active on them: the probe would slow it and
measure a link it shares. A receiver holds at most ``MAX_LISTENERS`` probe listeners at once; one
nobody uses closes after ``ACCEPT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import ssl
import time
from typing import Any

from agentprotocol import Encryption, PreparedProbe, ProbeRequest, ProbeResult, ProbeRun
from hostagent.driver import Conflict, InvalidRequest
from hostagent.drivers.simulated.wire import (
    ACCEPT,
    FILLER,
    HELLO,
    HELLO_TIMEOUT_S,
    READY,
    REFUSE,
    Channel,
    FrameReader,
    FrameWriter,
    ProtocolError,
    accept_until,
    connect,
    read_hello,
    token_refusal,
)
from hostagent.tls import TlsSettings

log = logging.getLogger("hostagent.probe")
FILLER_CHUNK = 1 << 20  # bytes per FILLER frame, and the receiver's whole buffer
ACCEPT_S = 10.0  # a probe listener nobody proved himself to within this closes
# Beyond the granted seconds, for the bytes still in the socket buffers (up to ~8 MiB: wire.SOCKET_BUFFER
# on each side) and the answer: a link down to about 1 MB/s still finishes; the receiver holds no more
# memory meanwhile (one FILLER_CHUNK buffer).
GRACE_S = 10.0
MAX_LISTENERS = 4
_filler: bytes | None = None


def filler() -> bytes:
    """``FILLER_CHUNK`` random bytes, made once (random, so no compression on the way flatters the link)."""
    global _filler
    if _filler is None:
        _filler = os.urandom(FILLER_CHUNK)
    return _filler


def tls_context(tls: TlsSettings | None, encryption: Encryption, server_side: bool) -> ssl.SSLContext | None:
    """The data plane's context under ``encryption`` (None: plain TCP); "required" without TLS is 400."""
    if encryption == "off":
        return None
    if tls is None:
        raise InvalidRequest(
            "the encryption policy requires TLS on the data plane, but this agent has no certificate "
            "(start it with --tls-cert --tls-key --tls-ca, or set the pair's policy to off)"
        )
    return tls.data_server_context() if server_side else tls.data_client_context()


class ProbeListener:
    """The receiving side of one probe: a one-time listener, then one bounded session."""

    def __init__(self, request: ProbeRequest, data_host: str, tls: ssl.SSLContext | None) -> None:
        self.request = request
        self._tls = tls
        self._token = secrets.token_urlsafe(32)
        family = socket.AF_INET6 if ":" in data_host else socket.AF_INET
        self._listener = socket.create_server((data_host, 0), family=family, backlog=4)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._data_host = data_host
        self._channel: Channel | None = None
        self._claimed = False
        self.task: asyncio.Task[None] | None = None

    def prepared(self) -> PreparedProbe:
        return PreparedProbe(
            data_host=self._data_host,
            data_port=self.port,
            token=self._token,
            max_bytes=self.request.max_bytes,
            seconds=self.request.seconds,
        )

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"probe listener {self.port}")

    async def _run(self) -> None:
        won: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(ACCEPT_S):
                await accept_until(self._listener, self._handshake, won, "a link probe")
            self._listener.close()
            won.result()
            assert self._channel is not None
            async with asyncio.timeout(self.request.seconds + GRACE_S):
                await self._receive(self._channel)
        except TimeoutError:
            log.warning("link probe on port %s: nobody proved himself, or it ran over its time", self.port)
        except (OSError, ProtocolError) as error:
            log.warning("link probe on port %s ended: %s", self.port, error)
        except Exception:
            log.exception("link probe on port %s failed", self.port)
        finally:
            self._listener.close()
            if self._channel is not None:
                self._channel.close()

    async def _handshake(self, sock: socket.socket, peer: Any, won: asyncio.Future[None]) -> None:
        """One connection's TLS and HELLO (``wire.read_hello``); the first with the token wins."""
        try:
            channel, kind, hello = await read_hello(sock, self._tls)
        except (TimeoutError, OSError, ProtocolError) as error:
            reason = "no HELLO within the handshake limit" if isinstance(error, TimeoutError) else error
            log.warning("refused probe connection from %s: %s", peer, reason)
            sock.close()
            return
        except Exception:
            log.exception("refused probe connection from %s", peer)
            sock.close()
            return
        except BaseException:  # cancelled: the prober got in, or the listener's time is up
            sock.close()
            raise
        refusal = token_refusal(kind, hello, self._token) or self._check_session(hello)
        if refusal is None and self._claimed:
            refusal = "the one-time token was already used"
        writer = FrameWriter(channel)
        if refusal is not None:
            log.warning("refused probe connection from %s: %s", peer, refusal)
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.message(REFUSE, {"error": refusal}), 1.0)
            sock.close()
            return
        self._claimed = True  # before anything is awaited: the token admits one session
        try:
            await writer.message(ACCEPT, {"session": "probe"})
        except BaseException as error:
            sock.close()
            if not won.done():
                won.set_exception(ConnectionError(f"the prober went away during the handshake: {error!r}"))
            if not isinstance(error, Exception):
                raise
            return
        self._channel = channel
        if not won.done():
            won.set_result(None)

    def _check_session(self, hello: dict[str, Any]) -> str | None:
        if hello.get("session") != "probe":
            return "this listener is for a link probe"
        max_bytes, seconds = hello.get("max_bytes"), hello.get("seconds")
        if (
            not isinstance(max_bytes, int)
            or isinstance(max_bytes, bool)
            or max_bytes > self.request.max_bytes
        ):
            return f"a probe here may send at most {self.request.max_bytes} bytes"
        if (
            not isinstance(seconds, (int, float))
            or isinstance(seconds, bool)
            or seconds > self.request.seconds
        ):
            return f"a probe here may last at most {self.request.seconds:g} s"
        return None

    async def _receive(self, channel: Channel) -> None:
        """FILLER frames into one reused buffer until the empty one; then READY with the bytes received."""
        reader, writer = FrameReader(channel), FrameWriter(channel)
        buffer = memoryview(bytearray(FILLER_CHUNK))
        received, started = 0, time.monotonic()
        try:
            while True:
                kind, count, _ = await reader.header()
                if kind != FILLER:
                    raise ProtocolError(f"unexpected frame kind {kind} in a link probe")
                if count == 0:
                    break
                if count > FILLER_CHUNK or received + count > self.request.max_bytes:
                    raise ProtocolError(
                        f"the probe sent more than the {self.request.max_bytes} bytes granted"
                    )
                await reader.into(buffer[:count])
                received += count
        except ProtocolError as error:
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.message(REFUSE, {"error": str(error)}), 1.0)
            raise
        await writer.message(READY, {"bytes": received, "seconds": time.monotonic() - started})
        log.info("link probe on port %s: received %d bytes", self.port, received)


class ProbeListeners:
    """The receiving agent's probe listeners (at most ``MAX_LISTENERS`` at once)."""

    def __init__(self) -> None:
        self._running: set[ProbeListener] = set()

    def open(self, request: ProbeRequest, data_host: str, tls: TlsSettings | None) -> PreparedProbe:
        """A new listener for ``request``; ``Conflict`` when ``MAX_LISTENERS`` are open already."""
        context = tls_context(tls, request.encryption, server_side=True)
        self._running = {listener for listener in self._running if listener.task and not listener.task.done()}
        if len(self._running) >= MAX_LISTENERS:
            raise Conflict(f"{MAX_LISTENERS} link probes are waiting here already; probe again later")
        listener = ProbeListener(request, data_host, context)
        listener.start()
        self._running.add(listener)
        return listener.prepared()

    async def close(self) -> None:
        for listener in self._running:
            if listener.task is not None:
                listener.task.cancel()
        for listener in self._running:
            if listener.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await listener.task


async def run_probe(run: ProbeRun, tls: TlsSettings | None) -> ProbeResult:
    """Send filler to ``run.target`` for at most ``run.seconds`` / ``run.max_bytes`` and measure the rate.

    Raises ``Conflict`` in plain words when the peer cannot be reached, fails TLS, refuses the token
    or the bounds, or does not answer within ``seconds`` + ``GRACE_S`` (+ the handshake's limit).
    """
    context = tls_context(tls, run.encryption, server_side=False)
    socks: list[socket.socket] = []
    target = f"{run.target.host}:{run.target.port}"
    try:
        return await _probe(run, context, socks)
    except ssl.SSLError as error:
        raise Conflict(
            f"the data plane at {target} failed the TLS handshake: {error.reason or error}"
        ) from None
    except TimeoutError:
        raise Conflict(f"the link probe to {target} did not finish in time") from None
    except (OSError, ProtocolError) as error:
        raise Conflict(f"the link probe to {target} failed: {error}") from None
    finally:
        for sock in socks:
            sock.close()


async def _probe(run: ProbeRun, context: ssl.SSLContext | None, socks: list[socket.socket]) -> ProbeResult:
    hello = {
        "token": run.target.token,
        "session": "probe",
        "max_bytes": run.max_bytes,
        "seconds": run.seconds,
    }
    async with asyncio.timeout(HELLO_TIMEOUT_S + 1.0):
        channel = await connect(run.target.host, run.target.port, context, socks)
        writer, reader = FrameWriter(channel), FrameReader(channel)
        await writer.message(HELLO, hello)
        kind, answer = await reader.message()
    if kind != ACCEPT:
        raise ProtocolError(f"the peer refused the probe: {answer.get('error', 'no reason')}")
    chunk = filler()
    async with asyncio.timeout(run.seconds + GRACE_S):
        started = time.monotonic()
        sent = 0
        while sent < run.max_bytes and time.monotonic() - started < run.seconds:
            size = min(FILLER_CHUNK, run.max_bytes - sent)
            await writer.filler(memoryview(chunk)[:size])
            sent += size
        await writer.filler(b"")
        kind, answer = await reader.message()
        elapsed = time.monotonic() - started
    if kind != READY:
        raise ProtocolError(f"the peer ended the probe: {answer.get('error', 'no reason')}")
    received = answer.get("bytes")
    if not isinstance(received, int) or isinstance(received, bool) or not 0 <= received <= sent:
        raise ProtocolError(f"the peer's count of received bytes makes no sense: {received!r}")
    seconds = max(elapsed, 1e-6)
    return ProbeResult(
        bytes=received, seconds=seconds, rate_bytes_s=round(received / seconds), encryption=run.encryption
    )
