"""Host capacity: free memory of VSPs, in one query for any number of hosts.

Free memory is the host's memory minus the guests powered on there minus the memory reserved there by
in-flight migrations (queued or running, to that host): the same number the migrate dialog's pre-check
uses (``migrations_app.checks.free_memory_mib``). ``vms`` does not import ``migrations_app``; the
migrations table is reached through the app registry, and counts as empty when that app is not installed.
"""

from __future__ import annotations

from django.apps import apps
from django.db.models import F, IntegerField, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce

from vms.models import VSP, Registration


def reserved_by_incoming_migrations() -> Subquery | Value:
    """Per VSP (``OuterRef("pk")``): the memory of the VMs migrating to it, as one correlated subquery."""
    try:
        migration = apps.get_model("migrations_app", "Migration")
    except LookupError:
        return Value(0)
    incoming = (
        migration.objects.filter(target=OuterRef("pk"), state__in=migration.ACTIVE_STATES)
        .order_by()
        .values("target")
        .annotate(total=Sum("vm__memory_mib"))
        .values("total")
    )
    return Subquery(incoming, output_field=IntegerField())


def with_free_memory(vsps: QuerySet[VSP]) -> QuerySet[VSP]:
    """Annotate ``used_memory_mib``, ``reserved_memory_mib`` and ``free_memory_mib`` on each VSP.

    Used memory is the memory of the VMs whose copy on that VSP has hardware On (a copy that is On is
    always the runnable one); reserved memory is held there for incoming migrations. Free memory can be
    negative on an overcommitted host.
    """
    running_there = Q(registrations__hardware_status=Registration.HardwareStatus.ON)
    return vsps.annotate(
        used_memory_mib=Coalesce(
            Sum("registrations__vm__memory_mib", filter=running_there), 0, output_field=IntegerField()
        ),
        reserved_memory_mib=Coalesce(reserved_by_incoming_migrations(), 0, output_field=IntegerField()),
    ).annotate(free_memory_mib=F("memory_mib") - F("used_memory_mib") - F("reserved_memory_mib"))


# The annotation ``with_free_memory`` adds (a name the type checker cannot see through the helper).
FREE_MEMORY: str = "free_memory_mib"


def free_memory_mib(vsp: VSP) -> int:
    return with_free_memory(VSP.objects.filter(pk=vsp.pk)).values_list(FREE_MEMORY, flat=True).get()


def free_memory_by_vsp(vsp_ids: list[int]) -> dict[int, int]:
    rows = with_free_memory(VSP.objects.filter(pk__in=vsp_ids)).values_list("pk", FREE_MEMORY)
    return dict(rows)
