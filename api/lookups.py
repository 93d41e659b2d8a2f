"""Finding what a request names: an id or a name, as an admin would type either.

Each ``get_*`` raises ``Http404`` with a plain sentence when nothing matches (a problem document, 404).
"""

from __future__ import annotations

from typing import Any, TypeVar

from django.db.models import Model, QuerySet
from django.http import Http404

from migrations_app.access import visible_migration_condition
from migrations_app.models import Migration
from vms.access import visible_vms, visible_vsps
from vms.models import VSP, VirtualMachine
from vms.queries import vm_with_registrations

MAX_ID = 2**53  # beyond any id the database holds; larger numbers overflow SQLite's integers


def parse_ref(ref: str) -> tuple[int | None, str]:
    """(id, "") for digits, (None, name) otherwise."""
    ref = ref.strip()
    if ref.isascii() and ref.isdigit() and 0 < int(ref) <= MAX_ID:
        return int(ref), ""
    return None, ref


M = TypeVar("M", bound=Model)


def _get_by_ref(queryset: QuerySet[M], ref: str, what: str) -> M:
    number, name = parse_ref(ref)
    # A NUL can match no name; PostgreSQL refuses it in a query outright.
    found = None
    if number is not None:
        found = queryset.filter(pk=number).first() or queryset.filter(name=ref.strip()).first()
    elif name and "\x00" not in name:
        found = queryset.filter(name=name).first()
    if found is None:
        raise Http404(f"No {what} with the id or name {ref.strip()!r}.")
    return found


def get_vsp(ref: str, user: Any) -> VSP:
    """The VSP ``user`` may see (``vms.access``); another host group's is not found, like a missing one."""
    return _get_by_ref(visible_vsps(user), ref, "VSP")


def get_vm(ref: str, user: Any) -> VirtualMachine:
    """The VM (or vPar) ``user`` may see, with its registrations and their VSPs prefetched."""
    return _get_by_ref(visible_vms(user, vm_with_registrations()), ref, "VM")


def get_migration(migration_id: int, user: Any) -> Migration:
    """The migration ``user`` may see (its source or target is in one of their host groups)."""
    migration = (
        Migration.objects.select_related("vm", "source", "target", "requested_by")
        .filter(visible_migration_condition(user), pk=migration_id)
        .first()
    )
    if migration is None:
        raise Http404(f"No migration with the id {migration_id}.")
    return migration
