"""The invariants a soak run must leave true once recovery has run (issue 10, "checks every invariant").

Each check returns plain sentences, one per broken invariant. ``check_invariants`` retries all of them
for up to ``SETTLE_S`` seconds (clean-up commands and inventory may land a moment after the outcome is
recorded) and returns what was still broken at the end.

A QEMU guest "runs" when QMP says its vCPUs run (``workload.vcpus_running``) and "keeps working" when
its own memwriter passes a further full memory self-check with none failed (``selfcheck_passes``); on a
completed migration's target that proves no written page was lost, besides the digests at freeze.

Issue 19's invariant, one writer per disk (``single_writer_violations``): every guest of the soak has a
disk on the shared pool all its agents mount, and no volume may be recorded as written by two running
guests at once, from the agents' own records (``GET /v1/resources``, ``VolumeWriter``: for QEMU the
process holding QEMU's write lock on the image, read from the kernel; for a simulated guest the
descriptor it holds open for writing). ``WriterWatch`` samples it throughout a run; ``check_invariants``
once more after it.

Issue 20's invariants, a guest's disk through its migration (``RunDisk``): most runs' guests have their
disk on a local pool of the source, so their migration mirrors it to a volume the target allocates,
and their fault strikes while the mirror copies or once it is ready, before the switchover.

- After an abort or a cancel, **no volume of the attempt is left on the target** (``check_no_volume_left``,
  in ``check_invariants``: retried while recovery and a killed agent's restart clean up).
- After an abort or a cancel, **the source's disk is as before the attempt** (``check_kept_disk``). A
  simulated guest writes its disk all along (a stamped 4 KiB block per I/O request: its seed and the
  request's number, at a place given by the number), and it goes on writing on its source after the
  abort, so the digest of the source's volume cannot be compared with one taken before the attempt as
  it is. The check is the exact version of it: the guest is powered off (its disk then holds still),
  and the volume must equal the image the harness wrote before the guest first ran with the guest's
  own requests 1..N written over it in order, N the highest request found, and N must be the number of
  requests the guest's agent says it completed (when it answers: a killed simulated source took its
  guest with it). Any byte the attempt wrote into the source's volume, or any write of the guest lost,
  breaks that equality; take the guest's writes since the attempt began out of the volume and its
  digest is the one before the attempt. A QEMU test guest never writes its disk: there, it is the very
  digest before the attempt.
- After a completion, **the target's disk at the freeze equals the source's at the freeze**
  (``check_completed_disk``): a hard link to the source's volume (the witness), made before the
  request, keeps the source's disk as its guest left it at the freeze after its agent deletes the
  volume; the target's volume, with the writes its guest made after it resumed taken out (put back to
  the witness's blocks), must equal it byte for byte; and both must hold only the guest's own writes.
- The same content check runs for the shared pool's runs (``check_kept_disk`` on the one volume both
  hosts use): whatever the outcome, the disk holds its guest's writes and nothing else.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from django.db.models import Count, Q

from agentprotocol import GuestInfo, HostResources
from evacuations.models import Evacuation
from evacuations.summary import said_not_running, summarize
from hostagent.drivers.simulated.guest import DISK_BLOCK, DISK_STAMP
from migrations_app.agents import agent_migration_id
from migrations_app.models import Migration
from vms.agent_client import AgentClient, AgentError
from vms.models import Registration, VirtualMachine

if TYPE_CHECKING:
    from soak_run import Scenario
    from soak_stack import Stack

SETTLE_S = 15.0
WORKLOAD_SAMPLE_S = 0.4
SELFCHECK_WAIT_S = 30.0  # the memwriter checks all its memory every 2 s (longer under a loaded TCG)
NOT_RUNNABLE = Registration.HardwareStatus.NOT_RUNNABLE


def check_invariants(
    stack: Stack,
    scenario: Scenario,
    migration: Migration,
    web: httpx.Client,
    host_crash: bool,
    disk: RunDisk | None = None,
) -> list[str]:
    deadline = time.monotonic() + SETTLE_S
    while True:
        migration.refresh_from_db()
        broken = [
            *check_database(),
            *check_outcome(stack, scenario, migration, host_crash),
            *check_agents(stack),
            *check_general_tab(web, stack.web_url, migration),
            *check_release_settled(migration),
            *check_stall(scenario, migration),
            *check_running_not_stays_or_lost(stack, migration),
            *check_unreported_not_up(stack, migration),
            *check_single_writer(stack),
            *check_no_volume_left(stack, scenario, migration, disk),
        ]
        # What an earlier run left broken (a leaked guest on an agent) is reported with that run only.
        broken = [problem for problem in broken if problem not in stack.reported]
        if not broken or time.monotonic() > deadline:
            stack.reported.update(broken)
            return broken
        time.sleep(0.5)


def check_database() -> list[str]:
    broken = []
    runnable = Count("registrations", filter=~Q(registrations__hardware_status=NOT_RUNNABLE))
    for vm in VirtualMachine.objects.annotate(runnable=runnable).exclude(runnable=1):
        broken.append(f"VM {vm.name} has {vm.runnable} runnable registrations")
    for left in Migration.objects.exclude(state__in=Migration.TERMINAL_STATES):
        broken.append(f"migration {left.pk} of VM {left.vm_id} left {left.state} after recovery")
    return broken


def runnable_copy(vm_id: int) -> Registration | None:
    copies = Registration.objects.filter(vm_id=vm_id).exclude(hardware_status=NOT_RUNNABLE)
    return copies.select_related("vsp").first()


def guest_on(stack: Stack, host: str, name: str) -> GuestInfo | None:
    """The agent's GuestInfo, or None if it does not know the guest; raises AgentError if it is down."""
    agent = stack.agents[host]
    with AgentClient(agent.url, agent.secret, trust=agent.trust, timeout_s=3) as client:
        guests = {guest.name: guest for guest in client.list_guests()}
    return guests.get(name)


