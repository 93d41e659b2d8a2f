"""Host capacity: free memory of VSPs, in one query for any number of hosts."""

from __future__ import annotations

from django.db.models import F, IntegerField, Q, QuerySet, Sum
from django.db.models.functions import Coalesce

from vms.models import VSP, Registration


def with_free_memory(vsps: QuerySet[VSP]) -> QuerySet[VSP]:
    """Annotate ``used_memory_mib`` and ``free_memory_mib`` on each VSP.

    Used memory is the memory of the VMs whose copy on that VSP has hardware On (a copy that is On is
    always the runnable one). Free memory can be negative on an overcommitted host.
    """
    running_there = Q(registrations__hardware_status=Registration.HardwareStatus.ON)
    return vsps.annotate(
        used_memory_mib=Coalesce(
            Sum("registrations__vm__memory_mib", filter=running_there), 0, output_field=IntegerField()
        ),
    ).annotate(free_memory_mib=F("memory_mib") - F("used_memory_mib"))


def free_memory_mib(vsp: VSP) -> int:
    return with_free_memory(VSP.objects.filter(pk=vsp.pk)).values_list("free_memory_mib", flat=True).get()


def free_memory_by_vsp(vsp_ids: list[int]) -> dict[int, int]:
    rows = with_free_memory(VSP.objects.filter(pk__in=vsp_ids)).values_list("pk", "free_memory_mib")
    return dict(rows)
