"""Inventory collection: what the host agents say about their guests, stored in the database.

Only the copy that is runnable on a VSP takes the agent's On/Off and OS status; Not Runnable copies and
VMs in the middle of a migration are left alone (the migration's worker owns them then).
An agent that does not answer marks its VSP unreachable, which the migrate dialog shows.
"""

from __future__ import annotations

import logging
from typing import Any

from django.utils import timezone

from vms.agent_client import AgentClient, AgentProtocolError, AgentRefused, AgentUnreachable
from vms.models import VSP, Registration, VirtualMachine

logger = logging.getLogger(__name__)

AGENT_ERRORS = (AgentUnreachable, AgentRefused, AgentProtocolError)
REFRESH_TIMEOUT_S = 3.0  # an admin is waiting for Refresh Data
MIGRATING_STATES = (
    "init",
    "copy",
    "io_quiesce",
    "frozen",
    "committing",
)  # Migration.ACTIVE_STATES minus queued


def collect_all_inventory() -> dict[str, bool]:
    """Re-collect every VSP; returns whether each agent answered."""
    return {vsp.name: collect_vsp_inventory(vsp) for vsp in VSP.objects.all()}


def collect_vsp_inventory(vsp: VSP, *, timeout_s: float | None = None) -> bool:
    try:
        with AgentClient(vsp.agent_url, vsp.agent_secret, timeout_s=timeout_s) as agent:
            guests = agent.list_guests()
    except AGENT_ERRORS as error:
        logger.warning("Agent of VSP %s did not answer: %s", vsp.name, error)
        mark_reachable(vsp, False)
        return False
    mark_reachable(vsp, True)
    store_guests(
        vsp, {guest["name"]: guest for guest in guests if isinstance(guest, dict) and "name" in guest}
    )
    return True


def collect_vm_state(vm: VirtualMachine) -> None:
    """Refresh Data: ask the agent of the VSP the VM is runnable on now (no-op if it has none)."""
    runnable = (
        Registration.objects.filter(vm=vm)
        .exclude(hardware_status=Registration.HardwareStatus.NOT_RUNNABLE)
        .select_related("vsp")
        .first()
    )
    if runnable is not None:
        collect_vsp_inventory(runnable.vsp, timeout_s=REFRESH_TIMEOUT_S)


def mark_reachable(vsp: VSP, reachable: bool) -> None:
    VSP.objects.filter(pk=vsp.pk).update(agent_reachable=reachable, agent_checked_at=timezone.now())
    vsp.agent_reachable = reachable


def store_guests(vsp: VSP, guests: dict[str, dict[str, Any]]) -> None:
    registrations = (
        Registration.objects.filter(vsp=vsp)
        .exclude(hardware_status=Registration.HardwareStatus.NOT_RUNNABLE)
        .exclude(vm__migrations__state__in=MIGRATING_STATES)
        .select_related("vm")
    )
    for registration in registrations:
        guest = guests.get(registration.vm.name)
        if guest is not None:
            store_guest(registration, guest)


def store_guest(registration: Registration, guest: dict[str, Any]) -> None:
    hardware = (
        Registration.HardwareStatus.ON
        if guest.get("hardware_status") == "on"
        else Registration.HardwareStatus.OFF
    )
    if registration.hardware_status != hardware:
        registration.hardware_status = hardware
        registration.save(update_fields=["hardware_status"])
    vm = registration.vm
    os_status = guest.get("os_status")
    if os_status in VirtualMachine.OSStatus.values and vm.os_status != os_status:
        vm.os_status = os_status
        vm.save(update_fields=["os_status"])
