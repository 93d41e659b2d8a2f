"""The source side of a QEMU live migration (see ``migration`` for the protocol between the agents)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from agentprotocol import (
    ACTIVE_STATES,
    MAX_STREAMS,
    Endpoint,
    FailureKind,
    MigrationParams,
    MigrationState,
    ParamsChange,
    ProgressSnapshot,
    Role,
)
from hostagent.driver import Conflict, MigrationAborted, SourceAbortCommands
from hostagent.drivers.qemu.diskmirror import MirrorFailed, SourceMirror, TargetVolume
from hostagent.drivers.qemu.migration import (
    FD_NAME,
    HANDSHAKE_TIMEOUT_S,
    POLL_INTERVAL_S,
    SETTLE_TIMEOUT_S,
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
from hostagent.drivers.qemu.quiesce import IoQuiesce, enable_request_tracing, io_quiesce
from hostagent.drivers.qemu.states import QEMU_STATES, apply_query_migrate
from hostagent.drivers.qemu.tls import use_plain, use_tls
from hostagent.resources import delete_volumes

log = logging.getLogger(__name__)
FORCED_DOWNTIME_MS = 600_000  # "switch over now": a downtime limit no remaining memory exceeds
MIB = 1 << 20


class SourceMigration(QemuMigration, SourceAbortCommands):
    role: Role = "source"

    def __init__(
        self,
        process: QemuProcess,
        migration_id: str,
        target: Endpoint,
        params: MigrationParams,
        finished: Finished,
        channels: int = 1,
        *,
        tls_dir: Path | None = None,
        mirror: list[str] | None = None,
        volumes: dict[str, Path] | None = None,
        guest_name: str = "",
    ) -> None:
        """``channels`` > 1: QEMU's multifd with that many channels (the target's must be the same).

        ``mirror``: the devices of the guest's disks on local pools, mirrored to the target's new
        volumes in Copy before the memory moves (``diskmirror``); None or empty: no mirror.
        ``volumes``: each mirrored device's volume here (its file), deleted at the release
        (``_delete_mirrored_volumes``); ``guest_name``: the guest's name, for words and logs."""
        super().__init__(process, migration_id, params.limits, finished)
        self.channels = channels
        self._relay_dir: str | None = None
        self.tls_dir = tls_dir  # None: the pair's policy is "off", the stream is plain TCP
        self.target = target
        self.params = params
        self.allowed_downtime_ms = params.downtime_ms
        self._last_remaining: int | None = None
        self._target_ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._started_wall = time.time()
        self.io_quiesce: IoQuiesce | None = None  # the switchover's drain, once measured (``quiesce``)
        self.guest_name = guest_name or self.guest_id
        self.volumes = dict(volumes or {})
        self.mirror: SourceMirror | None = None
        if mirror:
            hostname = target.host if tls_dir is not None else None
            self.mirror = SourceMirror(
                self.qmp, mirror, tls_hostname=hostname, speed=self._cap_bytes_s(), guest=self.guest_name
            )
        self._mirror_finished = False

    def _cap_bytes_s(self) -> int:
        """The pair's cap in bytes/s (``bandwidth_mbps`` is megabits per second), 0 for none."""
        bandwidth = self.params.bandwidth_mbps
        return int(bandwidth * 125_000) if bandwidth else 0

    def begin(self) -> None:
        self.spawn(self._watch_phase_limits())
        self.spawn(self._run())

    async def _run(self) -> None:
        try:
            self._control = await self._connect("ctrl", str(self.process.workload.memory_mib))
            self.spawn(self._watch_target())
            self.progress.raise_percent("init", 50)
            await self._configure()
            await self._secure()
            if self.mirror is not None:
                await self._mirror_disks(self.mirror)
            if self.channels > 1:
                await self._start_multifd()
            else:
                data = await self._connect("data")
                try:
                    await self.qmp.execute("getfd", pass_fd=data.fileno(), fdname=FD_NAME)
                finally:
                    data.close()  # QEMU holds its own copy now
                await self.qmp.execute("migrate", uri=f"fd:{FD_NAME}")
            self.progress.update(streams=self.channels)
            await self._poll_numbers()
        except MigrationAborted as error:
            await self.abort(str(error), error.kind, side=error.side)
        except (OSError, TimeoutError) as error:
            await self.abort(str(error) or type(error).__name__, FailureKind.UNREACHABLE)
        except (QmpError, QmpClosed) as error:
            await self.abort(str(error) or type(error).__name__, FailureKind.INTERNAL)

    async def _start_multifd(self) -> None:
        """QEMU migrates to a Unix socket of this agent's; each of its connections (the main channel,
        then one per multifd channel) is relayed over a ``data`` connection of its own to the target."""
        self._relay_dir = tempfile.mkdtemp(prefix="hostagent-multifd-")  # 0700: only this user connects
        path = os.path.join(self._relay_dir, "migration.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(MAX_STREAMS + 1)
        listener.setblocking(False)
        self.spawn(self._relay_channels(listener))
        await self.qmp.execute("migrate", uri=f"unix:{path}")  # TLS end to end, through the relay

    async def _mirror_disks(self, mirror: SourceMirror) -> None:
        """Copy's first part (``diskmirror``): each local disk's NBD connection handed to QEMU (Init),
        then every ``blockdev-mirror`` (Copy) until each job is actively synced in write-blocking
        mode. Raises MigrationAborted (REFUSED: QEMU could not open the target's export, e.g. its
        certificate; INTERNAL: a job failed, on the target's side if its pool filled up), OSError."""
        for device in mirror.devices:
            sock, said = await self._handshake("nbd", device)
            try:
                await mirror.attach(device, sock, TargetVolume.from_answer(said))
            except QmpError as error:
                raise MigrationAborted(
                    f"QEMU could not open the target's export of disk {device}: {error.description}",
                    FailureKind.REFUSED,
                ) from None
        self.progress.enter("copy")
        try:
            await mirror.start()
        except QmpError as error:
            reason = f"QEMU refused to mirror the disks: {error.description}"
            raise MigrationAborted(reason, FailureKind.INTERNAL) from None
        self.spawn(self._poll_mirror(mirror))
        synced: asyncio.Future[Any] = asyncio.ensure_future(mirror.synced.wait())
        try:
            await asyncio.wait({synced, mirror.failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            synced.cancel()
        if not mirror.synced.is_set():
            raise MigrationAborted(mirror.failed.result(), FailureKind.INTERNAL, side=mirror.failed_side)
        log.info(
            "%s: %d disk(s) mirrored and in step (write-blocking) after %.1f s; the memory moves now",
            self.guest_id,
            len(mirror.devices),
            time.monotonic() - mirror.started,
        )

    async def _poll_mirror(self, mirror: SourceMirror) -> None:
        """The mirror's figures into the snapshot every ``POLL_INTERVAL_S`` until Frozen."""
        while self.progress.state in ("init", "copy", "quiesce") and not self._ending:
            try:
                fields = await mirror.poll()
            except (QmpError, QmpClosed):
                return
            self.progress.update(**fields)
            self._raise_copy_percent()
            await asyncio.sleep(POLL_INTERVAL_S)

    def _raise_copy_percent(self) -> None:
        """With a mirror, Copy's percent counts disk and memory bytes together (the memory's total is
        the guest's size until QEMU's migration reports its own)."""
        current = self.progress.current
        if self.mirror is None or current.state != "copy":
            return
        memory_total = current.bytes_total or self.process.workload.memory_mib * MIB
        memory_done = current.bytes_total - current.bytes_remaining if current.bytes_total else 0
        total = current.disk_bytes_total + memory_total
        if total:
            done = current.disk_bytes_sent + memory_done
            self.progress.raise_percent("copy", min(99, 100 * done / total))

    async def _relay_channels(self, listener: socket.socket) -> None:
        """Relay QEMU's main channel and its ``channels`` multifd channels; a failure aborts."""
        loop = asyncio.get_running_loop()
        try:
            for _ in range(self.channels + 1):
                channel, _ = await loop.sock_accept(listener)
                channel.setblocking(False)
                try:
                    data = await self._connect("data")
                except BaseException:
                    channel.close()
                    raise
                self.spawn(relay(channel, data))
        except MigrationAborted as error:
            await self.abort(str(error), error.kind)
        except (OSError, TimeoutError) as error:
            reason = f"a multifd channel could not reach the target: {error}"
            await self.abort(reason, FailureKind.UNREACHABLE)
        finally:
            listener.close()
            if self._relay_dir is not None:
                shutil.rmtree(self._relay_dir, ignore_errors=True)

    async def _connect(self, kind: str, detail: str = "") -> socket.socket:
        """A ``kind`` ("ctrl" or "data") connection to the target's endpoint, its handshake answered OK
        (``_handshake``)."""
        sock, _ = await self._handshake(kind, detail)
        return sock

    async def _handshake(self, kind: str, detail: str = "") -> tuple[socket.socket, bytes]:
        """A ``kind`` ("ctrl", "data" or "nbd") connection to the target's endpoint, its handshake
        answered OK, and what followed the OK (an "nbd" one's: ``diskmirror.TargetVolume``; else b"").

        Raises MigrationAborted: REFUSED if the target said no, UNREACHABLE (naming the endpoint) if it
        did not answer the handshake within ``HANDSHAKE_TIMEOUT_S``; OSError if it could not connect.
        """
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in self.target.host else socket.AF_INET)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (self.target.host, self.target.port))
            await loop.sock_sendall(sock, f"{self.target.token} {kind} {detail}".strip().encode() + b"\n")
            answer = await asyncio.wait_for(recv_line(sock), HANDSHAKE_TIMEOUT_S)
        except TimeoutError:
            # Found by the QEMU soak (a stalled link in Init): the alert said only "TimeoutError".
            sock.close()
            raise MigrationAborted(
                f"the target's data plane at {self.target.host}:{self.target.port} did not answer the "
                f"{kind} connection's handshake within {HANDSHAKE_TIMEOUT_S:g} s",
                FailureKind.UNREACHABLE,
            ) from None
        except BaseException:
            sock.close()
            raise
        if answer != b"OK\n" and not answer.startswith(b"OK "):
            sock.close()
            reason = answer[3:].decode(errors="replace").strip() if answer.startswith(b"NO ") else ""
            raise MigrationAborted(
                f"the target refused the data-plane connection{': ' if reason else ''}{reason}",
                FailureKind.REFUSED,
            )
        return sock, answer[3:].strip()

    async def _configure(self) -> None:
        """The policy as QEMU's own capabilities and parameters (QEMU's qapi/migration.json)."""
        params = self.params
        names = ("events", "pause-before-switchover", "return-path")
        capabilities = [{"capability": name, "state": True} for name in names]
        capabilities.append({"capability": "auto-converge", "state": params.auto_converge})
        multifd_capabilities, multifd_parameters = multifd_settings(self.channels)
        await self.qmp.execute("migrate-set-capabilities", capabilities=capabilities + multifd_capabilities)
        if multifd_parameters:
            await self.qmp.execute("migrate-set-parameters", **multifd_parameters)
        if self.process.machine.disks:
            await enable_request_tracing(self.qmp)  # to measure I/O Quiesce's drain (``quiesce``)
        bandwidth = params.bandwidth_mbps
        # bandwidth_mbps is megabits per second; QEMU's max-bandwidth is bytes per second, 0 = unlimited.
        await self.qmp.execute(
            "migrate-set-parameters",
            downtime_limit=params.downtime_ms,
            max_bandwidth=int(bandwidth * 125_000) if bandwidth else 0,
            cpu_throttle_initial=params.throttle_initial_pct,
            cpu_throttle_increment=params.throttle_increment_pct,
            max_cpu_throttle=params.throttle_max_pct,
        )
        self.allowed_downtime_ms = params.downtime_ms

    async def _secure(self) -> None:
        """QEMU's TLS to the target under "required" (``tls``), checking its certificate's name."""
        if self.tls_dir is None:
            await use_plain(self.qmp)
        else:
            await use_tls(self.qmp, "client", self.tls_dir, hostname=self.target.host)

    async def change_params(self, change: ParamsChange) -> ProgressSnapshot:
        """An admin's change to the running Copy, as QEMU parameters; switch over now = no downtime limit."""
        if self.progress.state not in ("init", "copy"):
            raise Conflict(f"migration {self.migration_id} is {self.progress.state}; its Copy is over")
        if change.auto_converge is not None and change.auto_converge != self.params.auto_converge:
            # QEMU refuses migrate-set-capabilities while a migration runs ("There's a migration process
            # in progress"), and auto-converge is a capability: refuse before changing anything.
            raise Conflict(
                "QEMU cannot turn auto-converge on or off during a migration; it is "
                f"{'on' if self.params.auto_converge else 'off'} for this one (set it in the policy before "
                "starting, or raise the allowed downtime / switch over now instead)"
            )
        update: dict[str, Any] = {}
        if change.downtime_ms is not None:
            self.allowed_downtime_ms = change.downtime_ms
            update["downtime_ms"] = change.downtime_ms
        if change.bandwidth_mbps is not None:
            update["bandwidth_mbps"] = change.bandwidth_mbps or None
            cap = int(change.bandwidth_mbps * 125_000)
            await self.qmp.execute("migrate-set-parameters", max_bandwidth=cap)
            if self.mirror is not None and not self._mirror_finished:
                await self.mirror.set_speed(cap)  # the pair's cap covers the disks too
        self.params = self.params.model_copy(update=update)
        if change.switchover_now:
            self.allowed_downtime_ms = FORCED_DOWNTIME_MS
        await self.qmp.execute("migrate-set-parameters", downtime_limit=self.allowed_downtime_ms)
        self.progress.update(allowed_downtime_ms=min(self.allowed_downtime_ms, FORCED_DOWNTIME_MS))
        return self.snapshot()

    async def _escalate(self, remaining: int) -> None:
        """After a stalled round, raise QEMU's downtime-limit one step (the policy's escalation)."""
        params = self.params
        stalled = self._last_remaining is not None and remaining > 0.9 * self._last_remaining
        self._last_remaining = remaining
        if stalled and params.downtime_step_ms:
            ceiling = params.downtime_max_ms or params.downtime_ms
            raised = min(ceiling, self.allowed_downtime_ms + params.downtime_step_ms)
            if raised > self.allowed_downtime_ms:
                self.allowed_downtime_ms = raised
                await self.qmp.execute("migrate-set-parameters", downtime_limit=raised)

    async def _poll_numbers(self) -> None:
        max_rounds = self.params.max_rounds
        seen_round = 0
        while self.progress.state in ACTIVE_STATES:
            info = await self.qmp.execute("query-migrate")
            apply_query_migrate(self.progress, info)
            self._raise_copy_percent()
            snapshot = self.progress.current
            throttle = info.get("cpu-throttle-percentage")
            if isinstance(throttle, int):
                self.progress.update(throttle_pct=max(0, min(100, throttle)))
            self.progress.update(allowed_downtime_ms=min(self.allowed_downtime_ms, FORCED_DOWNTIME_MS))
            if snapshot.state == "copy" and snapshot.round > seen_round:
                seen_round = snapshot.round
                await self._escalate(snapshot.bytes_remaining)
            over = snapshot.state == "copy" and snapshot.round > max_rounds
            if over and self.params.at_limit == "switchover":
                if self.allowed_downtime_ms < FORCED_DOWNTIME_MS:
                    log.info("%s: round limit reached, switching over anyway", self.guest_id)
                    await self.change_params(ParamsChange(switchover_now=True))
            elif over:
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
            running_for = time.monotonic() - self.progress.phase_started
            if (
                phase == "copy"
                and limit is not None
                and self.params.at_limit == "switchover"
                and running_for > 0.8 * limit
                and self.allowed_downtime_ms < FORCED_DOWNTIME_MS
            ):
                log.info("%s: Copy time limit near, switching over anyway", self.guest_id)
                self.spawn(self.change_params(ParamsChange(switchover_now=True)))
            elif limit is not None and running_for > limit:
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
        if self.mirror is not None and self.mirror.job_of(event) is not None:
            await self._on_mirror_event(self.mirror, event)
            return
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
            self.enter_forward(QEMU_STATES[status])  # with a mirror Copy began before QEMU's "setup"
            if status == "pre-switchover":
                self.spawn(self._quiesce_and_continue())

    async def _on_mirror_event(self, mirror: SourceMirror, event: dict[str, Any]) -> None:
        """A mirror job's event (also while ending: ``finish`` and ``abort`` wait for the jobs' ends)."""
        try:
            await mirror.handle_event(event)
        except (QmpError, QmpClosed) as error:
            reason = f"QEMU could not switch the mirror to write-blocking: {error}"
            self.spawn(self.abort(reason, FailureKind.INTERNAL))
            return
        if mirror.failed.done() and not self._ending and self.progress.state in ACTIVE_STATES:
            self.spawn(self.abort(mirror.failed.result(), FailureKind.INTERNAL, side=mirror.failed_side))

    async def _qemu_error(self) -> str | None:
        with contextlib.suppress(QmpError, QmpClosed):
            return (await self.qmp.execute("query-migrate")).get("error-desc")
        return None

    async def _verify_switchover(self) -> None:
        """QEMU is done: hash the stopped source, take the target's digest, then "ready"."""
        try:
            apply_query_migrate(self.progress, await self.qmp.execute("query-migrate"))
            if self.mirror is not None:
                await self._finish_mirror(self.mirror)
            source_digest = await self.digest()
            self.progress.update(source_digest=source_digest)
            self.progress.raise_percent("frozen", 95)
            target_digest = await self._target_ready
        except MirrorFailed as error:
            await self.abort(str(error), FailureKind.INTERNAL)
            return
        except (QmpError, QmpClosed, OSError) as error:
            await self.abort(f"could not verify the switchover: {error}", FailureKind.INTERNAL)
            return
        self.progress.update(target_digest=target_digest, bytes_remaining=0)
        self.progress.enter("ready")
        self.stop_background()
        self.close_control()

    async def _finish_mirror(self, mirror: SourceMirror) -> None:
        """Frozen: the guest stopped, every job ends with the target holding the disks as they are
        (``SourceMirror.finish``). Raises MirrorFailed, QmpClosed."""
        began = time.monotonic()
        await mirror.finish()
        self._mirror_finished = True
        total = sum(job.length for job in mirror.jobs.values())
        self.progress.update(disk_bytes_total=total, disk_bytes_sent=total, disk_bytes_remaining=0)
        log.info(
            "%s: mirror of %d disk(s) completed at the switchover in %.0f ms (%d bytes over the wire)",
            self.guest_id,
            len(mirror.devices),
            (time.monotonic() - began) * 1000,
            mirror.wire_bytes,
        )

    async def _quiesce_and_continue(self) -> None:
        """Pre-switchover: the vCPUs already stand still and QEMU drained and flushed the block
        devices as it stopped them, so switch over at once. Waiting here for the control plane
        would only add its round trips to the guest's downtime."""
        if self._ending or self.progress.state != "quiesce":
            return
        try:
            devices = await self.qmp.execute("query-block")
            self._measure_io_quiesce(len(devices))
            self.progress.raise_percent("quiesce", 100)
            await self.qmp.execute("migrate-continue", state="pre-switchover")
        except (QmpError, QmpClosed) as error:
            await self.abort(f"could not continue from pre-switchover: {error}", FailureKind.INTERNAL)

    def _measure_io_quiesce(self, devices: int) -> None:
        """What QEMU's drain did at the stop, from its trace (``quiesce``); logged and kept."""
        if not self.process.machine.disks:
            log.info("%s: %d block device(s) drained in pre-switchover", self.guest_id, devices)
            return
        self.io_quiesce = io_quiesce(self.process.trace_path, after=self._started_wall)
        if self.io_quiesce is None:
            log.warning("%s: no switchover stop in QEMU's trace %s", self.guest_id, self.process.trace_path)
            return
        self.progress.update(io_outstanding=self.io_quiesce.outstanding, io_drain_ms=self.io_quiesce.drain_ms)
        log.info(
            "%s: I/O quiesce: %d request(s) outstanding when the vCPUs stopped, drained in %.3f ms, "
            "flushed %s ms after the stop",
            self.guest_id,
            self.io_quiesce.outstanding,
            self.io_quiesce.drain_ms,
            self.io_quiesce.flushed_ms,
        )

    async def quiesce(self) -> ProgressSnapshot:
        """Return once I/O Quiesce is over (the driver continues by itself) or the migration ended."""
        return await self.wait_until(lambda state: state not in ("init", "copy", "quiesce"))

    async def freeze(self) -> ProgressSnapshot:
        """Return once the target holds a verified paused copy ("ready"), or the migration ended."""
        return await self.wait_until(lambda state: state not in ACTIVE_STATES)

    async def release(self) -> ProgressSnapshot:
        """After the commit, once the target runs the guest: quit the source's QEMU (its copy stays
        listed, Not Runnable) and delete its volumes of the mirrored local disks, named in
        ``disks_deleted`` (``_delete_mirrored_volumes``). Raises Conflict before "ready"."""
        state = self.progress.state
        if state == "ready":
            await self.process.quit()
            deleted = await asyncio.to_thread(self._delete_mirrored_volumes)
            self.progress.enter("released")
            self.progress.update(phase=None, disks_deleted=deleted)
            self._finished(self)
            await self._after_switchover()
        elif state != "released":
            raise Conflict(f"release needs a migration in state ready, this one is {state}")
        return self.snapshot()

    def _delete_mirrored_volumes(self) -> list[str]:
        """The release's one deletion: this host's volumes of the mirrored local disks (the target runs
        the guest on its own copies by then), ``resources.delete_volumes``. Returns the devices whose
        volume is gone; one that cannot be deleted is logged and left out (the console says so)."""
        if self.mirror is None:
            return []
        volumes = {device: self.volumes[device] for device in self.mirror.devices if device in self.volumes}
        return delete_volumes(self.guest_name, volumes)

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
        elif self.owns_guest():
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
        if self.mirror is not None:
            await self.mirror.abort()  # first: a guest write waiting on the target fails over at once
        with contextlib.suppress(QmpError, QmpClosed):
            await self.qmp.execute("migrate_cancel")
            await self._wait_qemu_settled()
        if self.process.machine.disks:
            with contextlib.suppress(QmpError, QmpClosed):
                await enable_request_tracing(self.qmp, enable=False)
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
