"""A QEMU live migration, driven over QMP and mapped onto the agent's phases: what both sides share.

The sides are ``source.SourceMigration`` and ``target.TargetMigration``.

TCP connections go from the source agent to the target agent's one-time listener, each
opened with ``<token> <kind>`` (QEMU cannot check a token, so the agents
do, in constant time, before QEMU sees the socket):

1. ``data`` is handed to QEMU on both sides (``getfd`` + ``migrate fd:`` / ``migrate-incoming
   fd:``), so QEMU's own stream flows with no copy through the agents.
2. ``ctrl`` stays with the agents: the target sends ``READY <digest>`` once it holds a
   verified paused copy, or ``ABORT <kind> <reason>`` (``kind``: a ``FailureKind`` value);
   either side closing it before "ready" aborts.
3. ``nbd <device>`` (a local disk's mirror, ``diskmirror``): one per mirrored disk, before ``data``;
   handed to the source QEMU as an NBD client node, relayed by the target agent to its QEMU's NBD
   server (a Unix socket in a private directory), so the export is reached with the token only.

Streams (``streams`` > 1): QEMU's ``multifd`` capability with ``multifd-channels`` = streams, set on
both QEMUs before ``migrate`` / ``migrate-incoming``. QEMU then opens the main channel and one
connection per multifd channel itself, which an ``fd:`` URI cannot give it; so each side's QEMU
talks to a Unix socket of its agent's (in a private 0700 directory), and every such connection is
relayed over its own ``<token> data`` connection between the agents (``relay``; one copy through
each agent). One stream keeps the single ``fd:`` connection handed straight to QEMU. ``streams``
None (automatic) keeps one: both QEMUs must be given the same channel count before either knows
the other's cores.

States follow QEMU's MIGRATION events (polling misses short states); numbers come from
``query-migrate``. With ``pause-before-switchover`` the source stops in ``pre-switchover``
(its vCPUs already stopped: QEMU drains and flushes its block devices as it stops them),
which is I/O Quiesce; the driver lets it continue at once into ``device`` (Frozen), since
the guest is already stopped there and any wait would be downtime; ``quiesce`` and ``freeze``
wait for those phases to end. With
``return-path`` the source sees ``completed`` only once the target loaded the stream. Then
both sides hash their stopped guest's RAM (``digest``) so the control plane can check
that not one written page was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from agentprotocol import (
    PHASES,
    TERMINAL_STATES,
    FailureKind,
    MigrationState,
    PhaseLimits,
    ProgressSnapshot,
    Role,
)
from hostagent.drivers.qemu.digest import memory_digest
from hostagent.drivers.qemu.process import QemuProcess
from hostagent.drivers.qemu.qmp import QmpClient
from hostagent.progress import Progress

log = logging.getLogger(__name__)

TOKEN_BYTES = 16
HANDSHAKE_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.1
SETTLE_TIMEOUT_S = 10.0
FD_NAME = "migration"
KINDS = (b"data", b"ctrl", b"nbd")
LINE_LIMIT = 4096

Finished = Callable[["QemuMigration"], None]


def abort_line(rest: str) -> tuple[FailureKind, str]:
    """``<kind> <reason>`` of an ABORT line: the kind (INTERNAL if unknown) and the words."""
    word, _, reason = rest.partition(" ")
    try:
        return FailureKind(word), reason
    except ValueError:
        return FailureKind.INTERNAL, rest


async def recv_line(sock: socket.socket) -> bytes:
    """One ``\\n``-terminated line from a non-blocking socket; b"" on EOF."""
    loop = asyncio.get_running_loop()
    line = b""
    while not line.endswith(b"\n") and len(line) < LINE_LIMIT:
        chunk = await loop.sock_recv(sock, 1)
        if not chunk:
            return b""
        line += chunk
    return line


async def send_line(sock: socket.socket | None, text: str) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        await asyncio.get_running_loop().sock_sendall(sock, text.encode()[: LINE_LIMIT - 1] + b"\n")


RELAY_BUFFER = 1 << 20


async def relay(first: socket.socket, second: socket.socket) -> None:
    """Copy bytes both ways between two non-blocking sockets until either side ends; closes both."""
    try:
        await asyncio.gather(_copy(first, second), _copy(second, first))
    finally:
        first.close()
        second.close()


async def _copy(source: socket.socket, sink: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    buffer = memoryview(bytearray(RELAY_BUFFER))
    try:
        while received := await loop.sock_recv_into(source, buffer):
            await loop.sock_sendall(sink, buffer[:received])
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def multifd_settings(channels: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """QEMU's capabilities and parameters for ``channels`` streams (nothing for one)."""
    if channels <= 1:
        return [], {}
    return [{"capability": "multifd", "state": True}], {"multifd_channels": channels}


class QemuMigration:
    """What both roles share: progress, the phase-limit watchdog, background tasks."""

    role: Role

    def __init__(
        self, process: QemuProcess, migration_id: str, limits: PhaseLimits, finished: Finished
    ) -> None:
        self.process = process
        self.migration_id = migration_id
        self.guest_id = process.name  # the QEMU process is named after the guest's id
        self.limits = limits
        self.progress = Progress(migration_id, self.role, process.name)
        self._finished = finished
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ending = False
        self._control: socket.socket | None = None
        # Called (awaited) once the guest ran again after the switchover: by the target as it resumes, by
        # the source as it releases; ``since`` is that moment (wall s). The driver measures the network
        # blackout there (``QemuDriver._measure_blackout``).
        self.after_switchover: Callable[[QemuMigration, float], Coroutine[Any, Any, None]] | None = None
        # False once a newer migration of the same guest owns its QEMU: a repeated cancel of this ended
        # one must then leave the guest alone (a "cont" would resume it in the newer one's Frozen phase).
        self.owns_guest: Callable[[], bool] = lambda: True

    async def _after_switchover(self) -> None:
        if self.after_switchover is not None:
            await self.after_switchover(self, time.time())

    @property
    def qmp(self) -> QmpClient:
        assert self.process.qmp is not None
        return self.process.qmp

    def snapshot(self) -> ProgressSnapshot:
        return self.progress.snapshot()

    def enter_forward(self, state: MigrationState) -> None:
        """Enter ``state`` unless it is a phase before the current one: with a disk mirror Copy begins
        before QEMU's migration does, whose "setup" must not take the snapshot back to Init."""
        current = self.progress.state
        if state in PHASES and current in PHASES and PHASES.index(state) <= PHASES.index(current):
            return
        self.progress.enter(state)

    async def next_change(self, after_seq: int) -> ProgressSnapshot:
        return await self.progress.next_change(after_seq)

    @property
    def settled(self) -> bool:
        return self.progress.state in TERMINAL_STATES

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait_until(self, done: Callable[[MigrationState], bool]) -> ProgressSnapshot:
        current = self.snapshot()
        while not done(current.state):
            current = await self.next_change(current.seq)
        return current

    def stop_background(self) -> None:
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    def close_control(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None

    async def digest(self) -> str:
        fifo = Path(self.process.config.run_dir) / f"{self.guest_id}.{self.role}.digest.fifo"
        return await memory_digest(self.qmp, self.process.workload.memory_mib, fifo)

    async def abort(
        self, reason: str, kind: FailureKind, state: MigrationState = "aborted", *, side: Role | None = None
    ) -> None:
        """Stop, keep (source) or drop (target) the guest, record why: ``kind`` for decisions."""
        raise NotImplementedError

    async def handle_event(self, event: dict[str, Any]) -> None:
        raise NotImplementedError
