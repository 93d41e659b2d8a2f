"""Guest memory: page-addressed storage with write tracking and incremental digests.

The storage is an anonymous ``mmap``: the kernel backs only the pages that were
touched, so a 4 GiB guest that wrote little costs little RAM.

Three bitmaps (one byte per page, so C-speed ``re``/``count`` work on them):
- ``written``: pages that may be non-zero. Pages never written are zero and go
  over the wire as a marker.
- ``dirty``: pages written since the last ``take_dirty`` (only while tracking).
- ``stale``: pages whose digest must be recomputed.

The whole-memory digest is SHA-256 over a table of per-page SHA-1 digests, so
after a round only the pages written since are hashed again (a guest writing
scattered pages would dirty every larger chunk).

Digest invariant, with writers on the event-loop thread and ``refresh_digests``
on a worker thread: a writer marks a page stale *after* writing it, and the
refresher clears the mark *before* hashing, so a page written while hashed is
always hashed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import re
import time
from collections.abc import Iterator

PAGE_SIZE = 4096
CHUNK_PAGES = 256
CHUNK_SIZE = PAGE_SIZE * CHUNK_PAGES
PAGE_DIGEST_SIZE = 20
ZERO_PAGE_DIGEST = hashlib.sha1(bytes(PAGE_SIZE), usedforsecurity=False).digest()
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14; Python 3.11 lacks the name
POPULATE_BATCH_CHUNKS = 64
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
    def __init__(self, memory_mib: int) -> None:
        self.size = memory_mib * 1024 * 1024
        self.page_count = self.size // PAGE_SIZE
        self.chunk_count = self.page_count // CHUNK_PAGES
        self._map = mmap.mmap(-1, self.size)
        self.view = memoryview(self._map)
        self.written = bytearray(self.page_count)
        self.stale = bytearray(self.page_count)
        self._page_digests = bytearray(ZERO_PAGE_DIGEST * self.page_count)
        self.dirty: bytearray | None = None

    # -- writing -------------------------------------------------------
    def note_written(self, first_page: int, count: int) -> None:
        """Record that pages were written (call after the bytes are in place)."""
        end = first_page + count
        self.written[first_page:end] = b"\x01" * count
        if self.dirty is not None:
            self.dirty[first_page:end] = b"\x01" * count
        self.stale[first_page:end] = b"\x01" * count

    def note_pages_written(self, pages: list[int]) -> None:
        """``note_written`` for scattered single pages (the target's PAGE_LIST frames)."""
        written, stale = self.written, self.stale
        for page in pages:
            written[page] = 1
            stale[page] = 1

    def zero_pages(self, first_page: int, count: int) -> None:
        """Make pages zero; pages never written already are, and stay unbacked."""
        end = first_page + count
        for run_first, run_count in runs_of(self.written, first_page, end):
            start = run_first * PAGE_SIZE
            self.view[start : start + run_count * PAGE_SIZE] = bytes(run_count * PAGE_SIZE)
            self.written[run_first : run_first + run_count] = bytes(run_count)
            self.note_stale(run_first, run_count)

    def note_stale(self, first_page: int, count: int) -> None:
        self.stale[first_page : first_page + count] = b"\x01" * count

    def written_chunk_runs(self) -> list[tuple[int, int]]:
        """(first_chunk, count) runs of chunks holding written pages: what a receiver will need backed."""
        chunks = bytes(
            int(self.written.find(1, chunk * CHUNK_PAGES, (chunk + 1) * CHUNK_PAGES) != -1)
            for chunk in range(self.chunk_count)
        )
        return list(runs_of(chunks))

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
        """Re-hash stale pages (thread-safe against writers, see module doc). Returns pages hashed."""
        hashed = 0
        view, table, sha1 = self.view, self._page_digests, hashlib.sha1
        for first, count in runs_of(bytes(self.stale)):
            self.stale[first : first + count] = bytes(count)
            for page in range(first, first + count):
                start = page * PAGE_SIZE
                digest = sha1(view[start : start + PAGE_SIZE], usedforsecurity=False).digest()
                table[page * PAGE_DIGEST_SIZE : (page + 1) * PAGE_DIGEST_SIZE] = digest
            hashed += count
        return hashed

    def digest(self) -> str:
        """Whole-memory digest from the page digests; call ``refresh_digests`` first."""
        return hashlib.sha256(self._page_digests).hexdigest()

    def close(self) -> None:
        self.dirty = None
        self.written = bytearray(self.page_count)
        # Views handed out by ``pages`` may still be alive; the map then goes with them.
        with contextlib.suppress(BufferError):
            self.view.release()
            self._map.close()
