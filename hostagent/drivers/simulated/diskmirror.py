"""The simulated driver's mirror of a guest's disks on local pools (``LocalDisks`` "mirror").

One extra data-plane connection, the **disk stream**, opened with the migration's one-time token
beside the page streams (HELLO ``disk_stream``), carries DISK_DATA frames (``wire``) from the source's
volumes into the new volumes the target allocated at prepare, then DISK_END.

Source, in order (``SourceMirror``), before the memory pre-copy starts:
1. Tracking on: every block the guest writes is marked dirty (4 KiB, ``guest.DISK_BLOCK``).
2. First pass: the data segments of each volume (``SEEK_DATA``/``SEEK_HOLE``: holes are not read)
   in 1 MiB reads; an all-zero read is not sent (the target's new volume is sparse: zero already).
3. Catch-up rounds: the blocks written meanwhile, re-read and sent, until at most
   ``READY_PENDING_BYTES`` are left.
4. Ready, in one step of the event loop (no guest write can fall between): the last dirty blocks go
   into the stream's buffer and the mirror turns **write-blocking**: from then on each guest write is
   put into the stream's buffer before the write completes (``FrameWriter.disk_now``), so the target
   cannot fall behind; the stream's order keeps a block's later version after its earlier ones.
5. At Frozen (the guest paused, its disks closed): DISK_END, and the SHA-256 of each source volume
   travels in FREEZE; the target waits for DISK_END, hashes its volumes and answers READY only if
   every digest matches (``DIGEST_MISMATCH`` otherwise).

"Write-blocking" here means the write is queued on the disk stream, in order, before the guest's
write completes; the simulation does not wait for the target's acknowledgement (QEMU's
``copy-mode=write-blocking`` does). Safety does not rest on it: the digests at Frozen do.

An abort or cancel stops the mirror and leaves the source's volumes as the guest wrote them (the mirror
only reads them); the target deletes the volumes it allocated (``SimulatedDriver._drop_incoming``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from hostagent.drivers.simulated.guest import DISK_BLOCK, SimulatedGuest
from hostagent.drivers.simulated.wire import (
    DISK_DATA,
    DISK_END,
    DISK_OFFSET_MASK,
    DISK_SHIFT,
    MAX_DISK_FRAME,
    FrameReader,
    FrameWriter,
    ProtocolError,
)

READ_CHUNK = 1 << 20
ZERO_CHUNK = bytes(READ_CHUNK)
READY_PENDING_BYTES = 256 * 1024  # at most this much left to re-send: the mirror turns write-blocking
FLUSH_EVERY_S = 0.005  # write-blocking: the guest's queued writes leave at least this often


def data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of ``fd`` that hold data (holes skipped); the whole file if the
    file system cannot tell."""
    segments, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # only a hole is left
                break
            return [(0, size)]
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        segments.append((start, end))
        offset = end
    return segments


