"""Both sides of a QEMU live migration, driven over QMP and mapped onto the agent's phases.

Two TCP connections go from the source agent to the target agent's one-time listener, each
opened with ``<token> data`` or ``<token> ctrl`` (QEMU cannot check a token, so the agents
do, in constant time, before QEMU sees the socket):

1. ``data`` is handed to QEMU on both sides (``getfd`` + ``migrate fd:`` / ``migrate-incoming
   fd:``), so QEMU's own stream flows with no copy through the agents.
2. ``ctrl`` stays with the agents: the target sends ``READY <digest>`` once it holds a
   verified paused copy, or ``ABORT <kind> <reason>`` (``kind``: a ``FailureKind`` value);
   either side closing it before "ready" aborts.

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
import hmac
import logging
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from hostagent.driver import Conflict, MigrationAborted, SourceAbortCommands
from hostagent.drivers.qemu.digest import memory_digest
from hostagent.drivers.qemu.process import QemuProcess
from hostagent.drivers.qemu.qmp import QmpClient, QmpClosed, QmpError
from hostagent.drivers.qemu.states import QEMU_STATES, apply_query_migrate
from hostagent.progress import Progress
from hostagent.protocol import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Endpoint,
    FailureKind,
    MigrationParams,
    MigrationState,
    PhaseLimits,
    ProgressSnapshot,
    Role,
)

log = logging.getLogger(__name__)

TOKEN_BYTES = 16
HANDSHAKE_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.1
SETTLE_TIMEOUT_S = 10.0
FD_NAME = "migration"
KINDS = (b"data", b"ctrl")
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

    @property
    def qmp(self) -> QmpClient:
        assert self.process.qmp is not None
        return self.process.qmp

    def snapshot(self) -> ProgressSnapshot:
        return self.progress.snapshot()

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


class SourceMigration(QemuMigration, SourceAbortCommands):
    role: Role = "source"

    def __init__(
        self,
        process: QemuProcess,
        migration_id: str,
        target: Endpoint,
        params: MigrationParams,
        finished: Finished,
    ) -> None:
        super().__init__(process, migration_id, params.limits, finished)
        self.target = target
        self.params = params
        self._target_ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def begin(self) -> None:
        self.spawn(self._watch_phase_limits())
        self.spawn(self._run())

    async def _run(self) -> None:
        try:
            self._control = await self._connect("ctrl", str(self.process.workload.memory_mib))
            self.spawn(self._watch_target())
            data = await self._connect("data")
            try:
                self.progress.raise_percent("init", 50)
                await self._configure()
                await self.qmp.execute("getfd", pass_fd=data.fileno(), fdname=FD_NAME)
            finally:
                data.close()  # QEMU holds its own copy now
            await self.qmp.execute("migrate", uri=f"fd:{FD_NAME}")
            await self._poll_numbers()
        except MigrationAborted as error:
            await self.abort(str(error), error.kind)
        except (OSError, TimeoutError) as error:
            await self.abort(str(error) or type(error).__name__, FailureKind.UNREACHABLE)
        except (QmpError, QmpClosed) as error:
            await self.abort(str(error) or type(error).__name__, FailureKind.INTERNAL)

    async def _connect(self, kind: str, detail: str = "") -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in self.target.host else socket.AF_INET)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (self.target.host, self.target.port))
            await loop.sock_sendall(sock, f"{self.target.token} {kind} {detail}".strip().encode() + b"\n")
            answer = await asyncio.wait_for(recv_line(sock), HANDSHAKE_TIMEOUT_S)
        except BaseException:
            sock.close()
            raise
        if answer != b"OK\n":
            sock.close()
            reason = answer[3:].decode(errors="replace").strip() if answer.startswith(b"NO ") else ""
            raise MigrationAborted(
                f"the target refused the data-plane connection{': ' if reason else ''}{reason}",
                FailureKind.REFUSED,
            )
        return sock

    async def _configure(self) -> None:
        names = ("events", "pause-before-switchover", "return-path")
        capabilities = [{"capability": name, "state": True} for name in names]
        await self.qmp.execute("migrate-set-capabilities", capabilities=capabilities)
        bandwidth = self.params.bandwidth_mbps
        # bandwidth_mbps is megabits per second; QEMU's max-bandwidth is bytes per second, 0 = unlimited.
        await self.qmp.execute(
            "migrate-set-parameters",
            downtime_limit=self.params.downtime_ms,
            max_bandwidth=int(bandwidth * 125_000) if bandwidth else 0,
        )

    async def _poll_numbers(self) -> None:
        max_rounds = self.params.max_rounds
        while self.progress.state in ACTIVE_STATES:
            info = await self.qmp.execute("query-migrate")
            apply_query_migrate(self.progress, info)
            snapshot = self.progress.current
            if snapshot.state == "copy" and snapshot.round > max_rounds:
                raise MigrationAborted(
                    f"did not converge in {max_rounds} rounds: the guest writes "
                    f"{snapshot.dirty_rate_bytes_s / 1e6:.1f} MB/s, "
                    f"the link moves {snapshot.throughput_bytes_s / 1e6:.1f} MB/s",
                    FailureKind.NOT_CONVERGED,
                )
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _watch_phase_limits(self) -> None:
        while self.progress.state in ACTIVE_STATES:
            phase = self.progress.phase
            limit = self.limits.of(phase) if phase else None
            if limit is not None and time.monotonic() - self.progress.phase_started > limit:
                self.spawn(
                    self.abort(f"the {phase} phase ran over its limit of {limit:g} s", FailureKind.TIME_LIMIT)
                )
                return
            await asyncio.sleep(0.05)

    async def _watch_target(self) -> None:
        """The target's word on the control connection: READY with its digest, or why it gave up."""
        assert self._control is not None
        line = (await recv_line(self._control)).decode(errors="replace").strip()
        word, _, rest = line.partition(" ")
        if word == "READY" and rest:
            self._target_ready.set_result(rest)
        elif word == "ABORT":
            kind, reason = abort_line(rest)
            self.spawn(self.abort(f"the target aborted: {reason}", kind, side="target"))
        else:
            reason = "the target closed the control connection"
            self.spawn(self.abort(f"the target aborted: {reason}", FailureKind.UNREACHABLE, side="target"))

    async def handle_event(self, event: dict[str, Any]) -> None:
        if event.get("event") != "MIGRATION" or self._ending or self.progress.state not in ACTIVE_STATES:
            return
        status = str(event.get("data", {}).get("status"))
        if status == "pre-switchover":
            self.progress.update(converged=True)
        if status in ("failed", "cancelled"):
            reason = await self._qemu_error() or f"QEMU reported the migration {status}"
            self.spawn(self.abort(reason, FailureKind.INTERNAL))
        elif status == "completed":
            self.progress.raise_percent("frozen", 90)
            self.spawn(self._verify_switchover())
        elif status in QEMU_STATES:
            self.progress.enter(QEMU_STATES[status])
            if status == "pre-switchover":
                self.spawn(self._quiesce_and_continue())

    async def _qemu_error(self) -> str | None:
        with contextlib.suppress(QmpError, QmpClosed):
            return (await self.qmp.execute("query-migrate")).get("error-desc")
        return None

    async def _verify_switchover(self) -> None:
        """QEMU is done: hash the stopped source, take the target's digest, then "ready"."""
        try:
            apply_query_migrate(self.progress, await self.qmp.execute("query-migrate"))
            source_digest = await self.digest()
            self.progress.update(source_digest=source_digest)
            self.progress.raise_percent("frozen", 95)
            target_digest = await self._target_ready
        except (QmpError, QmpClosed, OSError) as error:
            await self.abort(f"could not verify the switchover: {error}", FailureKind.INTERNAL)
            return
        self.progress.update(target_digest=target_digest, bytes_remaining=0)
        self.progress.enter("ready")
        self.stop_background()
        self.close_control()

    async def _quiesce_and_continue(self) -> None:
        """Pre-switchover: the vCPUs already stand still and QEMU drained and flushed the block
        devices as it stopped them, so switch over at once. Waiting here for the control plane
        would only add its round trips to the guest's downtime."""
        if self._ending or self.progress.state != "quiesce":
            return
        try:
            devices = await self.qmp.execute("query-block")
            log.info("%s: %d block device(s) drained in pre-switchover", self.guest_id, len(devices))
            self.progress.raise_percent("quiesce", 100)
            await self.qmp.execute("migrate-continue", state="pre-switchover")
        except (QmpError, QmpClosed) as error:
            await self.abort(f"could not continue from pre-switchover: {error}", FailureKind.INTERNAL)

    async def quiesce(self) -> ProgressSnapshot:
        """Return once I/O Quiesce is over (the driver continues by itself) or the migration ended."""
        return await self.wait_until(lambda state: state not in ("init", "copy", "quiesce"))

    async def freeze(self) -> ProgressSnapshot:
        """Return once the target holds a verified paused copy ("ready"), or the migration ended."""
        return await self.wait_until(lambda state: state not in ACTIVE_STATES)

    async def release(self) -> ProgressSnapshot:
        state = self.progress.state
        if state == "ready":
            await self.process.quit()
            self.progress.enter("released")
            self.progress.update(phase=None)
            self._finished(self)
        elif state != "released":
            raise Conflict(f"release needs a migration in state ready, this one is {state}")
        return self.snapshot()

    async def _roll_back(self, state: MigrationState, reason: str) -> ProgressSnapshot:
        current = self.progress.state
        if current == "released":
            raise Conflict("the guest was released after the commit; it runs on the target now")
        if current in ACTIVE_STATES:
            await self.abort(reason, FailureKind.CANCELLED, state)
        elif current == "ready":
            await self._run_guest()
            self.progress.fail(state, reason, FailureKind.CANCELLED, keep_phase=True)
            self._finished(self)
        else:
            await self._run_guest()
        return self.snapshot()

    async def abort(
        self, reason: str, kind: FailureKind, state: MigrationState = "aborted", *, side: Role | None = None
    ) -> None:
        """Stop QEMU's migration, keep the guest running here, record why."""
        if self._ending or self.progress.state not in ACTIVE_STATES:
            return
        self._ending = True
        self.stop_background()
        await send_line(self._control, f"ABORT {kind} {reason}")
        self.close_control()
        with contextlib.suppress(QmpError, QmpClosed):
            await self.qmp.execute("migrate_cancel")
            await self._wait_qemu_settled()
        await self._run_guest()
        log.info("%s: migration %s %s: %s", self.guest_id, self.migration_id, state, reason)
        self.progress.fail(state, reason, kind, side=side, keep_phase=True)
        self._finished(self)

    async def _wait_qemu_settled(self) -> None:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            status = (await self.qmp.execute("query-migrate")).get("status")
            if status in (None, "cancelled", "failed", "completed", "none"):
                return
            await asyncio.sleep(0.02)

    async def _run_guest(self) -> None:
        with contextlib.suppress(QmpError, QmpClosed):
            if not (await self.qmp.execute("query-status"))["running"]:
                await self.qmp.execute("cont")