def vcpus_running(guest: GuestInfo) -> bool:
    """Simulated: ``workload.running``; QEMU: ``workload.vcpus_running`` (QMP's run state)."""
    workload = guest.workload
    return bool(workload["running"] if "running" in workload else workload.get("vcpus_running"))


def is_running(guest: GuestInfo | None) -> bool:
    return bool(guest and guest.hardware_status == "on" and vcpus_running(guest))


def selfcheck_passes(stack: Stack, host: str, name: str, first: GuestInfo) -> str | None:
    """A QEMU guest's memwriter says alive again and passes a further self-check, none failed.

    Returns None when it does, else the sentence of what it did instead.
    """
    before = first.workload
    deadline = time.monotonic() + SELFCHECK_WAIT_S
    while True:
        found = guest_on(stack, host, name)
        now = found.workload if found is not None else {}
        if now.get("selfchecks_failed"):
            failed, log = now["selfchecks_failed"], now.get("serial_log")
            return f"its memory self-check FAILED {failed} time(s) (serial log {log})"
        if now.get("selfchecks_passed", 0) > before.get("selfchecks_passed", 0) and now.get(
            "alive_lines", 0
        ) > before.get("alive_lines", 0):
            return None
        if time.monotonic() > deadline:
            return f"no further memory self-check within {SELFCHECK_WAIT_S:.0f} s (workload {now})"
        time.sleep(0.5)


