"""A host's domains as the console sees guests: memory, vCPUs, disks and network cards.

Read-only: nothing here changes a domain, a pool or a network. ``parse_domain_xml`` reads what
the domain's XML says alone (no daemon needed); ``read_domain`` adds what only the daemon knows: the
storage pool and volume behind each disk file with its size (libvirt's storage pool API), and the
bridge behind each network card's libvirt network (its network API).
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, replace

from hostagent.drivers.libvirt.connection import Connection, Domain, libvirt_module

KIB = 1024
# libvirt's virDomainState values (libvirt-domain.h), in the words ``virsh domstate`` uses.
DOMAIN_STATES = {
    0: "no state",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",  # shutting down
    5: "shut off",
    6: "crashed",
    7: "pmsuspended",
}
UNIT_BYTES = {
    "b": 1, "bytes": 1, "k": KIB, "kib": KIB, "kb": 1000, "m": KIB**2, "mib": KIB**2, "mb": 1000**2,
    "g": KIB**3, "gib": KIB**3, "gb": 1000**3, "t": KIB**4, "tib": KIB**4, "tb": 1000**4,
}  # fmt: skip


class DomainXmlError(ValueError):
    """A domain's XML lacks what every libvirt domain has (a name, a UUID, memory, vCPUs)."""


@dataclass(frozen=True)
class DiskInfo:
    """One disk (or CD-ROM, floppy) of a domain.

    ``source_type`` is libvirt's disk type: ``file``, ``block``, ``volume`` (pool + volume named
    in the XML), ``network`` (e.g. Ceph RBD: ``path`` is then the protocol's name, e.g.
    ``rbd:pool/image``). ``pool``/``volume``/``capacity_bytes``/``allocation_bytes`` are known when
    the source is a volume of one of the host's storage pools (None otherwise, or before
    ``read_domain`` looked). ``shared`` is the disk's ``<shareable/>`` flag.
    """

    target: str  # the guest's name for it: vda, sda, hdc ...
    device: str  # disk, cdrom, floppy, lun
    source_type: str
    path: str | None
    format: str | None  # raw, qcow2 ... (the driver's type)
    read_only: bool
    shared: bool
    pool: str | None = None
    volume: str | None = None
    capacity_bytes: int | None = None
    allocation_bytes: int | None = None


@dataclass(frozen=True)
class NicInfo:
    """One network card: ``kind`` is libvirt's interface type (network, bridge, direct, user, ...).

    ``network`` is the libvirt network for ``kind == "network"``; ``bridge`` the host bridge it
    plugs into (named in the XML for ``bridge``, the network's bridge for ``network`` when the
    network is active).
    """

    mac: str
    kind: str
    network: str | None
    bridge: str | None
    model: str | None


@dataclass(frozen=True)
class DomainInfo:
    """One domain of a host. ``memory_mib``: its current memory; ``max_memory_mib``: what it may grow to."""

    name: str
    uuid: str
    domain_type: str  # qemu (TCG) or kvm
    memory_mib: int
    max_memory_mib: int
    vcpus: int
    disks: tuple[DiskInfo, ...]
    nics: tuple[NicInfo, ...]
    state: str = "no state"  # one of DOMAIN_STATES' words
    state_reason: int = 0  # libvirt's reason code for that state (e.g. shut off 4: migrated away)
    persistent: bool = True  # defined (survives a stop) or transient


def _to_bytes(element: ElementTree.Element | None, default_unit: str = "KiB") -> int:
    if element is None or not (element.text or "").strip():
        return 0
    unit = (element.get("unit") or default_unit).lower()
    if unit not in UNIT_BYTES:
        raise DomainXmlError(f"unknown size unit {unit!r}")
    return int(element.text.strip()) * UNIT_BYTES[unit]  # type: ignore[union-attr]


def _disk(element: ElementTree.Element) -> DiskInfo:
    source_type = element.get("type", "file")
    source = element.find("source")
    path = pool = volume = None
    if source is not None:
        if source_type == "volume":
            pool, volume = source.get("pool"), source.get("volume")
        elif source_type == "network":
            path = f"{source.get('protocol', 'network')}:{source.get('name', '')}"
        else:
            path = source.get("file") or source.get("dev") or source.get("dir")
    driver = element.find("driver")
    target = element.find("target")
    return DiskInfo(
        target=target.get("dev", "") if target is not None else "",
        device=element.get("device", "disk"),
        source_type=source_type,
        path=path,
        format=driver.get("type") if driver is not None else None,
        read_only=element.find("readonly") is not None,
        shared=element.find("shareable") is not None,
        pool=pool,
        volume=volume,
    )


