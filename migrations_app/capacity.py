"""Memory a migration holds on its target: what the inventory's free memory counts as reserved while a
migration is queued or running (``vms.hooks.register_reservation``), and so what the migrate dialog's
pre-check, evacuation plans and the VSP pages all subtract."""

from __future__ import annotations

from django.db.models import IntegerField, OuterRef, Subquery, Sum

from .models import Migration


def reserved_by_incoming_migrations() -> Subquery:
    """Per VSP (``OuterRef("pk")``): the memory (MiB) of the VMs migrating to it, as one correlated
    subquery (NULL: none)."""
    incoming = (
        Migration.objects.filter(target=OuterRef("pk"), state__in=Migration.ACTIVE_STATES)
        .order_by()
        .values("target")
        .annotate(total=Sum("vm__memory_mib"))
        .values("total")
    )
    return Subquery(incoming, output_field=IntegerField())
