"""A guest's virtual hardware beyond CPUs and memory, and the QEMU arguments for it.

Two kinds of guest run on the QEMU driver:

- the built-in test guest (no ``Machine.disks``): the agent boots ``vmlinuz`` + ``initramfs.cpio.gz``
  with ``-kernel``; memwriter is its workload;
- the OS image guest: it boots from its own disk (``Disk.boot``; SeaBIOS -> syslinux -> kernel, all
  inside the image built by ``scripts/build_guest_image.sh``); guestload is its workload, configured
  through QEMU's fw_cfg (``GUESTLOAD_FW_CFG``) and told to check itself over the command port
  (the second serial port, ``guestload.request_selfcheck``).

Disks are ``-blockdev`` nodes (a ``file`` node and a format node on top), attached as
``virtio-blk-pci``. The same arguments serve the source and the incoming side of a migration: an
incoming QEMU (``-incoming``) opens every node *inactive* by itself (QEMU's ``RUN_STATE_INMIGRATE``)
and takes no image lock until it resumes, so both can name the same image on shared storage
(``storage``, ``docs/qemu-driver.md``).

Network cards are ``virtio-net-pci`` with a fixed MAC, on user-mode networking (QEMU's own NAT, no
privileges) or on a tap the agent opened on a bridge (``network.open_tap``; the fd is handed to
QEMU). The option ROM (iPXE) is left out: the guest never boots from the network, and it costs boot
time under TCG.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

GUESTLOAD_FW_CFG = "opt/org.matrixoe/guestload"  # QEMU wants fw_cfg names under opt/<reverse domain>/
DiskFormat = Literal["qcow2", "raw"]


@dataclass(frozen=True)
class Disk:
    """One virtio-blk disk backed by an image file.

    ``name`` is the device id (``vda``, ``vdb``...); ``cache_direct`` opens the image with O_DIRECT
    (``cache.direct=on``: needed for migration on shared storage whose hosts do not share a page
    cache, such as NFS; on one host the page cache is shared and either works).
    """

    name: str
    path: Path
    format: DiskFormat = "qcow2"
    read_only: bool = False
    cache_direct: bool = False
    boot: bool = False
    detect_zeroes: bool = False

    def args(self) -> list[str]:
        file_node, format_node = f"{self.name}-file", f"{self.name}-fmt"
        read_only = "on" if self.read_only else "off"
        direct = "on" if self.cache_direct else "off"
        unmap = ",discard=unmap" if self.detect_zeroes else ""
        zeroes = f"{unmap},detect-zeroes=unmap" if self.detect_zeroes else ""
        return [
            "-blockdev",
            f"driver=file,node-name={file_node},filename={qemu_escape(str(self.path))},"
            f"cache.direct={direct},read-only={read_only}{unmap}",
            "-blockdev",
            f"driver={self.format},node-name={format_node},file={file_node},read-only={read_only}{zeroes}",
            "-device",
            f"virtio-blk-pci,drive={format_node},id={self.name}" + (",bootindex=0" if self.boot else ""),
        ]


@dataclass(frozen=True)
class UserNetwork:
    """QEMU's user-mode networking: the guest is 10.0.2.15 behind QEMU's NAT; 10.0.2.2 is the host's
    loopback. Each QEMU has its own NAT, whose state moves with the guest."""

    kind: Literal["user"] = "user"


@dataclass(frozen=True)
class BridgeNetwork:
    """A tap on a Linux bridge, optionally inside a network namespace (``netns``)."""

    bridge: str
    netns: str | None = None
    kind: Literal["bridge"] = "bridge"


Network = UserNetwork | BridgeNetwork


@dataclass(frozen=True)
class Nic:
    """One virtio-net card: its MAC (the same on both sides of a migration) and what it is on."""

    mac: str
    network: Network

    def args(self, index: int, tap_fd: int | None) -> list[str]:
        netdev = f"net{index}"
        if isinstance(self.network, UserNetwork):
            backend = f"user,id={netdev}"
        else:
            if tap_fd is None:
                raise ValueError("a bridged network card needs its tap's file descriptor")
            backend = f"tap,id={netdev},fd={tap_fd},vhost=off"
        return ["-netdev", backend, "-device", f"virtio-net-pci,netdev={netdev},mac={self.mac},romfile="]


@dataclass(frozen=True)
class Machine:
    """What a guest has beyond CPUs and memory. Empty: the built-in test guest."""

    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    guest_config: tuple[tuple[str, str], ...] = field(default=())  # guestload's key=value lines

    @property
    def boots_from_disk(self) -> bool:
        return any(disk.boot for disk in self.disks)

    def guest_config_text(self) -> str:
        return "".join(f"{key}={value}\n" for key, value in self.guest_config)


def qemu_escape(value: str) -> str:
    """A value inside QEMU's ``key=value,...`` option syntax: a comma is written twice."""
    return value.replace(",", ",,")


def mac_for(guest_id: str, index: int = 0) -> str:
    """A stable, locally administered unicast MAC for a guest's ``index``-th card (52:54:00 is QEMU's
    prefix); both sides of a migration derive the same one."""
    digest = hashlib.sha256(f"{guest_id}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{byte:02x}" for byte in digest[:3])


def tap_name(guest_id: str, instance: str, index: int = 0) -> str:
    """A tap name unique per QEMU process (Linux allows 15 characters)."""
    return "mx" + hashlib.sha256(f"{guest_id}/{instance}/{index}".encode()).hexdigest()[:11]
