"""The target side of a QEMU live migration (see ``migration`` for the protocol between the agents)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from agentprotocol import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Endpoint,
    FailureKind,
    MigrationState,
    PhaseLimits,
    ProgressSnapshot,
    Role,
)
from hostagent.driver import Conflict
from hostagent.drivers.qemu.diskmirror import DiskExport, MirrorFailed, TargetVolume
from hostagent.drivers.qemu.migration import (
    FD_NAME,
    HANDSHAKE_TIMEOUT_S,
    KINDS,
    TOKEN_BYTES,
    Finished,
    QemuMigration,
    abort_line,
    multifd_settings,
    recv_line,
    relay,
    send_line,
)
from hostagent.drivers.qemu.process import QemuProcess
from hostagent.drivers.qemu.qmp import QmpClosed, QmpError
from hostagent.drivers.qemu.states import QEMU_STATES
from hostagent.drivers.qemu.tls import use_tls
from hostagent.resources import mark_committed

MAX_PENDING_HANDSHAKES = 32  # connections greeting at once; more are closed at once
UNEXPORT_TIMEOUT_S = 5.0  # at resume, how long the source's mirror may take to let go of the exports
log = logging.getLogger(__name__)


class TargetMigration(QemuMigration):
    role: Role = "target"

    def __init__(
        self,
        process: QemuProcess,
        migration_id: str,
        limits: PhaseLimits,
        data_host: str,
        finished: Finished,
        channels: int = 1,
        *,
        tls_dir: Path | None = None,
        mirror: list[str] | None = None,
        volumes: list[Path] | None = None,
        places: dict[str, TargetVolume] | None = None,
    ) -> None:
        """``channels`` > 1: QEMU's multifd with that many channels (the source's must be the same).

        ``mirror``: the devices whose new, empty volumes (``volumes``, allocated by the driver for this
        migration) the source mirrors into over this QEMU's NBD server (``diskmirror``); the volumes
        are deleted if the migration does not complete here, kept (their markers removed) if it does.
        ``places``: where each device's volume is (this host's name and the pool), told to the source.
        """
        super().__init__(process, migration_id, limits, finished)
        self.channels = channels
        # Data connections: one handed to QEMU, or with multifd the main channel + one per channel relayed.
        self._data_expected = 1 if channels <= 1 else channels + 1
        self._data_joined = 0
        self._incoming: asyncio.Future[str] | None = None  # the Unix socket QEMU listens on (multifd)
        self._relay_dir: str | None = None
        self.tls_dir = tls_dir  # None: the pair's policy is "off", the stream is plain TCP
        self.mirror = list(mirror or [])
        self.volumes = list(volumes or [])
        self.places = dict(places or {})
        self.export: DiskExport | None = None
        self.token = secrets.token_hex(TOKEN_BYTES)
        self._connected = False
        self._admitting: set[asyncio.Task[None]] = set()
        self._accept_task: asyncio.Task[None] | None = None
        family = socket.AF_INET6 if ":" in data_host else socket.AF_INET
        self._listener = socket.create_server((data_host, 0), family=family)
        self._listener.setblocking(False)
        self.endpoint = Endpoint(host=data_host, port=self._listener.getsockname()[1], token=self.token)

    async def begin(self) -> None:
        capabilities = [{"capability": name, "state": True} for name in ("events", "return-path")]
        multifd_capabilities, multifd_parameters = multifd_settings(self.channels)
        await self.qmp.execute("migrate-set-capabilities", capabilities=capabilities + multifd_capabilities)
        if multifd_parameters:
            await self.qmp.execute("migrate-set-parameters", **multifd_parameters)
        if self.tls_dir is not None:  # a new QEMU: without it, its migration is plain already
            await use_tls(self.qmp, "server", self.tls_dir)
        if self.mirror:
            self.export = DiskExport(self.qmp, self.mirror, tls=self.tls_dir is not None)
            await self.export.start()
        self.spawn(self._watch_init_limit())
        self._accept_task = self.spawn(self._accept())
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
        """Each connection proves itself on its own (bounded by ``HANDSHAKE_TIMEOUT_S`` and
        ``LINE_LIMIT``): a silent or wrong peer is dropped alone and never delays the real source."""
        loop = asyncio.get_running_loop()
        try:
            await self._accept_until_both_in(loop)
        finally:
            # Closed only here, after the pending accept was cancelled: a socket closed under a
            # registered accept leaves the loop watching a file descriptor number that a later
            # connection (an API request) reuses, whose handshake then never completes.
            self._listener.close()

    def _all_in(self) -> bool:
        """The control connection, every data connection and every mirrored disk's have joined."""
        disks_in = self.export is None or len(self.export.joined) == len(self.mirror)
        return self._control is not None and self._data_joined >= self._data_expected and disks_in

    async def _accept_until_both_in(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._all_in():
            connection, peer = await loop.sock_accept(self._listener)
            if len(self._admitting) >= MAX_PENDING_HANDSHAKES:
                log.warning(
                    "%s: refused a data-plane connection from %s: too many at once", self.guest_id, peer[0]
                )
                connection.close()
                continue
            task = self.spawn(self._admit(connection, peer))
            self._admitting.add(task)
            task.add_done_callback(self._admitting.discard)

    async def _admit(self, connection: socket.socket, peer: Any) -> None:
        """One connection's greeting: the data channel goes to QEMU, the control one is kept."""
        kind, detail = await self._greeting(connection)
        if kind == b"data" and self._data_joined < self._data_expected:
            self._data_joined += 1
            if self.channels > 1:
                await self._relay_incoming(connection)
            else:
                await self._start_incoming(connection)
        elif kind == b"ctrl" and self._control is None:
            mismatch = self._mismatch(detail)
            await send_line(connection, f"NO {mismatch}" if mismatch else "OK")
            self._control = connection
            if mismatch:
                self.spawn(self.abort(mismatch, FailureKind.REFUSED))
                return
            self.spawn(self._watch_source())
        elif kind == b"nbd" and self.export is not None and detail.decode() in self.mirror:
            await self._relay_export(connection, detail.decode())
        else:
            log.warning("%s: refused a data-plane connection from %s: bad token", self.guest_id, peer[0])
            connection.close()
        if self._all_in() and self._accept_task is not None:
            self._accept_task.cancel()

    async def _relay_export(self, connection: socket.socket, device: str) -> None:
        """A mirrored disk's connection (``<token> nbd <device>``, once per disk) relayed to this QEMU's
        NBD server: the source's Copy began. The greeting's answer says where the volume is
        (``TargetVolume.answer``)."""
        assert self.export is not None
        if device in self.export.joined:
            log.warning("%s: refused a second connection for the export of disk %s", self.guest_id, device)
            connection.close()
            return
        self.export.joined.add(device)
        self._connected = True
        self.enter_forward("copy")
        try:
            qemu = await self.export.connect()
        except OSError as error:
            connection.close()
            reason = f"cannot reach the NBD server of disk {device}: {error}"
            self.spawn(self.abort(reason, FailureKind.INTERNAL))
            return
        place = self.places.get(device)
        answer = place.answer() if place is not None else "OK"
        try:
            await asyncio.get_running_loop().sock_sendall(connection, answer.encode() + b"\n")
        except OSError:
            qemu.close()
            connection.close()
            return
        self.spawn(relay(connection, qemu))

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

    async def _relay_incoming(self, connection: socket.socket) -> None:
        """Multifd: the first data connection starts QEMU's incoming migration on a Unix socket; each
        data connection is relayed to a connection of its own to that socket."""
        self._connected = True
        loop = asyncio.get_running_loop()
        if self._incoming is None:
            self._incoming = loop.create_future()
            try:
                self._relay_dir = tempfile.mkdtemp(prefix="hostagent-multifd-")  # 0700
                path = os.path.join(self._relay_dir, "migration.sock")
                await self.qmp.execute("migrate-incoming", uri=f"unix:{path}")
                self._incoming.set_result(path)
                self.progress.update(streams=self.channels)
                self.progress.raise_percent("init", 50)
            except (OSError, QmpError, QmpClosed) as error:
                self._incoming.set_exception(error)
        try:
            path = await asyncio.shield(self._incoming)
            qemu = socket.socket(socket.AF_UNIX)
            qemu.setblocking(False)
            try:
                await loop.sock_connect(qemu, path)
                await loop.sock_sendall(connection, b"OK\n")
            except BaseException:
                qemu.close()
                raise
        except (OSError, QmpError, QmpClosed) as error:
            connection.close()
            self.spawn(self.abort(f"cannot start the incoming migration: {error}", FailureKind.INTERNAL))
            return
        log.info(
            "%s: multifd: relaying data connection %d of %d (main channel + %d multifd channels)",
            self.guest_id,
            self._data_joined,
            self._data_expected,
            self.channels,
        )
        self.spawn(relay(connection, qemu))

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
            self.enter_forward(QEMU_STATES[status])

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
            if self.export is not None:
                try:  # never run while the source's mirror can still write into the disks
                    await self.export.stop(UNEXPORT_TIMEOUT_S)
                except MirrorFailed as error:
                    raise Conflict(f"cannot resume yet: {error}") from None
            await self.qmp.execute("cont")
            for volume in self.volumes:
                mark_committed(volume)  # the guest's disks now: no restart of the agent removes them
            self.progress.enter("completed")
            self.stop_background()
            self.close_control()
            self._finished(self)
            await self._after_switchover()
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
        if self._relay_dir is not None:
            shutil.rmtree(self._relay_dir, ignore_errors=True)
        await send_line(self._control, f"ABORT {kind} {reason}")
        self.close_control()
        await self.process.kill()
        if self.export is not None:
            self.export.close()
        self._remove_volumes()
        log.info("%s: incoming migration %s %s: %s", self.guest_id, self.migration_id, state, reason)
        self.progress.fail(state, reason, kind, side=side, keep_phase=True)
        self._finished(self)

    def _remove_volumes(self) -> None:
        """Delete the volumes allocated for this migration's mirror, and their markers (idempotent)."""
        for volume in self.volumes:
            volume.unlink(missing_ok=True)
            mark_committed(volume)  # the marker goes with its volume
        if self.volumes:
            names = ", ".join(volume.name for volume in self.volumes)
            log.info("%s: deleted the mirror's volumes %s", self.guest_id, names)
        self.volumes = []
