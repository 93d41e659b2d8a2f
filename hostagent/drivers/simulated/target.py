"""The simulated driver's target side: it receives the guest into a paused copy (``driver.Migration``).

It listens once, checks the source's one-time token, admits the streams the first one announced
(each index once, with the same token), takes pages, PAGE_LIST and ZERO frames (``wire``) from every
stream into the guest's memory, mirrors the source's progress, and at Frozen, once every stream has
delivered every send batch (ROUND_END), checks the memory digest before it answers READY. A stream
that ends or breaks the partition before that aborts the migration. From "ready" on it only obeys the
control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agentprotocol import (
    ACTIVE_STATES,
    Endpoint,
    FailureKind,
    Phase,
    PhaseLimits,
    ProgressSnapshot,
    Role,
)
from hostagent.driver import Conflict, MigrationAborted, plain_connection_error
from hostagent.drivers.simulated.diskmirror import DiskWriteFailed, disk_digest, receive_disks
from hostagent.drivers.simulated.guest import SimulatedGuest
from hostagent.drivers.simulated.memory import PAGE_SIZE
from hostagent.drivers.simulated.source import MIRRORED_FIELDS
from hostagent.drivers.simulated.timing import (
    POPULATE_BUDGET_S,
    SourceAborted,
    kind_of,
)
from hostagent.drivers.simulated.wire import (
    ABORT,
    ACCEPT,
    DIGESTED,
    FREEZE,
    MAX_PAGE_LIST,
    MAX_ROUND,
    PAGE_KINDS,
    PAGE_LIST,
    PAGES,
    PARTITION_PAGES,
    PROGRESS,
    READY,
    REFUSE,
    ROUND_END,
    ZERO,
    Channel,
    FrameReader,
    FrameWriter,
    FreezeFrame,
    HelloFrame,
    ProgressFrame,
    ProtocolError,
    accept_until,
    check,
    read_hello,
    stream_of,
    token_refusal,
)
from hostagent.progress import Progress
from hostagent.resources import in_words, mark_committed

log = logging.getLogger("hostagent.simulated.target")
STOP_WAIT_S = 2.0  # a discard or cancel waits this long for the cancelled run to end, then drops anyway


class TargetMigration:
    """Receives the guest into a paused copy; from "ready" on it only obeys the control plane."""

    role: Role = "target"

    def __init__(
        self,
        guest: SimulatedGuest,
        migration_id: str,
        limits: PhaseLimits,
        data_host: str,
        on_drop: Callable[[SimulatedGuest], Awaitable[None]],
        tls: ssl.SSLContext | None = None,
        host_name: str = "this host",
    ) -> None:
        """``tls``: the data plane's server context (mutual TLS), or None for plain TCP (policy "off").
        ``host_name``: this agent's name, for errors people read."""
        self.host_name = host_name
        self.migration_id = migration_id
        self.guest_id = guest.guest_id
        self.guest = guest
        self.limits = limits
        self.progress = Progress(migration_id, "target", guest.guest_id, guest.memory.size)
        self._on_drop = on_drop
        self._token = secrets.token_urlsafe(32)
        self._listener = socket.create_server((data_host, 0), family=self._family(data_host), backlog=4)
        self._listener.setblocking(False)
        self._data_host = data_host
        self._sock: socket.socket | None = None
        self._channel: Channel | None = None  # stream 0: pages and every control frame
        self._channels: list[Channel | None] = []  # by stream index, filled as streams join
        self._streams = 1  # announced by stream 0's HELLO
        self._done_batch: list[int] = []  # per stream: the last send batch it ended (ROUND_END)
        self._done_round: list[int] = []  # per stream: the round of that batch
        self._batch_ended = asyncio.Event()
        self._tls = tls
        self._claimed = False
        self._joining: set[int] = set()  # stream indexes admitted, their ACCEPT not yet sent
        self._task: asyncio.Task[None] | None = None
        self._refresh: asyncio.Future[None] | None = None
        self._round_done: Any = 0
        self._drop_task: asyncio.Future[None] | None = None
        # Work in threads on the guest's memory (hashing, pre-faulting): a cancelled await leaves the
        # thread running, so the drop waits for these before it frees the memory.
        self._threads: set[asyncio.Future[Any]] = set()
        # A local-disk mirror (``diskmirror``): the devices, the new volumes open to write, DISK_END seen.
        self._mirror_devices = list(guest.mirror_volumes)
        self._mirror_fds: list[int] = []
        self._disks_ended = asyncio.Event()

    @staticmethod
    def _family(host: str) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in host else socket.AF_INET

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(host=self._data_host, port=self._listener.getsockname()[1], token=self._token)

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
        for volume in self.guest.mirror_volumes.values():
            mark_committed(volume)
        self.guest.mirror_volumes = {}  # the guest's own now: nothing deletes them
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
            current = self.progress.current
            error = current.error or "discarded by the control plane"
            self.progress.fail("discarded", error, current.failure_kind or FailureKind.CANCELLED)
        return self.snapshot()

    async def cancel(self) -> ProgressSnapshot:
        state = self.progress.state
        if state in ACTIVE_STATES or state == "ready":
            await self._stop(notify="the target was cancelled by the control plane")
            await self._drop()
            self.progress.fail("cancelled", "cancelled by the control plane", FailureKind.CANCELLED)
        elif state == "completed":
            raise Conflict("the guest already runs here; too late to cancel")
        return self.snapshot()

    # -- the run --------------------------------------------------------
    async def _run(self) -> None:
        try:
            async with asyncio.timeout(self.limits.of("init")):
                await self._accept_source()
            self.progress.update(state="copy", phase="copy")
            await self._receive()
        except TimeoutError:
            await self._abort(
                f"no source connected within the init limit of {self.limits.of('init')} s",
                FailureKind.TIME_LIMIT,
            )
        except SourceAborted as error:
            await self._abort(str(error), error.kind, side="source")
        except MigrationAborted as error:
            await self._abort(str(error), error.kind)
        except ProtocolError as error:
            await self._abort(f"refused the source's data-plane message: {error}", FailureKind.REFUSED)
        except OSError as error:
            await self._abort(
                f"lost the data-plane connection to the source: {plain_connection_error(error)}",
                FailureKind.UNREACHABLE,
            )
        except Exception as error:
            log.exception("migration %s (target) failed", self.migration_id)
            await self._abort(f"internal error: {error!r}", FailureKind.INTERNAL)
        finally:
            self._listener.close()
            self._close_streams()

    async def _accept_source(self) -> None:
        """Accept connections until every stream of the source proved itself; each handshake runs alone.

        ``wire.accept_until``: a stranger (no certificate from the CA, no or a wrong token, garbage,
        or silence) is dropped alone after at most ``HELLO_TIMEOUT_S``; it never delays the real
        source, whose handshakes run beside the strangers' ones.
        """
        won: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # every stream is in
        await accept_until(self._listener, self._handshake, won, f"migration {self.migration_id} (target)")
        won.result()
        self.progress.update(streams=self._streams)
        self._channel = self._channels[0]
        self._sock = self._channel.sock if self._channel is not None else None
        self._listener.close()
        self.progress.update(percent={"init": 100})

    async def _handshake(self, sock: socket.socket, peer: Any, won: asyncio.Future[None]) -> None:
        """One connection's TLS handshake and HELLO, bounded in time and size; never raises."""
        try:
            channel, kind, hello = await read_hello(sock, self._tls)
        except (TimeoutError, OSError, ProtocolError) as error:  # ssl.SSLError is an OSError
            reason = "no HELLO within the handshake limit" if isinstance(error, TimeoutError) else error
            log.warning("refused data-plane connection from %s for %s: %s", peer, self.migration_id, reason)
            sock.close()
            return
        except Exception:
            log.exception("refused data-plane connection from %s for %s", peer, self.migration_id)
            sock.close()
            return
        except BaseException:  # cancelled: the source got in, or the migration ended
            sock.close()
            raise
        refusal = self._check_hello(kind, hello)
        index = 0
        if refusal is None:
            refusal, index = self._admit_stream(hello, won)
        writer = FrameWriter(channel)
        try:
            if refusal:
                log.warning(
                    "refused data-plane connection from %s for %s: %s", peer, self.migration_id, refusal
                )
                with contextlib.suppress(OSError):
                    await asyncio.wait_for(writer.message(REFUSE, {"error": refusal}), 1.0)
                sock.close()
                return
            if index == 0:
                init_s = self.limits.of("init") or POPULATE_BUDGET_S * 4
                budget = min(POPULATE_BUDGET_S, init_s / 4)
                await self._in_thread(self.guest.memory.populate, self._populate_runs(hello), budget)
            await writer.message(ACCEPT, {"migration_id": self.migration_id, "stream": index})
        except (OSError, TimeoutError) as error:
            log.warning("data-plane source %s for %s went away: %s", peer, self.migration_id, error)
            sock.close()
            if not won.done():
                won.set_exception(ConnectionError(f"the source went away during the handshake: {error}"))
            return
        if won.done():
            sock.close()
            return
        self._channels[index] = channel
        if all(joined is not None for joined in self._channels):
            won.set_result(None)

    def _admit_stream(self, hello: dict[str, Any], won: asyncio.Future[None]) -> tuple[str | None, int]:
        """(refusal or None, stream index) for a HELLO with the right token; claims the index at once.

        Stream 0 comes first and announces the count; the token then admits each further index once.
        """
        try:
            frame = check(HelloFrame, hello, "HELLO")
        except ProtocolError as error:
            return str(error), 0
        index = frame.stream
        if won.done():
            return "the one-time token was already used", index
        if frame.disk_stream:
            return self._admit_disk_stream()
        if index == 0:
            if self._claimed:
                return "the one-time token was already used", index
            if frame.mirror != self._mirror_devices:
                return (
                    f"the source mirrors disks {frame.mirror or 'none'}, this target allocated volumes for "
                    f"{self._mirror_devices or 'none'} (both sides need the same local_disks)",
                    index,
                )
            self._claimed = True
            self._streams = frame.streams
            self._channels = [None] * (frame.streams + (1 if self._mirror_devices else 0))
            self._done_batch = [0] * frame.streams
            self._done_round = [0] * frame.streams
            return None, index
        if not self._claimed:
            return "stream 0 must join first", index
        if frame.streams != self._streams or index >= self._streams:
            return f"stream {index} of {frame.streams} does not fit the {self._streams} announced", index
        if self._channels[index] is not None or index in self._joining:
            return f"stream {index} already joined (the one-time token admits each stream once)", index
        self._joining.add(index)
        return None, index

    def _admit_disk_stream(self) -> tuple[str | None, int]:
        """The mirror's disk stream: after stream 0, once, only if this target allocated volumes."""
        index = self._streams
        if not self._mirror_devices:
            return "this target mirrors no disk", 0
        if not self._claimed:
            return "stream 0 must join first", 0
        if self._channels[index] is not None or index in self._joining:
            return "the disk stream already joined", 0
        self._joining.add(index)
        return None, index

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
        refusal = token_refusal(kind, hello, self._token)
        if refusal is not None:
            return refusal
        if hello.get("migration_id") != self.migration_id or hello.get("guest") != self.guest.guest_id:
            return "this listener is for another migration"
        if hello.get("memory_mib") != self.guest.memory_mib:
            return f"the target guest was prepared with {self.guest.memory_mib} MiB"
        return None

    async def _receive(self) -> None:
        """Read every stream at once until stream 0's FREEZE is verified; any stream failing aborts."""
        tasks = [
            asyncio.create_task(
                self._receive_stream(index, channel)
                if index < self._streams
                else self._receive_disks(channel)
            )
            for index, channel in enumerate(self._channels)
            if channel is not None
        ]
        pending: set[asyncio.Task[None]] = set(tasks)
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if tasks[0] in done:
                    return tasks[0].result()
                for task in done:
                    task.result()  # other page streams end only by failing, the disk stream at DISK_END
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _receive_stream(self, index: int, channel: Channel) -> None:
        """One stream's frames into memory; stream 0 also carries the control frames, ends at FREEZE."""
        reader = FrameReader(channel)
        memory = self.guest.memory
        while True:
            kind, count, first = await reader.header()
            if index and kind not in PAGE_KINDS:
                raise ProtocolError(f"data-plane stream {index} carried a control frame (kind {kind})")
            if kind in (PAGES, ZERO):
                if count < 1 or first + count > memory.page_count:
                    raise ProtocolError(f"pages {first}+{count} are outside the guest's memory")
                self._check_partition(index, first, count)
            if kind == PAGES:
                await reader.into(memory.pages(first, count))
                memory.note_written(first, count)
            elif kind == PAGE_LIST:
                await self._receive_page_list(reader, count, index)
            elif kind == ROUND_END:
                self._stream_ended_batch(index, count, first)
            elif kind == ZERO:
                memory.zero_pages(first, count)
            elif kind == PROGRESS:
                self._mirror(check(ProgressFrame, await reader.json_body(count), "PROGRESS from the source"))
            elif kind == FREEZE:
                await self._verify(
                    check(FreezeFrame, await reader.json_body(count), "FREEZE from the source")
                )
                return
            elif kind == ABORT:
                body = await reader.json_body(count)
                raise SourceAborted(f"the source aborted: {body.get('error', 'no reason')}", kind_of(body))
            else:
                raise ProtocolError(f"unexpected frame kind {kind} from the source")

    async def _receive_disks(self, channel: Channel) -> None:
        """The disk stream into the volumes allocated at prepare, until DISK_END (``diskmirror``)."""
        paths = [self.guest.mirror_volumes[device] for device in self._mirror_devices]
        self._mirror_fds = [os.open(path, os.O_RDWR | os.O_CLOEXEC) for path in paths]
        sizes = [os.fstat(fd).st_size for fd in self._mirror_fds]
        try:
            await receive_disks(FrameReader(channel), self._mirror_fds, sizes)
        except DiskWriteFailed as failed:
            device = self._mirror_devices[failed.index]
            disk = next(disk for disk in self.guest.spec.disks if disk.device == device)
            where, at = f"{self.host_name}'s pool {disk.pool}", in_words(failed.offset)
            if failed.error.errno == errno.ENOSPC:
                error = f"{where} ran out of space at {at} of {in_words(sizes[failed.index])}"
            else:
                error = f"{where} could not be written at {at}: {failed.error.strerror}"
            error += f" ({self.guest.name}'s disk {device})"
            if self._channel is not None:  # the source aborts with this reason, not a lost connection
                with contextlib.suppress(OSError, TimeoutError):
                    abort = {"error": error, "kind": FailureKind.INTERNAL}
                    await asyncio.wait_for(FrameWriter(self._channel).message(ABORT, abort), 1.0)
            raise MigrationAborted(error, FailureKind.INTERNAL) from None
        self._close_mirror_files()
        self._disks_ended.set()

    def _close_mirror_files(self) -> None:
        """Flush and close the mirror's volumes (idempotent)."""
        for fd in self._mirror_fds:
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)
        self._mirror_fds = []

    async def _verify_disks(self, freeze: FreezeFrame) -> None:
        """Every mirrored volume here equals the source's at the freeze (digests), or ABORT."""
        if not self._mirror_devices:
            return
        await self._disks_ended.wait()
        paths = [self.guest.mirror_volumes[device] for device in self._mirror_devices]
        digests = await self._in_thread(lambda: [disk_digest(path) for path in paths])
        for device, digest in zip(self._mirror_devices, digests, strict=True):
            if freeze.disk_digests.get(device) != digest:
                assert self._channel is not None
                mismatch = FailureKind.DIGEST_MISMATCH
                error = f"disk {device} digest mismatch after the mirror"
                await FrameWriter(self._channel).message(ABORT, {"error": error, "kind": mismatch})
                raise MigrationAborted(error, mismatch)

    def _check_partition(self, index: int, first: int, count: int) -> None:
        """Pages travel only on their own stream (``wire.stream_of``), or a stale copy could win."""
        streams = self._streams
        if streams > 1 and (
            count > PARTITION_PAGES
            or stream_of(first, streams) != index
            or stream_of(first + count - 1, streams) != index
        ):
            raise ProtocolError(f"pages {first}+{count} do not belong to data-plane stream {index}")

    def _stream_ended_batch(self, index: int, batch: int, round_number: int) -> None:
        """ROUND_END: stream ``index`` sent all its pages of ``batch``; a round every stream ended is
        hashed in the background (DIGESTED tells the source)."""
        if batch != self._done_batch[index] + 1 or round_number > MAX_ROUND:
            raise ProtocolError(f"stream {index} ended batch {batch} after batch {self._done_batch[index]}")
        self._done_batch[index] = batch
        self._done_round[index] = round_number
        self._batch_ended.set()
        received = min(self._done_round)
        if received != self._round_done:
            self._round_done = received
            self._refresh_in_background()

    async def _all_streams_ended(self, batches: int) -> None:
        """Wait until every stream ended send batch ``batches`` (FREEZE names it)."""
        while min(self._done_batch) < batches:
            self._batch_ended.clear()
            await self._batch_ended.wait()

    async def _receive_page_list(self, reader: FrameReader, count: int, index: int = 0) -> None:
        memory = self.guest.memory
        if not 0 < count <= MAX_PAGE_LIST:
            raise ProtocolError(f"a page list of {count} pages")
        numbers = bytearray(8 * count)
        await reader.into(memoryview(numbers))
        pages = list(struct.unpack(f"<{count}Q", numbers))
        if max(pages) >= memory.page_count:
            raise ProtocolError("a listed page is outside the guest's memory")
        streams = self._streams
        if streams > 1 and any((page // PARTITION_PAGES) % streams != index for page in pages):
            raise ProtocolError(f"a listed page does not belong to data-plane stream {index}")
        contents = memoryview(bytearray(count * PAGE_SIZE))
        await reader.into(contents)
        view = memory.view
        for index, page in enumerate(pages):
            view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = contents[
                index * PAGE_SIZE : (index + 1) * PAGE_SIZE
            ]
        memory.note_pages_written(pages)

    def _mirror(self, source: ProgressFrame) -> None:
        fields = {name: getattr(source, name) for name in MIRRORED_FIELDS if name in source.model_fields_set}
        phase = source.phase
        if phase in ("copy", "quiesce", "frozen"):
            fields.update(state=phase, phase=phase)
        percent: dict[Phase, float] = dict(source.percent)
        self.progress.update(percent=percent, **fields)

    def _refresh_in_background(self) -> None:
        """Keep page digests warm between rounds, so the check at Frozen only hashes the last pages."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._hash_rounds())

    async def _hash_rounds(self) -> None:
        """Hash the rounds received so far, tell the source, and go on while rounds keep coming."""
        while True:
            round_done = self._round_done
            await self._in_thread(self.guest.memory.refresh_digests)
            if self._channel is not None and isinstance(round_done, int):
                with contextlib.suppress(OSError):
                    await FrameWriter(self._channel).message(DIGESTED, {"round": round_done})
            if self._round_done == round_done:
                return

    async def _verify(self, freeze: FreezeFrame) -> None:
        assert self._channel is not None
        self.progress.update(state="frozen", phase="frozen", percent={"frozen": 70})
        started = time.monotonic()
        await self._all_streams_ended(freeze.batches)
        if self._refresh is not None:
            # Shielded: awaiting the task itself would cancel it with this run (a discard during
            # Frozen), and the drop that then awaited the cancelled task raised CancelledError into
            # every later discard: the agent closed the connection without an answer (soak, seed 1 run 93).
            await asyncio.shield(self._refresh)
        waited = time.monotonic() - started
        memory = self.guest.memory
        hashed = await self._in_thread(memory.refresh_digests)
        digest, source_digest = memory.digest(), freeze.source_digest
        log.info(
            "migration %s (target) digest: waited %.0f ms for hashing in flight, then %d pages in %.0f ms",
            self.migration_id,
            waited * 1000,
            hashed,
            (time.monotonic() - started - waited) * 1000,
        )
        await self._verify_disks(freeze)
        writer = FrameWriter(self._channel)
        if digest != source_digest:
            mismatch = FailureKind.DIGEST_MISMATCH
            await writer.message(ABORT, {"error": "memory digest mismatch", "kind": mismatch})
            raise MigrationAborted(
                f"memory digest mismatch: source {source_digest}, target {digest}", mismatch
            )
        self.guest.load_state(freeze.state.model_dump())
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
    async def _abort(self, error: str, kind: FailureKind, side: Role = "target") -> None:
        if self.progress.state not in ACTIVE_STATES:
            return
        log.warning("migration %s (target) aborted: %s", self.migration_id, error)
        await self._drop()
        self.progress.fail("aborted", error, kind, side=side)

    async def _in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in a worker thread, remembered until it ends (``_drop`` waits for it)."""
        future = asyncio.get_running_loop().run_in_executor(None, function, *args)
        self._threads.add(future)
        future.add_done_callback(self._threads.discard)
        return await future

    async def _stop(self, notify: str | None = None) -> None:
        """End the run (cancelled) and close the data plane; never raises, waits ``STOP_WAIT_S`` at most.

        Waiting with ``asyncio.wait`` neither cancels the caller nor lets the run's own ending
        (CancelledError included) escape into the command that stops it.
        """
        if notify and self._channel is not None and self.progress.state in ACTIVE_STATES:
            with contextlib.suppress(OSError, TimeoutError):
                abort = {"error": notify, "kind": FailureKind.CANCELLED}
                await asyncio.wait_for(FrameWriter(self._channel).message(ABORT, abort), 1.0)
        task = self._task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_WAIT_S)
            if not task.done():
                log.error(
                    "migration %s (target): the run did not end within %s s of its cancel; dropping anyway",
                    self.migration_id,
                    STOP_WAIT_S,
                )
        self._listener.close()
        self._close_streams()

    def _close_streams(self) -> None:
        """Close the data-plane streams and let go of them (their buffers: see the source's
        ``_drop_streams``); the agent keeps the ended migration listed."""
        for channel in self._channels:
            if channel is not None:
                channel.close()
        self._close_mirror_files()
        self._channels = [None] * len(self._channels)
        self._channel, self._sock = None, None

    async def _drop(self) -> None:
        """Free the copy once: the target never keeps a half-received guest.

        The drop runs in a task of its own that every caller waits for, shielded: a
        discard arriving while an abort is still dropping cancels the run task, and that
        must not leave the copy half-dropped (it would block every retry to this host).
        """
        previous = self._drop_task
        if previous is None or (previous.done() and (previous.cancelled() or previous.exception())):
            self._drop_task = asyncio.ensure_future(self._drop_once())  # a failed drop is tried again
        assert self._drop_task is not None
        await asyncio.shield(self._drop_task)

    async def _drop_once(self) -> None:
        """Wait for the work in threads on the guest's memory (however it ended), then free it."""
        busy = {*self._threads, *([self._refresh] if self._refresh is not None else [])}
        if busy:
            await asyncio.wait(busy)
        await self._on_drop(self.guest)
