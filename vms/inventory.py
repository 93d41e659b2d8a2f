"""Inventory collection: what the host agents say about their guests, stored in the database.

Only the copy that is runnable on a VSP takes the agent's On/Off and OS status; Not Runnable copies and
VMs in the middle of a migration are left alone (the migration's worker owns them then).
Split brain: a guest the agent reports running where its copy is Not Runnable is flagged
(``Registration.found_running_at``) and raises a critical alert on the VM, its VSPs and the VSP list;
which copy is runnable never changes by itself.
Lost guests: a runnable copy whose agent answers without the guest (it died with its agent, or was
removed behind the console's back) is marked Lost (``Registration.HardwareStatus.LOST``, with
``lost_since``): its hardware and OS status say so, the VM's pages and the VSP list raise an alert, and
Start defines it again from the console's record (``vms.power``). A guest reported again is no longer
lost. A copy whose VM migrates is left to the migration, as always.
Refresh Data (``collect_vm_state``) returns a ``RefreshOutcome`` that says whether anything was collected.

Periodic collection runs in rounds (``InventoryRound``): ``start_round`` records one, then one Celery task
per VSP calls ``collect_vsp`` (``vms.tasks``), each with a short time-out
(``INVENTORY_AGENT_TIMEOUT_S``), so a slow or dead agent holds up only its own VSP.

Reachability: every unanswered call counts (``VSP.agent_failures``); periodic collection marks a VSP
unreachable only at ``INVENTORY_UNREACHABLE_AFTER`` in a row (a lost packet does not flip a host), while a
call someone waits on (a migration, the migrate dialog's probe, Refresh Data) marks it at once
(``mark_reachable(vsp, False)``). ``VSP.unreachable_since`` says since when; any answer resets both.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from agentprotocol import GuestInfo, Health, HostResources
from vms import hooks
from vms.agent_client import (
    AgentAddressRefused,
    AgentClient,
    AgentError,
    AgentProtocolError,
    AgentRefused,
    AgentUnreachable,
    AgentUntrusted,
    unreachable_words,
)
from vms.devices import store_guest_devices, store_resources
from vms.models import VSP, InventoryRound, Registration, VirtualMachine

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


KEEP_ROUNDS = 100  # InventoryRound rows kept (the metrics read the last finished one)


def collect_all_inventory() -> dict[str, bool]:
    """Re-collect every VSP in this process, one after the other (``seed_demo_agents``, tests); returns
    whether each agent answered. The periodic collection fans out instead (``start_round``)."""
    round_id, vsp_ids = start_round()
    names = dict(VSP.objects.filter(pk__in=vsp_ids).values_list("pk", "name"))
    return {names[pk]: collect_vsp(pk, round_id) for pk in vsp_ids}


def start_round() -> tuple[int, list[int]]:
    """Record a new collection round over every VSP; returns its id and the VSPs' ids to collect.

    Rounds beyond the last ``KEEP_ROUNDS`` are deleted.
    """
    vsp_ids = list(VSP.objects.filter(retired_at=None).order_by("pk").values_list("pk", flat=True))
    inventory_round = InventoryRound.objects.create(vsps=len(vsp_ids))
    InventoryRound.objects.filter(pk__lte=inventory_round.pk - KEEP_ROUNDS).delete()
    if not vsp_ids:
        InventoryRound.objects.filter(pk=inventory_round.pk).update(finished_at=timezone.now())
    return inventory_round.pk, vsp_ids


def collect_vsp(vsp_id: int, round_id: int | None = None, *, deadline: float | None = None) -> bool:
    """Collect one VSP's guests with the periodic time-out and count it in round ``round_id``.

    Returns whether the agent answered. An unanswered call counts toward marking the VSP unreachable
    (``INVENTORY_UNREACHABLE_AFTER`` in a row); a VSP deleted meanwhile is only counted. Past
    ``deadline`` (Unix time: the next round is due) the agent is not asked and the VSP counts as skipped,
    so a backlog drains at once and the round still finishes; so does a VSP whose answer could not be
    stored (a database error, logged).

    1. Ask the agent (no transaction open) and read the VSP's copies.
    2. In one short transaction, only writes: reachability, the copies (compare-and-set), the count in
       the round, last so that its row stays locked only until the commit. With SQLite (one writer at
       a time, the lock taken at BEGIN) this is what 500 VSPs in one interval hinge on.
    """
    if deadline is not None and time.time() > deadline:
        if round_id is not None:
            finish_log(round_id, count_in_round(round_id, SKIPPED))
        return False
    vsp = VSP.objects.filter(pk=vsp_id).first()
    asked = ask_agent(vsp, settings.INVENTORY_AGENT_TIMEOUT_S) if vsp is not None else None
    answered = asked is not None and asked.guests is not None
    outcome = ANSWERED if answered else UNANSWERED
    copies = copies_to_store(vsp) if vsp is not None and answered else []
    try:
        with transaction.atomic():
            if vsp is not None and asked is not None:
                record_asked(vsp, asked, copies, periodic=True)
            counted = count_in_round(round_id, outcome) if round_id is not None else None
    except DatabaseError:
        logger.exception("Inventory of VSP %s not stored", vsp.name if vsp else vsp_id)
        counted = count_in_round(round_id, SKIPPED) if round_id is not None else None
    if round_id is not None and counted is not None:
        finish_log(round_id, counted)
    return answered


ANSWERED, UNANSWERED, SKIPPED = "answered", "unanswered", "skipped"


def count_in_round(round_id: int, outcome: str) -> datetime:
    """One VSP of round ``round_id`` done (``outcome``: ANSWERED, UNANSWERED or SKIPPED): one ``UPDATE``
    (SET reads the row as it was before it), so concurrent workers lose no count and exactly one of
    them sets ``finished_at``, to the time returned."""
    now = timezone.now()
    InventoryRound.objects.filter(pk=round_id).update(
        done=F("done") + 1,
        unanswered=F("unanswered") + int(outcome == UNANSWERED),
        skipped=F("skipped") + int(outcome == SKIPPED),
        finished_at=Case(
            When(Q(finished_at=None) & Q(done__gte=F("vsps") - 1), then=Value(now)),
            default=F("finished_at"),
        ),
    )
    return now


def finish_log(round_id: int, counted_at: datetime) -> None:
    """Log the round's figures if the count made at ``counted_at`` was its last."""
    finished = InventoryRound.objects.filter(pk=round_id, finished_at=counted_at).first()
    if finished is not None:
        log = logger.warning if finished.skipped else logger.info
        log(
            "Inventory collection of %d VSPs took %.1f s (%d unanswered, %d skipped)",
            finished.vsps,
            finished.duration_s or 0.0,
            finished.unanswered,
            finished.skipped,
        )