class TargetMigration(QemuMigration):
    role: Role = "target"

    def __init__(
        self, process: QemuProcess, migration_id: str, limits: PhaseLimits, data_host: str, finished: Finished
    ) -> None:
        super().__init__(process, migration_id, limits, finished)
        self.token = secrets.token_hex(TOKEN_BYTES)
        self._connected = False
        family = socket.AF_INET6 if ":" in data_host else socket.AF_INET
        self._listener = socket.create_server((data_host, 0), family=family)
        self._listener.setblocking(False)
        self.endpoint = Endpoint(host=data_host, port=self._listener.getsockname()[1], token=self.token)

    async def begin(self) -> None:
        capabilities = [{"capability": name, "state": True} for name in ("events", "return-path")]
        await self.qmp.execute("migrate-set-capabilities", capabilities=capabilities)
        self.spawn(self._watch_init_limit())
        self.spawn(self._accept())
        self.spawn(self._watch_process())

    async def _watch_init_limit(self) -> None:
        """Only Init is timed here (waiting for the source); the source times the rest,
        since this side cannot see when the source's Copy ends."""
        limit = self.limits.init_s
        while not self._connected:
            if limit is not None and time.monotonic() - self.progress.phase_started > limit:
                reason = f"the source did not connect within the init limit of {limit:g} s"
                self.spawn(self.abort(reason, FailureKind.TIME_LIMIT))
                return
            await asyncio.sleep(0.05)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while self._control is None or not self._connected:
            connection, peer = await loop.sock_accept(self._listener)
            kind, detail = await self._greeting(connection)
            if kind == b"data" and not self._connected:
                await self._start_incoming(connection)
            elif kind == b"ctrl" and self._control is None:
                mismatch = self._mismatch(detail)
                await send_line(connection, f"NO {mismatch}" if mismatch else "OK")
                self._control = connection
                if mismatch:
                    self.spawn(self.abort(mismatch, FailureKind.REFUSED))
                    return
                self.spawn(self._watch_source())
            else:
                log.warning("%s: refused a data-plane connection from %s: bad token", self.guest_id, peer[0])
                connection.close()
        self._listener.close()

    async def _greeting(self, connection: socket.socket) -> tuple[bytes | None, bytes]:
        """``<token> <kind> [detail]`` with the one-time token (compared in constant time)."""
        try:
            line = await asyncio.wait_for(recv_line(connection), HANDSHAKE_TIMEOUT_S)
        except (TimeoutError, OSError):
            return None, b""
        token, _, rest = line.strip().partition(b" ")
        kind, _, detail = rest.partition(b" ")
        if hmac.compare_digest(token, self.token.encode()) and kind in KINDS:
            return kind, detail
        return None, b""

    def _mismatch(self, source_memory_mib: bytes) -> str | None:
        """QEMU cannot load RAM of another size; say so plainly instead of failing mid-stream."""
        prepared = self.process.workload.memory_mib
        if source_memory_mib and source_memory_mib != str(prepared).encode():
            got = source_memory_mib.decode(errors="replace")
            return f"the target was prepared with {prepared} MiB but the guest has {got} MiB"
        return None

    async def _start_incoming(self, connection: socket.socket) -> None:
        self._connected = True
        try:
            await asyncio.get_running_loop().sock_sendall(connection, b"OK\n")
            await self.qmp.execute("getfd", pass_fd=connection.fileno(), fdname=FD_NAME)
            await self.qmp.execute("migrate-incoming", uri=f"fd:{FD_NAME}")
            self.progress.raise_percent("init", 50)
        except (OSError, QmpError, QmpClosed) as error:
            self.spawn(self.abort(f"cannot start the incoming migration: {error}", FailureKind.INTERNAL))
        finally:
            connection.close()

    async def _watch_source(self) -> None:
        assert self._control is not None
        line = (await recv_line(self._control)).decode(errors="replace").strip()
        if self.progress.state in ACTIVE_STATES:
            word, _, rest = line.partition(" ")
            if word == "ABORT":
                kind, why = abort_line(rest)
            else:
                kind, why = FailureKind.UNREACHABLE, "it closed the control connection"
            self.spawn(self.abort(f"the source aborted: {why}", kind, side="source"))

    async def _watch_process(self) -> None:
        assert self.process.process is not None
        code = await self.process.process.wait()
        if not self._ending and not self.settled:
            reason = f"the target QEMU exited ({code}): {self.process.log_tail()[-200:]}"
            self.spawn(self.abort(reason, FailureKind.INTERNAL))

    async def handle_event(self, event: dict[str, Any]) -> None:
        if event.get("event") != "MIGRATION" or self._ending or self.progress.state not in ACTIVE_STATES:
            return
        status = str(event.get("data", {}).get("status"))
        if status == "completed":
            self.spawn(self._verify())
        elif status == "failed":
            self.spawn(self.abort("the incoming migration failed", FailureKind.INTERNAL))
        elif status in ("setup", "active"):
            self.progress.enter(QEMU_STATES[status])

    async def _verify(self) -> None:
        """QEMU loaded the stream and keeps the guest paused: hash it, tell the source."""
        try:
            target_digest = await self.digest()
        except (QmpError, QmpClosed, OSError) as error:
            await self.abort(f"could not hash the received memory: {error}", FailureKind.INTERNAL)
            return
        self.progress.update(target_digest=target_digest)
        self.progress.enter("ready")
        await send_line(self._control, f"READY {target_digest}")

    async def quiesce(self) -> ProgressSnapshot:
        raise Conflict("quiesce is a source command")

    async def freeze(self) -> ProgressSnapshot:
        raise Conflict("freeze is a source command")

    async def release(self) -> ProgressSnapshot:
        raise Conflict("release is a source command; the target discards")

    async def resume(self) -> ProgressSnapshot:
        if self.progress.state == "ready":
            await self.qmp.execute("cont")
            self.progress.enter("completed")
            self.stop_background()
            self.close_control()
            self._finished(self)
        elif self.progress.state != "completed":
            raise Conflict(f"resume needs a migration in state ready, this one is {self.progress.state}")
        return self.snapshot()

    async def discard(self) -> ProgressSnapshot:
        if self.progress.state == "completed":
            raise Conflict(f"migration {self.migration_id} completed: the guest runs here")
        if self.progress.state not in TERMINAL_STATES:
            current = self.progress.current
            reason = current.error or "discarded by the control plane"
            await self._drop("discarded", reason, current.failure_kind or FailureKind.CANCELLED)
        return self.snapshot()

    async def cancel(self) -> ProgressSnapshot:
        if self.progress.state in ACTIVE_STATES or self.progress.state == "ready":
            await self._drop("cancelled", "cancelled by the control plane", FailureKind.CANCELLED)
        return self.snapshot()

    async def abort(
        self, reason: str, kind: FailureKind, state: MigrationState = "aborted", *, side: Role | None = None
    ) -> None:
        if self._ending or self.progress.state not in ACTIVE_STATES:
            return
        await self._drop(state, reason, kind, side=side)

    async def _drop(
        self, state: MigrationState, reason: str, kind: FailureKind, *, side: Role | None = None
    ) -> None:
        self._ending = True
        self.stop_background()
        self._listener.close()
        await send_line(self._control, f"ABORT {kind} {reason}")
        self.close_control()
        await self.process.kill()
        log.info("%s: incoming migration %s %s: %s", self.guest_id, self.migration_id, state, reason)
        self.progress.fail(state, reason, kind, side=side, keep_phase=True)
        self._finished(self)
