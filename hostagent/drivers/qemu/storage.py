"""Disk images in a storage pool, and who holds them: the single-writer rule across a migration.

What QEMU 10 does with a disk on shared storage during a live migration (checked by
``tests/hostagent/test_qemu_image_guest.py``, relied on here, not re-implemented):

1. The incoming QEMU (``-incoming``) opens every image *inactive* (``BDRV_O_INACTIVE``; QMP
   ``query-block`` shows ``"active": false``, a field new in 10.0): it reads nothing it caches, writes
   nothing and takes no image lock, although its descriptor is opened read-write.
2. At the switchover the source stops the vCPUs, drains in-flight requests and flushes
   (``vm_stop`` -> ``bdrv_drain_all`` + ``bdrv_flush_all``), sends the device state, then inactivates
   its images: it drops the lock bytes of the write permission, keeping only a shared read lock.
3. The target activates its images when it resumes (``cont``): it drops its caches (qcow2 metadata),
   re-reads, and takes the write locks. Had the source still held them, activation would fail
   ("Failed to get "write" lock") and the target would not run.

QEMU's locks (``file-posix``) are OFD read locks on single bytes of the image file: byte 100+i says
"I hold permission i", byte 200+i "I do not share permission i", with i = 0 consistent read,
1 write, 2 write-unchanged, 3 resize. So a process *writes* an image exactly when it holds byte 101,
which ``image_holders`` reads from ``/proc/<pid>/fdinfo`` (the kernel lists each descriptor's locks
there); a second writer is kept out by byte 201.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostagent.drivers.qemu.qmp import QmpClient
from hostagent.resources import PlannedDisk

LOCK_PERM_BASE = 100  # QEMU's RAW_LOCK_PERM_BASE
LOCK_SHARED_BASE = 200  # QEMU's RAW_LOCK_SHARED_BASE
PERM_WRITE_BIT = 1  # BLK_PERM_WRITE is 1 << 1


class VolumeError(RuntimeError):
    """A volume could not be created or is not usable (the message says which and why)."""


@dataclass(frozen=True)
class ImageHolder:
    """One open descriptor of an image file: its process, whether it was opened for writing, and the
    bytes QEMU's OFD locks cover on it."""

    pid: int
    fd: int
    opened_for_writing: bool
    lock_bytes: frozenset[int]

    @property
    def writes(self) -> bool:
        """Holds QEMU's write permission on the image (lock byte 101)."""
        return LOCK_PERM_BASE + PERM_WRITE_BIT in self.lock_bytes

    @property
    def excludes_other_writers(self) -> bool:
        """Refuses to share the write permission (lock byte 201): no second writer can start."""
        return LOCK_SHARED_BASE + PERM_WRITE_BIT in self.lock_bytes


def _lock_bytes(fdinfo: str) -> set[int]:
    """The byte ranges of ``lock:`` lines in one fdinfo (``lock: 1: OFDLCK ADVISORY READ -1
    fe:00:2229265 100 101``: start and end, inclusive)."""
    covered: set[int] = set()
    for line in fdinfo.splitlines():
        if not line.startswith("lock:"):
            continue
        fields = line.split()
        try:
            start, end = int(fields[-2]), fields[-1]
        except (ValueError, IndexError):
            continue
        last = start + 1023 if end == "EOF" else int(end)  # QEMU's locks never run to EOF
        covered.update(range(start, min(last, start + 1023) + 1))
    return covered


def image_holders(path: Path, pids: list[int] | None = None) -> list[ImageHolder]:
    """Every descriptor open on the image at ``path`` (matched by device and inode), among ``pids``
    or all processes; processes that vanish meanwhile are skipped. Needs permission to read the
    processes' ``/proc/<pid>/fd`` (the agent's own QEMUs always qualify)."""
    target = os.stat(path)
    found: list[ImageHolder] = []
    candidates = pids if pids is not None else [int(name) for name in os.listdir("/proc") if name.isdigit()]
    for pid in candidates:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in descriptors:
            try:
                status = os.stat(f"/proc/{pid}/fd/{name}")
                if (status.st_dev, status.st_ino) != (target.st_dev, target.st_ino):
                    continue
                info = Path(f"/proc/{pid}/fdinfo/{name}").read_text()
            except OSError:
                continue
            flag_lines = [line for line in info.splitlines() if line.startswith("flags:")]
            flags = int(flag_lines[0].split()[1], 8) if flag_lines else 0
            found.append(
                ImageHolder(
                    pid=pid,
                    fd=int(name),
                    opened_for_writing=(flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR),
                    lock_bytes=frozenset(_lock_bytes(info)),
                )
            )
    return found


