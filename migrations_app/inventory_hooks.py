"""Everything this app adds to the inventory's pages and rules, registered with ``vms.hooks`` (and
``vms.general_tab``) from ``MigrationsAppConfig.ready``: the inventory imports none of it.

- the VM General tab: live progress and the Migrate… control, the phases panel, alerts, the status icon,
  the VM's migration history, its migration policy and phase limits (``SLOTS``, context providers);
- a VSP's page: the live part and "migrate selected", a selection and a migration column per row;
- power: a guest that migrates is busy (its power buttons say why); a VSP with migrations cannot retire;
- free memory: an in-flight migration reserves its guest's memory on its target;
- the audit trail: events about a migration are readable by whoever sees both its ends;
- lost guests: an alert that said the guest keeps running on a source that no longer reports it is
  restated (``endings.restate_lost_on_source``).
- roles: a viewer may read migrations, an operator request and cancel them (the model permissions).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from django.db.models import Q

from vms import general_tab, hooks
from vms.access import may_act_on_vsp
from vms.models import VSP, Role, VirtualMachine

from . import history, migration_policy, progress
from .access import (
    ADD_MIGRATION_PERMISSION,
    CHANGE_MIGRATION_PERMISSION,
    VIEW_MIGRATION_PERMISSION,
    audited_migrations,
)
from .capacity import reserved_by_incoming_migrations
from .endings import restate_lost_on_source
from .models import Migration

PROGRESS = "migrations_app/progress.html"
SLOTS: dict[str, str] = {
    "vm_general.live": f"{PROGRESS}#vm_live",
    "vm_general.status_icon": f"{PROGRESS}#status_icon",
    "vm_general.fields": "migrations_app/vm_fields.html",
    "vm_general.phases": f"{PROGRESS}#phases",
    "vm_general.alerts": f"{PROGRESS}#alerts",
    "vm_general.history": "migrations_app/vm_history.html",
    "vsp_detail.live": f"{PROGRESS}#vsp_live",
    "vsp_detail.head": "migrations_app/vsp_rows.html#head",
    "vsp_detail.row": "migrations_app/vsp_rows.html#row",
}


def register() -> None:
    """Register every hook (``ready()`` may run more than once: each registration is kept once)."""
    for slot, template_name in SLOTS.items():
        hooks.register_slot(slot, template_name)
    general_tab.register_context_provider(progress.general_tab_context)
    general_tab.register_context_provider(history.general_tab_context)
    general_tab.register_context_provider(policy_context)
    hooks.register_vsp_page_context(vsp_page_context)
    hooks.register_busy_check(migrating_guests)
    hooks.register_vsp_busy_check(migrations_on_vsp)
    hooks.register_reservation(reserved_by_incoming_migrations)
    hooks.register_audit_subject("migrations_app.migration", audited_migrations)
    hooks.register_lost_listener(restate_lost_on_source)
    hooks.register_role_permissions(Role.VIEWER, [VIEW_MIGRATION_PERMISSION])  # the history, reports
    hooks.register_role_permissions(Role.OPERATOR, [ADD_MIGRATION_PERMISSION, CHANGE_MIGRATION_PERMISSION])


def policy_context(vm: VirtualMachine, visible_vsp_ids: Collection[int] | None = None) -> dict[str, Any]:
    """The General tab's migration policy: its words, its values and the presets the form offers (the
    same for every viewer: it names no VSP)."""
    return {
        "policy": migration_policy.effective(vm.migration_policy),
        "policy_words": migration_policy.describe(vm.migration_policy),
        "presets": [(key, label, words) for key, (label, words, _) in migration_policy.PRESETS.items()],
    }


def vsp_page_context(request: Any, vsp: VSP, vm_ids: Collection[int]) -> dict[str, Any]:
    """A VSP's page: whether its user may "migrate selected" from here (add_migration and operator of
    the VSP's group, decided once for every row), each row's latest migration from or to this VSP (one
    query), and the rows the page's websocket pushes updates for."""
    may_migrate_here = may_act_on_vsp(request.user, ADD_MIGRATION_PERMISSION, vsp.pk)
    return {
        "may_migrate_here": may_migrate_here,
        "migration_rows": progress.get_row_migrations(vsp, vm_ids),
        "page_vm_ids": ",".join(str(vm_id) for vm_id in vm_ids),
        "row_columns": 2 if may_migrate_here else 1,  # the selection box, the migration's status
    }


def migrations_on_vsp(vsp_id: int) -> list[str]:
    """Why VSP ``vsp_id`` may not be retired for migrations: those queued or running from or to it."""
    active = Migration.objects.filter(state__in=Migration.ACTIVE_STATES).filter(
        Q(source_id=vsp_id) | Q(target_id=vsp_id)
    )
    names = sorted(active.values_list("vm__name", flat=True))
    if not names:
        return []
    return [
        f"{len(names)} migration{'s' if len(names) != 1 else ''} from or to it not ended yet "
        f"({', '.join(names[:5])}): wait for them to end or cancel them"
    ]


def migrating_guests(vm_ids: Collection[int]) -> dict[int, str]:
    """The guests among ``vm_ids`` with a migration queued or running (one query): a migration owns the
    guest until it ends, so its power does not change meanwhile."""
    migrating = Migration.objects.filter(vm_id__in=vm_ids, state__in=Migration.ACTIVE_STATES)
    return {
        vm_id: f"{name} is migrating: wait for the migration to end or cancel it."
        for vm_id, name in migrating.values_list("vm_id", "vm__name")
        if vm_id is not None
    }
