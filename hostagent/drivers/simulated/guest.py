"""A simulated guest: real memory contents, a workload writing pages, an I/O queue, vCPU state, disks.

Its disks are sparse files in the host's pools. Each I/O request, when it completes, writes one
sequence-numbered 4 KiB block to the first writable disk (``DISK_BLOCK``): the I/O queue is the
disk's write load. A guest holds its writable disks open (``disk_files``) exactly while it may
write them, which is what ``VolumeWriter`` reports: from boot or resume until it powers off, and
on a migration's source until the Frozen phase paused it (its requests in flight drained in I/O
Quiesce, new ones queued for the target); the target opens them when it resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentprotocol import DiskInfo, GuestInfo, GuestSpec, HardwareStatus, OsStatus
from hostagent.drivers.simulated.memory import CHUNK_PAGES, CHUNK_SIZE, PAGE_SIZE, GuestMemory

TICK_S = 0.01
IO_REQUESTS_PER_S = 50
PAGE_STAMP = struct.Struct("<QQ")
DISK_BLOCK = 4096  # bytes one completed I/O request writes
DISK_STAMP = struct.Struct("<8sQQ")  # b"MXDISK01", the guest's seed, the request's number
# Odd multiplier (Knuth): walks the guest's pages in a scattered but reproducible order.
PAGE_STRIDE = 2654435761
# The workload rewrites at least what it writes in this many seconds (see ``working_set_pages``).
WORKING_SET_MIN_S = 10


class SimulatedGuest:
    """Runs its workload as an asyncio task on the agent's loop.

    The workload writes ``dirty_pages_per_s`` pages per second within its working set
    (``working_set_pages``), as a real guest does, instead of sweeping its whole memory
    over time; page ``n`` of the write sequence and its contents depend only on the
    guest's seed and ``n``, so a run is reproducible, and the target carries on the same
    sequence within the same working set.
    """

    def __init__(self, spec: GuestSpec, disks: dict[str, tuple[Path, str]] | None = None) -> None:
        """``disks``: each disk's file and its pool's identity by device name (``spec.disks``, resolved
        in this host's pools)."""
        self.spec = spec
        self.disk_paths = {device: path for device, (path, _) in (disks or {}).items()}
        self.disk_identities = {device: identity for device, (_, identity) in (disks or {}).items()}
        self.disk_files: dict[str, int] = {}  # device -> descriptor open for writing (see module doc)
        self.disk_writes = 0
        # A local-disk mirror's tracker (``diskmirror.SourceMirror``): told of every block written.
        self.disk_write_hook: Callable[[str, int, bytes], None] | None = None
        # On a migration's target: the volumes allocated for a mirror (device -> file), deleted if the
        # migration does not complete here.
        self.mirror_volumes: dict[str, Path] = {}
        self.guest_id = spec.guest_id
        self.name = spec.name  # for people only; the guest is known by its id
        self.seed = zlib.crc32(self.guest_id.encode())
        self.memory = GuestMemory(spec.memory_mib)
        self.running = False
        self.not_runnable = False
        self.booted = False
        self.booting = False  # powered on, its OS still starting (filling memory): On, Initializing
        self.migrating: str | None = None
        self.vcpus_paused = False
        self.write_counter = 0
        self.io_issued = 0
        self.io_completed = 0
        self.io_in_flight: deque[tuple[int, float]] = deque()
        self.io_queued: list[int] = []
        self.io_queueing = False
        # Shutting down: the workload writes no page and issues no I/O; what is in flight completes.
        self.shutting_down = False
        self.io_lost_at_stop = 0  # I/O requests in flight when the power was last cut (0: a clean stop)
        self._task: asyncio.Task[None] | None = None
        self._pattern_bytes: bytes | None = None
        self.working_set_pages = self._default_working_set()
        # Auto-converge: percent of vCPU time taken away, so the workload writes that much less (as QEMU).
        self.throttle_pct = 0.0

    def _default_working_set(self) -> int:
        """Pages the workload writes into: the ones filled at boot, or at least WORKING_SET_MIN_S of writes.

        A guest filled 100% (the data-plane benchmark) writes anywhere; a demo guest filled a
        few percent keeps its writes, and so its RAM, within that part.
        """
        page_count = self.memory.page_count
        filled = self.memory.chunk_count * self.spec.fill_percent // 100 * CHUNK_PAGES
        by_rate = self.spec.dirty_pages_per_s * WORKING_SET_MIN_S
        return max(1, min(page_count, max(filled, by_rate, CHUNK_PAGES)))

    @property
    def _pattern(self) -> bytes:
        """2 MiB of seeded random bytes the pages are cut from; made on first use (a guest never
        booted here costs nothing)."""
        if self._pattern_bytes is None:
            self._pattern_bytes = random.Random(self.seed).randbytes(2 * CHUNK_SIZE)
        return self._pattern_bytes

    @property
    def memory_mib(self) -> int:
        return self.spec.memory_mib

    @property
    def state_save_ms(self) -> int:
        return self.spec.state_save_ms

    # -- lifecycle -----------------------------------------------------
    async def boot(self) -> None:
        """Power on: fill part of memory as an OS would, then run the workload."""
        if not self.booted:
            self.booting = True
            try:
                await asyncio.to_thread(self._fill_memory)
            finally:
                self.booting = False
            self.booted = True
        self.run()

    def run(self) -> None:
        self.running = True
        self.vcpus_paused = False
        self.activate_disks()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._workload(), name=f"workload {self.guest_id}")

    async def shut_down(self) -> bool:
        """What the OS does when asked to shut down, then the power goes off.

        1. Writes stop: the workload dirties no page and issues no I/O from now on.
        2. The I/O in flight completes (``io_latency_ms`` at most).
        3. The rest of the shutdown takes ``shutdown_ms``; then the guest powers off, no I/O lost.
        Cancelled (the caller's timeout ran out), it leaves the guest running, its writes stopped.
        False if the power was cut meanwhile (a force stop), True if the guest powered itself off.
        """
        self.shutting_down = True
        self.io_lost_at_stop = 0
        while self.io_in_flight and self.running:
            await asyncio.sleep(TICK_S)
        done_at = time.monotonic() + self.spec.shutdown_ms / 1000
        while self.running and time.monotonic() < done_at:
            await asyncio.sleep(min(TICK_S * 10, max(done_at - time.monotonic(), 0)))
        if not self.running:
            return False
        await self.power_off()
        return True

    async def cut_power(self) -> None:
        """A stop that is not a shutdown: the I/O in flight or queued is lost (counted in the report)."""
        if self.running:
            self.io_lost_at_stop = len(self.io_in_flight) + len(self.io_queued)
        await self.power_off()

    async def power_off(self) -> None:
        self.running = False
        self.shutting_down = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.io_in_flight.clear()
        self.io_queued.clear()
        self.deactivate_disks()

    # -- disks ---------------------------------------------------------
    def activate_disks(self) -> None:
        """Open the writable disks for writing (idempotent): this guest writes them from now on."""
        for disk in self.spec.disks:
            path = self.disk_paths.get(disk.device)
            if path is not None and not disk.read_only and disk.device not in self.disk_files:
                self.disk_files[disk.device] = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def deactivate_disks(self) -> None:
        """Flush and close them (idempotent): another host may write them now."""
        for fd in self.disk_files.values():
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)
        self.disk_files.clear()

    def drop_memory(self) -> None:
        """Give the guest's RAM back to the host (after it left, or when it is deleted)."""
        self.memory.close()
        self._pattern_bytes = None

    def pause_vcpus(self) -> None:
        self.vcpus_paused = True

    def resume_vcpus(self) -> None:
        self.vcpus_paused = False

    async def measure_dirty_rate(self, seconds: float) -> tuple[float, int]:
        """Distinct bytes written per second over ``seconds`` (bytes/s), and the working set (bytes).

        Counts the workload's page writes over the window and reports them as random writes within the
        working set of ``W`` pages would hit: ``W * (1 - exp(-n / W))`` distinct pages, the law
        ``migrations_app.forecast.write_rate`` inverts back to ``n``. The write sequence itself walks the
        working set without repeating a page, so a round of ``n`` writes dirties ``min(n, W)`` pages
        (``forecast.dirtied_bytes``).
        """
        before, started = self.write_counter, time.monotonic()
        await asyncio.sleep(seconds)
        writes, elapsed = self.write_counter - before, max(time.monotonic() - started, 1e-3)
        pages = self.working_set_pages
        distinct = pages * (1 - math.exp(-writes / pages))
        return distinct * PAGE_SIZE / elapsed, pages * PAGE_SIZE

    # -- I/O -----------------------------------------------------------
    async def quiesce_io(self, on_progress: Callable[[int], None]) -> int:
        """Queue new requests and wait until the ones in flight completed; returns how many were."""
        self.io_queueing = True
        outstanding = len(self.io_in_flight)
        while self.io_in_flight:
            if outstanding:
                on_progress(100 * (outstanding - len(self.io_in_flight)) // outstanding)
            await asyncio.sleep(TICK_S)
        on_progress(100)
        return outstanding

    def unquiesce_io(self) -> None:
        self.io_queueing = False
        latency = self.spec.io_latency_ms / 1000
        now = time.monotonic()
        self.io_in_flight.extend((request, now + latency) for request in self.io_queued)
        self.io_queued.clear()

    # -- state handed to the target at Frozen ---------------------------
    def save_state(self) -> dict[str, Any]:
        return {
            "vcpus": [
                {"id": n, "rip": (self.seed + self.write_counter * (n + 1)) & 0xFFFFFFFF, "halted": False}
                for n in range(self.spec.vcpus)
            ],
            "devices": {"disk0": {"io_issued": self.io_issued, "io_completed": self.io_completed}},
            "workload": {
                "write_counter": self.write_counter,
                "dirty_pages_per_s": self.spec.dirty_pages_per_s,
                "io_latency_ms": self.spec.io_latency_ms,
                "working_set_pages": self.working_set_pages,
            },
            "io_queued": list(self.io_queued),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        workload = state["workload"]
        self.write_counter = int(workload["write_counter"])
        working_set = workload.get("working_set_pages")  # absent from an older source's state
        if isinstance(working_set, int) and not isinstance(working_set, bool):
            self.working_set_pages = max(1, min(self.memory.page_count, working_set))
        self.spec = self.spec.model_copy(
            update={
                "dirty_pages_per_s": int(workload["dirty_pages_per_s"]),
                "io_latency_ms": int(workload["io_latency_ms"]),
            }
        )
        disk = state["devices"]["disk0"]
        self.io_issued, self.io_completed = int(disk["io_issued"]), int(disk["io_completed"])
        self.io_queued = [int(request) for request in state["io_queued"]]
        self.booted = True

    # -- reporting -----------------------------------------------------
    def info(self) -> GuestInfo:
        hardware: HardwareStatus
        if self.not_runnable:
            hardware = "not_runnable"
        else:
            hardware = "on" if self.running or self.booting else "off"
        os_status: OsStatus = "up" if self.running and not self.vcpus_paused else "down"
        if self.booting:
            os_status = "initializing"
        return GuestInfo(
            guest_id=self.guest_id,
            name=self.name,
            os_type=self.spec.os_type,
            os_status=os_status,
            hardware_status=hardware,
            memory_mib=self.spec.memory_mib,
            vcpus=self.spec.vcpus,
            migrating=self.migrating,
            disks=self.disk_infos(),
            nics=list(self.spec.nics),
            workload={
                "running": self.running and not self.vcpus_paused,
                "dirty_pages_per_s": self.spec.dirty_pages_per_s,
                "pages_written": self.write_counter,
                "io_completed": self.io_completed,
                "io_in_flight": len(self.io_in_flight),
                "io_queued": len(self.io_queued),
                "resident_mib": self.memory.written_count() * PAGE_SIZE // (1024 * 1024),
                "shutting_down": self.shutting_down,
                "io_lost_at_stop": self.io_lost_at_stop,
                "disk_writes": self.disk_writes,
                "disks_open_for_writing": sorted(self.disk_files),
            },
        )

    def disk_infos(self) -> list[DiskInfo]:
        """The disks as they are on the pool now: size and allocated bytes from their files."""
        infos = []
        for disk in self.spec.disks:
            path = self.disk_paths.get(disk.device)
            size, allocated = disk.virtual_size_bytes, 0
            if path is not None:
                with contextlib.suppress(OSError):
                    status = os.stat(path)
                    size, allocated = max(1, status.st_size), status.st_blocks * 512
            fields = disk.model_dump() | {
                "virtual_size_bytes": size,
                "pool_identity": self.disk_identities.get(disk.device, disk.pool_identity),
            }
            infos.append(DiskInfo(**fields, allocated_bytes=allocated))
        return infos

    # -- the workload --------------------------------------------------
    def _fill_memory(self) -> None:
        fill_chunks = self.memory.chunk_count * self.spec.fill_percent // 100
        for chunk in range(fill_chunks):
            start = chunk * CHUNK_SIZE
            offset = (chunk * 4096) % CHUNK_SIZE
            self.memory.view[start : start + CHUNK_SIZE] = self._pattern[offset : offset + CHUNK_SIZE]
            PAGE_STAMP.pack_into(self.memory.view, start, self.seed, chunk)
            self.memory.note_written(chunk * CHUNK_PAGES, CHUNK_PAGES)

    def _write_next_page(self) -> None:
        counter = self.write_counter
        page = (counter * PAGE_STRIDE + self.seed) % self.working_set_pages
        start = page * PAGE_SIZE
        offset = (counter * 64) % CHUNK_SIZE
        self.memory.view[start : start + PAGE_SIZE] = self._pattern[offset : offset + PAGE_SIZE]
        PAGE_STAMP.pack_into(self.memory.view, start, self.seed, counter)
        self.memory.note_written(page, 1)
        self.write_counter = counter + 1

    async def _workload(self) -> None:
        last = time.monotonic()
        owed_pages = owed_io = 0.0
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            elapsed, last = min(now - last, 1.0), now
            self._complete_io(now)
            if self.vcpus_paused or self.shutting_down:
                continue
            owed_pages += elapsed * self.spec.dirty_pages_per_s * (1 - self.throttle_pct / 100)
            for _ in range(int(owed_pages)):
                self._write_next_page()
            owed_pages -= int(owed_pages)
            owed_io += elapsed * IO_REQUESTS_PER_S
            for _ in range(int(owed_io)):
                self._issue_io(now)
            owed_io -= int(owed_io)

    def _issue_io(self, now: float) -> None:
        self.io_issued += 1
        if self.io_queueing:
            self.io_queued.append(self.io_issued)
        else:
            self.io_in_flight.append((self.io_issued, now + self.spec.io_latency_ms / 1000))

    def _complete_io(self, now: float) -> None:
        while self.io_in_flight and self.io_in_flight[0][1] <= now:
            request, _ = self.io_in_flight.popleft()
            self._write_block(request)
            self.io_completed += 1

    def _write_block(self, request: int) -> None:
        """Request ``request``'s block on the first writable disk open here (none: only counted)."""
        for disk in self.spec.disks:
            fd = self.disk_files.get(disk.device)
            if fd is None:
                continue
            blocks = max(1, disk.virtual_size_bytes // DISK_BLOCK)
            block = DISK_STAMP.pack(b"MXDISK01", self.seed, request).ljust(DISK_BLOCK, b"\0")
            offset = (request % blocks) * DISK_BLOCK
            os.pwrite(fd, block, offset)
            self.disk_writes += 1
            if self.disk_write_hook is not None:
                self.disk_write_hook(disk.device, offset, block)
            return
