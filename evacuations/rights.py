"""Who may see and do what about evacuations: one function per right, so per-host-group permissions
replace the global checks in one place. An evacuation requests and cancels migrations, so its rights are
the migration rights on the VSP's host group (``migrations_app.access``, built on ``vms.access``)."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied

from migrations_app.access import ADD_MIGRATION_PERMISSION, CHANGE_MIGRATION_PERMISSION
from vms.access import LACKS_PERMISSION, can_view_vsp, may_act_on_vsp
from vms.models import VSP


def may_view_evacuation(user: Any, vsp: VSP) -> bool:
    """Whether ``user`` may see ``vsp``'s evacuation plan and progress: they see ``vsp``
    (``vms.access.can_view_vsp``: ``vms.view_vsp`` and a role in its host group)."""
    return can_view_vsp(user, vsp.pk)


def may_evacuate(user: Any, vsp: VSP) -> bool:
    """Whether ``user`` may start an evacuation of ``vsp`` (it requests migrations): ``add_migration``
    and operator of ``vsp``'s host group (the plan then offers only targets where they are operator)."""
    return may_act_on_vsp(user, ADD_MIGRATION_PERMISSION, vsp.pk)


def may_cancel_evacuation(user: Any, vsp: VSP) -> bool:
    """Whether ``user`` may cancel ``vsp``'s running evacuation (it cancels migrations):
    ``change_migration`` and operator of ``vsp``'s host group."""
    return may_act_on_vsp(user, CHANGE_MIGRATION_PERMISSION, vsp.pk)


def may_leave_maintenance(user: Any, vsp: VSP) -> bool:
    """Whether ``user`` may take ``vsp`` out of maintenance: ``add_migration`` and operator of its group."""
    return may_act_on_vsp(user, ADD_MIGRATION_PERMISSION, vsp.pk)


def require(allowed: bool) -> None:
    """Raise ``PermissionDenied`` (the plain refusal) unless ``allowed``."""
    if not allowed:
        raise PermissionDenied(LACKS_PERMISSION)