def check_outcome(stack: Stack, scenario: Scenario, migration: Migration, host_crash: bool) -> list[str]:
    if migration.state not in Migration.TERMINAL_STATES:
        return []  # check_database says so
    name = migration.vm.name
    keeper, other = (
        (scenario.target, scenario.source)
        if migration.state == Migration.State.COMPLETED
        else (scenario.source, scenario.target)
    )
    broken = []
    copy = runnable_copy(migration.vm_id)
    if copy is None or copy.vsp.name != keeper:
        broken.append(
            f"{migration.state}: the runnable copy is on {copy.vsp.name if copy else 'no VSP'}, not {keeper}"
        )
    if migration.state == Migration.State.COMPLETED and (
        not migration.source_digest or migration.source_digest != migration.target_digest
    ):
        broken.append(
            f"completed with digests source={migration.source_digest!r} target={migration.target_digest!r}"
        )
    try:
        kept, left = guest_on(stack, keeper, name), guest_on(stack, other, name)
    except AgentError as error:
        return [*broken, f"an agent did not answer the checks: {error}"]
    if host_crash:
        # Killed after the outcome was recorded: the alert was true when written; a crash of a host
        # whose migration is over is the inventory's business, not this migration's. The worker records
        # the outcome a moment after the target's last answer (its final check after the release), so
        # a kill in that moment (ENDING_RACE_S) struck what was already over (soak seed 38: the target
        # answered at .508, was killed, and the completion was written at .545).
        struck_after_end = migration.state_changed_at - ENDING_RACE <= stack.killed_at[keeper]
        if not struck_after_end and ("keeps running" in migration.alert or not migration.alert):
            broken.append(
                f"{migration.state} after {keeper}'s agent was killed (host crash, guest "
                f"{'running' if is_running(kept) else 'gone'} there), but the alert does not say so: "
                f"{migration.alert!r}"
            )
    elif not is_running(kept):
        broken.append(f"{migration.state}: the guest does not run on {keeper}: {summary(kept)}")
    elif scenario.driver == "qemu":
        assert kept is not None
        if (trouble := selfcheck_passes(stack, keeper, name, kept)) is not None:
            broken.append(f"{migration.state}: the guest on {keeper}: {trouble}")
    elif scenario.dirty_pages_per_s and not workload_writes(stack, keeper, name, kept):
        broken.append(f"{migration.state}: the guest's workload on {keeper} stopped writing")
    if left is not None and left.hardware_status == "on":
        broken.append(f"{migration.state}: a copy still on {other}: {summary(left)}")
    if migration.state == Migration.State.COMPLETED and not host_crash:
        broken += check_agent_digests(stack, scenario, migration)
    return broken


ENDING_RACE_S = 0.25
ENDING_RACE = timedelta(seconds=ENDING_RACE_S)


def workload_writes(stack: Stack, host: str, name: str, first: GuestInfo) -> bool:
    time.sleep(WORKLOAD_SAMPLE_S)
    later = guest_on(stack, host, name)
    return bool(later and later.workload["pages_written"] > first.workload["pages_written"])


def check_agent_digests(stack: Stack, scenario: Scenario, migration: Migration) -> list[str]:
    """The source's digest at freeze against the target's, as each agent reports it (if both know it)."""
    agent_id = agent_migration_id(migration)
    digests = {}
    for side, host in (("source", scenario.source), ("target", scenario.target)):
        agent = stack.agents[host]
        try:
            with AgentClient(agent.url, agent.secret, trust=agent.trust, timeout_s=3) as client:
                snapshot = client.snapshot(agent_id)
                digests[side] = snapshot.source_digest if side == "source" else snapshot.target_digest
        except AgentError:
            return []  # restarted since: the database's copy of the digests was checked
    if not digests["source"] or digests["source"] != digests["target"]:
        return [f"agents' digests differ: source {digests['source']!r}, target {digests['target']!r}"]
    return []


def check_agents(stack: Stack) -> list[str]:
    """No guest paused, migrating, orphaned or running where it is not the runnable copy."""
    broken = []
    runnable = {
        (vm_name, vsp_name)
        for vm_name, vsp_name in Registration.objects.exclude(hardware_status=NOT_RUNNABLE).values_list(
            "vm__name", "vsp__name"
        )
    }
    known = set(VirtualMachine.objects.values_list("name", flat=True))
    for host, agent in stack.agents.items():
        try:
            with AgentClient(agent.url, agent.secret, trust=agent.trust, timeout_s=3) as client:
                guests = client.list_guests()
        except AgentError as error:
            broken.append(f"agent {host} did not answer: {error}")
            continue
        for guest in guests:
            name = guest.name
            if name not in known:
                broken.append(f"orphan guest {name} on {host}: {summary(guest)}")
            elif guest.migrating:
                broken.append(f"guest {name} on {host} still migrating ({guest.migrating})")
            elif guest.hardware_status == "on" and not vcpus_running(guest):
                broken.append(f"guest {name} left paused on {host}")
            elif guest.hardware_status == "on" and (name, host) not in runnable:
                broken.append(f"guest {name} runs on {host} where its copy is not the runnable one")
    return broken