def fetch_and_store(vsp: VSP, *, timeout_s: float | None = None) -> dict[str, GuestInfo] | None:
    """Ask ``vsp``'s agent for its guests and store them; the guests by id, or None if it did not answer.

    Agents know a guest by its id (``VirtualMachine.guest_id`` as text); the name is only displayed.
    """
    return fetch_guests(vsp, timeout_s=timeout_s)[0]


def fetch_guests(vsp: VSP, *, timeout_s: float | None = None) -> tuple[dict[str, GuestInfo] | None, str]:
    """``fetch_and_store`` with the problem in words when it got nothing ("did not answer", or an
    untrusted certificate); no answer marks the VSP unreachable at once (someone is waiting on it)."""
    asked = ask_agent(vsp, timeout_s)
    copies = copies_to_store(vsp) if asked.guests is not None else []
    with transaction.atomic():
        record_asked(vsp, asked, copies, periodic=False)
    return asked.guests, asked.problem


@dataclass(frozen=True)
class Asked:
    """What one ``GET /v1/guests`` got: the guests by id (None: no answer), the problem in words, ms."""

    guests: dict[str, GuestInfo] | None
    problem: str
    took_ms: int
    driver: str = ""  # the agent's driver, asked only while the VSP's is not known (``VSP.agent_driver``)
    # Whether its driver mirrors local disks (``VSP.agent_mirrors_local_disks``), asked with the driver.
    mirrors: bool | None = None
    cause: str = ""  # why it got nothing (``agent_client.unreachable_words``): kept as ``VSP.agent_problem``
    # Its pools and networks (``GET /v1/resources``); None: an agent older than pools (404).
    resources: HostResources | None = None


