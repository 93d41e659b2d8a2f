"""Refresh Data: re-collect a VM's state before the General tab is re-rendered."""

from __future__ import annotations

from dataclasses import dataclass

from vms.inventory import RefreshOutcome, collect_vm_state
from vms.models import VirtualMachine
from vms.queries import vm_with_registrations


@dataclass(frozen=True)
class Refreshed:
    vm: VirtualMachine  # re-read, registrations prefetched
    outcome: RefreshOutcome  # whether the agent was heard; its ``message`` is the tab's warning


def refresh_vm(vm: VirtualMachine) -> Refreshed:
    """Ask ``vm``'s agent now, store what it says, re-read the VM, and say whether anything was collected.

    An agent that does not answer marks its VSP unreachable; the database is shown as it is.
    """
    outcome = collect_vm_state(vm)
    return Refreshed(vm_with_registrations().get(pk=vm.pk), outcome)


def refresh_vm_state(vm: VirtualMachine) -> VirtualMachine:
    """Return ``vm`` as freshly known (see ``refresh_vm`` for the outcome too)."""
    return refresh_vm(vm).vm