def check_general_tab(web: httpx.Client, base_url: str, migration: Migration) -> list[str]:
    """The VM's General tab, fetched from the running server, against the database."""
    try:
        page = web.get(f"{base_url}/vms/{migration.vm_id}/general/", timeout=10)
    except httpx.HTTPError as error:
        return [f"General tab did not load: {error}"]
    if page.status_code != 200:
        return [f"General tab answered HTTP {page.status_code}"]
    text = html.unescape(page.text)
    copy = runnable_copy(migration.vm_id)
    broken = []
    shown_status = re.search(r'data-field="hardware_status" data-value="([^"]*)"', page.text)
    shown_vsp = re.search(r'data-field="breadcrumb_vsp">([^<]*)<', page.text)
    if copy is not None:
        if not shown_status or shown_status.group(1) != copy.hardware_status:
            broken.append(
                f"General tab shows hardware status {shown_status and shown_status.group(1)!r}, "
                f"database {copy.hardware_status!r}"
            )
        if not shown_vsp or html.unescape(shown_vsp.group(1)).strip() != copy.vsp.name:
            broken.append(
                f"General tab shows VSP {shown_vsp and shown_vsp.group(1)!r}, database {copy.vsp.name!r}"
            )
    if migration.alert and migration.alert not in text:
        broken.append(f"General tab does not show the alert {migration.alert!r}")
    return broken


def summary(guest: GuestInfo | None) -> str:
    if guest is None:
        return "absent"
    workload = guest.workload
    running = workload.get("running", workload.get("vcpus_running"))
    return (
        f"hardware {guest.hardware_status}, os {guest.os_status}, running {running}, "
        f"migrating {guest.migrating}"
    )


def check_release_settled(migration: Migration) -> list[str]:
    """Issue 18 item 3: a completed migration whose source did not answer its release has it pending,
    with an alert naming the host; once the source answers again (the service manager restarted it),
    recovery finishes the release and the alert goes."""
    if migration.state == Migration.State.COMPLETED and migration.release_pending:
        return [f"completed with the source's release still pending after it came back: {migration.alert!r}"]
    return []


def check_stall(scenario: Scenario, migration: Migration) -> list[str]:
    """Issue 18 item 2: a target paused past the no-progress limit in Copy (Copy unlimited) ends the
    migration aborted in Copy for want of progress, after a warning recorded while it was only stalled."""
    if scenario.kind != "stall-copy" or migration.state not in Migration.TERMINAL_STATES:
        return []
    if migration.failed_phase == "init":
        return []  # it ended before Copy, where the pause is struck (waiting for Copy, it saw the end)
    if (migration.state, migration.failed_phase, migration.failure_kind) != (
        "aborted",
        "copy",
        "no_progress",
    ):
        return [
            f"target paused past the no-progress limit, but it ended {migration.state} "
            f"({migration.failed_phase or '-'}, {migration.failure_kind or '-'}): {migration.alert!r}"
        ]
    events = list(migration.events.order_by("at", "pk").values_list("to_state", "message"))
    warned = [
        i for i, (state, text) in enumerate(events) if state == "copy" and text.startswith("No progress")
    ]
    if not warned or warned[0] >= len(events) - 1:
        return ["aborted for want of progress without a warning first"]
    return []


# -- issue 18's invariants ----------------------------------------------------------------------

EVACUATIONS_CHECKED = 3  # the latest ones: earlier runs' evacuations were checked with their run


def check_running_not_stays_or_lost(stack: Stack, migration: Migration) -> list[str]:
    """No running guest is reported as "stays" or lost: the run's guest is not Lost in the database
    while its host's agent runs it, and no guest an evacuation summary lists as staying (or as "did not
    arrive") runs on the evacuated VSP."""
    broken = []
    copy = runnable_copy(migration.vm_id)
    if copy is not None and copy.is_lost:
        try:
            guest = guest_on(stack, copy.vsp.name, migration.vm.name)
        except AgentError:
            guest = None  # not answering: nothing known to contradict
        if is_running(guest):
            broken.append(f"{migration.vm.name} is shown Lost on {copy.vsp.name}, where its agent runs it")
    for evacuation in Evacuation.objects.select_related("vsp").order_by("-pk")[:EVACUATIONS_CHECKED]:
        if evacuation.is_running:
            continue
        summary = summarize(evacuation)
        said_away = [
            row.vm_name for row in summary.staying_rows if not row.runs_here and said_not_running(row.reason)
        ]
        said_away += [step.vm_name for step, status in summary.rows if status == "did not arrive"]
        for name in said_away:
            try:
                guest = guest_on(stack, evacuation.vsp.name, name)
            except AgentError:
                continue
            if is_running(guest):
                broken.append(
                    f"evacuation {evacuation.pk} of {evacuation.vsp.name} says {name} stays or did not "
                    f"arrive, but it runs there: {summary.sentence()}"
                )
    return broken


