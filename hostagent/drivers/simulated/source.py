"""The simulated driver's source side: it copies the guest's pages to the target (``driver.Migration``).

Source, in order (each phase under its time limit, ``timing``; any failure aborts with its
``FailureKind``):
1. Init: connect to the target, present the one-time token, wait for ACCEPT; then open the
   other streams (``streams`` in all) with the same token, each naming its index.
2. Copy: start write tracking, send all memory once (never-written pages as
   ZERO markers), then rounds of the pages written meanwhile. Each pass or round is one send
   batch: every stream sends its pages of it (``wire.stream_of``) at once, then ROUND_END. When what is left
   would take no longer than ``downtime_ms`` at the measured rate (``convergence``), mark
   ``converged`` and keep sending small rounds until told to quiesce. Abort
   after ``max_rounds`` rounds without converging.
3. I/O Quiesce: new I/O is queued, outstanding I/O completes.
4. Frozen (on ``freeze``): stop the vCPUs, send the last dirty pages, the
   vCPU/device state, the queued I/O and the digest; wait for READY.
5. "ready": wait for the control plane (``release`` or ``resume``/``cancel``).

The frames are in ``wire``; the receiving side is ``target``.

Longer than ~400 lines on purpose: it is one class, the source's data plane, whose copy rounds and
Frozen hand-off share their state (the writer, round counters, events); the convergence judgement
(``convergence``) and phase timing (``timing``) live apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from agentprotocol import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Endpoint,
    FailureKind,
    MigrationParams,
    MigrationState,
    ParamsChange,
    ProgressSnapshot,
    Role,
)
from hostagent.driver import Conflict, MigrationAborted, SourceAbortCommands, plain_connection_error
from hostagent.drivers.simulated.convergence import RATE_SAMPLE_BYTES, ConvergenceJudge
from hostagent.drivers.simulated.diskmirror import SourceMirror
from hostagent.drivers.simulated.guest import SimulatedGuest
from hostagent.drivers.simulated.memory import CHUNK_PAGES, PAGE_SIZE, gaps_of, runs_of
from hostagent.drivers.simulated.timing import TargetAborted, kind_of, wait_watching
from hostagent.drivers.simulated.wire import (
    ABORT,
    ACCEPT,
    DIGESTED,
    FREEZE,
    HELLO,
    PARTITION_PAGES,
    PROGRESS,
    READY,
    Channel,
    DigestedFrame,
    FrameReader,
    FrameWriter,
    ProtocolError,
    check,
    connect,
    split_by_stream,
    stream_of,
)
from hostagent.progress import Progress
from hostagent.resources import delete_volumes

log = logging.getLogger("hostagent.simulated.source")
T = TypeVar("T")
RUN_PAGES = 4 * CHUNK_PAGES
SCATTERED_RUN = 16  # shorter runs of dirty pages travel in PAGE_LIST frames
PAGE_LIST_BATCH = 256
ZERO_RUN = bytes(RUN_PAGES * PAGE_SIZE)
PROGRESS_EVERY_S = 0.05
COPY_PROGRESS_EVERY_S = 0.2  # the source's own Copy progress within a round (the page wants >= 2/s)
IDLE_ROUND_WAIT_S = 0.02
PRE_PAUSE_ROUNDS = 5
PRE_PAUSE_SHRINK = 0.8  # a round before the pause must leave at most this share of what it sent
SWITCHOVER_AT_LIMIT_SHARE = 0.8  # with at_limit=switchover, Copy ends at this share of its time limit
PEER_REASON_WAIT_S = 0.5  # a broken connection waits this long for the target's ABORT already sent
STREAM_END_GRACE_S = 5.0  # after FREEZE, a stream's end waits this long for READY before it fails
TARGET_HASH_WAIT_S = 2.0  # before pausing, wait this long at most for the target to hash the last round
# What the source tells the target of its progress (PROGRESS frames), so both snapshots agree.
MIRRORED_FIELDS = (
    "bytes_sent",
    "bytes_remaining",
    "round",
    "dirty_rate_bytes_s",
    "throughput_bytes_s",
    "expected_downtime_ms",
    "converged",
    "disk_bytes_total",
    "disk_bytes_sent",
    "disk_bytes_remaining",
    "disk_dirty_rate_bytes_s",
    "disk_throughput_bytes_s",
    "disk_mirror_ready",
)


class SourceMigration(SourceAbortCommands, ConvergenceJudge):
    role: Role = "source"

    def __init__(
        self,
        guest: SimulatedGuest,
        migration_id: str,
        target: Endpoint,
        params: MigrationParams,
        on_release: Callable[[SimulatedGuest], Awaitable[None]],
        tls: ssl.SSLContext | None = None,
        streams: int = 1,
        mirror: list[str] | None = None,
    ) -> None:
        """``tls``: the data plane's client context (mutual TLS), or None for plain TCP (policy "off").

        ``streams``: parallel data-plane connections (1..``agentprotocol.MAX_STREAMS``, already resolved).
        ``mirror``: the devices of the guest's disks on local pools to mirror (``diskmirror``), copied
        on a disk stream of their own before the memory pre-copy starts; none: no disk stream.
        """
        self.migration_id = migration_id
        self.guest_id = guest.guest_id
        self.guest = guest
        self.target = target
        self.params = params
        self.limits = params.limits
        self.progress = Progress(migration_id, "source", guest.guest_id, guest.memory.size)
        self._on_release = on_release
        self._sock: socket.socket | None = None
        self._socks: list[socket.socket] = []
        self._tls = tls
        self.streams = streams
        self._mirror = SourceMirror(guest, mirror) if mirror else None
        self._mirror_task: asyncio.Task[None] | None = None
        self._writer: FrameWriter | None = None  # stream 0's: pages and every control frame
        self._writers: list[FrameWriter] = []  # one per stream, stream 0's first
        self._reader: FrameReader | None = None
        self._stream_watchers: list[asyncio.Task[None]] = []
        self._freeze_sent = False
        self._hashed_once = False
        self._hashing: asyncio.Future[int] | None = None  # the background refresh of page digests
        self._pass_pages = 0  # first-pass pages sent, all streams together
        self._batch = 0  # send batches (the first pass, then each round) every stream has ended
        self._task: asyncio.Task[None] | None = None
        self._copy_task: asyncio.Task[None] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._converged = asyncio.Event()
        self._quiesce_requested = asyncio.Event()
        self._quiesced = asyncio.Event()
        self._freeze_requested = asyncio.Event()
        self._settled = asyncio.Event()  # "ready" or terminal
        self._ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._stop_copy = False
        self._round_done = 0
        self._round_started: tuple[float, int] | None = None
        self._rounds_seconds = 0.0
        self._rounds_bytes = 0
        # Scattered dirty pages go slower than the first pass's long runs; judge convergence by them.
        self._dirty_round_rate: float | None = None
        self._target_digested = 0
        self._target_hashed = asyncio.Event()
        self._hash_rate_pages_s: float | None = None
        self._last_mirror = 0.0
        self._last_copy_note = 0.0  # when the Copy progress was last noted (monotonic s)
        self._to_send_bytes = 0  # what the round under way has to send (bytes)
        self._dirty_mark = (time.monotonic(), 0)
        self._last_round_bytes: int | None = None
        self._policy_round = 1
        self._force_switchover = False
        self.allowed_downtime_ms = params.downtime_ms

    # -- the Migration protocol -----------------------------------------
    def start(self) -> None:
        self.guest.migrating = self.migration_id
        self._task = asyncio.create_task(self._run(), name=f"migrate out {self.migration_id}")

    def snapshot(self) -> ProgressSnapshot:
        return self.progress.snapshot()

    async def next_change(self, after_seq: int) -> ProgressSnapshot:
        return await self.progress.next_change(after_seq)

    async def quiesce(self) -> ProgressSnapshot:
        if self.progress.state in ACTIVE_STATES:
            self._quiesce_requested.set()
            await self._wait_for(self._quiesced)
        return self.snapshot()

    async def freeze(self) -> ProgressSnapshot:
        if self.progress.state in ACTIVE_STATES:
            self._quiesce_requested.set()
            self._freeze_requested.set()
            await self._wait_for(self._settled)
        return self.snapshot()

    async def release(self) -> ProgressSnapshot:
        state = self.progress.state
        if state == "released":
            return self.snapshot()
        if state != "ready":
            raise Conflict(f"release needs a migration in state ready, this one is {state}")
        await self._on_release(self.guest)
        deleted = await asyncio.to_thread(self._delete_mirrored_volumes)
        self.guest.migrating = None
        self.progress.update(state="released", phase=None, disks_deleted=deleted)
        return self.snapshot()

    def _delete_mirrored_volumes(self) -> list[str]:
        """After the commit, once the target runs the guest on its own copies (the console releases the
        source only then): the volumes here of the mirrored local disks are deleted, the Not Runnable
        copy keeping its definition (``resources.delete_volumes``). Returns the devices whose volume is
        gone; a volume that cannot be deleted is logged and left out."""
        if self._mirror is None:
            return []
        paths = self.guest.disk_paths
        volumes = {device: paths[device] for device in self._mirror.devices if device in paths}
        return delete_volumes(self.guest.name, volumes)

    # -- helpers for commands ------------------------------------------
    async def _wait_for(self, event: asyncio.Event) -> None:
        waiter = asyncio.ensure_future(event.wait())
        settled = asyncio.ensure_future(self._settled.wait())
        await asyncio.wait({waiter, settled}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        settled.cancel()

    async def _roll_back(self, state: MigrationState, error: str) -> ProgressSnapshot:
        current = self.progress.state
        if current == "released":
            raise Conflict("the guest was released after the commit; it runs on the target now")
        if current in TERMINAL_STATES:
            self._restore_guest()
            return self.snapshot()
        await self._stop_tasks()
        self._finish(state, error, FailureKind.CANCELLED)
        return self.snapshot()

    # -- the run --------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._init_phase()
            self.progress.update(state="copy", phase="copy")
            self._copy_task = asyncio.create_task(self._copy_rounds())
            self._reader_task = asyncio.create_task(self._read_target())
            await self._copy_phase()
            await self._quiesce_phase()
            await self._watch(self._freeze_requested.wait())
            await self._frozen_phase()
        except TimeoutError:
            phase = self.progress.phase or "init"
            limit = self.limits.of(phase)
            await self._abort(f"the {phase} phase ran over its limit of {limit} s", FailureKind.TIME_LIMIT)
        except TargetAborted as error:
            await self._abort(str(error), error.kind, side="target")
        except MigrationAborted as error:
            await self._abort(str(error), error.kind)
        except ProtocolError as error:
            await self._abort(f"refused the target's data-plane message: {error}", FailureKind.REFUSED)
        except OSError as error:
            told = await self._target_said_why()
            if told is not None:
                await self._abort(str(told), told.kind, side="target")
                return
            if self.progress.phase == "init":
                await self._abort(
                    f"could not reach the target's data plane: {plain_connection_error(error)}",
                    FailureKind.UNREACHABLE,
                )
            else:
                await self._abort(
                    f"lost the data-plane connection to the target: {plain_connection_error(error)}",
                    FailureKind.UNREACHABLE,
                )
        except Exception as error:  # a bug must still leave the guest running here
            log.exception("migration %s failed", self.migration_id)
            await self._abort(f"internal error: {error!r}", FailureKind.INTERNAL)

    async def _target_said_why(self) -> TargetAborted | None:
        """The target's ABORT, if it sent one before the connection broke (a send may fail first).

        A target that gives up sends ABORT on stream 0, then closes every stream: the copy task's next
        send may fail before the reader task has read the ABORT waiting in the socket.
        """
        reader = self._reader_task
        if reader is None:
            return None
        if not reader.done():
            await asyncio.wait({reader}, timeout=PEER_REASON_WAIT_S)
        failure = reader.exception() if reader.done() and not reader.cancelled() else None
        return failure if isinstance(failure, TargetAborted) else None

    async def _watch(self, awaitable: Awaitable[Any]) -> Any:
        watched = [self._copy_task, self._reader_task, self._mirror_task, *self._stream_watchers]
        return await wait_watching(awaitable, watched)

    async def _init_phase(self) -> None:
        async with asyncio.timeout(self.limits.of("init")):
            hello = await self._hello()
            self._writer, self._reader = await self._open_stream(0, hello)
            self._sock = self._socks[0]
            self.progress.update(percent={"init": 50})
            # The populate list is for the first stream only: the target backs memory once.
            others = [self._open_stream(index, {**hello, "populate": []}) for index in range(1, self.streams)]
            opened = await gather_all(others)
            self._writers = [self._writer, *(writer for writer, _ in opened)]
            for writer in self._writers:
                writer.on_sent = self._copy_progress_tick
            self.progress.update(streams=self.streams)
            self._stream_watchers = [
                asyncio.create_task(self._watch_stream(index, reader))
                for index, (_, reader) in enumerate(opened, start=1)
            ]
            if self._mirror is not None:  # the disk stream, beside the page streams
                disk_writer, disk_reader = await self._open_stream(
                    0, {**hello, "populate": [], "disk_stream": True}
                )
                self._mirror.start(disk_writer)
                self._stream_watchers.append(
                    asyncio.create_task(self._watch_stream(self.streams, disk_reader))
                )

    async def _open_stream(self, index: int, hello: dict[str, Any]) -> tuple[FrameWriter, FrameReader]:
        """Connect stream ``index``, prove it with the token (TLS first under "required"), wait for ACCEPT."""
        channel: Channel
        try:
            channel = await connect(self.target.host, self.target.port, self._tls, self._socks)
        except ssl.SSLError as error:
            raise MigrationAborted(
                f"the target's data plane failed the TLS handshake: {error.reason or error}",
                FailureKind.REFUSED,
            ) from error
        # The disk stream takes the whole cap: the disks go before the memory's first pass, so the pair's
        # cap covers both (only the guest's writes forwarded in write-blocking mode come on top).
        bandwidth = self.params.bandwidth_mbps
        cap = self._disk_cap(bandwidth) if hello.get("disk_stream") else self._stream_cap(bandwidth)
        writer = FrameWriter(channel, cap)
        reader = FrameReader(channel)
        await writer.message(HELLO, {**hello, "stream": index, "streams": self.streams})
        kind, answer = await reader.message()
        if kind != ACCEPT:
            raise MigrationAborted(
                f"the target refused the connection: {answer.get('error', 'no reason')}",
                FailureKind.REFUSED,
            )
        return writer, reader

    @staticmethod
    def _disk_cap(bandwidth_mbps: float | None) -> float | None:
        """The disk stream's cap (bytes/s): the pair's whole cap, or None for none."""
        return bandwidth_mbps * 125_000 if bandwidth_mbps else None

    def _stream_cap(self, bandwidth_mbps: float | None) -> float | None:
        """Each stream's share of the cap (bytes/s), or None for no cap."""
        return bandwidth_mbps * 125_000 / self.streams if bandwidth_mbps else None

    async def _watch_stream(self, index: int, reader: FrameReader) -> None:
        """Streams other than 0 carry nothing back: any frame, or their end, fails the migration."""
        try:
            kind, _ = await reader.message()
        except ConnectionError as error:
            if self._freeze_sent:
                # The target closes every stream right after READY on stream 0, and that EOF may be
                # seen first: it is no failure if READY follows.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STREAM_END_GRACE_S):
                        await asyncio.shield(self._ready)
                        return
            closed = f"data-plane stream {index} of {self.streams} was closed: {error}"
            raise ConnectionError(closed) from None
        raise ProtocolError(f"unexpected frame kind {kind} on data-plane stream {index}")

    async def _hello(self) -> dict[str, Any]:
        # Scanning a large guest's written map is tens of ms: off the loop, which must keep answering.
        populate = await asyncio.to_thread(self.guest.memory.written_chunk_runs)
        return {
            "token": self.target.token,
            "migration_id": self.migration_id,
            "guest": self.guest.guest_id,
            "memory_mib": self.guest.memory_mib,
            "populate": populate,
            "mirror": self._mirror.devices if self._mirror else [],
        }

    async def _copy_phase(self) -> None:
        limit = self.limits.of("copy")
        if self.params.at_limit == "switchover" and limit is not None:
            # At the Copy time limit, switch over instead of failing (Nova's live_migration_timeout_action).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(limit * SWITCHOVER_AT_LIMIT_SHARE):
                    await self._watch(self._converged.wait())
            if not self._converged.is_set():
                log.info("migration %s: Copy time limit near, switching over anyway", self.migration_id)
                self.switchover_now()
            limit *= 1 - SWITCHOVER_AT_LIMIT_SHARE
        async with asyncio.timeout(limit):
            await self._watch(self._converged.wait())
            if self._mirror is not None:  # a forced switchover too waits for every mirror to be ready
                await self._watch(self._mirror.ready.wait())
            await self._watch(self._quiesce_requested.wait())

    def switchover_now(self) -> None:
        """End Copy now: what is left moves while the guest is frozen, however long that takes."""
        self._force_switchover = True
        self.progress.update(converged=True, percent={"copy": 100})
        self._converged.set()

    def change_params(self, change: ParamsChange) -> ProgressSnapshot:
        """Apply an admin's change to the running Copy (``ParamsChange``); Conflict after Copy."""
        if self.progress.state not in ("init", "copy"):
            raise Conflict(f"migration {self.migration_id} is {self.progress.state}; its Copy is over")
        update: dict[str, Any] = {}
        if change.downtime_ms is not None:
            self.allowed_downtime_ms = change.downtime_ms
            update["downtime_ms"] = change.downtime_ms
        if change.bandwidth_mbps is not None:
            update["bandwidth_mbps"] = change.bandwidth_mbps or None
            for writer in self._writers:
                writer.set_cap(self._stream_cap(change.bandwidth_mbps))
            if self._mirror is not None and self._mirror.writer is not None:
                self._mirror.writer.set_cap(self._disk_cap(change.bandwidth_mbps))
        if change.auto_converge is not None:
            update["auto_converge"] = change.auto_converge
            if not change.auto_converge:
                self.guest.throttle_pct = 0
        self.params = self.params.model_copy(update=update)
        fields: dict[str, Any] = {"allowed_downtime_ms": self.allowed_downtime_ms}
        if change.switchover_now:
            self.switchover_now()
        self.progress.update(**fields, throttle_pct=round(self.guest.throttle_pct))
        return self.progress.snapshot()

    async def _quiesce_phase(self) -> None:
        """Queue new I/O, let the requests in flight complete; report how many there were and how long
        they took (``io_outstanding``, ``io_drain_ms``)."""
        self.progress.update(state="quiesce", phase="quiesce", io_outstanding=len(self.guest.io_in_flight))
        began = time.monotonic()
        async with asyncio.timeout(self.limits.of("quiesce")):
            outstanding = await self._watch(
                self.guest.quiesce_io(lambda pct: self.progress.update(percent={"quiesce": pct}))
            )
        drain_ms = round((time.monotonic() - began) * 1000, 1) if outstanding else 0.0
        self.progress.update(percent={"quiesce": 100}, io_outstanding=outstanding, io_drain_ms=drain_ms)
        self._quiesced.set()

    async def _frozen_phase(self) -> None:
        assert self._writer is not None and self._copy_task is not None
        self.progress.update(state="frozen", phase="frozen")
        async with asyncio.timeout(self.limits.of("frozen")):
            self._stop_copy = True
            await self._copy_task
            await self._last_round_before_pause()
            frozen_at = time.monotonic()
            self.guest.pause_vcpus()
            # Its I/O drained in Quiesce and new requests queue: it writes its disks no more, so it lets
            # go of them before the target may open them (one writer at a time).
            self.guest.deactivate_disks()
            if self.guest.state_save_ms:
                await asyncio.sleep(self.guest.state_save_ms / 1000)
            disk_digests = await self._finish_mirror()
            final_pages = self.guest.memory.dirty_count()
            await self._send_round(self.guest.memory.take_dirty())
            sent_at = time.monotonic()
            self.progress.update(percent={"frozen": 50})
            memory = self.guest.memory
            hashed = await asyncio.get_running_loop().run_in_executor(None, memory.refresh_digests)
            digest = memory.digest()
            log.info(
                "migration %s (source) frozen: %d last pages sent in %.0f ms, %d pages hashed in %.0f ms",
                self.migration_id,
                final_pages,
                (sent_at - frozen_at) * 1000,
                hashed,
                (time.monotonic() - sent_at) * 1000,
            )
            self.progress.update(source_digest=digest, percent={"frozen": 70})
            freeze = {
                "state": self.guest.save_state(),
                "source_digest": digest,
                "batches": self._batch,
                "disk_digests": disk_digests,
            }
            self._freeze_sent = True
            await self._writer.message(FREEZE, freeze)
            answer = await self._watch(self._ready)
        await self._stop_watchers()
        self._drop_streams()
        downtime_ms = round((time.monotonic() - frozen_at) * 1000)
        self.progress.update(
            state="ready",
            percent={"frozen": 100},
            downtime_ms=downtime_ms,
            target_digest=answer.get("target_digest"),
            bytes_remaining=0,
        )
        self._settled.set()

    async def _finish_mirror(self) -> dict[str, str]:
        """The guest paused and closed its disks: the mirror's last writes and DISK_END go, and the
        source volumes' digests come back (device -> SHA-256; none without a mirror)."""
        if self._mirror is None:
            return {}
        if self._mirror_task is not None:
            self._mirror_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._mirror_task
            self._mirror_task = None
        digests = await self._mirror.finish()
        self._note_copy_progress(force=True)
        return digests

    async def _last_round_before_pause(self) -> None:
        """Send and hash what the last rounds left while the vCPUs still run: that is not downtime.

        A few more rounds (at most ``PRE_PAUSE_ROUNDS``), until what is left would take at most half the
        allowed downtime, or a round no longer shrinks what is left (by ``PRE_PAUSE_SHRINK``): a guest
        that writes as fast as the link carries would otherwise run every round while the Frozen phase's
        time limit runs out (QA: an allowed downtime raised to 24 s on a capped link, aborted in Frozen).
        """
        memory = self.guest.memory
        if self._hashing is not None:
            await self._hashing  # the last background refresh (Copy has ended: no new one starts)
        before: int | None = None
        for _ in range(PRE_PAUSE_ROUNDS):
            await self._refresh_digests()
            pending = memory.dirty_count()
            expected_ms = self._expected_ms(pending)
            if (
                self._force_switchover
                or pending * PAGE_SIZE < RATE_SAMPLE_BYTES
                or (expected_ms is not None and expected_ms <= self.allowed_downtime_ms / 2)
                or (before is not None and pending > before * PRE_PAUSE_SHRINK)
            ):
                break
            before = pending
            self.progress.update(round=self.progress.current.round + 1)
            await self._send_round(memory.take_dirty())
        await self._refresh_digests()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TARGET_HASH_WAIT_S):
                while self._target_digested < self._round_done:
                    self._target_hashed.clear()
                    await self._watch(self._target_hashed.wait())

    async def _read_target(self) -> None:
        """The target reports hashed rounds (DIGESTED), then confirms (READY) or refuses (ABORT)."""
        assert self._reader is not None
        while True:
            kind, body = await self._reader.message()
            if kind == DIGESTED:
                digested = check(DigestedFrame, body, "DIGESTED from the target").round
                self._target_digested = max(self._target_digested, digested)
                self._target_hashed.set()
            elif kind == READY:
                self._ready.set_result(body)
                return
            elif kind == ABORT:
                raise TargetAborted(f"the target aborted: {body.get('error', 'no reason')}", kind_of(body))
            else:
                raise ProtocolError(f"unexpected frame kind {kind} from the target")

    # -- copying --------------------------------------------------------
    async def _copy_rounds(self) -> None:
        memory = self.guest.memory
        if self._mirror is not None:  # the disks first, then memory (Proxmox's order)
            self._mirror_task = asyncio.create_task(
                self._mirror.run(lambda force: self._note_copy_progress(force=force))
            )
            await self._watch(self._mirror.ready.wait())
        memory.start_tracking()
        self._dirty_mark = (time.monotonic(), 0)
        self.progress.update(round=1)
        self._begin_round()
        await self._send_full_pass()
        self._end_round()
        self._round_done = 1
        await self._mirror_progress(force=True)
        while not self._stop_copy:
            self._hash_in_background()
            self._judge_convergence()
            if self._target_digested < 1:
                await self._wait_for_target_hashing()
            if memory.dirty_count() == 0:
                await self._mirror_progress(force=False)
                await asyncio.sleep(IDLE_ROUND_WAIT_S)
                continue
            dirty = memory.take_dirty()
            self._dirty_mark = (time.monotonic(), 0)
            self.progress.update(round=self.progress.current.round + 1)
            await self._send_round(dirty)
            self._round_done = self.progress.current.round

    def _hash_in_background(self) -> None:
        """Re-hash the pages sent so far in a worker thread while the next round goes out.

        Hashing is kept off the sending path: on a loaded machine, hashing a round's pages before
        sending the next one made each round last long enough for the guest to dirty as much again
        (1 GiB at 25,000 pages/s never converged). One refresh at a time; the stale marks keep it
        correct whenever it runs (``memory``), and the last one is awaited before the vCPUs stop.
        """
        if self._hashing is None or self._hashing.done():
            self._hashing = asyncio.ensure_future(self._refresh_digests())

    async def _send_full_pass(self) -> None:
        """Round 1: every page once, each stream its blocks in address order; never-written pages as
        ZERO markers."""
        written = bytes(self.guest.memory.written)
        self._pass_pages = 0
        self._to_send_bytes = written.count(1) * PAGE_SIZE  # ZERO markers cost (next to) nothing
        self._batch += 1
        await gather_all([self._send_pass_part(index, written) for index in range(self.streams)])
        self._to_send_bytes = 0
        self._note_copy_progress(force=True)

    async def _send_pass_part(self, index: int, written: bytes) -> None:
        """Stream ``index``'s share of the first pass: its blocks of ``PARTITION_PAGES`` pages."""
        writer, page_count = self._writers[index], self.guest.memory.page_count
        step = self.streams * PARTITION_PAGES
        for block in range(index * PARTITION_PAGES, page_count, step):
            end = min(block + PARTITION_PAGES, page_count)
            position = block
            for first, count in gaps_of(written, block, end):
                await self._send_written(writer, position, first)
                await writer.zero(first, count)
                position = first + count
            await self._send_written(writer, position, end)
            self._pass_pages += end - block
            self._note_copy_progress()
            if index == 0:  # control frames travel on stream 0, written by its sender only
                await self._mirror_progress(force=False)
        await writer.round_end(self._batch, self.progress.current.round)

    async def _send_written(self, writer: FrameWriter, first: int, end: int) -> None:
        for run_first in range(first, end, RUN_PAGES):
            count = min(RUN_PAGES, end - run_first)
            payload = self.guest.memory.pages(run_first, count)
            if payload == ZERO_RUN[: len(payload)]:
                await writer.zero(run_first, count)
            else:
                await writer.pages(run_first, payload)

    def _copy_progress_tick(self) -> None:
        """A slice went out on a stream (``FrameWriter.on_sent``): Copy's progress, while its rounds run
        (throttled by ``_note_copy_progress``), so a slow link's bytes move on the page every second."""
        if self.progress.state == "copy" and not self._converged.is_set():
            self._note_copy_progress()

    def _note_copy_progress(self, *, force: bool = False) -> None:
        """Copy's progress within a round, at most every ``COPY_PROGRESS_EVERY_S`` (``force``: now).

        ``percent``: the share of the bytes to send that has been sent, sent / (sent + left), where
        left is what the current round still has to send plus the pages dirtied since it began; capped
        at 99 until Copy converges (``Progress`` never lets it go back when the guest dirties more).
        ``dirty_rate_bytes_s`` is measured from the start of the round, so it reads from round 1 on.
        """
        now = time.monotonic()
        if not force and now - self._last_copy_note < COPY_PROGRESS_EVERY_S:
            return
        self._last_copy_note = now
        sent = self._bytes_sent()
        round_sent = sent - (self._round_started[1] if self._round_started else sent)
        dirtied = self.guest.memory.dirty_count() * PAGE_SIZE
        left = max(0, self._to_send_bytes - round_sent) + dirtied
        if self._batch == 0:  # the memory's first pass has not begun (a disk mirror goes first)
            sent, left = 0, self.guest.memory.written_count() * PAGE_SIZE
        disk = self._disk_fields()
        all_sent, all_left = sent + disk.get("disk_bytes_sent", 0), left + disk.get("disk_bytes_remaining", 0)
        self.progress.update(
            percent={"copy": min(99, 100 * all_sent // (all_sent + all_left)) if all_sent + all_left else 0},
            bytes_sent=sent,
            bytes_remaining=left,
            dirty_rate_bytes_s=self._dirty_rate(dirtied),
            throughput_bytes_s=round(self._throughput()),
            **disk,
        )

    def _disk_fields(self) -> dict[str, Any]:
        """The mirror's figures for the snapshot (``ProgressSnapshot.disk_*``); none without one."""
        mirror = self._mirror
        if mirror is None:
            return {}
        return {
            "disk_bytes_total": mirror.total_bytes,
            "disk_bytes_sent": mirror.sent_bytes,
            "disk_bytes_remaining": mirror.pending_bytes(),
            "disk_dirty_rate_bytes_s": mirror.dirty_rate(),
            "disk_throughput_bytes_s": mirror.throughput(),
            "disk_mirror_ready": mirror.ready.is_set(),
        }

    async def _send_round(self, dirty: bytearray) -> None:
        """Send the pages of one round, whole: once taken, they are no longer marked dirty.

        Each stream sends its own pages of the round at once (``wire.stream_of``).
        """
        self._begin_round()
        self._batch += 1
        parts: list[list[tuple[int, int]]] = [[] for _ in range(self.streams)]
        for first, count in runs_of(dirty):
            if self.streams == 1:
                parts[0].append((first, count))
            elif count == 1:
                parts[stream_of(first, self.streams)].append((first, 1))
            else:
                for index, pieces in enumerate(split_by_stream(first, count, self.streams)):
                    parts[index].extend(pieces)
        self._to_send_bytes = dirty.count(1) * PAGE_SIZE
        await gather_all([self._send_round_part(index, runs) for index, runs in enumerate(parts)])
        self._to_send_bytes = 0
        self._end_round(dirty_round=True)
        self.progress.update(bytes_sent=self._bytes_sent())
        self._round_done = self.progress.current.round
        await self._mirror_progress(force=True)

    async def _send_round_part(self, index: int, runs: list[tuple[int, int]]) -> None:
        """Stream ``index``'s pages of a round: long runs as PAGES, short ones batched in PAGE_LIST."""
        writer, memory = self._writers[index], self.guest.memory
        view, scattered = memory.view, list[int]()
        for first, count in runs:
            if count < SCATTERED_RUN:
                scattered.extend(range(first, first + count))
                if len(scattered) >= PAGE_LIST_BATCH:
                    await writer.page_list(scattered, view)
                    scattered = []
                    self._note_copy_progress()
                    if index == 0:
                        await self._mirror_progress(force=False)
                continue
            for run_first in range(first, first + count, RUN_PAGES):
                run_count = min(RUN_PAGES, first + count - run_first)
                await writer.pages(run_first, memory.pages(run_first, run_count))
                self._note_copy_progress()
            if index == 0:
                await self._mirror_progress(force=False)
        if scattered:
            await writer.page_list(scattered, view)
        await writer.round_end(self._batch, self.progress.current.round)

    async def _mirror_progress(self, force: bool) -> None:
        """Tell the target how far the source is, at most every PROGRESS_EVERY_S."""
        assert self._writer is not None
        now = time.monotonic()
        if not force and now - self._last_mirror < PROGRESS_EVERY_S:
            return
        self._last_mirror = now
        snapshot = self.progress.current.wire()
        mirror = {name: snapshot[name] for name in MIRRORED_FIELDS}
        mirror.update(state=snapshot["state"], phase=snapshot["phase"], percent=snapshot["percent"])
        mirror["round_done"] = self._round_done
        await self._writer.message(PROGRESS, mirror)

    # -- ending ---------------------------------------------------------
    async def _abort(self, error: str, kind: FailureKind, side: Role = "source") -> None:
        if self.progress.state not in ACTIVE_STATES:
            return
        log.warning("migration %s (source) aborted: %s", self.migration_id, error)
        await self._stop_tasks(keep_main=True)
        self._finish("aborted", error, kind, side)

    async def _stop_tasks(self, keep_main: bool = False) -> None:
        current = asyncio.current_task()
        tasks = [self._copy_task, self._reader_task, self._mirror_task, *self._stream_watchers]
        for task in tasks + ([] if keep_main else [self._task]):
            if task is not None and task is not current and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._hashing is not None and not self._hashing.done():
            self._hashing.cancel()  # its worker thread finishes the batch it is in; nobody waits for it
        self._drop_streams()

    def _drop_streams(self) -> None:
        """Close the data-plane streams and let go of them: each holds buffers (TLS receive buffer and
        BIOs, the frame writer's batch: 1-2 MiB a stream), and the agent keeps an ended migration listed
        (its snapshot) for as long as it runs, so kept streams grew it ~4.5 MiB per migration."""
        for sock in self._socks:
            sock.close()
        self._socks, self._writers, self._stream_watchers = [], [], []
        self._sock = self._writer = self._reader = None

    async def _stop_watchers(self) -> None:
        """After READY the target closes every stream; their watchers have nothing left to watch."""
        for task in self._stream_watchers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _finish(self, state: MigrationState, error: str, kind: FailureKind, side: Role = "source") -> None:
        self._restore_guest()
        self.progress.fail(state, error, kind, side=side)
        self._settled.set()

    def _restore_guest(self) -> None:
        """The guest stays (or becomes again) the running one, its workload going on; a mirror stops
        (the source's volumes untouched by it: it only read them).

        A repeated cancel or resume of this ended migration, arriving once a newer migration of the same
        guest has started, leaves the guest alone: stopping the write tracking here took the newer
        migration's dirty pages away, and its Frozen phase then failed on a memory digest mismatch."""
        if self._mirror is not None:
            self._mirror.stop()
        if self.guest.migrating not in (None, self.migration_id):
            return
        self.guest.memory.stop_tracking()
        self.guest.throttle_pct = 0
        self.guest.unquiesce_io()
        self.guest.resume_vcpus()
        if self.guest.running:
            self.guest.activate_disks()
        if self.guest.migrating == self.migration_id:
            self.guest.migrating = None


async def gather_all(coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coroutines`` at once (one per stream) and return their results in order.

    The first failure cancels the others and is raised as itself (not an ``ExceptionGroup``, which the
    run's ``except OSError`` would miss); one coroutine runs without a task of its own.
    """
    if len(coroutines) == 1:
        return [await coroutines[0]]
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
