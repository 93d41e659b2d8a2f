"""Storage and network pre-checks of a migration: the target must reach every shared pool the guest's
disks are on, and have a network of the same name for each of its cards (the vendor's Init checks).

Read from the inventory only (``vms.devices``: what the agents last reported; Init collects the target's
again first, ``phases``). The words name the host, the pool or network and the guest's device:
"vsp3 does not mount pool san-a: db01's disk vda", "vsp3 has no network prod-net: db01's nic 0".
A disk on a ``local`` pool cannot move yet (storage live migration is a separate step): refused for
every target with that reason. A guest without disks or cards (what agents older than pools run) passes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vms.devices import RESOURCES_UNKNOWN, disk_identity, pool_by_name
from vms.models import VSP, Network, NetworkCard, StoragePool, VirtualDisk, VirtualMachine

# Reasons of this module begin with a host's or a guest's name, which a sentence keeps as it is written.
_NAMED_FIRST = re.compile(r"\S+( does not mount pool | has no network | cannot be checked: |'s disk )")


def begins_with_a_name(reason: str) -> bool:
    """Whether ``reason`` is one of this module's, opening with a VSP's or VM's name ("vsp3 has no ...")."""
    return bool(_NAMED_FIRST.match(reason))


def local_disk_refusal(vm: VirtualMachine, source: VSP | None) -> str | None:
    """Why ``vm`` cannot leave ``source`` because of a disk on a local pool, or None."""
    if source is None:
        return None
    pools = pool_by_name(source)
    for disk in VirtualDisk.objects.filter(vm=vm).order_by("device"):
        pool = pools.get(disk.pool)
        if pool is not None and pool.kind == StoragePool.Kind.LOCAL:
            return (
                f"{vm.name}'s disk {disk.device} is on local pool {pool.name} of {source.name}: "
                "local disks cannot move yet (only disks on shared pools do)"
            )
    return None


@dataclass(frozen=True)
class GuestDevices:
    """A guest's disks and cards with its source's pools by name, read once for every target checked."""

    disks: list[VirtualDisk]
    cards: list[NetworkCard]
    source_pools: dict[str, StoragePool]


def load_devices(vm: VirtualMachine, source: VSP | None) -> GuestDevices:
    disks = list(VirtualDisk.objects.filter(vm=vm).order_by("device"))
    cards = list(NetworkCard.objects.filter(vm=vm).order_by("index"))
    pools = pool_by_name(source) if source is not None and disks else {}
    return GuestDevices(disks, cards, pools)


def devices_refusal(
    vm: VirtualMachine, source: VSP | None, target: VSP, devices: GuestDevices | None = None
) -> str | None:
    """Why ``target`` cannot take ``vm``'s disks or cards, or None: the first disk whose shared pool it
    does not mount, else the first card whose network it lacks. ``target``'s pools not known (its agent
    is older than pools) refuses a guest that has disks or cards: they cannot be checked. ``devices``:
    ``load_devices(vm, source)`` when checking several targets (read once)."""
    devices = devices or load_devices(vm, source)
    disks, cards = devices.disks, devices.cards
    if not disks and not cards:
        return None
    if target.resources_collected_at is None:
        first = f"disk {disks[0].device}" if disks else f"nic {cards[0].index}"
        return f"{target.name} cannot be checked: {RESOURCES_UNKNOWN}: {vm.name}'s {first}"
    mounted = set(StoragePool.objects.filter(vsp=target).values_list("identity", flat=True))
    for disk in disks:
        identity = disk_identity(disk, devices.source_pools)
        if identity not in mounted:
            return f"{target.name} does not mount pool {disk.pool}: {vm.name}'s disk {disk.device}"
    networks = set(Network.objects.filter(vsp=target).values_list("name", flat=True))
    for card in cards:
        if card.network not in networks:
            return f"{target.name} has no network {card.network}: {vm.name}'s nic {card.index}"
    return None