def check_unreported_not_up(stack: Stack, migration: Migration) -> list[str]:
    """No guest its host does not report is shown Up (or On): the run's guest, wherever it is runnable."""
    copy = runnable_copy(migration.vm_id)
    if copy is None or (copy.hardware_status != "on" and copy.os_status != "up"):
        return []
    try:
        guest = guest_on(stack, copy.vsp.name, migration.vm.name)
    except AgentError:
        return []  # a host that does not answer reports nothing either way (the alert says so)
    if guest is None:
        return [
            f"{migration.vm.name} is shown {copy.get_hardware_status_display()}/"
            f"{copy.get_os_status_display()} on {copy.vsp.name}, whose agent does not report it"
        ]
    return []


# -- issue 19's invariant: no image written by two running guests at once -------------------------

WRITER_SAMPLE_S = 0.3  # WriterWatch's interval between two samples of every agent's writers
WRITER_TIMEOUT_S = 2.0  # an agent that does not answer a sample within this is left out of it


@dataclass(frozen=True, order=True)
class VolumeWrite:
    """One running guest its host's agent records as a volume's writer (``agentprotocol.VolumeWriter``).

    ``pool_identity`` and ``volume`` name the image (the same storage on every host: the identity, not
    the pool's local name); ``pid`` is the writing process (a QEMU, or a simulated agent itself).
    """

    pool_identity: str
    volume: str
    host: str
    guest: str  # the guest's name, for people
    guest_id: str
    pid: int

    def words(self) -> str:
        return f"{self.guest} on {self.host} (pid {self.pid})"


def running_writes(host: str, resources: HostResources, guests: list[GuestInfo]) -> list[VolumeWrite]:
    """The writers ``host``'s agent reports (``resources.writers``) whose guest it also lists powered on
    (``guests``: hardware status on, its vCPUs running or paused: a paused guest may resume and write).
    A writer of a guest the agent does not list, or lists off, is not a running guest's and is left out."""
    on = {guest.guest_id: guest.name for guest in guests if guest.hardware_status == "on"}
    return [
        VolumeWrite(
            writer.pool_identity, writer.volume, host, on[writer.guest_id], writer.guest_id, writer.pid
        )
        for writer in resources.writers
        if writer.guest_id in on
    ]


def sample_writes(clients: Mapping[str, AgentClient]) -> tuple[list[VolumeWrite], list[str]]:
    """Every agent's running writers now, asked one agent after the other in ``clients``' order, and the
    hosts that did not answer (left out of the sample). The guest list is asked only of an agent that
    reports a writer. Raises nothing for an agent's failure."""
    writes: list[VolumeWrite] = []
    silent: list[str] = []
    for host, client in clients.items():
        try:
            resources = client.resources()
            if resources is None or not resources.writers:
                continue
            writes += running_writes(host, resources, client.list_guests())
        except AgentError:
            silent.append(host)
    return writes, silent


def two_writers(writes: list[VolumeWrite]) -> list[str]:
    """One sentence per volume that more than one running guest (or process) writes in ``writes``,
    naming the volume, its pool's identity and each writer's guest, host and pid."""
    by_volume: dict[tuple[str, str], set[VolumeWrite]] = {}
    for write in writes:
        by_volume.setdefault((write.pool_identity, write.volume), set()).add(write)
    return [
        f"volume {volume} of pool {identity} is written by {len(found)} running guests at once: "
        + ", ".join(write.words() for write in sorted(found, key=lambda w: (w.host, w.guest, w.pid)))
        for (identity, volume), found in sorted(by_volume.items())
        if len(found) > 1
    ]