def image_writers(path: Path, pids: list[int] | None = None) -> list[int]:
    """The processes holding QEMU's write permission on the image (normally zero or one)."""
    return sorted({holder.pid for holder in image_holders(path, pids) if holder.writes})


def create_volume(template: Path, volume: Path) -> Path:
    """A new qcow2 volume at ``volume``, a full copy of ``template`` (no backing chain: a chain would
    tie the guest to the template's pool, and a local disk's mirror refuses chains). Written under a
    temporary name and renamed, so a half-written volume never has the volume's name. Raises
    ``VolumeError`` if the volume exists or ``qemu-img`` fails."""
    if volume.exists():
        raise VolumeError(f"volume {volume} exists already")
    if not template.is_file():
        raise VolumeError(f"image {template} not found: build it with scripts/build_guest_image.sh")
    partial = volume.with_name(f".{volume.name}.partial")
    command = ["qemu-img", "convert", "-q", "-O", "qcow2", str(template), str(partial)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise VolumeError(f"qemu-img could not create {volume}: {done.stderr.strip()}")
    os.replace(partial, volume)
    return volume


def virtual_size(path: Path, disk_format: str) -> int:
    """A volume's virtual size (bytes): a qcow2 header's ``size`` field, or a raw file's length.
    Raises OSError, or VolumeError if the file is not in that format."""
    with path.open("rb") as image:
        header = image.read(32)
        if disk_format == "raw":
            return max(1, os.fstat(image.fileno()).st_size)
    if len(header) < 32 or header[:4] != b"QFI\xfb":
        raise VolumeError(f"volume {path.name} is not a qcow2 image")
    return int.from_bytes(header[24:32], "big")


def create_empty_volume(disk: PlannedDisk) -> None:
    """A new, empty volume (``qemu-img create``), under a temporary name, then linked to its own (which
    fails if it appeared meanwhile). Raises VolumeError."""
    partial = disk.path.with_name(f".{disk.path.name}.partial")
    command = [
        "qemu-img",
        "create",
        "-q",
        "-f",
        disk.spec.format,
        str(partial),
        str(disk.spec.virtual_size_bytes),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    try:
        if done.returncode != 0:
            raise VolumeError(f"qemu-img could not create {disk.spec.volume}: {done.stderr.strip()}")
        os.link(partial, disk.path)
    except FileExistsError:
        raise VolumeError(f"volume {disk.spec.volume} appeared in pool {disk.pool.name} meanwhile") from None
    finally:
        partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class BlockNode:
    """A guest disk as QEMU's ``query-block`` reports it."""

    device: str  # the qdev id (``vda``)
    node_name: str
    file: str
    format: str
    read_only: bool
    active: bool  # False on an incoming side before it resumes, and on a source after the switchover


async def block_nodes(qmp: QmpClient) -> list[BlockNode]:
    """The guest's disks and whether each is active (QEMU >= 10.0 reports ``active``)."""
    nodes = []
    for device in await qmp.execute("query-block"):
        inserted: dict[str, Any] | None = device.get("inserted")
        if not inserted:
            continue
        qdev = str(device.get("qdev", ""))
        nodes.append(
            BlockNode(
                device=qdev.split("/")[3] if qdev.startswith("/machine/peripheral/") else qdev,
                node_name=str(inserted.get("node-name", "")),
                file=str(inserted.get("file", "")),
                format=str(inserted.get("drv", "")),
                read_only=bool(inserted.get("ro")),
                active=bool(inserted.get("active", True)),
            )
        )
    return nodes


async def block_writes(qmp: QmpClient) -> dict[str, int]:
    """Write requests each disk's device completed since QEMU started (``query-blockstats``
    ``wr_operations``), by qdev id."""
    writes = {}
    for entry in await qmp.execute("query-blockstats"):
        qdev = str(entry.get("qdev", ""))
        device = qdev.split("/")[3] if qdev.startswith("/machine/peripheral/") else qdev
        writes[device] = int(entry.get("stats", {}).get("wr_operations", 0))
    return writes
