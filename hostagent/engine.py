"""The page-copying migration engine: one object per side, implementing ``driver.Migration``.

Source, in order (each phase under its time limit; any failure aborts):
1. Init: connect to the target, present the one-time token, wait for ACCEPT.
2. Copy: start write tracking, send all memory once (never-written pages as
   ZERO markers), then rounds of the pages written meanwhile. When what is left
   would take no longer than ``downtime_ms`` at the measured rate, mark
   ``converged`` and keep sending small rounds until told to quiesce. Abort
   after ``max_rounds`` rounds without converging.
3. I/O Quiesce: new I/O is queued, outstanding I/O completes.
4. Frozen (on ``freeze``): stop the vCPUs, send the last dirty pages, the
   vCPU/device state, the queued I/O and the digest; wait for READY.
5. "ready": wait for the control plane (``release`` or ``resume``/``cancel``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hostagent.driver import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Conflict,
    Endpoint,
    MigrationParams,
    PhaseLimits,
    ProgressSnapshot,
    SourceAbortCommands,
)
from hostagent.guest import SimulatedGuest
from hostagent.memory import CHUNK_PAGES, PAGE_SIZE, gaps_of, runs_of
from hostagent.progress import Progress
from hostagent.wire import (
    ABORT,
    ACCEPT,
    DIGESTED,
    FREEZE,
    HELLO,
    MAX_PAGE_LIST,
    PAGE_LIST,
    PAGES,
    PROGRESS,
    READY,
    REFUSE,
    ZERO,
    FrameReader,
    FrameWriter,
    ProtocolError,
    tune_socket,
)

log = logging.getLogger("hostagent.engine")
RUN_PAGES = 4 * CHUNK_PAGES
SCATTERED_RUN = 16  # shorter runs of dirty pages travel in PAGE_LIST frames
PAGE_LIST_BATCH = 256
RATE_SAMPLE_BYTES = 256 * 1024
ZERO_RUN = bytes(RUN_PAGES * PAGE_SIZE)
PROGRESS_EVERY_S = 0.05
IDLE_ROUND_WAIT_S = 0.02
HELLO_TIMEOUT_S = 5.0
PRE_PAUSE_ROUNDS = 5
HASH_RATE_SAMPLE_PAGES = 1000
UNJUDGED_ROUND_WAIT_S = 0.2  # between rounds while the target still hashes the first pass
UNJUDGED_ROUNDS_FACTOR = 10
TARGET_HASH_WAIT_S = 2.0  # before pausing, wait this long at most for the target to hash the last round
POPULATE_BUDGET_S = 3.0  # at most a quarter of the init limit
MIRRORED_FIELDS = (
    "bytes_sent",
    "bytes_remaining",
    "round",
    "dirty_rate_bytes_s",
    "throughput_bytes_s",
    "expected_downtime_ms",
    "converged",
)


class MigrationAborted(Exception):
    pass


def limit_of(limits: PhaseLimits, phase: str) -> float | None:
    return limits.get(f"{phase}_s")  # type: ignore[return-value]


async def wait_watching(awaitable: Awaitable[Any], watched: list[asyncio.Task[Any] | None]) -> Any:
    """Await ``awaitable``, but fail as soon as a watched task fails (ending cleanly is fine)."""
    waiter = asyncio.ensure_future(awaitable)
    pending = {waiter, *(task for task in watched if task is not None)}
    try:
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not waiter and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if waiter in done:
                return waiter.result()
    finally:
        if not waiter.done():
            waiter.cancel()


class SourceMigration(SourceAbortCommands):
    role = "source"

    def __init__(
        self,
        guest: SimulatedGuest,
        migration_id: str,
        target: Endpoint,
        params: MigrationParams,
        on_release: Callable[[SimulatedGuest], Awaitable[None]],
    ) -> None:
        self.migration_id = migration_id
        self.guest_name = guest.name
        self.guest = guest
        self.target = target
        self.params = params
        self.limits: PhaseLimits = params["limits"]
        self.progress = Progress(migration_id, "source", guest.name, guest.memory.size)
        self._on_release = on_release
        self._sock: socket.socket | None = None
        self._writer: FrameWriter | None = None
        self._reader: FrameReader | None = None
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
        self._dirty_mark = (time.monotonic(), 0)

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
        self.guest.migrating = None
        self.progress.update(state="released", phase=None)
        return self.snapshot()

    # -- helpers for commands ------------------------------------------
    async def _wait_for(self, event: asyncio.Event) -> None:
        waiter = asyncio.ensure_future(event.wait())
        settled = asyncio.ensure_future(self._settled.wait())
        await asyncio.wait({waiter, settled}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        settled.cancel()

    async def _roll_back(self, state: str, error: str) -> ProgressSnapshot:
        current = self.progress.state
        if current == "released":
            raise Conflict("the guest was released after the commit; it runs on the target now")
        if current in TERMINAL_STATES:
            self._restore_guest()
            return self.snapshot()
        failed_phase = self.progress.phase if current != "ready" else None
        await self._stop_tasks()
        self._finish(state, error, failed_phase)
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
            await self._abort(f"the {phase} phase ran over its limit of {limit_of(self.limits, phase)} s")
        except MigrationAborted as error:
            await self._abort(str(error))
        except (OSError, ProtocolError) as error:
            if self.progress.phase == "init":
                await self._abort(f"could not reach the target's data plane: {error}")
            else:
                await self._abort(f"lost the data-plane connection to the target: {error}")
        except Exception as error:  # a bug must still leave the guest running here
            log.exception("migration %s failed", self.migration_id)
            await self._abort(f"internal error: {error!r}")

    async def _watch(self, awaitable: Awaitable[Any]) -> Any:
        return await wait_watching(awaitable, [self._copy_task, self._reader_task])

    async def _init_phase(self) -> None:
        async with asyncio.timeout(limit_of(self.limits, "init")):
            host, port = self.target["host"], self.target["port"]
            self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            tune_socket(self._sock)
            await asyncio.get_running_loop().sock_connect(self._sock, (host, port))
            self.progress.update(percent={"init": 50})
            cap = self.params.get("bandwidth_mbps")
            self._writer = FrameWriter(self._sock, cap * 125_000 if cap else None)
            self._reader = FrameReader(self._sock)
            await self._writer.message(HELLO, self._hello())
            kind, answer = await self._reader.message()
            if kind != ACCEPT:
                raise MigrationAborted(
                    f"the target refused the connection: {answer.get('error', 'no reason')}"
                )

    def _hello(self) -> dict[str, Any]:
        return {
            "token": self.target["token"],
            "migration_id": self.migration_id,
            "guest": self.guest.name,
            "memory_mib": self.guest.memory_mib,
            "populate": self.guest.memory.written_chunk_runs(),
        }

    async def _copy_phase(self) -> None:
        async with asyncio.timeout(limit_of(self.limits, "copy")):
            await self._watch(self._converged.wait())
            await self._watch(self._quiesce_requested.wait())

    async def _quiesce_phase(self) -> None:
        self.progress.update(state="quiesce", phase="quiesce")
        async with asyncio.timeout(limit_of(self.limits, "quiesce")):
            await self._watch(
                self.guest.quiesce_io(lambda pct: self.progress.update(percent={"quiesce": pct}))
            )
        self.progress.update(percent={"quiesce": 100})
        self._quiesced.set()

    async def _frozen_phase(self) -> None:
        assert self._writer is not None and self._copy_task is not None
        self.progress.update(state="frozen", phase="frozen")
        async with asyncio.timeout(limit_of(self.limits, "frozen")):
            self._stop_copy = True
            await self._copy_task
            await self._last_round_before_pause()
            frozen_at = time.monotonic()
            self.guest.pause_vcpus()
            if self.guest.state_save_ms:
                await asyncio.sleep(self.guest.state_save_ms / 1000)
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
            freeze = {"state": self.guest.save_state(), "source_digest": digest}
            await self._writer.message(FREEZE, freeze)
            answer = await self._watch(self._ready)
        self._sock.close()  # type: ignore[union-attr]
        downtime_ms = round((time.monotonic() - frozen_at) * 1000)
        self.progress.update(
            state="ready",
            percent={"frozen": 100},
            downtime_ms=downtime_ms,
            target_digest=answer.get("target_digest"),
            bytes_remaining=0,
        )
        self._settled.set()

    async def _last_round_before_pause(self) -> None:
        """Send and hash what the last rounds left while the vCPUs still run: that is not downtime.

        A few more rounds, until what is left would take at most half the allowed downtime.
        """
        memory = self.guest.memory
        for _ in range(PRE_PAUSE_ROUNDS):
            await self._refresh_digests()
            pending = memory.dirty_count()
            expected_ms = self._expected_ms(pending)
            if pending * PAGE_SIZE < RATE_SAMPLE_BYTES or (
                expected_ms is not None and expected_ms <= self.params["downtime_ms"] / 2
            ):
                break
            self.progress.update(round=self.progress.snapshot()["round"] + 1)
            await self._send_round(memory.take_dirty())
        await self._refresh_digests()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TARGET_HASH_WAIT_S):
                while self._target_digested < self._round_done:
                    self._target_hashed.clear()
                    await self._watch(self._target_hashed.wait())

    async def _refresh_digests(self) -> int:
        """Hash the pages written since the last time, in a worker thread; learns the hashing rate."""
        started = time.monotonic()
        hashed = await asyncio.get_running_loop().run_in_executor(None, self.guest.memory.refresh_digests)
        elapsed = time.monotonic() - started
        if hashed >= HASH_RATE_SAMPLE_PAGES and elapsed > 0:
            self._hash_rate_pages_s = hashed / elapsed
        return hashed

    def _expected_ms(self, pending_pages: int) -> int | None:
        """Downtime to move and hash ``pending_pages`` (the target hashes alongside the source)."""
        rate = self._dirty_round_rate or self._throughput()
        if not rate:
            return None
        seconds = pending_pages * PAGE_SIZE / rate
        if self._hash_rate_pages_s:
            seconds += pending_pages / self._hash_rate_pages_s
        return round(1000 * seconds)

    async def _read_target(self) -> None:
        """The target reports hashed rounds (DIGESTED), then confirms (READY) or refuses (ABORT)."""
        assert self._reader is not None
        while True:
            kind, body = await self._reader.message()
            if kind == DIGESTED:
                digested = body.get("round")
                if isinstance(digested, int):
                    self._target_digested = max(self._target_digested, digested)
                    self._target_hashed.set()
            elif kind == READY:
                self._ready.set_result(body)
                return
            elif kind == ABORT:
                raise MigrationAborted(f"the target aborted: {body.get('error', 'no reason')}")
            else:
                raise ProtocolError(f"unexpected frame kind {kind} from the target")

    # -- copying --------------------------------------------------------
    async def _copy_rounds(self) -> None:
        memory = self.guest.memory
        memory.start_tracking()
        self._dirty_mark = (time.monotonic(), 0)
        self.progress.update(round=1)
        self._begin_round()
        await self._send_full_pass()
        await self._writer.flush()  # type: ignore[union-attr]
        self._end_round()
        self._round_done = 1
        await self._mirror_progress(force=True)
        while not self._stop_copy:
            await self._refresh_digests()
            self._judge_convergence()
            if self._target_digested < 1:
                await self._wait_for_target_hashing()
            if memory.dirty_count() == 0:
                await self._mirror_progress(force=False)
                await asyncio.sleep(IDLE_ROUND_WAIT_S)
                continue
            dirty = memory.take_dirty()
            self._dirty_mark = (time.monotonic(), 0)
            self.progress.update(round=self.progress.snapshot()["round"] + 1)
            await self._send_round(dirty)
            self._round_done = self.progress.snapshot()["round"]

    def _judge_convergence(self) -> None:
        assert self._writer is not None
        pending_bytes = self.guest.memory.dirty_count() * PAGE_SIZE
        expected_ms = self._expected_ms(pending_bytes // PAGE_SIZE)
        # Until a round of dirty pages measured how fast they go, only "nothing left" converges;
        # and not before the target hashed the first pass, or Frozen would wait for that.
        judged = self._dirty_round_rate is not None or pending_bytes < RATE_SAMPLE_BYTES
        judged = judged and self._target_digested >= 1
        fields: dict[str, Any] = {
            "bytes_remaining": pending_bytes,
            "expected_downtime_ms": expected_ms,
            "dirty_rate_bytes_s": self._dirty_rate(pending_bytes),
            "throughput_bytes_s": round(self._throughput()),
        }
        if self._converged.is_set():
            self.progress.update(**fields)
            return
        total = self.guest.memory.size
        fields["percent"] = {"copy": 90 + 9 * (total - min(pending_bytes, total)) // total}
        fits = judged and expected_ms is not None and expected_ms <= self.params["downtime_ms"]
        if fits or (pending_bytes == 0 and self._target_digested >= 1):
            fields.update(converged=True, percent={"copy": 100})
            self._converged.set()
        elif self._rounds_exhausted(judged):
            raise MigrationAborted(
                f"did not converge in {self.params['max_rounds']} rounds: the guest writes "
                f"{fields['dirty_rate_bytes_s'] / 1e6:.1f} MB/s, "
                f"the link moves {(self._dirty_round_rate or self._throughput()) / 1e6:.1f} MB/s"
            )
        self.progress.update(**fields)

    async def _wait_for_target_hashing(self) -> None:
        """Pace the rounds while the target hashes the first pass, instead of spinning through them."""
        self._target_hashed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(UNJUDGED_ROUND_WAIT_S):
                await self._target_hashed.wait()

    def _rounds_exhausted(self, judged: bool) -> bool:
        """Rounds run while the target still hashes a big first pass say nothing about convergence.

        They count only once convergence can be judged, up to a hard cap of
        UNJUDGED_ROUNDS_FACTOR times the limit so that a target that never reports cannot keep
        the copy going forever.
        """
        rounds, limit = self.progress.snapshot()["round"], self.params["max_rounds"]
        return (judged and rounds >= limit) or rounds >= UNJUDGED_ROUNDS_FACTOR * limit

    def _begin_round(self) -> None:
        assert self._writer is not None
        self._round_started = (time.monotonic(), self._writer.bytes_sent)

    def _end_round(self, dirty_round: bool = False) -> None:
        assert self._writer is not None and self._round_started is not None
        started, sent_before = self._round_started
        seconds, sent = time.monotonic() - started, self._writer.bytes_sent - sent_before
        self._rounds_seconds += seconds
        self._rounds_bytes += sent
        self._round_started = None
        if dirty_round and sent >= RATE_SAMPLE_BYTES and seconds > 0:
            self._dirty_round_rate = sent / seconds

    def _throughput(self) -> float:
        """Bytes on the wire per wall-clock second of rounds (hashing and waits between rounds excluded)."""
        assert self._writer is not None
        seconds, sent = self._rounds_seconds, self._rounds_bytes
        if self._round_started is not None:
            started, sent_before = self._round_started
            seconds += time.monotonic() - started
            sent += self._writer.bytes_sent - sent_before
        return sent / seconds if seconds > 0 else 0.0

    def _dirty_rate(self, pending_bytes: int) -> int:
        since, _ = self._dirty_mark
        elapsed = time.monotonic() - since
        return round(pending_bytes / elapsed) if elapsed > 0 else 0

    async def _send_full_pass(self) -> None:
        """Round 1: every page once, in address order; never-written pages as ZERO markers."""
        memory = self.guest.memory
        written = bytes(memory.written)
        total = memory.size
        position = 0
        for first, count in gaps_of(written):
            await self._send_written(written, position, first)
            await self._writer_zero(first, count)
            position = first + count
            self._note_pass_progress(position, total)
        await self._send_written(written, position, memory.page_count)
        self._note_pass_progress(memory.page_count, total)

    async def _send_written(self, written: bytes, first: int, end: int) -> None:
        for run_first in range(first, end, RUN_PAGES):
            count = min(RUN_PAGES, end - run_first)
            await self._send_run(run_first, count)
            if run_first % (8 * RUN_PAGES) == 0:
                self._note_pass_progress(run_first + count, self.guest.memory.size)
                await self._mirror_progress(force=False)

    async def _writer_zero(self, first: int, count: int) -> None:
        assert self._writer is not None
        await self._writer.zero(first, count)

    async def _send_run(self, first: int, count: int) -> None:
        assert self._writer is not None
        payload = self.guest.memory.pages(first, count)
        if payload == ZERO_RUN[: len(payload)]:
            await self._writer.zero(first, count)
        else:
            await self._writer.pages(first, payload)

    def _note_pass_progress(self, pages_done: int, total: int) -> None:
        done = pages_done * PAGE_SIZE
        pending = self.guest.memory.dirty_count() * PAGE_SIZE
        self.progress.update(
            percent={"copy": 90 * done // total},
            bytes_sent=self._writer.bytes_sent if self._writer else 0,
            bytes_remaining=total - done + pending,
            throughput_bytes_s=round(self._throughput()),
        )

    async def _send_round(self, dirty: bytearray) -> None:
        """Send the pages of one round, whole: once taken, they are no longer marked dirty."""
        assert self._writer is not None
        self._begin_round()
        view, scattered = self.guest.memory.view, []
        for first, count in runs_of(dirty):
            if count < SCATTERED_RUN:
                scattered.extend(range(first, first + count))
                if len(scattered) >= PAGE_LIST_BATCH:
                    await self._writer.page_list(scattered, view)
                    scattered = []
                    await self._mirror_progress(force=False)
                continue
            for run_first in range(first, first + count, RUN_PAGES):
                run_count = min(RUN_PAGES, first + count - run_first)
                await self._writer.pages(run_first, self.guest.memory.pages(run_first, run_count))
            await self._mirror_progress(force=False)
        if scattered:
            await self._writer.page_list(scattered, view)
        await self._writer.flush()
        self._end_round(dirty_round=True)
        self.progress.update(bytes_sent=self._writer.bytes_sent)
        self._round_done = self.progress.snapshot()["round"]
        await self._mirror_progress(force=True)

    async def _mirror_progress(self, force: bool) -> None:
        """Tell the target how far the source is, at most every PROGRESS_EVERY_S."""
        assert self._writer is not None
        now = time.monotonic()
        if not force and now - self._last_mirror < PROGRESS_EVERY_S:
            return
        self._last_mirror = now
        snapshot = self.progress.snapshot()
        mirror = {name: snapshot[name] for name in MIRRORED_FIELDS}  # type: ignore[literal-required]
        mirror.update(state=snapshot["state"], phase=snapshot["phase"], percent=snapshot["percent"])
        mirror["round_done"] = self._round_done
        await self._writer.message(PROGRESS, mirror)

    # -- ending ---------------------------------------------------------
    async def _abort(self, error: str) -> None:
        if self.progress.state not in ACTIVE_STATES:
            return
        log.warning("migration %s (source) aborted: %s", self.migration_id, error)
        await self._stop_tasks(keep_main=True)
        self._finish("aborted", error, self.progress.phase)

    async def _stop_tasks(self, keep_main: bool = False) -> None:
        current = asyncio.current_task()
        tasks = [self._copy_task, self._reader_task] + ([] if keep_main else [self._task])
        for task in tasks:
            if task is not None and task is not current and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._sock is not None:
            self._sock.close()

    def _finish(self, state: str, error: str, failed_phase: str | None) -> None:
        self._restore_guest()
        self.progress.update(state=state, phase=None, error=error, failed_phase=failed_phase)
        self._settled.set()

    def _restore_guest(self) -> None:
        """The guest stays (or becomes again) the running one, its workload going on."""
        self.guest.memory.stop_tracking()
        self.guest.unquiesce_io()
        self.guest.resume_vcpus()
        if self.guest.migrating == self.migration_id:
            self.guest.migrating = None


class TargetMigration:
    """Receives the guest into a paused copy; from "ready" on it only obeys the control plane."""

    role = "target"

    def __init__(
        self,
        guest: SimulatedGuest,
        migration_id: str,
        limits: PhaseLimits,
        data_host: str,
        on_drop: Callable[[SimulatedGuest], Awaitable[None]],
    ) -> None:
        self.migration_id = migration_id
        self.guest_name = guest.name
        self.guest = guest
        self.limits = limits
        self.progress = Progress(migration_id, "target", guest.name, guest.memory.size)
        self._on_drop = on_drop
        self._token = secrets.token_urlsafe(32)
        self._listener = socket.create_server((data_host, 0), family=self._family(data_host), backlog=4)
        self._listener.setblocking(False)
        self._data_host = data_host
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._refresh: asyncio.Future[None] | None = None
        self._round_done: Any = 0
        self._drop_task: asyncio.Future[None] | None = None

    @staticmethod
    def _family(host: str) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in host else socket.AF_INET

    @property
    def endpoint(self) -> Endpoint:
        return {"host": self._data_host, "port": self._listener.getsockname()[1], "token": self._token}

    def start(self) -> None:
        self.guest.migrating = self.migration_id
        self._task = asyncio.create_task(self._run(), name=f"migrate in {self.migration_id}")

    def snapshot(self) -> ProgressSnapshot:
        return self.progress.snapshot()

    async def next_change(self, after_seq: int) -> ProgressSnapshot:
        return await self.progress.next_change(after_seq)

    async def quiesce(self) -> ProgressSnapshot:
        raise Conflict("quiesce is a source command")

    async def freeze(self) -> ProgressSnapshot:
        raise Conflict("freeze is a source command")

    async def release(self) -> ProgressSnapshot:
        raise Conflict("release is a source command")

    async def resume(self) -> ProgressSnapshot:
        state = self.progress.state
        if state == "completed":
            return self.snapshot()
        if state != "ready":
            raise Conflict(f"resume needs a migration in state ready, this one is {state}")
        self.guest.migrating = None
        self.guest.unquiesce_io()
        self.guest.run()
        self.progress.update(state="completed", phase=None)
        return self.snapshot()

    async def discard(self) -> ProgressSnapshot:
        state = self.progress.state
        if state == "completed":
            raise Conflict("the guest already runs here; it cannot be discarded")
        if state != "discarded":
            await self._stop()
            await self._drop()
            error = self.progress.snapshot()["error"]
            failed = self.progress.phase if state in ACTIVE_STATES else None
            self.progress.update(state="discarded", phase=None, error=error, failed_phase=failed)
        return self.snapshot()

    async def cancel(self) -> ProgressSnapshot:
        state = self.progress.state
        if state in ACTIVE_STATES or state == "ready":
            phase = self.progress.phase
            await self._stop(notify="the target was cancelled by the control plane")
            await self._drop()
            self.progress.update(
                state="cancelled", phase=None, error="cancelled by the control plane", failed_phase=phase
            )
        elif state == "completed":
            raise Conflict("the guest already runs here; too late to cancel")
        return self.snapshot()

    # -- the run --------------------------------------------------------
    async def _run(self) -> None:
        try:
            async with asyncio.timeout(limit_of(self.limits, "init")):
                await self._accept_source()
            self.progress.update(state="copy", phase="copy")
            await self._receive()
        except TimeoutError:
            await self._abort(
                f"no source connected within the init limit of {limit_of(self.limits, 'init')} s"
            )
        except MigrationAborted as error:
            await self._abort(str(error))
        except (OSError, ProtocolError) as error:
            await self._abort(f"lost the data-plane connection to the source: {error}")
        except Exception as error:
            log.exception("migration %s (target) failed", self.migration_id)
            await self._abort(f"internal error: {error!r}")
        finally:
            self._listener.close()
            if self._sock is not None:
                self._sock.close()

    async def _accept_source(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, peer = await loop.sock_accept(self._listener)
            tune_socket(sock)
            if await self._handshake(sock, peer):
                self._sock = sock
                self._listener.close()
                self.progress.update(percent={"init": 100})
                return
            sock.close()

    async def _handshake(self, sock: socket.socket, peer: Any) -> bool:
        writer = FrameWriter(sock)
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                kind, hello = await FrameReader(sock).message()
        except (TimeoutError, OSError, ProtocolError) as error:
            log.warning("refused data-plane connection from %s for %s: %s", peer, self.migration_id, error)
            return False
        refusal = self._check_hello(kind, hello)
        with contextlib.suppress(OSError):
            if refusal:
                log.warning(
                    "refused data-plane connection from %s for %s: %s", peer, self.migration_id, refusal
                )
                await writer.message(REFUSE, {"error": refusal})
                return False
            init_s = limit_of(self.limits, "init") or POPULATE_BUDGET_S * 4
            budget = min(POPULATE_BUDGET_S, init_s / 4)
            await asyncio.to_thread(self.guest.memory.populate, self._populate_runs(hello), budget)
            await writer.message(ACCEPT, {"migration_id": self.migration_id})
            return True
        return False

    def _populate_runs(self, hello: dict[str, Any]) -> list[tuple[int, int]]:
        """The chunks the source has written, checked: they get RAM before the copy starts."""
        runs = hello.get("populate")
        if not isinstance(runs, list):
            return []
        chunk_count = self.guest.memory.chunk_count
        return [
            (run[0], run[1])
            for run in runs
            if isinstance(run, list)
            and len(run) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in run)
            and run[0] >= 0
            and run[1] > 0
            and run[0] + run[1] <= chunk_count
        ]

    def _check_hello(self, kind: int, hello: dict[str, Any]) -> str | None:
        token = hello.get("token")
        if kind != HELLO or not isinstance(token, str):
            return "no token presented"
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            return "wrong data-plane token"
        if hello.get("migration_id") != self.migration_id or hello.get("guest") != self.guest.name:
            return "this listener is for another migration"
        if hello.get("memory_mib") != self.guest.memory_mib:
            return f"the target guest was prepared with {self.guest.memory_mib} MiB"
        return None

    async def _receive(self) -> None:
        assert self._sock is not None
        reader = FrameReader(self._sock)
        memory = self.guest.memory
        while True:
            kind, count, first = await reader.header()
            if kind in (PAGES, ZERO) and (count < 1 or first + count > memory.page_count):
                raise ProtocolError(f"pages {first}+{count} are outside the guest's memory")
            if kind == PAGES:
                await reader.into(memory.pages(first, count))
                memory.note_written(first, count)
            elif kind == PAGE_LIST:
                await self._receive_page_list(reader, count)
            elif kind == ZERO:
                memory.zero_pages(first, count)
            elif kind == PROGRESS:
                self._mirror(await reader.json_body(count))
            elif kind == FREEZE:
                await self._verify(await reader.json_body(count))
                return
            elif kind == ABORT:
                body = await reader.json_body(count)
                raise MigrationAborted(f"the source aborted: {body.get('error', 'no reason')}")
            else:
                raise ProtocolError(f"unexpected frame kind {kind} from the source")

    async def _receive_page_list(self, reader: FrameReader, count: int) -> None:
        memory = self.guest.memory
        if not 0 < count <= MAX_PAGE_LIST:
            raise ProtocolError(f"a page list of {count} pages")
        numbers = bytearray(8 * count)
        await reader.into(memoryview(numbers))
        pages = list(struct.unpack(f"<{count}Q", numbers))
        if max(pages) >= memory.page_count:
            raise ProtocolError("a listed page is outside the guest's memory")
        contents = memoryview(bytearray(count * PAGE_SIZE))
        await reader.into(contents)
        view = memory.view
        for index, page in enumerate(pages):
            view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = contents[
                index * PAGE_SIZE : (index + 1) * PAGE_SIZE
            ]
        memory.note_pages_written(pages)

    def _mirror(self, source: dict[str, Any]) -> None:
        fields = {name: source[name] for name in MIRRORED_FIELDS if name in source}
        phase = source.get("phase")
        if phase in ("copy", "quiesce", "frozen"):
            fields.update(state=phase, phase=phase)
        percent = source.get("percent") if isinstance(source.get("percent"), dict) else {}
        if source.get("round_done") != self._round_done:
            self._round_done = source.get("round_done")
            self._refresh_in_background()
        self.progress.update(percent=dict(percent), **fields)

    def _refresh_in_background(self) -> None:
        """Keep page digests warm between rounds, so the check at Frozen only hashes the last pages."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._hash_rounds())

    async def _hash_rounds(self) -> None:
        """Hash the rounds received so far, tell the source, and go on while rounds keep coming."""
        while True:
            round_done = self._round_done
            await asyncio.get_running_loop().run_in_executor(None, self.guest.memory.refresh_digests)
            if self._sock is not None and isinstance(round_done, int):
                with contextlib.suppress(OSError):
                    await FrameWriter(self._sock).message(DIGESTED, {"round": round_done})
            if self._round_done == round_done:
                return

    async def _verify(self, freeze: dict[str, Any]) -> None:
        assert self._sock is not None
        self.progress.update(state="frozen", phase="frozen", percent={"frozen": 70})
        started = time.monotonic()
        if self._refresh is not None:
            await self._refresh
        waited = time.monotonic() - started
        memory = self.guest.memory
        hashed = await asyncio.get_running_loop().run_in_executor(None, memory.refresh_digests)
        digest, source_digest = memory.digest(), freeze.get("source_digest")
        log.info(
            "migration %s (target) digest: waited %.0f ms for hashing in flight, then %d pages in %.0f ms",
            self.migration_id,
            waited * 1000,
            hashed,
            (time.monotonic() - started - waited) * 1000,
        )
        writer = FrameWriter(self._sock)
        if digest != source_digest:
            await writer.message(ABORT, {"error": "memory digest mismatch"})
            raise MigrationAborted(f"memory digest mismatch: source {source_digest}, target {digest}")
        self.guest.load_state(freeze["state"])
        self.guest.pause_vcpus()
        await writer.message(READY, {"target_digest": digest})
        self.progress.update(
            state="ready",
            percent={"frozen": 100},
            source_digest=source_digest,
            target_digest=digest,
            bytes_remaining=0,
        )

    # -- ending ---------------------------------------------------------
    async def _abort(self, error: str) -> None:
        if self.progress.state not in ACTIVE_STATES:
            return
        log.warning("migration %s (target) aborted: %s", self.migration_id, error)
        phase = self.progress.phase
        await self._drop()
        self.progress.update(state="aborted", phase=None, error=error, failed_phase=phase)

    async def _stop(self, notify: str | None = None) -> None:
        if notify and self._sock is not None and self.progress.state in ACTIVE_STATES:
            with contextlib.suppress(OSError):
                await asyncio.wait_for(FrameWriter(self._sock).message(ABORT, {"error": notify}), 1.0)
        if self._task is not None and self._task is not asyncio.current_task() and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._listener.close()
        if self._sock is not None:
            self._sock.close()

    async def _drop(self) -> None:
        """Free the copy once: the target never keeps a half-received guest.

        The drop runs in a task of its own that every caller waits for, shielded: a
        discard arriving while an abort is still dropping cancels the run task, and that
        must not leave the copy half-dropped (it would block every retry to this host).
        """
        if self._drop_task is None:
            self._drop_task = asyncio.ensure_future(self._drop_once())
        await asyncio.shield(self._drop_task)

    async def _drop_once(self) -> None:
        if self._refresh is not None:
            with contextlib.suppress(Exception):
                await self._refresh
        await self._on_drop(self.guest)
