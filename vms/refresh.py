"""Refresh Data: re-collect a VM's state before the General tab is re-rendered."""

from __future__ import annotations

from vms.models import VirtualMachine
from vms.queries import vm_with_registrations


def refresh_vm_state(vm: VirtualMachine) -> VirtualMachine:
    """Return ``vm`` as freshly known.

    For now the database is the only source, so this re-reads it; once host agents report guest state,
    this is the one place that asks the VM's agent and stores what it says before re-reading.
    """
    return vm_with_registrations().get(pk=vm.pk)
