"""VM power: Start, Stop (graceful) and Force stop of a guest's runnable copy, through its VSP's host agent.

Stop is graceful: the agent is asked to give the guest its Graceful Stop Timeout (``graceful_stop_timeout_s``)
to finish its I/O and shut down (QEMU: the ACPI power button; simulated: its writes stop, its I/O completes,
then its OS takes ``shutdown_ms``), then to stop it anyway; Force stop asks it to stop the guest at once.
The agent says how the stop ended (``protocol.StoppedGuest.stop``); when the guest ran out of time and was
forced off, the notice and the audit event say so.

Refused (``PowerRefused``, nothing changed)
for a Not Runnable copy (it must never run: the guest's runnable copy is elsewhere), while another app says
the guest is busy (``vms.hooks.register_busy_check``: a migration owns the guest until it ends), and when
the agent refuses or does not answer. Every action that happens leaves an ``AuditEvent``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from vms.access import allowed, check_can_power
from vms.agent_client import AgentClient, AgentError
from vms.hooks import busy_reasons
from vms.models import AuditEvent, Registration, VirtualMachine

logger = logging.getLogger(__name__)


class PowerAction(StrEnum):
    START = "start"
    STOP = "stop"
    FORCE_STOP = "force-stop"

    @property
    def label(self) -> str:
        return {"start": "Start", "stop": "Stop", "force-stop": "Force stop"}[self.value]


AUDIT_ACTION = {
    PowerAction.START: AuditEvent.Action.VM_STARTED,
    PowerAction.STOP: AuditEvent.Action.VM_STOPPED,
    PowerAction.FORCE_STOP: AuditEvent.Action.VM_FORCE_STOPPED,
}


NOT_RUNNABLE_REFUSAL = (
    "This copy is Not Runnable and cannot be started: the guest runs only from its runnable copy."
)


class PowerRefused(ValidationError):
    """The power action was refused; ``message`` says why in plain words."""


def may_power(user: Any, registration: Registration) -> bool:
    """Whether ``user`` may start and stop the guest's copy ``registration`` (``access.check_can_power``:
    ``vms.change_registration`` and operator of the copy's VSP's host group)."""
    return allowed(check_can_power, user, registration)


def refusals(registration: Registration, busy: str) -> dict[str, str]:
    """Per action value, why it cannot be done on this copy now ("" when it can); no query.

    ``busy``: why the guest is busy now, in one sentence (``vms.hooks.busy_reasons``; "" when it is not).
    """
    vm = registration.vm
    if not registration.is_runnable:  # the same words on every button
        blocked = NOT_RUNNABLE_REFUSAL
        return {action.value: blocked for action in PowerAction}
    if busy:
        return {action.value: busy for action in PowerAction}
    on = registration.hardware_status == Registration.HardwareStatus.ON
    return {
        PowerAction.START.value: f"{vm.name} is already running." if on else "",
        PowerAction.STOP.value: "" if on else f"{vm.name} is already stopped.",
        PowerAction.FORCE_STOP.value: "" if on else f"{vm.name} is already stopped.",
    }


@dataclass(frozen=True)
class PowerDone:
    """What a power action did: the copy as saved, ``notice`` (one sentence for people) and ``forced``
    (a graceful stop ran out of time and the guest was stopped anyway)."""

    registration: Registration
    notice: str
    forced: bool = False


def do_power(registration: Registration, action: PowerAction, user: Any) -> PowerDone:
    """Start, stop or force-stop the guest of ``registration`` on its VSP; says what was done.

    Raises ``PermissionDenied`` without the right and ``PowerRefused`` when refused (nothing changed).
    """
    vm = registration.vm
    check_can_power(user, registration)
    reason = refusals(registration, busy_reasons([vm.pk]).get(vm.pk, ""))[action.value]
    if reason:
        raise PowerRefused(reason)
    vsp = registration.vsp
    before = {"hardware_status": registration.hardware_status, "os_status": vm.os_status}
    try:
        with AgentClient.for_vsp(vsp) as agent:
            if action == PowerAction.START:
                guest = agent.start_guest(str(vm.guest_id))
            else:
                graceful = vm.graceful_stop_timeout_s if action == PowerAction.STOP else None
                guest = agent.stop_guest(str(vm.guest_id), graceful_timeout_s=graceful)
    except AgentError as error:
        raise PowerRefused(f"{action.label} of {vm.name} on {vsp.name} failed: {error}") from None
    hardware = (
        Registration.HardwareStatus.ON
        if guest["hardware_status"] == "on"
        else Registration.HardwareStatus.OFF
    )
    os_status = guest["os_status"] if guest["os_status"] in VirtualMachine.OSStatus.values else vm.os_status
    outcome = str(guest.get("stop") or "")  # None: an older agent, which stopped it at once
    notice = power_notice(vm, vsp.name, action, outcome, float(guest.get("stop_s", 0.0)))
    with transaction.atomic():
        Registration.objects.filter(pk=registration.pk).update(hardware_status=hardware)
        VirtualMachine.objects.filter(pk=vm.pk).update(os_status=os_status)
        registration.hardware_status, vm.os_status = hardware, os_status
        AuditEvent.record(
            AUDIT_ACTION[action],
            registration,
            actor=user,
            before=before,
            after={"hardware_status": hardware, "os_status": os_status}
            | ({"stop": outcome} if outcome else {}),
            message=f"{notice} (by {user})",
        )
    logger.info("%s: %s of %s on %s: %s", user, action.value, vm.name, vsp.name, outcome or "done")
    return PowerDone(registration, notice, forced=outcome == "timed_out")


def power_notice(vm: VirtualMachine, vsp_name: str, action: PowerAction, outcome: str, took_s: float) -> str:
    """One sentence on what was done; ``outcome``: the agent's ``StoppedGuest.stop`` ("" for Start)."""
    what = f"{action.label} of {vm.name} on {vsp_name}"
    timeout_s = vm.graceful_stop_timeout_s
    if outcome == "timed_out":
        return (
            f"{what}: the guest did not shut down within its Graceful Stop Timeout ({timeout_s} s), "
            "so it was forced off; I/O it had not finished may be lost."
        )
    if outcome == "shut_down":
        return f"{what}: the guest shut down cleanly in {took_s:.1f} s (Graceful Stop Timeout {timeout_s} s)."
    if outcome == "already_off":
        return f"{what}: the guest was already off."
    return f"{what} done."
