"""VM power: Start, Stop (graceful) and Force stop of a guest's runnable copy, through its VSP's host agent.

Stop is graceful: the agent is asked to give the guest its Graceful Stop Timeout (``graceful_stop_timeout_s``)
to finish its I/O and shut down (QEMU: the ACPI power button; simulated: its writes stop, its I/O completes,
then its OS takes ``shutdown_ms``), then to stop it anyway; Force stop asks it to stop the guest at once.
The agent says how the stop ended (``agentprotocol.StoppedGuest.stop``); when the guest ran out of
time and was forced off, the notice and the audit event say so.

Refused (``PowerRefused``, nothing changed)
for a Not Runnable copy (it must never run: the guest's runnable copy is elsewhere), while another app says
the guest is busy (``vms.hooks.register_busy_check``: a migration owns the guest until it ends), and when
the agent refuses or does not answer. Every action that happens leaves an ``AuditEvent``.

A **lost** copy (its host no longer reports the guest: ``Registration.HardwareStatus.LOST``) is still the
runnable one: Start defines the guest on its host again from the console's record
(``agent_messages.guest_spec``) and starts it; Stop and Force stop have nothing to stop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from pydantic import ValidationError as InvalidMessage

from agentprotocol import GuestInfo, StoppedGuest, StopRequest, plain_words
from vms.access import allowed, check_can_power
from vms.agent_client import AgentClient, AgentError, UnknownGuest
from vms.agent_messages import guest_spec
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
    if registration.is_lost:
        nothing = f"{vm.name} is lost: its host no longer reports it, so there is nothing to stop."
        return {
            PowerAction.START.value: "",
            PowerAction.STOP.value: nothing,
            PowerAction.FORCE_STOP.value: nothing,
        }
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
        stop = None if action == PowerAction.START else stop_request(vm, action)
    except InvalidMessage as error:  # a Graceful Stop Timeout beyond what an agent waits
        raise PowerRefused(f"{action.label} of {vm.name}: {plain_words(error, 'the stop')}") from None
    guest: GuestInfo
    redefined = False
    try:
        with AgentClient.for_vsp(vsp) as agent:
            if stop is None:
                guest, redefined = start_guest(agent, vm, lost=registration.is_lost)
            else:
                guest = agent.stop_guest(str(vm.guest_id), stop)
    except InvalidMessage as error:  # the console's record is beyond what an agent defines
        raise PowerRefused(f"{action.label} of {vm.name}: {plain_words(error, 'the guest')}") from None
    except AgentError as error:
        raise PowerRefused(f"{action.label} of {vm.name} on {vsp.name} failed: {error}") from None
    hardware = (
        Registration.HardwareStatus.ON if guest.hardware_status == "on" else Registration.HardwareStatus.OFF
    )
    os_status = guest.os_status if guest.os_status in VirtualMachine.OSStatus.values else vm.os_status
    stopped = guest if isinstance(guest, StoppedGuest) else None
    outcome: str = (stopped.stop if stopped else None) or ""  # None: Start, or an older agent
    outcome = "redefined" if redefined else outcome
    if hardware == Registration.HardwareStatus.OFF:
        os_status = VirtualMachine.OSStatus.DOWN  # never Up with hardware Off
    notice = power_notice(vm, vsp.name, action, outcome, stopped.stop_s if stopped else 0.0)
    with transaction.atomic():
        Registration.objects.filter(pk=registration.pk).update(hardware_status=hardware, lost_since=None)
        VirtualMachine.objects.filter(pk=vm.pk).update(os_status=os_status)
        registration.hardware_status, vm.os_status = hardware, os_status
        registration.lost_since = None
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


def start_guest(agent: AgentClient, vm: VirtualMachine, *, lost: bool) -> tuple[GuestInfo, bool]:
    """Start ``vm``'s guest on ``agent``; a ``lost`` guest the agent does not know is defined again from
    the console's record and started. Returns the guest and whether it was defined again.

    Raises ``AgentError`` (the agent refused or did not answer) and ``pydantic.ValidationError`` (the
    record is out of the protocol's bounds).
    """
    guest_id = str(vm.guest_id)
    if lost:
        try:
            agent.get_guest(guest_id)
        except UnknownGuest:
            return agent.define_guest(guest_spec(vm, running=True)), True
    return agent.start_guest(guest_id), False


def stop_request(vm: VirtualMachine, action: PowerAction) -> StopRequest:
    """Stop: gracefully within the VM's Graceful Stop Timeout; Force stop: at once."""
    if action == PowerAction.STOP:
        return StopRequest(graceful_timeout_s=vm.graceful_stop_timeout_s)
    return StopRequest(force=True)


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
    if outcome == "redefined":
        return f"{what}: the guest was lost, so it was defined again from the console's record and started."
    return f"{what} done."
