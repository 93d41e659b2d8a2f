"""Define a VM on a VSP from the console: its size, its disks (new volumes of a given size in a pool,
or an image already in a pool) and its network cards (on the VSP's networks, MAC generated unless given).

``do_define_vm`` checks everything it can against the inventory first (the VSP's pools and networks as
its agent last reported them, the MACs and volumes other VMs use) and refuses a bad definition with a
clear error before anything is sent; then the agent defines the guest (and creates the new volumes),
and refuses, in its own words, what only it can see (no room after all, an image that is not there).
The console's rows are written only once the agent said yes, so a refusal anywhere leaves nothing:
the agent creates nothing when it refuses (``agentprotocol``'s contract).
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from pydantic import ValidationError as ProtocolError

from agentprotocol import DiskInfo, DiskSpec, GuestInfo, GuestSpec, NicSpec
from agentprotocol.storage import MAX_DISKS, MAX_NICS
from vms.access import AccessDenied, has_role_on, require_global
from vms.agent_client import AgentClient, AgentError
from vms.devices import RESOURCES_UNKNOWN, size_text, store_guest_devices, volumes_in_use
from vms.models import VSP, AuditEvent, Network, NetworkCard, Registration, Role, StoragePool, VirtualMachine

logger = logging.getLogger(__name__)

ADD_VM_PERMISSION = "vms.add_virtualmachine"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
GIB = 1 << 30
# A new volume's size (bytes), the page's, the API's and this module's one bound: at least 1 MiB (a
# smaller disk holds no file system worth the name), at most 1 PiB (beyond any pool; qcow2 itself
# goes to 2 PiB with its default 64 KiB clusters).
DISK_MIN_BYTES = 1 << 20
DISK_MAX_BYTES = 1 << 50


def disk_size_refusal(size_bytes: int) -> str:
    """Why ``size_bytes`` is no size for a new volume ("" when it is one): out of ``DISK_MIN_BYTES`` ..
    ``DISK_MAX_BYTES``, in words naming both bounds and their unit."""
    if DISK_MIN_BYTES <= size_bytes <= DISK_MAX_BYTES:
        return ""
    shown = size_text(size_bytes) if size_bytes >= 0 else f"-{size_text(-size_bytes)}"
    return (
        f"a new volume's size is from {size_text(DISK_MIN_BYTES)} to {size_text(DISK_MAX_BYTES)} "
        f"({DISK_MIN_BYTES} to {DISK_MAX_BYTES} bytes), not {shown}"
    )


@dataclass(frozen=True)
class DiskRequest:
    """One disk asked for: a new volume of ``size_bytes`` in ``pool``, or (``image``) the volume of that
    name already in ``pool``."""

    pool: str
    size_bytes: int | None = None
    image: str = ""


@dataclass(frozen=True)
class NicRequest:
    """One network card asked for, on ``network``; ``mac`` empty: one is generated."""

    network: str
    mac: str = ""


@dataclass(frozen=True)
class Definition:
    """A VM to define on ``vsp``: memory in MiB, disks in order (vda, vdb, ...), cards in order (nic 0...)."""

    name: str
    vsp: VSP
    memory_mib: int
    vcpus: int = 1
    os_type: str = ""
    disks: list[DiskRequest] = field(default_factory=list)
    nics: list[NicRequest] = field(default_factory=list)
    running: bool = False


def check_can_define(user: Any, vsp: VSP) -> None:
    """``vms.add_virtualmachine`` and the administrator role in ``vsp``'s host group, else
    ``AccessDenied``."""
    require_global(user, ADD_VM_PERMISSION)
    if not has_role_on(user, Role.ADMINISTRATOR, [vsp.pk]):
        raise AccessDenied(
            f"You may not define VMs on {vsp.name}: you are not an administrator of its host group."
        )


def do_define_vm(definition: Definition, user: Any) -> VirtualMachine:
    """Define ``definition`` on its VSP: the agent defines the guest (creating its new volumes), then the
    console records the VM, its copy (Off, or On if ``running``), disks and cards, and an audit event.

    Raises ``AccessDenied`` (``check_can_define``) or ``ValidationError`` with every problem found in the
    inventory, else the agent's refusal in its words; nothing is created then, on either side.
    """
    check_can_define(user, definition.vsp)
    spec = check_definition(definition)
    try:
        with AgentClient.for_vsp(definition.vsp) as agent:
            guest = agent.define_guest(spec)
    except AgentError as error:
        raise ValidationError(f"{definition.vsp.name} refused {definition.name}: {error}") from None
    try:
        with transaction.atomic():
            vm = record_vm(definition, spec, guest, user)
    except IntegrityError:  # a name or MAC taken meanwhile: undo the agent's side
        undefine(definition.vsp, spec.guest_id)
        raise ValidationError(
            f"{definition.name}: its name or a MAC was taken meanwhile; nothing defined."
        ) from None
    logger.info("%s defined VM %s on %s", user, vm.name, definition.vsp.name)
    return vm


def check_definition(definition: Definition) -> GuestSpec:
    """The guest spec ``definition`` makes, or ``ValidationError`` listing every problem (checked against
    the inventory: nothing is sent)."""
    vsp = definition.vsp
    problems: list[str] = []
    if not _NAME.fullmatch(definition.name):
        problems.append("Name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.")
    elif VirtualMachine.objects.filter(name=definition.name).exists():
        problems.append(f"Name: a VM called {definition.name} exists already.")
    if len(definition.disks) > MAX_DISKS or len(definition.nics) > MAX_NICS:
        problems.append(f"At most {MAX_DISKS} disks and {MAX_NICS} network cards.")
    if (definition.disks or definition.nics) and vsp.resources_collected_at is None:
        problems.append(f"{vsp.name}'s storage pools and networks are not known: {RESOURCES_UNKNOWN}.")
    disks = _check_disks(definition, problems) if vsp.resources_collected_at else []
    nics = _check_nics(definition, problems) if vsp.resources_collected_at else []
    if problems:
        raise ValidationError(problems)
    try:
        return GuestSpec(
            guest_id=str(_new_guest_id()),
            name=definition.name,
            memory_mib=definition.memory_mib,
            vcpus=definition.vcpus,
            os_type=definition.os_type or "linux",
            disks=disks,
            nics=nics,
            running=definition.running,
        )
    except ProtocolError as error:
        raise ValidationError(
            [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
        ) from None


def _new_guest_id() -> str:
    import uuid

    return str(uuid.uuid4())


def _check_disks(definition: Definition, problems: list[str]) -> list[DiskSpec]:
    vsp = definition.vsp
    pools = {pool.name: pool for pool in StoragePool.objects.filter(vsp=vsp)}
    wanted: dict[str, int] = {}  # new bytes asked per pool, against its free space
    specs: list[DiskSpec] = []
    for index, disk in enumerate(definition.disks):
        device = f"vd{chr(ord('a') + index)}"
        what = f"Disk {device}"
        pool = pools.get(disk.pool)
        if pool is None:
            known = ", ".join(sorted(pools)) or "none"
            missing = "choose a pool" if not disk.pool else f"{vsp.name} has no pool {disk.pool!r}"
            problems.append(f"{what}: {missing} (its pools: {known}).")
            continue
        if disk.image and disk.size_bytes is not None:
            problems.append(
                f"{what}: give either a size (a new volume) or an image (a volume already in pool "
                f"{pool.name}), not both."
            )
            continue
        if disk.image:
            if "/" in disk.image or disk.image in (".", "..") or not _NAME.fullmatch(disk.image):
                problems.append(
                    f"{what}: {disk.image!r} is a path outside every pool: give the name of a volume "
                    f"in pool {pool.name} (letters, digits, '.', '_', '-'; no '/')."
                )
                continue
            volume, size, create = disk.image, 1, False  # its size is what the agent finds
        else:
            if disk.size_bytes is None:
                problems.append(f"{what}: give a size for the new volume in pool {pool.name}.")
                continue
            if refusal := disk_size_refusal(disk.size_bytes):
                problems.append(f"{what}: {refusal}.")
                continue
            if not _NAME.fullmatch(definition.name):
                continue  # its volume is named after the VM: the name's own problem says it all
            volume, size, create = f"{definition.name}-{device}.qcow2", disk.size_bytes, True
            wanted[pool.name] = wanted.get(pool.name, 0) + size
            if wanted[pool.name] > pool.free_bytes:
                problems.append(
                    f"{what}: pool {pool.name} on {vsp.name} has {size_text(pool.free_bytes)} free; "
                    f"the new volumes there need {size_text(wanted[pool.name])}."
                )
                continue
        used = volumes_in_use(pool.identity, [volume]).get(volume)
        if used is not None:
            problems.append(
                f"{what}: volume {volume} in pool {pool.name} is in use by "
                f"{used.vm.name}'s disk {used.device}."
            )
            continue
        try:
            spec = DiskSpec(
                device=device,
                pool=pool.name,
                volume=volume,
                virtual_size_bytes=size,
                format="qcow2",
                create=create,
                pool_identity=pool.identity,
            )
        except ProtocolError as error:  # e.g. a volume name made from a name refused above
            problems.extend(f"{what}: {e['msg']}" for e in error.errors())
            continue
        specs.append(spec)
    return specs


def _check_nics(definition: Definition, problems: list[str]) -> list[NicSpec]:
    vsp = definition.vsp
    networks = set(Network.objects.filter(vsp=vsp).values_list("name", flat=True))
    specs: list[NicSpec] = []
    chosen: set[str] = set()
    for index, nic in enumerate(definition.nics):
        what = f"Network card {index}"
        if nic.network not in networks:
            known = ", ".join(sorted(networks)) or "none"
            problems.append(f"{what}: {vsp.name} has no network {nic.network!r} (its networks: {known}).")
            continue
        mac = nic.mac.strip().lower() or new_mac(chosen)
        if not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
            problems.append(f"{what}: {nic.mac!r} is not a unicast MAC address such as 52:54:00:12:34:56.")
            continue
        holder = NetworkCard.objects.filter(mac=mac).select_related("vm").first()
        if holder is not None or mac in chosen:
            owner = f"{holder.vm.name}'s nic {holder.index}" if holder else "another card of this VM"
            problems.append(f"{what}: MAC {mac} is already used by {owner}.")
            continue
        chosen.add(mac)
        specs.append(NicSpec(network=nic.network, mac=mac))
    return specs


def new_mac(taken: set[str]) -> str:
    """A random locally-administered MAC in QEMU's prefix (52:54:00), used by no card nor in ``taken``."""
    while True:
        mac = "52:54:00:" + ":".join(f"{byte:02x}" for byte in secrets.token_bytes(3))
        if mac not in taken and not NetworkCard.objects.filter(mac=mac).exists():
            return mac