def ask_agent(vsp: VSP, timeout_s: float | None) -> Asked:
    """Ask ``vsp``'s agent for its guests (nothing is stored; no database access)."""
    started = time.monotonic()
    problem = ""
    guests: list[GuestInfo] = []
    driver = cause = ""
    mirrors = None
    resources = None
    try:
        with AgentClient.for_vsp(vsp, timeout_s=timeout_s) as agent:
            guests = agent.list_guests()
            resources = agent.resources()
            if not vsp.agent_driver or vsp.agent_mirrors_local_disks is None:
                health = agent.health()
                driver, mirrors = health.driver, health.mirrors_local_disks
    except AgentAddressRefused as error:
        logger.warning("Agent of VSP %s not asked: %s", vsp.name, error)
        problem = f"was not asked: {str(error).split(': ', 1)[-1]}"
        cause = unreachable_words(error)
    except AgentUntrusted as error:
        logger.warning("Agent of VSP %s refused: untrusted TLS certificate: %s", vsp.name, error)
        problem = "presented a TLS certificate the console does not trust (not the registered one)"
        if error.fingerprint:
            problem = f"{problem[:-1]}: SHA-256 fingerprint {error.fingerprint})"
        cause = unreachable_words(error)
    except AGENT_ERRORS as error:
        logger.warning("Agent of VSP %s did not answer: %s", vsp.name, error)
        problem = "did not answer"
        if isinstance(error, AgentUnreachable):
            cause = unreachable_words(error)
    took_ms = round((time.monotonic() - started) * 1000)
    if problem:
        return Asked(None, problem, took_ms, cause=cause)
    answered = {guest.guest_id: guest for guest in guests}
    return Asked(answered, "", took_ms, driver, mirrors=mirrors, resources=resources)


def record_asked(vsp: VSP, asked: Asked, copies: list[Registration], *, periodic: bool) -> None:
    """Store what ``ask_agent`` got about ``copies`` (``copies_to_store``). ``periodic``: the periodic
    collection's call, so no answer marks the VSP unreachable only after ``INVENTORY_UNREACHABLE_AFTER``
    in a row (else at once), and its duration is kept (``VSP.agent_collect_ms``)."""
    took_ms = asked.took_ms if periodic else None
    if asked.guests is None:
        record_unanswered(vsp, at_once=not periodic, took_ms=took_ms, problem=asked.cause)
        return
    record_answered(vsp, took_ms=took_ms, driver=asked.driver, mirrors=asked.mirrors)
    if asked.resources is not None:
        store_resources(vsp, asked.resources)
    store_guests(vsp, asked.guests, copies, devices=asked.resources is not None)


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
        # Collected all the same: the copy is now shown Lost (``store_guests``), with its alert.
        logger.warning("Agent of VSP %s does not know VM %s: shown as lost", vsp.name, vm.name)
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

    def answers(vsp: VSP) -> Health | AgentError:
        """The agent's health answer, or the error of a call that got no answer."""
        try:
            with AgentClient.for_vsp(vsp, timeout_s=timeout_s) as agent:
                return agent.health()
        except AGENT_ERRORS as error:
            return error

    if not vsps:
        return
    with ThreadPoolExecutor(max_workers=min(len(vsps), 16), thread_name_prefix="probe") as pool:
        drivers = list(pool.map(answers, vsps))
    for vsp, health in zip(vsps, drivers, strict=True):
        if isinstance(health, AgentError):
            logger.warning("Agent of VSP %s did not answer a health probe within %s s", vsp.name, timeout_s)
            problem = unreachable_words(health) if isinstance(health, AgentUnreachable) else ""
            record_unanswered(vsp, at_once=True, problem=problem)
        else:
            record_answered(vsp, driver=health.driver, mirrors=health.mirrors_local_disks)


