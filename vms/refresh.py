"""Refresh Data: re-collect a VM's state before the General tab is re-rendered."""

from __future__ import annotations

from vms.inventory import collect_vm_state
from vms.models import VirtualMachine
from vms.queries import vm_with_registrations


def refresh_vm_state(vm: VirtualMachine) -> VirtualMachine:
    """Return ``vm`` as freshly known: its agent is asked now and what it says is stored, then re-read.

    An agent that does not answer marks its VSP unreachable; the database is shown as it is.
    """
    collect_vm_state(vm)
    return vm_with_registrations().get(pk=vm.pk)
