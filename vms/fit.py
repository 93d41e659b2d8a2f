"""Whether a VM fits a VSP: checked when an administrator edits the inventory by hand (Django admin).

A VM bigger than a host (memory or vCPUs) cannot run there, and a copy marked On uses the host's
memory: the guests On on one host must fit in its memory. Without these checks the VSP list showed
negative free memory.
"""

from __future__ import annotations

from django.db.models import Sum

from vms.models import VSP, Registration, VirtualMachine


def size_problems(vm: VirtualMachine, vsp: VSP) -> list[str]:
    """Why ``vm`` can never run on ``vsp`` (too much memory or too many vCPUs), or nothing."""
    problems = []
    if vm.memory_mib is not None and vsp.memory_mib is not None and vm.memory_mib > vsp.memory_mib:
        problems.append(
            f"{vm.name or 'This VM'} needs {vm.memory_mib} MiB of memory; VSP {vsp.name} has only "
            f"{vsp.memory_mib} MiB."
        )
    if vm.vcpus is not None and vsp.cpus is not None and vm.vcpus > vsp.cpus:
        problems.append(
            f"{vm.name or 'This VM'} has {vm.vcpus} vCPUs; VSP {vsp.name} has only {vsp.cpus} CPUs."
        )
    return problems


def memory_on_elsewhere(vsp: VSP, *, excluding_vm: VirtualMachine | None = None) -> int:
    """Memory of the guests On on ``vsp``, leaving out ``excluding_vm`` (the one being edited)."""
    running = Registration.objects.filter(vsp=vsp, hardware_status=Registration.HardwareStatus.ON)
    if excluding_vm is not None and excluding_vm.pk is not None:
        running = running.exclude(vm=excluding_vm)
    return running.aggregate(total=Sum("vm__memory_mib"))["total"] or 0


def registration_problems(vm: VirtualMachine, vsp: VSP, hardware_status: str) -> list[str]:
    """Why this copy of ``vm`` on ``vsp`` with ``hardware_status`` is impossible, or nothing."""
    problems = size_problems(vm, vsp)
    if problems or hardware_status != Registration.HardwareStatus.ON:
        return problems
    used = memory_on_elsewhere(vsp, excluding_vm=vm)
    if used + vm.memory_mib > vsp.memory_mib:
        problems.append(
            f"VSP {vsp.name} has no room to run {vm.name or 'this VM'} (On): it needs {vm.memory_mib} MiB "
            f"and only {max(vsp.memory_mib - used, 0)} MiB of the host's {vsp.memory_mib} MiB are free."
        )
    return problems


def host_problems(vsp: VSP) -> list[str]:
    """Why ``vsp``'s (edited) memory or CPUs cannot hold the guests registered on it, or nothing."""
    if vsp.pk is None:
        return []
    problems = []
    registrations = Registration.objects.filter(vsp_id=vsp.pk).select_related("vm")
    for registration in registrations:
        problems.extend(size_problems(registration.vm, vsp))
    used = memory_on_elsewhere(vsp)
    if vsp.memory_mib is not None and used > vsp.memory_mib:
        problems.append(
            f"The guests On on {vsp.name} use {used} MiB: the host needs at least that much memory."
        )
    return problems
