"""A digest of a stopped guest's RAM, read through QMP ``pmemsave`` into a FIFO (no disk copy).

Source and target both take it while their guest is stopped (the source after switchover,
the target before it resumes), so equal digests mean not one written page was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path

from hostagent.drivers.qemu.qmp import QmpClient

MIB = 1024 * 1024
GIB = 1024 * MIB
# q35 keeps 2 GiB of RAM below 4 GiB when the guest has 2816 MiB or more; the rest sits above 4 GiB.
Q35_SPLIT_FROM = 2816 * MIB
Q35_LOW_RAM = 2 * GIB
READ_BYTES = 4 * MIB


def ram_ranges(memory_mib: int) -> list[tuple[int, int]]:
    """Guest-physical (start, size) ranges holding the RAM of a q35 guest."""
    size = memory_mib * MIB
    if size < Q35_SPLIT_FROM:
        return [(0, size)]
    return [(0, Q35_LOW_RAM), (4 * GIB, size - Q35_LOW_RAM)]


def _hash_fifo(fifo: Path, digest: hashlib._Hash) -> None:
    with fifo.open("rb") as stream:
        while chunk := stream.read(READ_BYTES):
            digest.update(chunk)


async def memory_digest(qmp: QmpClient, memory_mib: int, fifo: Path) -> str:
    """sha256 of the guest's RAM; the guest must be stopped."""
    digest = hashlib.sha256()
    loop = asyncio.get_running_loop()
    for start, size in ram_ranges(memory_mib):
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        reader = loop.run_in_executor(None, _hash_fifo, fifo, digest)
        try:
            await qmp.execute("pmemsave", val=start, size=size, filename=str(fifo))
        except BaseException:
            _unblock(fifo)
            raise
        finally:
            await reader
            fifo.unlink(missing_ok=True)
    return "sha256:" + digest.hexdigest()


def _unblock(fifo: Path) -> None:
    """Open the FIFO's writing end once so a reader waiting for QEMU returns."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
