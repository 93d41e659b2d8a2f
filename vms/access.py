"""Who may see and do what, per host group: the one place every page, action, socket and API asks.

Two layers, both required (superusers pass both):

1. The **global model permission** is the coarse gate: what *kind* of thing the account may do at
   all (``vms.view_vsp``, ``vms.change_registration``...; other apps' rights, e.g. migrating a guest,
   build on these functions). A role **carries** the permissions its rights need (``ROLE_PERMISSIONS``,
   granted by ``vms.backends.HostGroupRoleBackend``), so giving someone a role on the Hosts and rights
   pages is enough; a permission given in the Django admin adds a kind of right, never a place.
2. The **role in a host group** (``HostGroupMembership``) says *where*: viewer sees the group's
   VSPs and their guests; operator may also migrate and power them; administrator may also change
   settings (online migration, runnable marks, per-VM settings).

A VSP in no group is seen by superusers only. A guest is visible when one of its copies
(registrations) is on a visible VSP. What the user cannot see is answered 404 (``Http404``), never
403, so names do not leak; what they can see but not change is refused with ``PermissionDenied``
(403) and a plain message. See ``docs/permissions.md``.

Visibility is a filter inside the page's own query (a join on the memberships), so list pages keep a
fixed query count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.core.exceptions import PermissionDenied
from django.db.models import CharField, Exists, OuterRef, Q, QuerySet
from django.db.models.functions import Cast
from django.http import Http404

from vms.hooks import audit_subjects, registered_role_permissions
from vms.models import VSP, PairEncryption, Registration, Role, VirtualMachine

VIEW_VSP_PERMISSION = "vms.view_vsp"
VIEW_VM_PERMISSION = "vms.view_virtualmachine"
CHANGE_VM_PERMISSION = "vms.change_virtualmachine"
CHANGE_REGISTRATION_PERMISSION = "vms.change_registration"

# The model permissions each role carries, besides those of the roles below it and other apps' own
# (``vms.hooks.register_role_permissions``): exactly what the rights of ``docs/permissions.md``'s first
# table check. Setting up hosts and roles (``vms.host_setup``: ``add_vsp``, ``change_vsp``, ``delete_vsp``,
# ``change_hostgroup``) and reading the audit trail (``view_auditevent``) are deliberately not carried:
# they stay permissions a superuser gives.
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    Role.VIEWER: frozenset({VIEW_VSP_PERMISSION, VIEW_VM_PERMISSION, "vms.view_registration"}),
    Role.OPERATOR: frozenset({CHANGE_REGISTRATION_PERMISSION}),  # power a copy
    Role.ADMINISTRATOR: frozenset({CHANGE_VM_PERMISSION, "vms.add_virtualmachine"}),  # settings, define
}

LACKS_PERMISSION = "You may look but not change: your account lacks the permission to do this."


class AccessDenied(PermissionDenied):
    """Refused by a right of this module; ``str(error)`` says why in plain words."""


def permissions_of_roles(roles: Iterable[str]) -> frozenset[str]:
    """The model permissions ``roles`` (``Role`` values a user holds somewhere) carry: each role's own
    (``ROLE_PERMISSIONS`` and other apps' registered ones) and those of every role below it."""
    extra = registered_role_permissions()
    carried: set[str] = set()
    for role in set(roles) & set(Role.values):
        for lower in Role.values[: Role.values.index(role) + 1]:
            carried |= ROLE_PERMISSIONS.get(lower, frozenset()) | extra.get(lower, frozenset())
    return frozenset(carried)


def _authenticated(user: Any) -> bool:
    return bool(user is not None and getattr(user, "is_authenticated", False) and user.is_active)


def has_global(user: Any, permission: str) -> bool:
    """The coarse gate: an active, logged-in user holding the model ``permission`` (superusers do)."""
    return _authenticated(user) and bool(user.has_perm(permission))


def vsp_condition(user: Any, role: str = Role.VIEWER, prefix: str = "") -> Q:
    """A ``Q`` on VSPs where ``user`` has ``role`` or more (``prefix``: ``"vsp__"`` from registrations).

    Superusers: everything. Others: VSPs of the groups where they have that role (none in no group).
    """
    if getattr(user, "is_superuser", False):
        return Q()
    if not _authenticated(user):
        return Q(pk__in=[])
    return Q(
        **{
            f"{prefix}group__memberships__user_id": user.pk,
            f"{prefix}group__memberships__role__in": Role.at_least(role),
        }
    )


def vsps_with_role(user: Any, role: str, vsps: QuerySet[VSP] | None = None) -> QuerySet[VSP]:
    """``vsps`` (default all) on which ``user`` has ``role`` or more (no global permission checked)."""
    return (VSP.objects.all() if vsps is None else vsps).filter(vsp_condition(user, role))


def role_vsp_ids(user: Any) -> frozenset[int] | None:
    """The VSPs of ``user``'s host groups (a viewer role or more), ``None`` for a superuser (all): what a
    page or an answer about a guest or a migration may name (one query)."""
    if getattr(user, "is_superuser", False):
        return None
    return frozenset(vsps_with_role(user, Role.VIEWER).values_list("pk", flat=True))


def visible_vsps(user: Any, vsps: QuerySet[VSP] | None = None) -> QuerySet[VSP]:
    """The VSPs ``user`` may see: ``vms.view_vsp`` and a role in their group. No extra query."""
    if not has_global(user, VIEW_VSP_PERMISSION):
        return VSP.objects.none()
    return vsps_with_role(user, Role.VIEWER, vsps)


def visible_registrations(
    user: Any, registrations: QuerySet[Registration] | None = None
) -> QuerySet[Registration]:
    """The copies ``user`` may see: those on a VSP they see (``vms.view_virtualmachine`` needed)."""
    registrations = Registration.objects.all() if registrations is None else registrations
    if not has_global(user, VIEW_VM_PERMISSION):
        return registrations.none()
    return registrations.filter(vsp_condition(user, Role.VIEWER, prefix="vsp__"))


def visible_vms(user: Any, vms: QuerySet[VirtualMachine] | None = None) -> QuerySet[VirtualMachine]:
    """The guests ``user`` may see: one of their copies is on a VSP the user sees. No extra query."""
    vms = VirtualMachine.objects.all() if vms is None else vms
    if not has_global(user, VIEW_VM_PERMISSION):
        return vms.none()
    if getattr(user, "is_superuser", False):
        return vms
    seen = Registration.objects.filter(vm=OuterRef("pk")).filter(vsp_condition(user, prefix="vsp__"))
    return vms.filter(Exists(seen))


def ids_as_text(queryset: QuerySet[Any]) -> QuerySet[Any]:
    """``queryset``'s primary keys as text, to compare with ``AuditEvent.object_id`` in a subquery."""
    return queryset.annotate(pk_text=Cast("pk", output_field=CharField())).values("pk_text")


def visible_audit_condition(user: Any) -> Q:
    """A ``Q`` on ``AuditEvent`` rows ``user`` may read: events about an object they see **now**.

    - a VSP, a guest, a copy (registration): as ``visible_vsps`` / ``visible_vms`` /
      ``visible_registrations``; a pair's encryption setting: both VSPs seen; another app's object: as
      that app registered it (``vms.hooks.register_audit_subject``, e.g. a migration);
    - any other object (host groups, memberships: inventory-wide) and objects since deleted (their
      group is not known any more): superusers only.

    ``IN`` subqueries on the event's ``object_type`` and ``object_id`` (text): no join, no duplicate
    rows, no extra query. The coarse gate (``vms.view_auditevent``) is the caller's.
    """
    if getattr(user, "is_superuser", False):
        return Q()
    if not _authenticated(user):
        return Q(pk__in=[])
    seen_vsps = vsps_with_role(user, Role.VIEWER).values("pk")
    condition = (
        Q(object_type="vms.vsp", object_id__in=ids_as_text(visible_vsps(user)))
        | Q(object_type="vms.virtualmachine", object_id__in=ids_as_text(visible_vms(user)))
        | Q(object_type="vms.registration", object_id__in=ids_as_text(visible_registrations(user)))
        | Q(
            object_type="vms.pairencryption",
            object_id__in=ids_as_text(
                PairEncryption.objects.filter(vsp_a_id__in=seen_vsps, vsp_b_id__in=seen_vsps)
            ),
        )
    )
    for object_type, visible in audit_subjects().items():
        condition |= Q(object_type=object_type, object_id__in=ids_as_text(visible(user)))
    return condition


def can_view_vsp(user: Any, vsp_id: int) -> bool:
    return visible_vsps(user).filter(pk=vsp_id).exists()


def can_view_vm(user: Any, vm_id: int) -> bool:
    return visible_vms(user).filter(pk=vm_id).exists()


def get_visible_vm(
    user: Any, vm_id: int | None, vms: QuerySet[VirtualMachine] | None = None
) -> VirtualMachine:
    """The guest ``vm_id`` from ``vms`` if ``user`` may see it; raises ``Http404`` otherwise."""
    vm = visible_vms(user, vms).filter(pk=vm_id).first() if vm_id is not None else None
    if vm is None:
        raise Http404()  # the same page as for an id that never existed
    return vm


def get_visible_vsp(user: Any, vsp_id: int, vsps: QuerySet[VSP] | None = None) -> VSP:
    """The VSP ``vsp_id`` from ``vsps`` if ``user`` may see it; raises ``Http404`` otherwise."""
    vsp = visible_vsps(user, vsps).filter(pk=vsp_id).first()
    if vsp is None:
        raise Http404()  # the same page as for an id that never existed
    return vsp


def has_role_on(user: Any, role: str, vsp_ids: Sequence[int | None]) -> bool:
    """Whether ``user`` has ``role`` or more on every VSP of ``vsp_ids`` (one query; None: a deleted
    VSP, which only superusers act on)."""
    if getattr(user, "is_superuser", False):
        return True
    if None in vsp_ids:
        return False
    wanted = set(vsp_ids)
    return len(wanted) == vsps_with_role(user, role).filter(pk__in=wanted).count()


def require_global(user: Any, permission: str) -> None:
    """Raises ``AccessDenied`` (the plain refusal) unless ``user`` holds the model ``permission``."""
    if not has_global(user, permission):
        raise AccessDenied(LACKS_PERMISSION)


def check_can_change_vm(user: Any, vm: VirtualMachine) -> None:
    """Per-VM settings (online migration...): ``vms.change_virtualmachine`` and the administrator role
    on every VSP where the VM is configured (a setting holds on each of them)."""
    require_global(user, CHANGE_VM_PERMISSION)
    vsp_ids = list(Registration.objects.filter(vm=vm).values_list("vsp_id", flat=True))
    if not has_role_on(user, Role.ADMINISTRATOR, vsp_ids):
        raise AccessDenied(
            f"You may not change {vm.name}'s settings: you are not an administrator of the host group "
            "of every VSP it is configured on."
        )


def check_can_change_registration(user: Any, registration: Registration) -> None:
    """Runnable / Not Runnable marks: ``vms.change_registration`` and administrator of the copy's VSP."""
    require_global(user, CHANGE_REGISTRATION_PERMISSION)
    if not has_role_on(user, Role.ADMINISTRATOR, [registration.vsp_id]):
        raise AccessDenied(
            f"You may not change {registration}: you are not an administrator of its VSP's host group."
        )


def check_can_power(user: Any, registration: Registration) -> None:
    """Start, stop, force-stop a copy: ``vms.change_registration`` and operator of the copy's VSP's group."""
    require_global(user, CHANGE_REGISTRATION_PERMISSION)
    if not has_role_on(user, Role.OPERATOR, [registration.vsp_id]):
        raise AccessDenied(
            f"You may not start or stop {registration}: you are not an operator of its VSP's host group."
        )


def may_act_on_vsp(user: Any, permission: str, vsp_id: int) -> bool:
    """Whether ``user`` holds ``permission`` and the operator role on VSP ``vsp_id`` (one query): what a
    VSP page's per-row controls need (power: ``change_registration``; other apps' own, e.g. "migrate
    selected"), decided once for every row."""
    return has_global(user, permission) and has_role_on(user, Role.OPERATOR, [vsp_id])


def registration_changeable_vsp_ids(user: Any, vsp_ids: list[int]) -> set[int]:
    """Of ``vsp_ids``, those where ``user`` may change copies' marks (``check_can_change_registration``)."""
    if not has_global(user, CHANGE_REGISTRATION_PERMISSION):
        return set()
    return set(vsps_with_role(user, Role.ADMINISTRATOR).filter(pk__in=vsp_ids).values_list("pk", flat=True))


def allowed(check: Any, *args: Any) -> bool:
    """``check(*args)`` as a yes/no, for templates deciding which buttons to show."""
    try:
        check(*args)
    except PermissionDenied:
        return False
    return True