def record_vm(definition: Definition, spec: GuestSpec, guest: GuestInfo, user: Any) -> VirtualMachine:
    """The console's rows for a guest its agent defined (``guest``: what it reported back)."""
    status = Registration.HardwareStatus
    vm = VirtualMachine.objects.create(
        name=definition.name,
        guest_id=spec.guest_id,
        os_type=definition.os_type,
        memory_mib=definition.memory_mib,
        vcpus=definition.vcpus,
        os_status=guest.os_status if guest.os_status in VirtualMachine.OSStatus.values else "down",
    )
    Registration.objects.create(
        vm=vm, vsp=definition.vsp, hardware_status=status.ON if guest.hardware_status == "on" else status.OFF
    )
    reported = guest
    if not guest.disks and not guest.nics:  # an agent that did not echo them back: what was asked
        asked = [DiskInfo.model_validate(disk.model_dump()) for disk in spec.disks]
        reported = guest.model_copy(update={"disks": asked, "nics": spec.nics})
    store_guest_devices(vm, definition.vsp, reported)
    AuditEvent.record(
        AuditEvent.Action.CREATED,
        vm,
        actor=user,
        after={
            "vsp": definition.vsp.name,
            "memory_mib": vm.memory_mib,
            "vcpus": vm.vcpus,
            "disks": [f"{d.device}: {d.pool}/{d.volume}" for d in spec.disks],
            "nics": [f"{n.network} {n.mac}" for n in spec.nics],
        },
        message=f"Defined on {definition.vsp.name}",
    )
    return vm


def undefine(vsp: VSP, guest_id: str) -> None:
    try:
        with AgentClient.for_vsp(vsp) as agent:
            agent.delete_guest(guest_id)
    except AgentError as error:
        logger.warning("Guest %s left defined on %s: %s", guest_id, vsp.name, error)