def refresh_resources(vsp: VSP, timeout_s: float = REFRESH_TIMEOUT_S) -> bool:
    """Ask ``vsp``'s agent for its pools and networks now and store them (a migration's Init does, so a
    pool or network gone since the click is seen before anything is sent). False: not asked or no
    answer, or an agent older than pools (what was last stored stays)."""
    try:
        with AgentClient.for_vsp(vsp, timeout_s=timeout_s) as agent:
            resources = agent.resources()
    except AGENT_ERRORS as error:
        logger.info("Agent of VSP %s did not report its pools and networks: %s", vsp.name, error)
        return False
    if resources is None:
        return False
    with transaction.atomic():
        store_resources(vsp, resources)
    return True


DRIVER_ASK_TIMEOUT_S = 2.0


def learn_driver(vsp: VSP, timeout_s: float = DRIVER_ASK_TIMEOUT_S) -> str:
    """``vsp``'s agent driver (``VSP.agent_driver``), asked once (``GET /v1/health``) while not known.

    Returns it, or "" when the agent did not answer (nothing is recorded then: the next health probe
    or inventory collection asks again). A migration's Init calls it, so that every running migration's
    rescues match what its source can do.
    """
    if vsp.agent_driver:
        return vsp.agent_driver
    try:
        with AgentClient.for_vsp(vsp, timeout_s=timeout_s) as agent:
            driver = agent.health().driver[:32]
    except AGENT_ERRORS as error:
        logger.info("Agent of VSP %s did not say its driver: %s", vsp.name, error)
        return ""
    VSP.objects.filter(pk=vsp.pk).update(agent_driver=driver)
    vsp.agent_driver = driver
    return driver


def learn_abilities(vsp: VSP, timeout_s: float = DRIVER_ASK_TIMEOUT_S) -> bool:
    """Ask ``vsp``'s agent for its health now and keep its driver and whether it mirrors local disks
    (``VSP.agent_driver``, ``VSP.agent_mirrors_local_disks``): a migration's Init does for a guest with a
    local disk, so an agent upgraded (or replaced) since the last question is judged by what it is now.
    Returns whether it answered (no answer changes nothing: the checks then read what was kept)."""
    try:
        with AgentClient.for_vsp(vsp, timeout_s=timeout_s) as agent:
            health = agent.health()
    except AGENT_ERRORS as error:
        logger.info("Agent of VSP %s did not say what it can do: %s", vsp.name, error)
        return False
    driver, mirrors = health.driver[:32], health.mirrors_local_disks
    VSP.objects.filter(pk=vsp.pk).update(agent_driver=driver, agent_mirrors_local_disks=mirrors)
    vsp.agent_driver, vsp.agent_mirrors_local_disks = driver, mirrors
    return True


def mark_reachable(vsp: VSP, reachable: bool, *, error: AgentUnreachable | None = None) -> None:
    """What a call someone waits on learnt: an answer resets the count, no answer marks ``vsp``
    unreachable at once (a migration's call, the migrate dialog's probe, Refresh Data). ``error``: the
    call's, kept as why (``VSP.agent_problem``)."""
    if reachable:
        record_answered(vsp)
    else:
        record_unanswered(vsp, at_once=True, problem=unreachable_words(error) if error else "")


def note_answered(vsp: VSP) -> bool:
    """An agent answered a call (a migration's command, a probe): a VSP marked unreachable, or with failed
    calls counted, is reachable again at once, as one unanswered call marks it unreachable at once. One
    ``UPDATE`` that matches no row while all is well. Returns whether it changed anything."""
    troubled = Q(agent_reachable=False) | Q(agent_failures__gt=0)
    changed = VSP.objects.filter(troubled, pk=vsp.pk).update(
        agent_reachable=True, agent_failures=0, unreachable_since=None
    )
    if changed:
        logger.warning("Agent of VSP %s answered a call: marked reachable", vsp.name)
    vsp.agent_reachable, vsp.agent_failures, vsp.unreachable_since = True, 0, None
    return bool(changed)