def single_writer_violations(clients: Mapping[str, AgentClient]) -> tuple[list[str], list[VolumeWrite]]:
    """The invariant over one sample of ``clients`` (host -> its agent's client): the violations, and the
    running writes seen.

    Agents are asked one after the other, so a switchover between two of the answers could show the
    source (asked first) and the target (asked second) both writing although they never did at once. A
    volume seen with two writers is therefore asked about again, in the same order, and only writers
    seen in both samples count: each writer's two answers then bracket the other's first one, so both
    wrote at that moment (unless one stopped and started again in between, which no migration does).
    A double writer that ends before the second sample is not reported: the price of no false alarm.
    """
    first, _ = sample_writes(clients)
    if not two_writers(first):
        return [], first
    second, _ = sample_writes(clients)
    both = sorted(set(first) & set(second))
    return two_writers(both), first


def agent_clients(stack: Stack, timeout_s: float = WRITER_TIMEOUT_S) -> dict[str, AgentClient]:
    """A client per agent of the stack, in the stack's order (close them: ``close_all``)."""
    return {
        host: AgentClient(agent.url, agent.secret, trust=agent.trust, timeout_s=timeout_s)
        for host, agent in stack.agents.items()
    }


def close_all(clients: Mapping[str, AgentClient]) -> None:
    for client in clients.values():
        client.close()


def check_single_writer(stack: Stack) -> list[str]:
    """The invariant after a run (``single_writer_violations`` over every agent of the stack)."""
    clients = agent_clients(stack)
    try:
        return single_writer_violations(clients)[0]
    finally:
        close_all(clients)


class WriterWatch:
    """Samples every agent's writers every ``WRITER_SAMPLE_S`` in a thread while a run lasts (``with``).

    ``violations``: each distinct sentence of ``single_writer_violations`` once, with the number of
    samples that saw it; ``samples``: samples taken; ``saw_volume``: samples in which a running guest
    wrote ``volume`` (the run's disk), which says that the invariant had something to check.
    """

    def __init__(self, stack: Stack, volume: str) -> None:
        self.stack, self.volume = stack, volume
        self.samples = self.saw_volume = 0
        self.seen: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="writer-watch", daemon=True)

    def __enter__(self) -> WriterWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def violations(self) -> list[str]:
        return [f"while the run lasted: {text} (in {count} sample(s))" for text, count in self.seen.items()]

    def _watch(self) -> None:
        clients = agent_clients(self.stack)
        try:
            while not self._stop.is_set():
                found, writes = single_writer_violations(clients)
                self.samples += 1
                self.saw_volume += any(write.volume == self.volume for write in writes)
                self.seen.update(found)
                self._stop.wait(WRITER_SAMPLE_S)
        finally:
            close_all(clients)


# -- issue 20: a guest's disk through a migration (the mirror of local disks, and the shared pool) -----

MIB = 1 << 20


@dataclass(frozen=True)
class RunDisk:
    """What the disk checks need of a run's guest disk (``soak_run.create_guest``).

    ``volume``: its file name; ``local``: on the source's local pool (its migration mirrors it to a new
    volume the target allocates in its own local pool) or else on the shared pool; ``source_pool`` and
    ``target_pool``: the pools' directories on this machine (the same for the shared pool);
    ``witness``: a hard link to the source's volume the harness made before the migration was requested
    (local only): the same file, so it holds the source's disk as its guest left it, even once the
    source's agent deleted the volume after a completion; ``size``: its virtual size (bytes);
    ``prefill``: the bytes the harness wrote at ``prefill_at`` before the guest first ran (an image's
    data, so the mirror has something to copy); ``guest_seed``: the simulated guest's seed
    (``zlib.crc32(guest_id)``), which stamps every block it writes; None for a QEMU test guest, which
    never writes its disk.
    """

    volume: str
    local: bool
    source_pool: Path
    target_pool: Path
    witness: Path | None
    size: int
    prefill: bytes
    prefill_at: int
    guest_seed: int | None

    def pool_of(self, host: str, scenario: Scenario) -> Path:
        """The pool directory that holds the volume of ``host``'s copy (either end of the run)."""
        return self.source_pool if host == scenario.source else self.target_pool


def guest_block(guest_seed: int, request: int) -> bytes:
    """The 4 KiB a simulated guest writes for I/O request ``request`` (``SimulatedGuest._write_block``)."""
    return DISK_STAMP.pack(b"MXDISK01", guest_seed, request).ljust(DISK_BLOCK, b"\0")