def _nic(element: ElementTree.Element) -> NicInfo:
    kind = element.get("type", "")
    source = element.find("source")
    mac = element.find("mac")
    model = element.find("model")
    network = source.get("network") if source is not None and kind == "network" else None
    bridge = source.get("bridge") if source is not None else None
    return NicInfo(
        mac=mac.get("address", "") if mac is not None else "",
        kind=kind,
        network=network,
        bridge=bridge,
        model=model.get("type") if model is not None else None,
    )


def parse_domain_xml(xml: str) -> DomainInfo:
    """What a domain's XML (``virDomainGetXMLDesc``) says of it; pools and sizes are left unknown.

    Raises DomainXmlError when the XML is not a domain or lacks a name, UUID, memory or vCPU count.
    """
    try:
        root = ElementTree.fromstring(xml)  # noqa: S314 - libvirt's own formatting of a definition
    except ElementTree.ParseError as error:
        raise DomainXmlError(f"not XML: {error}") from None
    if root.tag != "domain":
        raise DomainXmlError(f"not a domain's XML: <{root.tag}>")
    name, uuid, vcpus = root.findtext("name"), root.findtext("uuid"), root.findtext("vcpu")
    max_memory = _to_bytes(root.find("memory"))
    if not name or not uuid or not vcpus or not max_memory:
        raise DomainXmlError("a domain's XML needs <name>, <uuid>, <memory> and <vcpu>")
    memory = _to_bytes(root.find("currentMemory")) or max_memory
    devices = root.find("devices")
    disks = tuple(_disk(disk) for disk in devices.iterfind("disk")) if devices is not None else ()
    nics = tuple(_nic(nic) for nic in devices.iterfind("interface")) if devices is not None else ()
    return DomainInfo(
        name=name,
        uuid=uuid,
        domain_type=root.get("type", ""),
        memory_mib=memory // KIB**2,
        max_memory_mib=max_memory // KIB**2,
        vcpus=int(vcpus),
        disks=disks,
        nics=nics,
    )


def _resolve_disk(connection: Connection, disk: DiskInfo) -> DiskInfo:
    """``disk`` with the pool, volume and sizes of its storage volume, when one of the host's pools has it."""
    libvirt = libvirt_module()
    try:
        if disk.source_type == "volume" and disk.pool and disk.volume:
            volume = connection.storagePoolLookupByName(disk.pool).storageVolLookupByName(disk.volume)
        elif disk.path and disk.source_type in ("file", "block"):
            volume = connection.storageVolLookupByPath(disk.path)
        else:
            return disk
        _kind, capacity, allocation = volume.info()
        pool = volume.storagePoolLookupByVolume().name()
        return replace(
            disk,
            pool=pool,
            volume=volume.name(),
            path=disk.path or volume.path(),
            capacity_bytes=capacity,
            allocation_bytes=allocation,
        )
    except libvirt.libvirtError:
        return disk  # not in any pool (a file the admin put there), or the pool is inactive


def _resolve_nic(connection: Connection, nic: NicInfo) -> NicInfo:
    if nic.kind != "network" or not nic.network or nic.bridge:
        return nic
    libvirt = libvirt_module()
    try:
        network = connection.networkLookupByName(nic.network)
        return replace(nic, bridge=network.bridgeName() if network.isActive() else None)
    except libvirt.libvirtError:
        return nic  # the network is gone or has no bridge (e.g. macvtap's forward mode)


def read_domain(connection: Connection, domain: Domain) -> DomainInfo:
    """``domain`` as a DomainInfo: its XML (the running definition if it runs), state, pools, networks."""
    info = parse_domain_xml(domain.XMLDesc(0))
    state, reason = domain.state()
    return replace(
        info,
        disks=tuple(_resolve_disk(connection, disk) for disk in info.disks),
        nics=tuple(_resolve_nic(connection, nic) for nic in info.nics),
        state=DOMAIN_STATES.get(state, "no state"),
        state_reason=reason,
        persistent=bool(domain.isPersistent()),
    )


def list_domains(connection: Connection) -> list[DomainInfo]:
    """Every domain of the host, running or only defined, by name (one undefined meanwhile is left out)."""
    libvirt = libvirt_module()
    domains = []
    for domain in connection.listAllDomains(0):
        try:
            domains.append(read_domain(connection, domain))
        except libvirt.libvirtError as error:
            if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    return sorted(domains, key=lambda info: info.name)
