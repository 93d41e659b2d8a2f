"""Online Migration Enabled, computed from VM and host state (docs/domain.md, "Online migration status")."""

from __future__ import annotations

from django.db import models

from vms.models import VSP, VirtualMachine


class OnlineMigrationStatus(models.TextChoices):
    HOST_DISABLED = "host_disabled", "Host disabled"
    HOST_NOT_LICENSED = "host_not_licensed", "Host not licensed"
    VM_ENABLED = "vm_enabled", "VM enabled"
    VM_DISABLED = "vm_disabled", "VM disabled"
    NOT_SUPPORTED = "not_supported", "vPar does not support migration"


def online_migration_status(vm: VirtualMachine, vsp: VSP | None) -> OnlineMigrationStatus:
    """What the General tab shows as Online Migration Enabled for ``vm`` on ``vsp``.

    The host's state wins over the VM's (a disabled host shows "Host disabled" whatever the VM says);
    a host both disabled and unlicensed shows "Host disabled", the table's first matching row.
    Without a VSP (no runnable copy) only the VM's own setting is shown.
    """
    if vm.is_vpar:
        return OnlineMigrationStatus.NOT_SUPPORTED
    if vsp is not None and not vsp.migration_enabled:
        return OnlineMigrationStatus.HOST_DISABLED
    if vsp is not None and not vsp.licensed:
        return OnlineMigrationStatus.HOST_NOT_LICENSED
    if vm.online_migration_enabled:
        return OnlineMigrationStatus.VM_ENABLED
    return OnlineMigrationStatus.VM_DISABLED


def can_migrate_online(vm: VirtualMachine, vsp: VSP | None) -> bool:
    return vsp is not None and online_migration_status(vm, vsp) == OnlineMigrationStatus.VM_ENABLED
