"""Guest memory: page-addressed storage with write tracking and incremental digests.

The storage is a private anonymous ``mmap``: the kernel backs only the pages that were
touched, so a 4 GiB guest that wrote little costs little RAM. ``close`` gives the
pages back to the kernel (``MADV_DONTNEED``) even while a view of them is alive.

Three bitmaps (one byte per page, so C-speed ``re``/``count`` work on them):
- ``written``: pages that may be non-zero. Pages never written are zero and go
  over the wire as a marker.
- ``dirty``: pages written since the last ``take_dirty`` (only while tracking).
- ``stale``: pages whose digest must be recomputed.

Integrity: each page has a 64-bit xxh3 hash (``xxhash``, XXH3_64bits: a fast
non-cryptographic hash; the threat is accidental corruption, not an attacker,
and the data plane is already authenticated by its one-time token). A page's
table entry is ``xxh3(page) XOR xxh3(zero page)``, so a zero page's entry is 0 and
the table, itself an anonymous ``mmap``, costs no RAM for pages never written. The
whole-memory digest is XXH3_128 over that table, so after a round only the pages
written since are hashed again (a guest writing scattered pages would dirty every
larger chunk). Both sides compute the same function of the memory's contents.

Digest invariant, with writers on the event-loop thread and ``refresh_digests``
on a worker thread: a writer marks a page stale *after* writing it, and the
refresher clears the mark *before* hashing, so a page written while hashed is
always hashed again.
"""

from __future__ import annotations

import contextlib
import mmap
import re
import struct
import time
from collections.abc import Iterator

import xxhash

PAGE_SIZE = 4096
CHUNK_PAGES = 256
CHUNK_SIZE = PAGE_SIZE * CHUNK_PAGES
PAGE_DIGEST_SIZE = 8
ZERO_PAGE_HASH = xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE))
# Table entries packed per call. Between batches the hashing thread lets go of the GIL: unlike
# hashlib's SHA-1, per-page XXH3 calls are mostly interpreter time, and the event loop receiving or
# sending pages must not wait a whole switch interval (5 ms) for it.
HASH_BATCH_PAGES = 1024
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14; Python 3.11 lacks the name
POPULATE_BATCH_CHUNKS = 16  # 16 MiB per madvise call, which keeps the GIL
# mmap.madvise keeps the GIL: freeing 1.4 GiB in one call held the agent's event loop 0.7 s even from a
# worker thread. Freed this many bytes per call, the loop waits one call at most.
RELEASE_BATCH = 16 << 20
# Private, not mmap's default MAP_SHARED: shared anonymous memory is shmem, which MADV_DONTNEED does
# not free (the pages stay in the shmem object until the last unmap).
PRIVATE_ANONYMOUS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_RUNS = re.compile(rb"\x01+")
_GAPS = re.compile(rb"\x00+")


