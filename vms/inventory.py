"""Inventory collection: what the host agents say about their guests, stored in the database.

Only the copy that is runnable on a VSP takes the agent's On/Off and OS status; Not Runnable copies and
VMs in the middle of a migration are left alone (the migration's worker owns them then).
Split brain: a guest the agent reports running where its copy is Not Runnable is flagged
(``Registration.found_running_at``) and raises a critical alert on the VM, its VSPs and the VSP list;
which copy is runnable never changes by itself.
An agent that does not answer marks its VSP unreachable, which the migrate dialog shows.
Refresh Data (``collect_vm_state``) returns a ``RefreshOutcome`` that says whether anything was collected.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.utils import timezone

from vms.agent_client import (
    AgentClient,
    AgentProtocolError,
    AgentRefused,
    AgentUnreachable,
    AgentUntrusted,
)
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
    return fetch_and_store(vsp, timeout_s=timeout_s) is not None


def fetch_and_store(vsp: VSP, *, timeout_s: float | None = None) -> dict[str, dict[str, Any]] | None:
    """Ask ``vsp``'s agent for its guests and store them; the guests by id, or None if it did not answer.

    Agents know a guest by its id (``VirtualMachine.guest_id`` as text); the name is only displayed.
    """
    return fetch_guests(vsp, timeout_s=timeout_s)[0]


def fetch_guests(vsp: VSP, *, timeout_s: float | None = None) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """``fetch_and_store`` with the problem in words when it got nothing ("did not answer", or an
    untrusted certificate)."""
    try:
        with AgentClient.for_vsp(vsp, timeout_s=timeout_s) as agent:
            guests = agent.list_guests()
    except AgentUntrusted as error:
        logger.warning("Agent of VSP %s refused: untrusted TLS certificate: %s", vsp.name, error)
        mark_reachable(vsp, False)
        return None, "presented a TLS certificate the console does not trust (not the registered one)"
    except AGENT_ERRORS as error:
        logger.warning("Agent of VSP %s did not answer: %s", vsp.name, error)
        mark_reachable(vsp, False)
        return None, "did not answer"
    mark_reachable(vsp, True)
    by_id = {guest["guest_id"]: guest for guest in guests}
    store_guests(vsp, by_id)
    return by_id, ""


@dataclass(frozen=True)
class RefreshOutcome:
    """What Refresh Data got: ``collected`` is False when the shown state is an older one."""

    collected: bool
    vsp_name: str = ""
    problem: str = ""  # "did not answer" | "does not know this VM" | untrusted certificate | "" (fresh)
    last_known_at: datetime | None = None

    @property
    def message(self) -> str:
        """The warning shown next to "Data as of", or "" when the state is fresh."""
        if self.collected or not self.problem:
            return ""
        if self.last_known_at is None:
            since = "showing the state last stored (never collected from a host agent)"
        else:
            since = f"showing the last known state from {timezone.localtime(self.last_known_at):%H:%M:%S}"
        return f"Host {self.vsp_name} {self.problem}; {since}."


def collect_vm_state(vm: VirtualMachine) -> RefreshOutcome:
    """Refresh Data: ask the agent of the VSP the VM is runnable on now, and say what came of it.

    A VM runnable nowhere has no agent to ask: nothing is collected, and there is nothing to warn about.
    """
    runnable = (
        Registration.objects.filter(vm=vm)
        .exclude(hardware_status=Registration.HardwareStatus.NOT_RUNNABLE)
        .select_related("vsp")
        .first()
    )
    if runnable is None:
        return RefreshOutcome(collected=False)
    vsp, last_known_at = runnable.vsp, runnable.state_collected_at
    guests, problem = fetch_guests(vsp, timeout_s=REFRESH_TIMEOUT_S)
    if guests is None:
        return RefreshOutcome(False, vsp.name, problem, last_known_at)
    check_not_runnable_copies(vm, timeout_s=REFRESH_TIMEOUT_S)
    if str(vm.guest_id) not in guests:
        logger.warning("Agent of VSP %s does not know VM %s", vsp.name, vm.name)
        return RefreshOutcome(False, vsp.name, "does not know this VM", last_known_at)
    return RefreshOutcome(True, vsp.name)


def check_not_runnable_copies(vm: VirtualMachine, *, timeout_s: float) -> None:
    """Ask the hosts of ``vm``'s Not Runnable copies too: a copy running there is a split brain."""
    copies = Registration.objects.filter(vm=vm, hardware_status=Registration.HardwareStatus.NOT_RUNNABLE)
    for copy in copies.select_related("vsp"):
        fetch_and_store(copy.vsp, timeout_s=timeout_s)


def probe_reachability(vsps: list[VSP], timeout_s: float) -> None:
    """Ask every agent of ``vsps`` for its health at once (one thread each, ``timeout_s`` s at most) and
    store whether it answered: the migrate dialog does it when it opens, so a dead target is not shown
    Ready until the next inventory collection. The database is written from the calling thread."""

    def answers(vsp: VSP) -> bool:
        try:
            with AgentClient.for_vsp(vsp, timeout_s=timeout_s) as agent:
                agent.health()
        except AGENT_ERRORS:
            return False
        return True

    if not vsps:
        return
    with ThreadPoolExecutor(max_workers=min(len(vsps), 16), thread_name_prefix="probe") as pool:
        verdicts = list(pool.map(answers, vsps))
    for vsp, reachable in zip(vsps, verdicts, strict=True):
        if not reachable:
            logger.warning("Agent of VSP %s did not answer a health probe within %s s", vsp.name, timeout_s)
        mark_reachable(vsp, reachable)


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
    reported = []
    for registration in registrations:
        guest = guests.get(str(registration.vm.guest_id))
        if guest is not None:
            store_guest(registration, guest)
            reported.append(registration.pk)
    Registration.objects.filter(pk__in=reported).update(state_collected_at=timezone.now())
    note_split_brain(vsp, guests)


def note_split_brain(vsp: VSP, guests: dict[str, dict[str, Any]]) -> None:
    """Flag (or clear) each Not Runnable copy on ``vsp`` by whether its agent reports the guest running.

    A guest that migrates is left to its migration (the target's copy runs paused, then resumes).
    """
    copies = (
        Registration.objects.filter(vsp=vsp, hardware_status=Registration.HardwareStatus.NOT_RUNNABLE)
        .exclude(vm__migrations__state__in=MIGRATING_STATES)
        .select_related("vm")
    )
    for copy in copies:
        guest = guests.get(str(copy.vm.guest_id))
        running = guest is not None and guest.get("hardware_status") == "on" and not guest.get("migrating")
        if running and copy.found_running_at is None:
            copy.found_running_at = timezone.now()
            copy.save(update_fields=["found_running_at"])
            logger.critical(copy.split_brain_alert())
        elif not running and copy.found_running_at is not None:
            copy.found_running_at = None
            copy.save(update_fields=["found_running_at"])
            logger.warning("Split brain over: %s no longer runs on %s", copy.vm.name, vsp.name)


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
