"""Pre-checks for an online migration, in plain words, read from the database only (no agent calls).

Storage and networks (``placement``): the target must mount every shared pool of the guest's disks and
have each of its cards' networks; a disk on a local pool is mirrored, so both agents must mirror local
disks and the target needs room in a local pool for the disk's virtual size.
The dialog shows ``check_targets(vm)`` (every VSP with its verdict); the action and the Init phase call
``check_target`` again so that what the dialog said is re-decided at the moment it matters.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Q, Sum

from vms.models import VSP, PairEncryption, Registration, VirtualMachine, streams_label

from .models import Migration
from .placement import GuestDevices, devices_refusal, load_devices, local_disk_refusal

OK = "ok"
ALREADY_MIGRATING_REASON = "VM is already migrating"


@dataclass(frozen=True)
class TargetCheck:
    vsp: VSP
    reason: str  # "ok" or why this VSP cannot take the VM, in plain words
    encryption: str = PairEncryption.Policy.REQUIRED  # the pair's data-plane policy: "required" | "off"
    streams: int | None = None  # the pair's parallel data-plane connections (None: automatic)
    free_mib: int | None = None  # the VSP's free memory now (MiB, ``free_memory_mib``); None: the source
    guest_mib: int = 0  # the guest's memory (MiB)

    @property
    def left_after_mib(self) -> int | None:
        """What the VSP would have free once the guest moved in (MiB), or None for the source."""
        return None if self.free_mib is None else self.free_mib - self.guest_mib

    @property
    def ok(self) -> bool:
        return self.reason == OK

    @property
    def encrypted(self) -> bool:
        return self.encryption != PairEncryption.Policy.OFF

    @property
    def streams_label(self) -> str:
        return streams_label(self.streams)


def check_targets(vm: VirtualMachine) -> list[TargetCheck]:
    """Every VSP in service (not retired) with its pre-check result for migrating ``vm`` there, and its
    free memory (not the source's)."""
    source = vm.current_vsp
    vm_reason = check_vm(vm, source)
    plain: set[int] = set()
    streams: dict[int, int | None] = {}
    if source is not None:
        pairs = PairEncryption.objects.filter(Q(vsp_a=source) | Q(vsp_b=source))
        rows = pairs.values_list("vsp_a_id", "vsp_b_id", "encryption", "streams")
        for low, high, encryption, count in rows:
            other = high if low == source.pk else low
            streams[other] = count
            if encryption == PairEncryption.Policy.OFF:
                plain.add(other)
    devices = load_devices(vm, source) if not vm_reason else None
    return [
        TargetCheck(
            vsp,
            vm_reason or check_target_host(vm, source, vsp, devices=devices) or OK,
            PairEncryption.Policy.OFF if vsp.pk in plain else PairEncryption.Policy.REQUIRED,
            streams.get(vsp.pk),
            None if source is not None and vsp.pk == source.pk else free_memory_mib(vsp),
            vm.memory_mib,
        )
        for vsp in VSP.objects.filter(retired_at=None)
    ]


def check_target(vm: VirtualMachine, target: VSP, *, ignoring: Migration | None = None) -> str | None:
    """Why ``vm`` cannot migrate to ``target`` now, or None if it can.

    ``ignoring`` is the migration being started itself, which must not count against it.
    """
    source = vm.current_vsp
    return check_vm(vm, source, ignoring=ignoring) or check_target_host(vm, source, target, ignoring=ignoring)


def check_vm(vm: VirtualMachine, source: VSP | None, *, ignoring: Migration | None = None) -> str | None:
    if vm.is_vpar:
        return "vPars do not migrate"
    if not vm.online_migration_enabled:
        return "VM not enabled for online migration"
    if _is_migrating(vm, ignoring):
        return ALREADY_MIGRATING_REASON
    if source is None:
        return "VM is not runnable on any VSP"
    if not is_running(vm):
        return not_running_reason(vm)
    if not source.migration_enabled:
        return f"source host {source.name} is disabled for online migration"
    if not source.licensed:
        return f"source host {source.name} is not licensed for online migration"
    if not source.agent_reachable:
        return f"agent unreachable on source host {source.name}{problem_words(source)}"
    return local_disk_refusal(vm, source)


def is_running(vm: VirtualMachine) -> bool:
    """Whether the VM's runnable copy has virtual hardware On (what the last inventory said)."""
    registration = vm.runnable_registration
    return registration is not None and registration.hardware_status == Registration.HardwareStatus.ON


def not_running_reason(vm: VirtualMachine) -> str:
    registration = vm.runnable_registration
    status = registration.get_hardware_status_display() if registration else "Off"
    return f"VM is not running ({status}): online migration moves running guests only"


def check_target_host(
    vm: VirtualMachine,
    source: VSP | None,
    target: VSP,
    *,
    ignoring: Migration | None = None,
    devices: GuestDevices | None = None,
) -> str | None:
    if reason := host_refusal(source, target):
        return reason
    if reason := devices_refusal(vm, source, target, devices):
        return reason
    free = free_memory_mib(target, ignoring=ignoring)
    if vm.memory_mib > free:
        return f"not enough free memory (needs {vm.memory_mib} MiB, {free} MiB free)"
    return None


def host_refusal(source: VSP | None, target: VSP) -> str | None:
    """Why ``target`` cannot take any guest from ``source`` now (memory aside), or None."""
    if source is not None and target.pk == source.pk:
        return "same host"
    if target.retired_at is not None:
        return "host retired"
    if target.maintenance:
        return "host in maintenance"
    if not target.migration_enabled:
        return "host disabled"
    if not target.licensed:
        return "host not licensed"
    if not target.agent_reachable:
        return f"agent unreachable{problem_words(target)}"
    return None


def problem_words(vsp: VSP) -> str:
    """ ": TLS certificate not trusted (SHA-256 fingerprint ...)": why ``vsp``'s agent was last found
    unreachable (``VSP.agent_problem``), to follow "agent unreachable"; "" when not known."""
    return f": {vsp.agent_problem}" if vsp.agent_problem else ""


def free_memory_mib(vsp: VSP, *, ignoring: Migration | None = None) -> int:
    """Capacity minus the guests powered on there and the memory reserved by incoming migrations."""
    running = Registration.objects.filter(vsp=vsp, hardware_status=Registration.HardwareStatus.ON)
    incoming = Migration.objects.filter(target=vsp, state__in=Migration.ACTIVE_STATES)
    if ignoring is not None:
        incoming = incoming.exclude(pk=ignoring.pk)
    used = (running.aggregate(total=Sum("vm__memory_mib"))["total"] or 0) + (
        incoming.aggregate(total=Sum("vm__memory_mib"))["total"] or 0
    )
    return max(vsp.memory_mib - used, 0)


def _is_migrating(vm: VirtualMachine, ignoring: Migration | None) -> bool:
    active = Migration.objects.filter(vm=vm, state__in=Migration.ACTIVE_STATES)
    if ignoring is not None:
        active = active.exclude(pk=ignoring.pk)
    return active.exists()