def runs_of(bitmap: bytes | bytearray, first: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """Yield (first_page, count) for each run of set bytes in ``bitmap[first:end]``."""
    for match in _RUNS.finditer(bitmap, first, len(bitmap) if end is None else end):
        yield match.start(), match.end() - match.start()


def gaps_of(bitmap: bytes | bytearray, first: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """Yield (first_page, count) for each run of clear bytes in ``bitmap[first:end]``."""
    for match in _GAPS.finditer(bitmap, first, len(bitmap) if end is None else end):
        yield match.start(), match.end() - match.start()


class GuestMemory:
    """``memory_mib`` MiB of guest RAM in 4 KiB pages; RAM is used only for pages written.

    Besides the pages written, a guest costs 2 bytes per page of bitmaps (3 while
    tracking writes) and up to 8 bytes per page of digest table (only where pages
    were hashed). Raises OSError when the map cannot be created.
    """

    def __init__(self, memory_mib: int) -> None:
        self.size = memory_mib * 1024 * 1024
        self.page_count = self.size // PAGE_SIZE
        self.chunk_count = self.page_count // CHUNK_PAGES
        self._map = mmap.mmap(-1, self.size, flags=PRIVATE_ANONYMOUS)
        self.view = memoryview(self._map)
        self.written: bytearray | bytes = bytearray(self.page_count)
        self.stale: bytearray | bytes = bytearray(self.page_count)
        self._page_digests = mmap.mmap(
            -1, max(1, self.page_count) * PAGE_DIGEST_SIZE, flags=PRIVATE_ANONYMOUS
        )
        self.dirty: bytearray | None = None
        self.closed = False

    # -- writing -------------------------------------------------------
    def note_written(self, first_page: int, count: int) -> None:
        """Record that pages were written (call after the bytes are in place)."""
        if count == 1:  # the workload's case, 25,000 times a second in the benchmark: no slices
            self.written[first_page] = 1  # type: ignore[index]
            if self.dirty is not None:
                self.dirty[first_page] = 1
            self.stale[first_page] = 1  # type: ignore[index]
            return
        end = first_page + count
        self.written[first_page:end] = b"\x01" * count  # type: ignore[index]
        if self.dirty is not None:
            self.dirty[first_page:end] = b"\x01" * count
        self.stale[first_page:end] = b"\x01" * count  # type: ignore[index]

    def note_pages_written(self, pages: list[int]) -> None:
        """``note_written`` for scattered single pages (the target's PAGE_LIST frames)."""
        written, stale = self.written, self.stale
        for page in pages:
            written[page] = 1  # type: ignore[index]
            stale[page] = 1  # type: ignore[index]

    def zero_pages(self, first_page: int, count: int) -> None:
        """Make pages zero; pages never written already are, and stay unbacked."""
        end = first_page + count
        for run_first, run_count in runs_of(self.written, first_page, end):
            start = run_first * PAGE_SIZE
            self.view[start : start + run_count * PAGE_SIZE] = bytes(run_count * PAGE_SIZE)
            self.written[run_first : run_first + run_count] = bytes(run_count)  # type: ignore[index]
            self.note_stale(run_first, run_count)

    def note_stale(self, first_page: int, count: int) -> None:
        self.stale[first_page : first_page + count] = b"\x01" * count  # type: ignore[index]

    def written_chunk_runs(self) -> list[tuple[int, int]]:
        """(first_chunk, count) runs of chunks whose every page was written: what a receiver will fill.

        A chunk with only some pages written is left out: backing all of it ahead of time
        would give RAM to pages that arrive as ZERO markers (a guest writing scattered pages
        would have its whole memory backed on the target); those pages fault in as they arrive.
        """
        runs: list[tuple[int, int]] = []
        for first, count in runs_of(self.written):
            first_chunk = -(-first // CHUNK_PAGES)
            end_chunk = (first + count) // CHUNK_PAGES
            if end_chunk > first_chunk:
                runs.append((first_chunk, end_chunk - first_chunk))
        return runs

    def populate(self, runs: list[tuple[int, int]], budget_s: float) -> None:
        """Back these chunks with RAM now, a batch per call, instead of one page fault per received page.

        Blocking (run it in a thread); stops after ``budget_s`` (the rest faults in as pages arrive),
        and at once on kernels without MADV_POPULATE_WRITE.
        """
        deadline = time.monotonic() + budget_s
        for first_chunk, count in runs:
            for batch_first in range(first_chunk, first_chunk + count, POPULATE_BATCH_CHUNKS):
                batch = min(POPULATE_BATCH_CHUNKS, first_chunk + count - batch_first)
                try:
                    self._map.madvise(MADV_POPULATE_WRITE, batch_first * CHUNK_SIZE, batch * CHUNK_SIZE)
                except (OSError, ValueError):
                    return
                if time.monotonic() > deadline:
                    return

    def pages(self, first_page: int, count: int) -> memoryview:
        return self.view[first_page * PAGE_SIZE : (first_page + count) * PAGE_SIZE]

    # -- write tracking ------------------------------------------------
    def start_tracking(self) -> None:
        self.dirty = bytearray(self.page_count)

    def stop_tracking(self) -> None:
        self.dirty = None

    def take_dirty(self) -> bytearray:
        """The pages written since the last call; tracking restarts from empty."""
        taken = self.dirty if self.dirty is not None else bytearray(self.page_count)
        self.dirty = bytearray(self.page_count)
        return taken

    def dirty_count(self) -> int:
        return self.dirty.count(1) if self.dirty is not None else 0

    def written_count(self) -> int:
        return self.written.count(1)

    # -- digests -------------------------------------------------------
    def refresh_digests(self) -> int:
        """Re-hash stale pages (thread-safe against writers, see module doc). Returns pages hashed.

        One XXH3_64 call per 4 KiB page; the table is written a batch of pages at a time.
        """
        hashed = since_yield = 0
        view, table, xxh3, zero = self.view, self._page_digests, xxhash.xxh3_64_intdigest, ZERO_PAGE_HASH
        for first, count in runs_of(bytes(self.stale)):
            self.stale[first : first + count] = bytes(count)  # type: ignore[index]
            end = first + count
            for batch in range(first, end, HASH_BATCH_PAGES):
                pages = min(HASH_BATCH_PAGES, end - batch)
                start = batch * PAGE_SIZE
                hashes = [
                    xxh3(view[offset : offset + PAGE_SIZE]) ^ zero
                    for offset in range(start, start + pages * PAGE_SIZE, PAGE_SIZE)
                ]
                table[batch * PAGE_DIGEST_SIZE : (batch + pages) * PAGE_DIGEST_SIZE] = struct.pack(
                    f"<{pages}Q", *hashes
                )
                # Yield per HASH_BATCH_PAGES pages hashed, not per run: a round of scattered dirty pages is
                # thousands of one-page runs, and a GIL hand-off each made it hash at ~5,000 pages/s on a
                # busy machine (Frozen of 5,000 pages took 0.9 s on each side; bench_forecast.py).
                since_yield += pages
                if since_yield >= HASH_BATCH_PAGES:
                    since_yield = 0
                    time.sleep(0)
            hashed += count
        return hashed

    def digest(self) -> str:
        """Whole-memory digest, ``"xxh3-128:"`` and 32 hex digits; call ``refresh_digests`` first."""
        return "xxh3-128:" + xxhash.xxh3_128_hexdigest(self._page_digests)

    def close(self) -> None:
        """Give the guest's RAM back: its pages, its digest table and its bitmaps. Idempotent.

        ``MADV_DONTNEED`` frees the pages even while a view handed out by ``pages`` is still
        alive (unmapping would then fail); such a view reads zeros afterwards. Large guests take
        100s of ms: call it from a worker thread (it frees ``RELEASE_BATCH`` bytes per GIL hold).
        """
        self.dirty = None
        self.written = b""
        self.stale = b""
        if self.closed:
            return
        self.closed = True
        for region in (self._map, self._page_digests):
            for start in range(0, len(region), RELEASE_BATCH):
                with contextlib.suppress(OSError, ValueError):
                    region.madvise(mmap.MADV_DONTNEED, start, min(RELEASE_BATCH, len(region) - start))
                time.sleep(0)
        with contextlib.suppress(BufferError):
            self.view.release()
            self._map.close()
        self._page_digests.close()