def block_of(request: int, size: int) -> int:
    """The byte offset request ``request`` writes in a disk of ``size`` bytes (the guest's own rule)."""
    return (request % max(1, size // DISK_BLOCK)) * DISK_BLOCK


def expected_image(disk: RunDisk, writes: int) -> bytes:
    """The disk as it must be after the harness's prefill and the guest's I/O requests 1..``writes``,
    each completed in order, the later write of a block winning; nothing else ever wrote it."""
    image = bytearray(disk.size)
    image[disk.prefill_at : disk.prefill_at + len(disk.prefill)] = disk.prefill
    if disk.guest_seed is not None:
        for request in range(1, writes + 1):
            at = block_of(request, disk.size)
            image[at : at + DISK_BLOCK] = guest_block(disk.guest_seed, request)
    return bytes(image)


def last_request(image: bytes, guest_seed: int | None) -> int:
    """The highest I/O request whose block (stamped with ``guest_seed``) ``image`` holds (0: none): the
    guest's writes complete in order, so all of 1..that one must be there."""
    if guest_seed is None:
        return 0
    magic = DISK_STAMP.pack(b"MXDISK01", guest_seed, 0)[:16]
    found = 0
    for at in range(0, len(image), DISK_BLOCK):
        if image[at : at + 16] == magic:
            found = max(found, DISK_STAMP.unpack_from(image, at)[2])
    return found


def sha(data: bytes) -> str:
    """The SHA-256 of ``data``, its first 16 hex digits (for the sentences; contents compare whole)."""
    return hashlib.sha256(data).hexdigest()[:16]


def read_image(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def holds_only_its_guests_writes(disk: RunDisk, image: bytes, completed: int | None, where: str) -> list[str]:
    """``image`` (``where``'s copy) is the prefill with the guest's requests 1..N and nothing else, N its
    highest stamped request; ``completed``: the requests its agent says the guest completed (None: not
    known, its agent was killed), which must be N: no completed write missing."""
    writes = last_request(image, disk.guest_seed)
    broken = []
    expected = expected_image(disk, writes)
    if len(image) != disk.size:
        broken.append(f"{where}: the disk is {len(image)} bytes, not {disk.size}")
    elif image != expected:
        broken.append(
            f"{where}: the disk's digest {sha(image)} is not {sha(expected)}, the image before the attempt "
            f"with the guest's own writes 1..{writes} and nothing else"
        )
    if completed is not None and disk.guest_seed is not None and completed != writes:
        broken.append(f"{where}: the guest completed {completed} disk writes, its disk holds {writes}")
    return broken


def stop_and_count(stack: Stack, host: str, guest_id: str) -> int | None:
    """Power the guest off on ``host`` (the power cut: the writes it completed are on its disk, the ones
    in flight are not) and return how many I/O requests it completed; None if its agent does not
    answer or does not run it (a host crash)."""
    agent = stack.agents[host]
    try:
        with AgentClient(agent.url, agent.secret, trust=agent.trust, timeout_s=10) as client:
            stopped = client.stop_guest(guest_id)
    except AgentError:
        return None
    completed = stopped.workload.get("io_completed")
    return completed if isinstance(completed, int) else None


def check_disk(
    stack: Stack, scenario: Scenario, migration: Migration, disk: RunDisk, keeper_restarted: bool
) -> list[str]:
    """The run's disk once its migration ended and every other invariant was checked (the guest is
    powered off here, so its disk holds still): ``check_completed_disk`` after a completed mirror,
    ``check_kept_disk`` after any other outcome (an abort or a cancel; any outcome on the shared pool).

    ``keeper_restarted``: the keeper's agent was started again on purpose after the outcome (its guest
    was defined again and counts its requests from 1): the count is not compared."""
    if migration.state not in Migration.TERMINAL_STATES:
        return []
    completed = migration.state == Migration.State.COMPLETED
    copy = runnable_copy(migration.vm_id)
    keeper = copy.vsp.name if copy is not None else (scenario.target if completed else scenario.source)
    count = stop_and_count(stack, keeper, str(migration.vm.guest_id))
    if keeper_restarted:
        count = None
    if completed and disk.local:
        return check_completed_disk(disk, keeper, count)
    return check_kept_disk(scenario, migration, disk, keeper, count)


def check_kept_disk(
    scenario: Scenario, migration: Migration, disk: RunDisk, keeper: str, count: int | None
) -> list[str]:
    """After an abort or a cancel (and after any outcome on the shared pool): **the source's disk is as
    before the attempt**. The guest kept writing it while the attempt ran (and after, on its source),
    so "as before" is stated exactly: its content is the image before the attempt with the guest's own
    later writes and nothing else (``holds_only_its_guests_writes``): the prefill, then the guest's
    stamped I/O requests 1..N in order, N the highest found and, if its agent answers, the number it
    says the guest completed; take those writes out and the digest is the digest before the attempt.
    For a QEMU guest (which never writes its disk) that is the very digest before the attempt. For a
    local disk the volume must also still be the same file as before (the witness's inode): the
    attempt did not delete or replace it."""
    where = f"{migration.state}: {keeper}'s disk {disk.volume}"
    path = disk.pool_of(keeper, scenario) / disk.volume
    image = read_image(path)
    if image is None:
        return [f"{where} is gone from its pool"]
    broken = holds_only_its_guests_writes(disk, image, count, where)
    if disk.local and disk.witness is not None and keeper == scenario.source:
        try:
            same = os.stat(path).st_ino == os.stat(disk.witness).st_ino
        except OSError:
            same = False
        if not same:
            broken.append(f"{where} is not the file it was before the attempt (replaced)")
    return broken


def check_completed_disk(disk: RunDisk, keeper: str, count: int | None) -> list[str]:
    """After a completed mirror: **the target's disk at the freeze equals the source's at the freeze**.

    The source's at the freeze is the witness (the source's volume: the guest stopped writing it when
    Frozen paused it and closed its disks; its agent only deleted the name after the commit); it must
    hold only its guest's writes 1..N. The target's has been written by the guest since it resumed
    there (requests N+1..M), and the guest was powered off before this check: the blocks of those
    requests are put back to what the witness holds, and that image's digest must equal the witness's;
    and the target's disk as it is must be the witness's with just those writes (1..M, M its agent's
    count when it answers)."""
    assert disk.witness is not None
    source = read_image(disk.witness)
    target = read_image(disk.target_pool / disk.volume)
    if source is None:
        return [f"completed: the source's volume {disk.volume} (its witness) is gone"]
    if target is None:
        return [f"completed: {keeper} has no volume {disk.volume} in its local pool"]
    broken = holds_only_its_guests_writes(disk, source, None, "completed: the source's disk at the freeze")
    frozen_at = last_request(source, disk.guest_seed)
    resumed = bytearray(target)
    for request in range(frozen_at + 1, last_request(target, disk.guest_seed) + 1):
        at = block_of(request, disk.size)
        resumed[at : at + DISK_BLOCK] = source[at : at + DISK_BLOCK]
    if resumed != source:
        broken.append(
            f"completed: the target's disk at the freeze (digest {sha(bytes(resumed))}, its guest's "
            f"writes after request {frozen_at} taken out) differs from the source's at the freeze "
            f"({sha(source)})"
        )
    broken += holds_only_its_guests_writes(disk, target, count, f"completed: {keeper}'s disk now")
    return broken


def check_no_volume_left(
    stack: Stack, scenario: Scenario, migration: Migration, disk: RunDisk | None
) -> list[str]:
    """After an abort or a cancel of a mirrored migration: **no volume of the attempt is left on the
    target**, neither the volume its agent allocated for the mirror nor its marker
    (``hostagent.resources.marker_of``), once the target's agent answers again (a killed one removes
    them when it starts: ``remove_uncommitted``). The agent lists no volumes of its pools, so the pool's
    directory on this machine is read."""
    if disk is None or not disk.local or migration.state not in ("aborted", "cancelled"):
        return []
    agent = stack.agents[scenario.target]
    try:
        with AgentClient(agent.url, agent.secret, trust=agent.trust, timeout_s=3) as client:
            client.health()
    except AgentError as error:
        return [f"{migration.state}: the target {scenario.target}'s agent did not answer: {error}"]
    left = [
        name
        for name in (disk.volume, f".{disk.volume}.matrixoe-mirror")
        if (disk.target_pool / name).exists()
    ]
    if left:
        return [f"{migration.state}: the target {scenario.target}'s local pool still has {', '.join(left)}"]
    return []
