"""Both sides of a QEMU live migration, driven over QMP and mapped onto the agent's phases.

The data plane is one TCP connection from the source agent to the target agent. QEMU cannot
check a token, so the agents do it before QEMU sees the socket:

1. The target agent listens on a random port and accepts a connection only if its first line
   is the one-time token (compared in constant time); it answers ``OK`` and hands the socket
   to the paused target QEMU (``getfd`` + ``migrate-incoming fd:``), then stops listening.
2. The source agent connects, sends the token, waits for ``OK`` and hands its end to the
   source QEMU (``getfd`` + ``migrate fd:``). QEMU's own stream then flows with no copy
   through the agents.

States follow QEMU's MIGRATION events (polling misses short states); numbers come from
``query-migrate``. With ``pause-before-switchover`` the source stops in ``pre-switchover``
(the vCPUs are already stopped there: QEMU drains and flushes its block devices as it stops
them), which is I/O Quiesce; ``freeze`` lets it continue into ``device`` (Frozen). With
``return-path`` the source reports ``completed`` only after the target loaded the stream, so
the source's "ready" means the target verified and holds a paused copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import select
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..driver import (
    ACTIVE_STATES,
    DEFAULT_LIMITS,
    TERMINAL_STATES,
    Conflict,
    Endpoint,
    MigrationParams,
    MigrationState,
    PhaseLimits,
    ProgressSnapshot,
    Role,
)
from .qemu_process import QemuProcess
from .qemu_progress import QEMU_STATES, Progress
from .qemu_qmp import QmpClient, QmpClosed, QmpError

log = logging.getLogger(__name__)

TOKEN_BYTES = 16
HANDSHAKE_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.1
SETTLE_TIMEOUT_S = 10.0
FD_NAME = "migration"

Finished = Callable[["QemuMigration"], None]


class MigrationAborted(Exception):
    pass


class QemuMigration:
    """What both roles share: progress, the phase-limit watchdog, background tasks."""

    role: Role

    def __init__(
        self, process: QemuProcess, migration_id: str, limits: PhaseLimits, finished: Finished
    ) -> None:
        self.process = process
        self.migration_id = migration_id
        self.guest_name = process.name
        self.limits: PhaseLimits = {**DEFAULT_LIMITS, **limits}
        self.progress = Progress(migration_id, self.role, process.name)
        self._finished = finished
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ending = False

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
        while not done(current["state"]):
            current = await self.next_change(current["seq"])
        return current

    async def watch_phase_limits(self) -> None:
        while self.progress.state in ACTIVE_STATES:
            phase = self.progress.phase
            limit = self.limits.get(f"{phase}_s")  # type: ignore[misc]
            if limit is not None and time.monotonic() - self.progress.phase_started > limit:
                self.spawn(self.abort(f"the {phase} phase ran over its {limit:g} s limit"))
                return
            await asyncio.sleep(0.05)

    def stop_background(self) -> None:
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    async def abort(self, reason: str, state: MigrationState = "aborted") -> None:
        raise NotImplementedError

    async def handle_event(self, event: dict[str, Any]) -> None:
        raise NotImplementedError


class SourceMigration(QemuMigration):
    role: Role = "source"

    def __init__(
        self,
        process: QemuProcess,
        migration_id: str,
        target: Endpoint,
        params: MigrationParams,
        finished: Finished,
    ) -> None:
        super().__init__(process, migration_id, params.get("limits") or {}, finished)
        self.target = target
        self.params = params
        self._continue_requested = False
        self._quiesced = False
        self._data_socket: socket.socket | None = None

    def begin(self) -> None:
        self.spawn(self.watch_phase_limits())
        self.spawn(self._run())

    async def _run(self) -> None:
        try:
            data_socket = await self._connect_target()
            self.progress.raise_percent("init", 50)
            await self._configure()
            # QEMU gets its own copy; this one is kept only to notice the target going away.
            self._data_socket = data_socket
            await self.qmp.execute("getfd", pass_fd=data_socket.fileno(), fdname=FD_NAME)
            await self.qmp.execute("migrate", uri=f"fd:{FD_NAME}")
            await self._poll_numbers()
        except (MigrationAborted, QmpError, QmpClosed, OSError, TimeoutError) as error:
            await self.abort(str(error) or type(error).__name__)

    async def _connect_target(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (self.target["host"], int(self.target["port"])))
            await loop.sock_sendall(sock, self.target["token"].encode() + b"\n")
            answer = await asyncio.wait_for(loop.sock_recv(sock, 3), HANDSHAKE_TIMEOUT_S)
        except BaseException:
            sock.close()
            raise
        if answer != b"OK\n":
            sock.close()
            raise MigrationAborted("the target refused the data-plane connection")
        return sock

    async def _configure(self) -> None:
        capabilities = [
            {"capability": name, "state": True}
            for name in ("events", "pause-before-switchover", "return-path")
        ]
        await self.qmp.execute("migrate-set-capabilities", capabilities=capabilities)
        bandwidth = self.params.get("bandwidth_mbps")
        parameters: dict[str, Any] = {"downtime_limit": int(self.params.get("downtime_ms", 300))}
        # max-bandwidth 0 means unlimited in QEMU 10; bandwidth_mbps is in megabits per second.
        parameters["max_bandwidth"] = int(bandwidth * 1_000_000 / 8) if bandwidth else 0
        await self.qmp.execute("migrate-set-parameters", **parameters)

    async def _poll_numbers(self) -> None:
        max_rounds = int(self.params.get("max_rounds", 30))
        while self.progress.state in ACTIVE_STATES:
            info = await self.qmp.execute("query-migrate")
            self.progress.apply_query_migrate(info)
            if self.progress.state == "copy" and self.progress.snapshot()["round"] > max_rounds:
                raise MigrationAborted(f"memory did not converge within {max_rounds} rounds")
            if self._target_hung_up():
                # QEMU notices a dead peer only when it writes, and in pre-switchover it does not.
                raise MigrationAborted("the target closed the data-plane connection")
            await asyncio.sleep(POLL_INTERVAL_S)

    def _target_hung_up(self) -> bool:
        if self._data_socket is None:
            return False
        poller = select.poll()
        poller.register(self._data_socket.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))

    def close_data_socket(self) -> None:
        if self._data_socket is not None:
            self._data_socket.close()
            self._data_socket = None

    async def handle_event(self, event: dict[str, Any]) -> None:
        if event.get("event") != "MIGRATION" or self._ending or self.settled:
            return
        status = str(event.get("data", {}).get("status"))
        if status == "pre-switchover":
            self.progress.update(converged=True)
        if status in ("failed", "cancelled"):
            reason = await self._qemu_error() or f"QEMU reported the migration {status}"
            self.spawn(self.abort(reason))
        elif status == "completed":
            await self._on_completed()
        elif status in QEMU_STATES:
            self.progress.enter(QEMU_STATES[status])
            if status == "pre-switchover" and self._continue_requested:
                self.spawn(self._continue())

    async def _qemu_error(self) -> str | None:
        with contextlib.suppress(QmpError, QmpClosed):
            return (await self.qmp.execute("query-migrate")).get("error-desc")
        return None

    async def _on_completed(self) -> None:
        with contextlib.suppress(QmpError, QmpClosed):
            self.progress.apply_query_migrate(await self.qmp.execute("query-migrate"))
        self.progress.enter("ready")
        self.stop_background()
        self.close_data_socket()

    async def quiesce(self) -> ProgressSnapshot:
        """Wait for QEMU to stop in pre-switchover; nothing more to do for I/O (see module doc)."""
        snapshot = await self.wait_until(lambda state: state not in ("init", "copy"))
        if snapshot["state"] == "quiesce" and not self._quiesced:
            self._quiesced = True
            devices = await self.qmp.execute("query-block")
            log.info("%s: quiesced %d block device(s) in pre-switchover", self.guest_name, len(devices))
            self.progress.raise_percent("quiesce", 50)
        return self.snapshot()

    async def freeze(self) -> ProgressSnapshot:
        """Let QEMU switch over (Frozen) and return once the target holds a verified paused copy."""
        if self.progress.state in ACTIVE_STATES:
            self._continue_requested = True
            if self.progress.state == "quiesce":
                await self._continue()
        return await self.wait_until(lambda state: state not in ACTIVE_STATES)

    async def _continue(self) -> None:
        if self.progress.state != "quiesce" or self._ending:
            return
        self.progress.raise_percent("quiesce", 100)
        try:
            await self.qmp.execute("migrate-continue", state="pre-switchover")
        except QmpError as error:
            log.info("%s: migrate-continue refused: %s", self.guest_name, error)

    async def resume(self) -> ProgressSnapshot:
        """Make sure the guest runs here; from "ready" that is the control plane's abort."""
        if self.progress.state == "ready":
            await self._run_guest()
            self.progress.fail("aborted", "aborted by the control plane after the target was ready")
            self._finished(self)
        elif self.settled and self.progress.state != "released":
            await self._run_guest()
        elif not self.settled:
            raise Conflict(
                f"migration {self.migration_id} is still in {self.progress.state}; cancel it first"
            )
        return self.snapshot()

    async def release(self) -> ProgressSnapshot:
        if self.progress.state == "ready":
            await self.process.quit()
            self.progress.enter("released")
            self._finished(self)
        elif self.progress.state != "released":
            raise Conflict(f"cannot release migration {self.migration_id} in state {self.progress.state}")
        return self.snapshot()

    async def cancel(self) -> ProgressSnapshot:
        if self.progress.state in ACTIVE_STATES:
            await self.abort("cancelled", state="cancelled")
        elif self.progress.state == "ready":
            raise Conflict(
                f"migration {self.migration_id} is ready: the control plane decides (resume/release)"
            )
        return self.snapshot()

    async def abort(self, reason: str, state: MigrationState = "aborted") -> None:
        """Stop QEMU's migration, keep the guest running here, record why."""
        if self._ending or self.progress.state not in ACTIVE_STATES:
            return
        self._ending = True
        self.stop_background()
        with contextlib.suppress(QmpError, QmpClosed):
            await self.qmp.execute("migrate_cancel")
            await self._wait_qemu_settled()
        self.close_data_socket()
        await self._run_guest()
        log.info("%s: migration %s %s: %s", self.guest_name, self.migration_id, state, reason)
        self.progress.fail(state, reason)
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
        self._listener = socket.create_server((data_host, 0))
        self._listener.setblocking(False)
        self.endpoint: Endpoint = {
            "host": data_host,
            "port": self._listener.getsockname()[1],
            "token": self.token,
        }

    async def begin(self) -> None:
        capabilities = [{"capability": name, "state": True} for name in ("events", "return-path")]
        await self.qmp.execute("migrate-set-capabilities", capabilities=capabilities)
        self.spawn(self.watch_phase_limits())
        self.spawn(self._accept())
        self.spawn(self._watch_process())

    async def watch_phase_limits(self) -> None:
        """Only Init is timed here (waiting for the source); the source times the rest, since
        this side cannot see when the source's Copy ends."""
        limit = self.limits.get("init_s")
        while self.progress.state == "init" and not self._connected:
            if limit is not None and time.monotonic() - self.progress.phase_started > limit:
                self.spawn(self.abort(f"the source did not connect within the {limit:g} s init limit"))
                return
            await asyncio.sleep(0.05)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, peer = await loop.sock_accept(self._listener)
            if await self._token_matches(connection):
                break
            log.warning("%s: refused a data-plane connection from %s: wrong token", self.guest_name, peer[0])
            connection.close()
        self._listener.close()
        self._connected = True
        try:
            await loop.sock_sendall(connection, b"OK\n")
            await self.qmp.execute("getfd", pass_fd=connection.fileno(), fdname=FD_NAME)
            await self.qmp.execute("migrate-incoming", uri=f"fd:{FD_NAME}")
            self.progress.raise_percent("init", 50)
        except (OSError, QmpError, QmpClosed) as error:
            self.spawn(self.abort(f"cannot start the incoming migration: {error}"))
        finally:
            connection.close()

    async def _token_matches(self, connection: socket.socket) -> bool:
        expected = self.token.encode() + b"\n"
        received = b""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                while len(received) < len(expected):
                    chunk = await loop.sock_recv(connection, len(expected) - len(received))
                    if not chunk:
                        break
                    received += chunk
        except (TimeoutError, OSError):
            return False
        return hmac.compare_digest(received, expected)

    async def _watch_process(self) -> None:
        assert self.process.process is not None
        code = await self.process.process.wait()
        if not self._ending and not self.settled:
            self.spawn(self.abort(f"the target QEMU exited ({code}): {self.process.log_tail()[-200:]}"))

    async def handle_event(self, event: dict[str, Any]) -> None:
        if event.get("event") != "MIGRATION" or self._ending or self.settled:
            return
        status = str(event.get("data", {}).get("status"))
        if status == "completed":
            self.progress.enter("ready")
        elif status == "failed":
            self.spawn(self.abort("the incoming migration failed"))
        elif status in ("setup", "active"):
            self.progress.enter(QEMU_STATES[status])

    async def quiesce(self) -> ProgressSnapshot:
        return self.snapshot()

    async def freeze(self) -> ProgressSnapshot:
        return self.snapshot()

    async def resume(self) -> ProgressSnapshot:
        if self.progress.state == "ready":
            await self.qmp.execute("cont")
            self.progress.enter("completed")
            self.stop_background()
            self._finished(self)
        elif self.progress.state != "completed":
            raise Conflict(f"cannot resume migration {self.migration_id} in state {self.progress.state}")
        return self.snapshot()

    async def discard(self) -> ProgressSnapshot:
        if self.progress.state == "completed":
            raise Conflict(f"migration {self.migration_id} completed: the guest runs here")
        if self.progress.state != "discarded":
            await self._drop("discarded", self.progress.snapshot()["error"])
        return self.snapshot()

    async def release(self) -> ProgressSnapshot:
        raise Conflict("release is a source command")

    async def cancel(self) -> ProgressSnapshot:
        if self.progress.state in ACTIVE_STATES:
            await self._drop("cancelled", "cancelled")
        return self.snapshot()

    async def abort(self, reason: str, state: MigrationState = "aborted") -> None:
        if self._ending or self.progress.state not in ACTIVE_STATES:
            return
        await self._drop(state, reason)

    async def _drop(self, state: MigrationState, reason: str | None) -> None:
        self._ending = True
        self.stop_background()
        self._listener.close()
        await self.process.kill()
        log.info("%s: incoming migration %s %s: %s", self.guest_name, self.migration_id, state, reason)
        self.progress.fail(state, reason)
        self._finished(self)