def record_answered(
    vsp: VSP, *, took_ms: int | None = None, driver: str = "", mirrors: bool | None = None
) -> None:
    """The agent answered: reachable again, no failures counted, no "unreachable since"; ``driver`` and
    ``mirrors`` (its health answer's, when asked) are kept as ``VSP.agent_driver`` and
    ``VSP.agent_mirrors_local_disks``."""
    fields: dict[str, Any] = {
        "agent_reachable": True,
        "agent_failures": 0,
        "unreachable_since": None,
        "agent_problem": "",
    }
    fields["agent_checked_at"] = timezone.now()
    if took_ms is not None:
        fields["agent_collect_ms"] = took_ms
    if driver:
        fields["agent_driver"] = vsp.agent_driver = driver[:32]
    if mirrors is not None:
        fields["agent_mirrors_local_disks"] = vsp.agent_mirrors_local_disks = mirrors
    VSP.objects.filter(pk=vsp.pk).update(**fields)
    if not vsp.agent_reachable:  # as loaded: the log line may be doubled by a concurrent caller
        logger.warning("Agent of VSP %s answers again: marked reachable", vsp.name)
    vsp.agent_reachable, vsp.agent_failures, vsp.unreachable_since = True, 0, None
    vsp.agent_problem = ""


def record_unanswered(vsp: VSP, *, at_once: bool, took_ms: int | None = None, problem: str = "") -> None:
    """One more unanswered call; the VSP is marked unreachable, with the time, by the call that brings
    the count to ``INVENTORY_UNREACHABLE_AFTER`` (or at once). One ``UPDATE``: SET reads the row as it
    was, so concurrent callers count every call and only the first to reach the limit sets the time.
    ``problem``: why, in words (``agent_client.unreachable_words``), kept as ``VSP.agent_problem``."""
    now = timezone.now()
    reaches_limit = Q(agent_failures__gte=(1 if at_once else settings.INVENTORY_UNREACHABLE_AFTER) - 1)
    fields: dict[str, Any] = {
        "agent_failures": F("agent_failures") + 1,
        "agent_checked_at": now,
        "agent_reachable": Case(When(reaches_limit, then=Value(False)), default=F("agent_reachable")),
        "unreachable_since": Case(
            When(reaches_limit & Q(agent_reachable=True), then=Value(now)), default=F("unreachable_since")
        ),
    }
    if took_ms is not None:
        fields["agent_collect_ms"] = took_ms
    if problem:
        fields["agent_problem"] = problem[:300]
    VSP.objects.filter(pk=vsp.pk).update(**fields)
    try:
        vsp.refresh_from_db(
            fields=["agent_reachable", "agent_failures", "unreachable_since", "agent_problem"]
        )
    except VSP.DoesNotExist:  # deleted meanwhile: nothing left to show
        return
    if vsp.unreachable_since == now:
        logger.warning("Agent of VSP %s marked unreachable (%d unanswered)", vsp.name, vsp.agent_failures)


def copies_to_store(vsp: VSP) -> list[Registration]:
    """The copies on ``vsp`` that an agent's answer may change: all but those of a migrating VM (the
    migration's worker owns them then). Read before the writing transaction; ``store_guests`` writes
    by compare-and-set, so a copy changed meanwhile (a migration's commit) is left as it now is."""
    return list(
        Registration.objects.filter(vsp=vsp)
        .exclude(vm__migrations__state__in=MIGRATING_STATES)
        .select_related("vm")
    )