def allocated_data_bytes(path: Path) -> int:
    """Bytes of ``path`` in data segments (what a sparse copy reads)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return sum(end - start for start, end in data_segments(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def disk_digest(path: Path) -> str:
    """SHA-256 of the volume's contents, hex: its size, then each 1 MiB chunk that is not all zeros
    (its number and bytes), in order. It depends on the contents only, not on where the file system
    keeps holes (the target's copy is sparser than the source). Raises OSError."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        digest.update(size.to_bytes(8, "little"))
        last = -1
        for start, end in data_segments(fd, size):
            for chunk in range(max(start // READ_CHUNK, last + 1), (end - 1) // READ_CHUNK + 1):
                data = os.pread(fd, READ_CHUNK, chunk * READ_CHUNK)
                if data != ZERO_CHUNK[: len(data)]:
                    digest.update(chunk.to_bytes(8, "little") + data)
                last = chunk
    finally:
        os.close(fd)
    return digest.hexdigest()


class SourceMirror:
    """The source's side of the mirror of ``devices`` (the guest's disks on local pools, in order)."""

    def __init__(self, guest: SimulatedGuest, devices: list[str]) -> None:
        self.guest = guest
        self.devices = devices
        self.ready = asyncio.Event()
        self.total_bytes = 0  # data bytes of the first pass (measured when it starts)
        self.sent_bytes = 0
        self.scanned_bytes = 0  # first-pass bytes read so far
        self.written_bytes = 0  # bytes the guest wrote to the mirrored disks since tracking began
        self.send_seconds = 0.0
        self._fds: list[int] = []
        self._sizes: list[int] = []
        self._dirty: list[set[int]] = [set() for _ in devices]
        self._index = {device: index for index, device in enumerate(devices)}
        self.writer: FrameWriter | None = None
        self._write_blocking = False
        self._started = time.monotonic()

    # -- figures ----------------------------------------------------------
    def pending_bytes(self) -> int:
        """What is left to send: the first pass's unread data plus the blocks written since copied."""
        if self._write_blocking:
            return 0
        dirty = sum(len(blocks) for blocks in self._dirty) * DISK_BLOCK
        return max(0, self.total_bytes - self.scanned_bytes) + dirty

    def dirty_rate(self) -> int:
        """Bytes/s the guest has written to the mirrored disks since the mirror began."""
        return round(self.written_bytes / max(time.monotonic() - self._started, 1e-3))

    def throughput(self) -> int:
        """Bytes/s the disk stream moved while sending."""
        return round(self.sent_bytes / self.send_seconds) if self.send_seconds else 0

    # -- running ----------------------------------------------------------
    def start(self, writer: FrameWriter) -> None:
        """Open the volumes to read, measure the first pass, and track the guest's writes from now on."""
        self.writer = writer
        for device in self.devices:
            path = self.guest.disk_paths[device]
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._fds.append(fd)
            self._sizes.append(os.fstat(fd).st_size)
        self.total_bytes = sum(allocated_data_bytes(self.guest.disk_paths[d]) for d in self.devices)
        self._started = time.monotonic()
        self.guest.disk_write_hook = self._on_write

    def _on_write(self, device: str, offset: int, data: bytes) -> None:
        """The guest wrote ``data`` at ``offset`` of ``device`` (called synchronously by its workload)."""
        index = self._index.get(device)
        if index is None:
            return
        self.written_bytes += len(data)
        if self._write_blocking:
            assert self.writer is not None
            self.writer.disk_now(index, offset, data)
            self.sent_bytes += len(data)
        else:
            for block in range(offset - offset % DISK_BLOCK, offset + len(data), DISK_BLOCK):
                self._dirty[index].add(block)

    async def run(self, on_progress: Callable[[bool], None]) -> None:
        """First pass, catch-up rounds, then write-blocking until cancelled (``finish`` or a stop).

        ``on_progress(force)``: called as the copy goes (``force``: note it now, at ready). Raises
        OSError (a volume unreadable, the stream broken)."""
        writer = self.writer
        assert writer is not None
        for index, fd in enumerate(self._fds):
            for start, end in data_segments(fd, self._sizes[index]):
                for offset in range(start, end, READ_CHUNK):
                    data = os.pread(fd, min(READ_CHUNK, end - offset), offset)
                    self.scanned_bytes += len(data)
                    if data != ZERO_CHUNK[: len(data)]:  # sparse: the target's new volume reads zero
                        await self._send(index, offset, data)
                    on_progress(False)
        while self.pending_bytes() > READY_PENDING_BYTES:
            dirty, self._dirty = self._dirty, [set() for _ in self.devices]
            for index, blocks in enumerate(dirty):
                for block in sorted(blocks):
                    await self._send(index, block, os.pread(self._fds[index], DISK_BLOCK, block))
                    on_progress(False)
        # One step of the loop: the last dirty blocks queued, then every guest write is forwarded.
        for index, blocks in enumerate(self._dirty):
            for block in sorted(blocks):
                data = os.pread(self._fds[index], DISK_BLOCK, block)
                writer.disk_now(index, block, data)
                self.sent_bytes += len(data)
            blocks.clear()
        self._write_blocking = True
        self.ready.set()
        on_progress(True)
        while True:
            started = time.monotonic()
            await writer.flush()
            self.send_seconds += time.monotonic() - started
            await asyncio.sleep(FLUSH_EVERY_S)

    async def _send(self, index: int, offset: int, data: bytes) -> None:
        assert self.writer is not None
        started = time.monotonic()
        await self.writer.disk(index, offset, data)
        self.send_seconds += time.monotonic() - started
        self.sent_bytes += len(data)

    async def finish(self) -> dict[str, str]:
        """At Frozen (the guest paused, its disks closed): DISK_END after every write, and the digests
        of the source's volumes (device -> SHA-256). Raises OSError."""
        assert self.writer is not None
        self.stop()
        self.writer.disk_end()
        await self.writer.flush()
        paths = [self.guest.disk_paths[device] for device in self.devices]
        digests = await asyncio.to_thread(lambda: [disk_digest(path) for path in paths])
        return dict(zip(self.devices, digests, strict=True))

    def stop(self) -> None:
        """Stop tracking the guest's writes and close the volumes (idempotent); the source's volumes
        are as the guest wrote them: the mirror only read them."""
        if self.guest.disk_write_hook == self._on_write:
            self.guest.disk_write_hook = None
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


class DiskWriteFailed(Exception):
    """The target could not write a mirrored volume: ``index`` of the disks, at byte ``offset``, why
    (``error``: ENOSPC when its pool ran out of space)."""

    def __init__(self, index: int, offset: int, error: OSError) -> None:
        super().__init__(f"disk {index} at {offset}: {error.strerror}")
        self.index, self.offset, self.error = index, offset, error


async def receive_disks(reader: FrameReader, fds: list[int], sizes: list[int]) -> None:
    """The target's end of the disk stream: DISK_DATA into the new volumes (``fds``), until DISK_END.

    Raises ProtocolError (a disk or range outside the volumes, another frame), ConnectionError,
    DiskWriteFailed (a volume could not be written: its pool is full)."""
    while True:
        kind, count, first = await reader.header()
        if kind == DISK_END:
            return
        if kind != DISK_DATA:
            raise ProtocolError(f"unexpected frame kind {kind} on the disk stream")
        index, offset = first >> DISK_SHIFT, first & DISK_OFFSET_MASK
        if index >= len(fds) or count > MAX_DISK_FRAME or offset + count > sizes[index]:
            raise ProtocolError(f"disk data {index}:{offset}+{count} lies outside the mirrored volumes")
        data = bytearray(count)
        await reader.into(memoryview(data))
        try:
            os.pwrite(fds[index], data, offset)
        except OSError as error:
            raise DiskWriteFailed(index, offset, error) from error
