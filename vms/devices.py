"""A VSP's storage pools and networks, and a VM's disks and network cards: stored from what the agents
report, and summed up for the pages, the API and the command.

The agent reports its pools and networks (``GET /v1/resources``, ``agentprotocol.HostResources``) and
each guest's disks and cards (``GuestInfo.disks``/``nics``); inventory collection (``vms.inventory``)
stores them here. An agent older than pools answers 404: ``VSP.resources_collected_at`` stays empty
and its pools and networks are "not known" (said so on the pages; never taken for "none"), and its
guests' disks and cards are left as the console knew them.

A VM's disks and cards belong to the VM (not to a copy): the runnable copy's agent reports them.
A disk's pool is named as on that VSP; its ``pool_identity`` finds the same storage elsewhere.

Pools and networks are that VSP's: a viewer who may not see it (he sees the guest only through a Not
Runnable copy in his host group) is shown the disks and cards but not where they are (``places_seen``):
"a pool of another host group", "a network of another host group" on the pages and in the command,
``null`` in the API (docs/permissions.md).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from django.db.models import Count, Sum
from django.utils import timezone

from agentprotocol import GuestInfo, HostResources
from vms.models import VSP, Network, NetworkCard, StoragePool, VirtualDisk, VirtualMachine

logger = logging.getLogger(__name__)

RESOURCES_UNKNOWN = "its agent does not report storage pools and networks (an older agent)"
HIDDEN_POOL = "a pool of another host group"  # stands for a pool of a VSP the viewer may not see
HIDDEN_NETWORK = "a network of another host group"


def places_seen(vm: VirtualMachine, seen_vsp_ids: Collection[int] | None) -> bool:
    """Whether a viewer who sees the VSPs ``seen_vsp_ids`` (``None``: all) may be told ``vm``'s disks'
    pools and its cards' networks: they are the VSP it runs on's (its runnable copy's), so he must see
    that VSP; a guest runnable nowhere was last reported by one of its copies' VSPs, so he must see them
    all. Reads ``vm.registrations`` (prefetch them for a list)."""
    if seen_vsp_ids is None:
        return True
    runnable = vm.runnable_registration
    if runnable is not None:
        return runnable.vsp_id in seen_vsp_ids
    return all(copy.vsp_id in seen_vsp_ids for copy in vm.registrations.all())


def store_resources(vsp: VSP, resources: HostResources) -> None:
    """Replace ``vsp``'s pools and networks by those its agent reported now (call inside a transaction)."""
    names = [pool.name for pool in resources.pools]
    StoragePool.objects.filter(vsp=vsp).exclude(name__in=names).delete()
    for pool in resources.pools:
        StoragePool.objects.update_or_create(
            vsp=vsp,
            name=pool.name,
            defaults={
                "kind": pool.kind,
                "identity": pool.identity,
                "capacity_bytes": pool.capacity_bytes,
                "free_bytes": pool.free_bytes,
                "location": pool.location,
                "formats": list(pool.formats),
            },
        )
    Network.objects.filter(vsp=vsp).exclude(name__in=[net.name for net in resources.networks]).delete()
    for network in resources.networks:
        Network.objects.update_or_create(
            vsp=vsp, name=network.name, defaults={"kind": network.kind, "bridge": network.bridge or ""}
        )
    now = timezone.now()
    VSP.objects.filter(pk=vsp.pk).update(resources_collected_at=now)
    vsp.resources_collected_at = now


def store_guest_devices(vm: VirtualMachine, vsp: VSP, guest: GuestInfo) -> None:
    """Replace ``vm``'s disks and cards by what ``vsp``'s agent reports of its guest (``vsp`` reports
    pools: ``resources_collected_at`` set). A card whose MAC another VM holds is skipped, logged (the
    console keeps MACs unique). Call inside a transaction."""
    identities = dict(StoragePool.objects.filter(vsp=vsp).values_list("name", "identity"))
    VirtualDisk.objects.filter(vm=vm).exclude(device__in=[disk.device for disk in guest.disks]).delete()
    for disk in guest.disks:
        VirtualDisk.objects.update_or_create(
            vm=vm,
            device=disk.device,
            defaults={
                "pool": disk.pool,
                "pool_identity": disk.pool_identity or identities.get(disk.pool, ""),
                "volume": disk.volume,
                "virtual_size_bytes": disk.virtual_size_bytes,
                "allocated_bytes": disk.allocated_bytes,
                "format": disk.format,
                "bus": disk.bus,
                "read_only": disk.read_only,
                "shareable": disk.shareable,
                "boot": disk.boot,
                "backing": list(disk.backing),
            },
        )
    macs = [nic.mac for nic in guest.nics]
    taken = set(NetworkCard.objects.filter(mac__in=macs).exclude(vm=vm).values_list("mac", flat=True))
    NetworkCard.objects.filter(vm=vm).delete()
    for index, nic in enumerate(guest.nics):
        if nic.mac in taken:
            logger.warning(
                "%s's nic %d on %s: MAC %s is another VM's; not stored", vm.name, index, vsp, nic.mac
            )
            continue
        NetworkCard.objects.create(vm=vm, index=index, network=nic.network, mac=nic.mac, model=nic.model)


@dataclass(frozen=True)
class DeviceSummary:
    """What the General tab's summary says of a VM's disks and cards: total virtual size (bytes) and
    the networks, by name, in card order without repeats."""

    disks: int
    disk_bytes: int
    networks: list[str]


def device_summary(vm: VirtualMachine, places: bool = True) -> DeviceSummary:
    """``places``: the viewer may be told the networks (``places_seen``), else each reads
    ``HIDDEN_NETWORK``."""
    disks = VirtualDisk.objects.filter(vm=vm).aggregate(count=Count("pk"), total=Sum("virtual_size_bytes"))
    networks = list(dict.fromkeys(NetworkCard.objects.filter(vm=vm).values_list("network", flat=True)))
    if not places and networks:
        networks = [HIDDEN_NETWORK]
    return DeviceSummary(disks["count"] or 0, disks["total"] or 0, networks)


def pool_by_name(vsp: VSP) -> dict[str, StoragePool]:
    """``vsp``'s pools by their name there."""
    return {pool.name: pool for pool in StoragePool.objects.filter(vsp=vsp)}


def disk_identity(disk: VirtualDisk, source_pools: dict[str, StoragePool]) -> str:
    """The identity of ``disk``'s pool: as reported with the disk, else its source pool's ("" unknown)."""
    if disk.pool_identity:
        return disk.pool_identity
    pool = source_pools.get(disk.pool)
    return pool.identity if pool else ""


def volumes_in_use(identity: str, volumes: Iterable[str]) -> dict[str, VirtualDisk]:
    """Of ``volumes`` in the storage of ``identity``, those a VM's disk already uses, by volume."""
    used = VirtualDisk.objects.filter(pool_identity=identity, volume__in=list(volumes)).select_related("vm")
    return {disk.volume: disk for disk in used}


def size_text(size: int) -> str:
    """Bytes for people: "10 GiB", "512 MiB", "1.5 TiB", "300 B"."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    value = float(size)
    unit = 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    text = f"{value:.1f}".removesuffix(".0")
    return f"{text} {units[unit]}"