def store_guests(
    vsp: VSP, guests: dict[str, GuestInfo], copies: list[Registration], *, devices: bool = False
) -> None:
    """Store what the agent says about the runnable ``copies``, then check the Not Runnable ones for a
    split brain. ``devices``: the agent reports pools, so its guests' disks and cards are stored too
    (an older agent's empty lists would wipe what the console knows)."""
    not_runnable = Registration.HardwareStatus.NOT_RUNNABLE
    reported = []
    for registration in copies:
        guest = guests.get(str(registration.vm.guest_id))
        if registration.hardware_status == not_runnable:
            continue
        if guest is not None:
            store_guest(registration, guest)
            if devices:
                store_guest_devices(registration.vm, vsp, guest)
            reported.append(registration.pk)
        else:
            mark_lost(registration)
    if reported:
        Registration.objects.filter(pk__in=reported).exclude(hardware_status=not_runnable).update(
            state_collected_at=timezone.now()
        )
    note_split_brain(vsp, guests, [r for r in copies if r.hardware_status == not_runnable])


def note_split_brain(vsp: VSP, guests: dict[str, GuestInfo], copies: list[Registration]) -> None:
    """Flag (or clear) each Not Runnable copy on ``vsp`` (``copies``, their VMs not migrating) by whether
    its agent reports the guest running.

    A guest that migrates is left to its migration (the target's copy runs paused, then resumes).
    """
    for copy in copies:
        guest = guests.get(str(copy.vm.guest_id))
        running = guest is not None and guest.hardware_status == "on" and not guest.migrating
        if running and copy.found_running_at is None:
            copy.found_running_at = timezone.now()
            copy.save(update_fields=["found_running_at"])
            logger.critical(copy.split_brain_alert())
        elif not running and copy.found_running_at is not None:
            copy.found_running_at = None
            copy.save(update_fields=["found_running_at"])
            logger.warning("Split brain over: %s no longer runs on %s", copy.vm.name, vsp.name)


def store_guest(registration: Registration, guest: GuestInfo) -> None:
    """Store the agent's On/Off and OS status of the runnable copy ``registration``; a lost copy is
    found again. With hardware Off the OS status stored is Down (never Up and Off together)."""
    hardware = (
        Registration.HardwareStatus.ON if guest.hardware_status == "on" else Registration.HardwareStatus.OFF
    )
    if registration.hardware_status != hardware:
        # compare-and-set: the copy may have become Not Runnable since it was read (a migration's commit)
        Registration.objects.filter(pk=registration.pk, hardware_status=registration.hardware_status).update(
            hardware_status=hardware, lost_since=None
        )
        if registration.is_lost:
            logger.warning("%s is reported by %s again: no longer lost", registration.vm, registration.vsp)
    vm = registration.vm
    os_status: str = guest.os_status
    if hardware == Registration.HardwareStatus.OFF:
        os_status = VirtualMachine.OSStatus.DOWN
    if os_status in VirtualMachine.OSStatus.values and vm.os_status != os_status:
        VirtualMachine.objects.filter(pk=vm.pk).update(os_status=os_status)


def mark_lost(registration: Registration) -> bool:
    """The agent answered without the guest of the runnable copy ``registration``: mark it Lost, since
    now, log the alert and tell the lost-guest listeners (``hooks.guest_lost``). Compare-and-set on its
    status as read, and never while its VM migrates (the migration owns the copies then); returns whether
    this call marked it."""
    if registration.is_lost:
        return False
    now = timezone.now()
    marked = (
        Registration.objects.filter(pk=registration.pk, hardware_status=registration.hardware_status)
        .exclude(vm__migrations__state__in=MIGRATING_STATES)
        .update(hardware_status=Registration.HardwareStatus.LOST, lost_since=now)
    )
    if not marked:
        return False
    VirtualMachine.objects.filter(pk=registration.vm_id).update(os_status=VirtualMachine.OSStatus.LOST)
    registration.hardware_status, registration.lost_since = Registration.HardwareStatus.LOST, now
    logger.error(registration.lost_alert())
    hooks.guest_lost(registration)  # e.g. a migration's alert that said it keeps running there
    return True
