"""Read-side queries shared by pages, with a query count that does not grow with the number of rows."""

from __future__ import annotations

from django.db.models import Exists, OuterRef, Prefetch, QuerySet
from django.db.models.functions import Lower

from vms.models import Registration, VirtualMachine


def vm_with_registrations() -> QuerySet[VirtualMachine]:
    registrations = Registration.objects.select_related("vsp").order_by("vsp__name")
    return VirtualMachine.objects.prefetch_related(Prefetch("registrations", queryset=registrations))


def filter_vms(
    vms: QuerySet[VirtualMachine],
    *,
    name: str = "",
    kind: str = "",
    os_status: str = "",
    vsp_id: int | None = None,
    hardware_status: str = "",
) -> QuerySet[VirtualMachine]:
    """VMs matching every given criterion; VSP and hardware status must hold for the same registration.

    Ordered by name as people read it: case-insensitively ("app01", "Backup", "db01"), then by name and
    pk so equal names in other cases keep one order (issue 21.8: "Zeta" came before "alpha").
    """
    vms = vms.order_by(Lower("name"), "name", "pk")
    if name:
        vms = vms.filter(name__icontains=name)
    if kind:
        vms = vms.filter(kind=kind)
    if os_status:
        vms = vms.filter(os_status=os_status)
    registration_conditions: dict[str, object] = {}
    if vsp_id is not None:
        registration_conditions["vsp_id"] = vsp_id
    if hardware_status:
        registration_conditions["hardware_status"] = hardware_status
    if registration_conditions:
        matching = Registration.objects.filter(vm=OuterRef("pk"), **registration_conditions)
        vms = vms.filter(Exists(matching))
    return vms


def filter_registrations(
    *,
    name: str = "",
    kind: str = "",
    os_status: str = "",
    vsp_id: int | None = None,
    hardware_status: str = "",
) -> QuerySet[Registration]:
    """The copies (registrations) matching every criterion, one row each, ordered by VM
    (case-insensitively, as ``filter_vms``) then VSP.

    Used when the list is filtered by VSP or hardware status: each row then shows the copy that
    matched, not the VM's runnable copy elsewhere.
    """
    registrations = Registration.objects.select_related("vm", "vsp").order_by(
        Lower("vm__name"), "vm__name", "vsp__name"
    )
    if name:
        registrations = registrations.filter(vm__name__icontains=name)
    if kind:
        registrations = registrations.filter(vm__kind=kind)
    if os_status:
        registrations = registrations.filter(vm__os_status=os_status)
    if vsp_id is not None:
        registrations = registrations.filter(vsp_id=vsp_id)
    if hardware_status:
        registrations = registrations.filter(hardware_status=hardware_status)
    return registrations
