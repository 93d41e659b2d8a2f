"""Storage and network pre-checks of a migration: the target must reach every shared pool the guest's
disks are on, have room in a local pool for each disk on a local pool (mirrored: live storage
migration), and have a network of the same name for each of its cards (the vendor's Init checks).

Read from the inventory only (``vms.devices``: what the agents last reported; Init collects the target's
again first, ``phases``). The words name the host, the pool or network and the guest's device:
"vsp3 does not mount pool san-a: db01's disk vda", "vsp3 has no network prod-net: db01's nic 0",
"vsp3 has no local pool with 40 GiB free for db01's disk vda (pool local: 25 GiB free)".

A disk on a ``local`` pool is mirrored to a new volume the target allocates (``hostagent/README.md``,
"Local disks"), which needs, before anything is sent (``local_disk_refusal`` for the guest whatever the
target, ``devices_refusal`` per target):

1. both agents to say they mirror local disks (``VSP.agent_mirrors_local_disks``, from their health);
2. the disk to be neither shareable nor read-only, and without a snapshot chain (a backing file);
3. a local pool on the target that writes the disk's format and has room for its **virtual** size (a
   thin image grows to it: Nova's ``_assert_dest_node_has_enough_disk``), the guest's other local disks
   counted in the pool they would take (the first that fits, in the order of the pools' names; the
   target's agent picks its own the same way at prepare, by its file system's free space then).

A guest without disks or cards (what agents older than pools run) passes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vms.devices import RESOURCES_UNKNOWN, disk_identity, pool_by_name, size_text
from vms.models import VSP, Network, NetworkCard, StoragePool, VirtualDisk, VirtualMachine

# Reasons of this module begin with a host's or a guest's name, which a sentence keeps as it is written.
_NAMED_FIRST = re.compile(
    r"\S+( does not mount pool | has no network | has no local pool | cannot mirror local disks"
    r"| cannot be checked: |'s disk )"
)


def begins_with_a_name(reason: str) -> bool:
    """Whether ``reason`` is one of this module's, opening with a VSP's or VM's name ("vsp3 has no ...")."""
    return bool(_NAMED_FIRST.match(reason))


def local_disks(vm: VirtualMachine, source: VSP | None) -> list[VirtualDisk]:
    """``vm``'s disks on a local pool of ``source`` (the ones its migration mirrors), by device."""
    if source is None:
        return []
    local = set(
        StoragePool.objects.filter(vsp=source, kind=StoragePool.Kind.LOCAL).values_list("name", flat=True)
    )
    return [disk for disk in VirtualDisk.objects.filter(vm=vm).order_by("device") if disk.pool in local]


def local_disk_refusal(vm: VirtualMachine, source: VSP | None) -> str | None:
    """Why ``vm``'s disks on local pools of ``source`` cannot be mirrored, whatever the target, or None
    (steps 1 and 2 of the module docstring, the source's side)."""
    disks = local_disks(vm, source)
    if not disks or source is None:
        return None
    if not source.agent_mirrors_local_disks:
        first = disks[0]
        where = f"{vm.name}'s disk {first.device} is on local pool {first.pool} of {source.name}"
        return f"{where}: {mirror_inability(source)}"
    for disk in disks:
        where = f"{vm.name}'s disk {disk.device} on local pool {disk.pool} of {source.name}"
        if disk.shareable:
            return f"{where} is shareable (several guests may write it): a shared local disk is not mirrored"
        if disk.read_only:
            return f"{where} is read-only: a read-only local disk is not mirrored"
        if disk.backing:
            chain = ", ".join(str(volume) for volume in disk.backing)
            return (
                f"{where} has a snapshot chain (backing {chain}): a local disk with snapshots is not mirrored"
            )
    return None


def mirror_inability(vsp: VSP) -> str:
    """ "vsp3 cannot mirror local disks (its agent, driver libvirt, does not)", or that it has not said."""
    if vsp.agent_mirrors_local_disks is None:
        why = "its agent has not said yet whether it can; it is asked at the next inventory collection"
    else:
        why = f"its agent, driver {vsp.agent_driver}, does not" if vsp.agent_driver else "its agent does not"
    return f"{vsp.name} cannot mirror local disks ({why})"


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
    does not mount, else the first local disk it cannot mirror into (``mirror_refusal``), else the
    first card whose network it lacks. ``target``'s pools not known (its agent
    is older than pools) refuses a guest that has disks or cards: they cannot be checked. ``devices``:
    ``load_devices(vm, source)`` when checking several targets (read once)."""
    devices = devices or load_devices(vm, source)
    disks, cards = devices.disks, devices.cards
    if not disks and not cards:
        return None
    if target.resources_collected_at is None:
        first = f"disk {disks[0].device}" if disks else f"nic {cards[0].index}"
        return f"{target.name} cannot be checked: {RESOURCES_UNKNOWN}: {vm.name}'s {first}"
    target_pools = list(StoragePool.objects.filter(vsp=target).order_by("name"))
    mounted = {pool.identity for pool in target_pools}
    local = [disk for disk in disks if is_local(disk, devices.source_pools)]
    for disk in disks:
        identity = disk_identity(disk, devices.source_pools)
        if disk not in local and identity not in mounted:
            return f"{target.name} does not mount pool {disk.pool}: {vm.name}'s disk {disk.device}"
    if local and (reason := mirror_refusal(vm, target, local, target_pools)):
        return reason
    networks = set(Network.objects.filter(vsp=target).values_list("name", flat=True))
    for card in cards:
        if card.network not in networks:
            return f"{target.name} has no network {card.network}: {vm.name}'s nic {card.index}"
    return None


def is_local(disk: VirtualDisk, source_pools: dict[str, StoragePool]) -> bool:
    """Whether ``disk`` is on a local pool of its source (``source_pools``: the source's, by name)."""
    pool = source_pools.get(disk.pool)
    return pool is not None and pool.kind == StoragePool.Kind.LOCAL


def mirror_refusal(
    vm: VirtualMachine, target: VSP, disks: list[VirtualDisk], target_pools: list[StoragePool]
) -> str | None:
    """Why ``target`` cannot take the mirrors of ``vm``'s local ``disks``, or None: its agent does not
    mirror (step 1), or no local pool of it writes a disk's format with room for its virtual size, the
    disks before it counted where they would go (step 3). ``target_pools``: its pools, by name."""
    if not target.agent_mirrors_local_disks:
        return f"{mirror_inability(target)}: {vm.name}'s disk {disks[0].device}"
    pools = [pool for pool in target_pools if pool.kind == StoragePool.Kind.LOCAL]
    planned: dict[int, int] = {}
    for disk in disks:
        what = f"{vm.name}'s disk {disk.device}"
        if not pools:
            return f"{target.name} has no local pool for {what}"
        writable = [pool for pool in pools if disk.format in (pool.formats or [disk.format])]
        if not writable:
            return f"{target.name} has no local pool that writes {disk.format} volumes for {what}"
        fits = [
            pool for pool in writable if pool.free_bytes - planned.get(pool.pk, 0) >= disk.virtual_size_bytes
        ]
        if not fits:
            free = "; ".join(
                f"pool {pool.name}: {size_text(max(0, pool.free_bytes - planned.get(pool.pk, 0)))} free"
                for pool in writable
            )
            return (
                f"{target.name} has no local pool with {size_text(disk.virtual_size_bytes)} free for {what} "
                f"({free})"
            )
        planned[fits[0].pk] = planned.get(fits[0].pk, 0) + disk.virtual_size_bytes
    return None
