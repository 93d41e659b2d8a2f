"""What other apps add to the inventory, without the inventory importing them.

The inventory (``vms``) sits below the apps that use it (migrations, evacuations): they register here
from their ``AppConfig.ready()``, and the inventory's pages and rules ask here. With nothing registered
every hook adds nothing, so the inventory works alone (an import-linter contract in ``pyproject.toml``
keeps ``vms`` from importing those apps).

- **slots**: templates another app renders into named places of the inventory's pages
  (``{% slot "name" %}``, ``vms.templatetags.console``), with the page's context;
- **VSP page context**: what those templates need on a VSP's page (the VM General tab's is
  ``vms.general_tab.register_context_provider``);
- **busy guests**: why a guest's power may not change now (e.g. a migration owns it);
- **busy hosts**: why a VSP may not be retired now (migrations, evacuations);
- **reservations**: memory a host holds for guests on their way to it (free memory counts it);
- **audit subjects**: which audit events about another app's objects a user may read;
- **lost guests**: told when a runnable copy's host no longer reports its guest (e.g. a migration's alert
  that said the guest keeps running there is restated).
- **role permissions**: the model permissions of another app's rights a host-group role carries.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

from django.db.models import QuerySet
from django.db.models.expressions import BaseExpression

# Each place of the inventory's pages another app may fill, with what it is for.
SLOTS: dict[str, str] = {
    "vm_general.live": "the General tab, outside the tab's body (kept across Refresh Data): live parts",
    "vm_general.status_icon": "beside the OS status: an icon of what happens to the guest now",
    "vm_general.fields": "more fields of the VM at the end of its list (not for vPars)",
    "vm_general.phases": "a panel below the fields and buttons",
    "vm_general.alerts": "alerts below that panel",
    "vm_general.history": "the VM's history, before its configurations on other VSPs",
    "vsp_detail.overview": "the top of a VSP's page, inside its overview (re-fetched as one)",
    "vsp_detail.live": "above the Virtual Machines tab: live parts and forms of the page",
    "vsp_detail.head": "header cells before Name in the Virtual Machines tab (one per added column)",
    "vsp_detail.row": "cells before Name in each row of that tab (context: vm, registration)",
}
_slots: dict[str, list[str]] = {}


def register_slot(slot: str, template_name: str) -> None:
    """Render ``template_name`` (a template or ``template.html#partial``) into ``slot`` (one of ``SLOTS``)
    with the page's context; slots filled by several templates render them in registration order.
    Raises ``ValueError`` for a slot the inventory's pages do not have."""
    if slot not in SLOTS:
        raise ValueError(f"The inventory's pages have no slot {slot!r}; they have: {', '.join(SLOTS)}.")
    templates = _slots.setdefault(slot, [])
    if template_name not in templates:
        templates.append(template_name)


def slot_templates(slot: str) -> tuple[str, ...]:
    """The templates registered for ``slot`` (none: it renders nothing)."""
    return tuple(_slots.get(slot, ()))


# -- a VSP's page ----------------------------------------------------------------------------------------
VSPPageProvider = Callable[[Any, Any, Collection[int]], dict[str, Any]]
_vsp_page_providers: list[VSPPageProvider] = []


def register_vsp_page_context(provider: VSPPageProvider) -> None:
    """Add ``provider(request, vsp, vm_ids) -> dict`` to a VSP page's context (``vm_ids``: the guests of
    the page's rows). A provider adding columns through the ``vsp_detail.head``/``row`` slots says how
    many in the key ``"row_columns"`` (summed over providers, for the page's empty-table row)."""
    if provider not in _vsp_page_providers:
        _vsp_page_providers.append(provider)


def vsp_page_context(request: Any, vsp: Any, vm_ids: Collection[int]) -> dict[str, Any]:
    """Every provider's keys, merged in registration order; ``row_columns`` summed."""
    context: dict[str, Any] = {}
    columns = 0
    for provider in _vsp_page_providers:
        added = provider(request, vsp, vm_ids)
        columns += int(added.pop("row_columns", 0))
        context.update(added)
    context["row_columns"] = columns
    return context


# -- busy guests -----------------------------------------------------------------------------------------
BusyCheck = Callable[[Collection[int]], dict[int, str]]
_busy_checks: list[BusyCheck] = []


def register_busy_check(check: BusyCheck) -> None:
    """Add ``check(vm_ids) -> {vm_id: reason}``: the guests among ``vm_ids`` whose power may not change
    now, each with why in one sentence for people ("web01 is migrating: ..."), in one query."""
    if check not in _busy_checks:
        _busy_checks.append(check)


def busy_reasons(vm_ids: Iterable[int]) -> dict[int, str]:
    """Why each busy guest among ``vm_ids`` is busy (the first check that says so); others are absent."""
    wanted = list(vm_ids)
    reasons: dict[int, str] = {}
    for check in _busy_checks:
        for vm_id, reason in check(wanted).items():
            reasons.setdefault(vm_id, reason)
    return reasons


# -- busy hosts -----------------------------------------------------------------------------------------
VSPBusyCheck = Callable[[int], list[str]]
_vsp_busy_checks: list[VSPBusyCheck] = []


def register_vsp_busy_check(check: VSPBusyCheck) -> None:
    """Add ``check(vsp_id) -> [reason, ...]``: why the VSP may not be retired now (e.g. "2 migrations
    to or from it are running"), each a phrase for people; empty when nothing holds it."""
    if check not in _vsp_busy_checks:
        _vsp_busy_checks.append(check)


def vsp_busy_reasons(vsp_id: int) -> list[str]:
    """Every registered check's reasons why VSP ``vsp_id`` is busy (empty: nothing holds it)."""
    return [reason for check in _vsp_busy_checks for reason in check(vsp_id)]


# -- memory reserved on a host ---------------------------------------------------------------------------
Reservation = Callable[[], BaseExpression]
_reservations: list[Reservation] = []


def register_reservation(reservation: Reservation) -> None:
    """Add ``reservation() -> expression``: per VSP (``OuterRef("pk")`` in the expression), the memory
    (MiB) held there for guests on their way to it, e.g. a correlated ``Subquery``; NULL counts as 0."""
    if reservation not in _reservations:
        _reservations.append(reservation)


def reservations() -> list[BaseExpression]:
    """The registered reservation expressions, made now (each call builds fresh ones)."""
    return [reservation() for reservation in _reservations]


# -- audit events about other apps' objects --------------------------------------------------------------
AuditSubject = Callable[[Any], QuerySet[Any]]
_audit_subjects: dict[str, AuditSubject] = {}


def register_audit_subject(object_type: str, visible: AuditSubject) -> None:
    """Events about objects of ``object_type`` (``"app_label.model"``, as ``AuditEvent.object_type``) are
    readable by a user when the object is in ``visible(user)``, a queryset of those objects."""
    _audit_subjects[object_type] = visible


def audit_subjects() -> dict[str, AuditSubject]:
    """The registered object types with their visibility querysets."""
    return dict(_audit_subjects)


# -- lost guests -----------------------------------------------------------------------------------------
LostListener = Callable[[Any], object]  # what it returns is not read
_lost_listeners: list[LostListener] = []


def register_lost_listener(listener: LostListener) -> None:
    """Add ``listener(registration)``: called once when the inventory marks the runnable copy
    ``registration`` Lost (its host's agent answered without the guest; ``lost_since`` set), inside the
    inventory's transaction, so what it writes commits with the mark."""
    if listener not in _lost_listeners:
        _lost_listeners.append(listener)


def guest_lost(registration: Any) -> None:
    """Tell every listener that ``registration`` was just marked Lost."""
    for listener in _lost_listeners:
        listener(registration)


# -- the model permissions a host-group role carries -----------------------------------------------------
_role_permissions: dict[str, set[str]] = {}


def register_role_permissions(role: str, permissions: Iterable[str]) -> None:
    """A host-group ``role`` (``vms.models.Role`` value) carries the model ``permissions``
    (``"app_label.codename"``) of another app's rights: whoever holds the role in some group has them
    (``vms.backends.HostGroupRoleBackend``); where they apply is still the role's groups."""
    _role_permissions.setdefault(role, set()).update(permissions)


def registered_role_permissions() -> dict[str, frozenset[str]]:
    """The registered ``{role: permissions}`` of other apps (only those roles' own, not the lower ones')."""
    return {role: frozenset(permissions) for role, permissions in _role_permissions.items()}
