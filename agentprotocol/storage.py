"""Storage pools, volumes and networks of a host, and a guest's disks and network cards.

A **storage pool** is where a host keeps volumes (disk images): a directory, an NFS export, a SAN
LUN group. It is ``shared`` (several hosts reach the same storage, whatever each calls it locally)
or ``local`` to one host. ``identity`` tells the two cases apart across hosts: two pools with the
same identity are the same storage; a ``local`` pool's identity is its host's alone, so a directory
of the same name on another host is never taken for it. A **network** is a virtual switch a guest's
network card plugs into, known by name (the vendor's rule: the target needs a switch of the same
name for each card).

A guest's **disk** lives in a pool of its host as a volume (a file name inside the pool, never a
path: an agent resolves it inside the pool, so no request can point outside every pool). Its
**network card** plugs into a network of its host by name, with a MAC address.

Sizes are bytes. Names of pools, networks and volumes: 1-64 of letters, digits, ``.``, ``_``, ``-``,
starting with a letter or digit (a volume name may not be ``.`` or ``..`` by that rule).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StrictBool, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

from .base import MAX_BYTES, Bytes, GuestId, Message, between, chars

PoolKind = Literal["shared", "local"]
DiskFormat = Literal["raw", "qcow2"]
DiskBus = Literal["virtio", "scsi", "sata"]
NetworkKind = Literal["bridge", "user", "simulated"]
NicModel = Literal["virtio", "e1000"]

ALL_FORMATS: tuple[DiskFormat, ...] = ("raw", "qcow2")
MAX_DISKS = 16
MAX_NICS = 8
MAX_POOLS = 64
MAX_NETWORKS = 64

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DEVICE = re.compile(r"(vd|sd)[a-z]")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise PydanticCustomError(
            "name",
            "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, not {value}",
            {"value": repr(value[:80])},
        )
    return value


def _device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise PydanticCustomError(
            "device",
            "must be a disk device name such as vda or sdb, not {value}",
            {"value": repr(value[:80])},
        )
    return value


def _mac(value: str) -> str:
    """A unicast MAC in lower case (``52:54:00:12:34:56``); upper case is accepted and lowered."""
    mac = value.lower()
    if not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        raise PydanticCustomError(
            "mac",
            "must be a unicast MAC address such as 52:54:00:12:34:56, not {value}",
            {"value": repr(value[:80])},
        )
    return mac


Name = Annotated[StrictStr, AfterValidator(_name)]
Device = Annotated[StrictStr, AfterValidator(_device)]
Mac = Annotated[StrictStr, AfterValidator(_mac)]
Identity = Annotated[StrictStr, AfterValidator(chars(128, "an identity"))]
VirtualSize = Annotated[StrictInt, AfterValidator(between(1, MAX_BYTES))]


class StoragePool(Message):
    """One storage pool of a host (``GET /v1/resources``).

    ``identity``: equal on every host that reaches the same storage (``shared``), unique otherwise;
    ``location``: where it lives, for people (a path, an export); ``formats``: the volume formats
    this host can create and write there.
    """

    name: Name
    kind: PoolKind
    identity: Identity
    capacity_bytes: Bytes
    free_bytes: Bytes
    location: Annotated[StrictStr, Field(max_length=4096)] = ""
    formats: list[DiskFormat] = Field(default_factory=lambda: list(ALL_FORMATS))


class Network(Message):
    """One network (virtual switch) of a host: ``bridge`` is what it is bridged to, if anything."""

    name: Name
    kind: NetworkKind
    bridge: Annotated[StrictStr, Field(max_length=64)] | None = None


class VolumeWriter(Message):
    """Who holds a volume open for writing on this host now, from the agent's own record.

    ``pid``: the process (a QEMU, or the agent itself for a simulated guest); ``guest_id``: whose disk.
    The fault soak's single-writer invariant reads these from every host at once.
    """

    pool_identity: Identity
    volume: Name
    guest_id: GuestId
    pid: Annotated[StrictInt, AfterValidator(between(1, 1 << 31))]


class HostResources(Message):
    """``GET /v1/resources``: the host's pools and networks, and who writes which volume."""

    pools: Annotated[list[StoragePool], Field(max_length=MAX_POOLS)] = Field(default_factory=list)
    networks: Annotated[list[Network], Field(max_length=MAX_NETWORKS)] = Field(default_factory=list)
    writers: list[VolumeWriter] = Field(default_factory=list)


class DiskSpec(Message):
    """One disk of a guest: ``volume`` in ``pool`` (names on this host), seen by the guest as ``device``.

    ``create``: make a new, empty volume of ``virtual_size_bytes`` when the guest is defined (refused
    if the volume exists); otherwise the volume must exist (an image already in the pool), and
    ``virtual_size_bytes`` is what the agent found. ``shareable``: several guests may write it at
    once (a cluster disk); ``read_only``: the guest cannot write it. ``pool_identity``: the pool's
    ``StoragePool.identity``; agents fill it in what they report, and a migration's target finds the
    pool of an incoming guest's disk by it (by ``pool`` when absent), so two hosts may call the same
    shared storage by different names. ``boot``: the guest boots from this disk (at most one; a guest
    without one boots its driver's built-in test guest, its disks attached as data disks).
    """

    device: Device
    pool: Name
    volume: Name
    virtual_size_bytes: VirtualSize
    format: DiskFormat = "qcow2"
    bus: DiskBus = "virtio"
    read_only: StrictBool = False
    shareable: StrictBool = False
    create: StrictBool = False
    pool_identity: Identity | None = None
    boot: StrictBool = False


class DiskInfo(DiskSpec):
    """A disk as its host reports it: ``allocated_bytes`` on the pool (a thin image grows towards its
    virtual size), ``backing`` the volumes below it (a snapshot chain; empty if none)."""

    allocated_bytes: Bytes = 0
    backing: list[StrictStr] = Field(default_factory=list)


class NicSpec(Message):
    """One network card: plugged into ``network`` (a name on this host), with ``mac``."""

    network: Name
    mac: Mac
    model: NicModel = "virtio"


def check_unique_devices(disks: list[DiskSpec], nics: list[NicSpec]) -> None:
    """Refuse two disks with one device name or one volume, two boot disks, and two cards with one MAC.

    Raises ``PydanticCustomError`` naming the first duplicate.
    """
    seen: dict[str, set[object]] = {"device": set(), "volume": set(), "mac": set()}
    for disk in disks:
        for what, value in (("device", disk.device), ("volume", (disk.pool, disk.volume))):
            if value in seen[what]:
                raise PydanticCustomError("duplicate", "two disks use the same {what}", {"what": what})
            seen[what].add(value)
    if sum(disk.boot for disk in disks) > 1:
        raise PydanticCustomError("duplicate", "only one disk can be the boot disk", {})
    for nic in nics:
        if nic.mac in seen["mac"]:
            raise PydanticCustomError("duplicate", "two network cards use MAC {mac}", {"mac": nic.mac})
        seen["mac"].add(nic.mac)
