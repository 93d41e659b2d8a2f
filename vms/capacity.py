"""Host capacity: free memory of VSPs, in one query for any number of hosts.

Free memory is the host's memory minus the guests powered on there minus the memory reserved there for
guests on their way to it: what other apps register (``vms.hooks.register_reservation``; in-flight
migrations reserve their guest's memory on their target), so the inventory's pages and those apps' checks
count the same number. With nothing registered, nothing is reserved.
"""

from __future__ import annotations

from django.db.models import Expression, F, IntegerField, Q, QuerySet, Sum, Value
from django.db.models.functions import Coalesce

from vms.hooks import reservations
from vms.models import VSP, Registration


def reserved_memory() -> Expression:
    """Per VSP: the memory (MiB) reserved there, the sum of every registered reservation (0: none)."""
    total: Expression = Value(0, output_field=IntegerField())
    for reservation in reservations():
        total = total + Coalesce(reservation, 0, output_field=IntegerField())
    return total


def with_free_memory(vsps: QuerySet[VSP]) -> QuerySet[VSP]:
    """Annotate ``used_memory_mib``, ``reserved_memory_mib`` and ``free_memory_mib`` on each VSP.

    Used memory is the memory of the VMs whose copy on that VSP has hardware On (a copy that is On is
    always the runnable one); reserved memory is held there for guests on their way (``reserved_memory``).
    Free memory can be negative on an overcommitted host.
    """
    running_there = Q(registrations__hardware_status=Registration.HardwareStatus.ON)
    return vsps.annotate(
        used_memory_mib=Coalesce(
            Sum("registrations__vm__memory_mib", filter=running_there), 0, output_field=IntegerField()
        ),
        reserved_memory_mib=reserved_memory(),
    ).annotate(free_memory_mib=F("memory_mib") - F("used_memory_mib") - F("reserved_memory_mib"))


# The annotation ``with_free_memory`` adds (a name the type checker cannot see through the helper).
FREE_MEMORY: str = "free_memory_mib"


def free_memory_mib(vsp: VSP) -> int:
    return with_free_memory(VSP.objects.filter(pk=vsp.pk)).values_list(FREE_MEMORY, flat=True).get()


def free_memory_by_vsp(vsp_ids: list[int]) -> dict[int, int]:
    rows = with_free_memory(VSP.objects.filter(pk__in=vsp_ids)).values_list("pk", FREE_MEMORY)
    return dict(rows)
