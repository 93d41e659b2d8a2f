"""One soak run: a fresh guest, one migration, one fault at a random moment of a phase, then every invariant.

Everything a run does comes from ``random.Random(seed)``: the guest's size and dirty rate, its source and
target, the fault (``FAULT_KINDS[seed % len(FAULT_KINDS)]``, so consecutive seeds go round all kinds),
the phase and the moment within it. ``make soak SEED=<seed> RUNS=1`` replays one run.
Django must be set up before this module is imported (``soak.py`` does it).

With the QEMU driver (``make soak DRIVER=qemu``) a run boots the test guest (its memwriter writes and
checks its own memory) on one of two QEMU hosts and draws from ``QEMU_FAULT_KINDS``: no SIGSTOP of an
agent (it would stop its QEMUs too, being their process group). The data-plane link faults apply: the
source agent connects to the endpoint the console hands it (the proxy's) and passes that socket to
QEMU, so QEMU's migration stream goes through the proxy. A kill of either agent and the link faults strike in
Copy (``QEMU_COPY_KINDS``); the other kinds aim at a random phase.

Every guest has a disk (issue 19): a new raw volume of ``DISK_BYTES`` (sparse) on the stack's shared pool,
named after the guest, deleted when the guest is retired. A simulated guest writes it as its I/O
completes; a QEMU test guest has it attached (QEMU holds the image's write lock while it runs). While
the run lasts, ``soak_checks.WriterWatch`` samples every agent's writers: no volume may be written by two
running guests at once.
"""

from __future__ import annotations

import os
import random
import time
import zlib
from dataclasses import dataclass, field

import httpx
from django.contrib.auth.models import User
from django.db import transaction
from soak_checks import RunDisk, WriterWatch, check_disk, check_invariants
from soak_stack import (
    AGENT_NAMES,
    HEARTBEAT_STALE_S,
    LOCAL_POOL,
    QEMU_AGENT_NAMES,
    RESTART_DELAY_S,
    SOAK_POOL,
    Stack,
)

from agentprotocol import GuestSpec
from evacuations.actions import (
    EvacuationRefused,
    do_cancel_evacuation,
    do_leave_maintenance,
    do_start_evacuation,
)
from evacuations.models import Evacuation
from evacuations.plan import build_plan
from evacuations.summary import summarize
from migrations_app.actions import MigrationRefused, do_cancel_migration, do_request_migration
from migrations_app.agents import agent_migration_id
from migrations_app.models import Migration
from vms.agent_client import AgentClient, AgentError
from vms.devices import store_guest_devices
from vms.inventory import refresh_resources
from vms.models import VSP, Registration, VirtualMachine
from vms.power import PowerAction, PowerRefused, do_power

FAULT_KINDS = (
    "none",
    "kill-source",
    "kill-target",
    "kill-worker",
    "kill-web",
    "redis-restart",
    "link-cut",
    "link-stall",
    "pause-source",
    "pause-target",
    "pause-worker",
    "cancel",
    # issue 18 item 2: the target paused past the no-progress limit, Copy unlimited (``stall_scenario``)
    "stall-copy",
    # issue 18 item 3: the source agent killed once the migration reached Committing
    "lose-source-committing",
    "evac-arriving",  # issue 18.1: the target's evacuation starts while the guest is arriving
    "restart-lost",  # issue 18.4: the keeper's agent restarts without its guests after the outcome
    # issue 20: the target's local pool filled (its tmpfs answers ENOSPC) while the mirror runs
    "pool-full",
)
# Issue 20: the kinds a run whose guest has its disk on a local pool draws (its migration mirrors the
# disk); each fault strikes while the mirror copies or once it is ready, before the switchover.
MIRROR_KINDS = ("none", "kill-source", "kill-target", "link-cut", "pool-full", "cancel")
MIRROR_PHASES = ("mirror", "mirror-ready")
LOCAL_ONLY_KINDS = ("pool-full",)
# Faults of issue 18 (items 2, 3) that only the simulated hosts take (a pause, a commit-time kill).
SIMULATED_ONLY_KINDS = ("stall-copy", "lose-source-committing")
# With QEMU hosts no agent is paused: SIGSTOP of a QEMU host's agent would stop its QEMUs too. The
# order is FAULT_KINDS' (a seed picks its kind by position). Nor issue 18.1/18.4's kinds: an evacuation
# needs a third host, and a QEMU agent's restart re-adopts its guests (none is lost).
QEMU_LEFT_OUT = ("pause-source", "pause-target", "evac-arriving", "restart-lost", *SIMULATED_ONLY_KINDS)
QEMU_FAULT_KINDS = tuple(kind for kind in FAULT_KINDS if kind not in (*QEMU_LEFT_OUT, *LOCAL_ONLY_KINDS))
# With QEMU agents that mirror local disks (their health says ``mirrors_local_disks``): the pool filled too.
QEMU_MIRROR_FAULT_KINDS = (*QEMU_FAULT_KINDS, *LOCAL_ONLY_KINDS)
PHASES = ("init", "copy", "io_quiesce", "frozen", "committing", "roll_forward")
# Struck in Copy: an agent's kill (the issue's acceptance case) and the link faults (QEMU's stream only
# flows in Copy and Frozen, and Frozen lasts a moment).
QEMU_COPY_KINDS = ("kill-source", "kill-target", "link-cut", "link-stall")
# QEMU passes I/O Quiesce at once (pre-switchover, continued at once): not a phase to aim at.
QEMU_PHASES = ("init", "copy", "copy", "frozen", "committing", "roll_forward")
# The guest's phase limits (s): short, so a stalled link or a paused peer overruns one quickly.
LIMITS = {"init_limit_s": 3, "copy_limit_s": 15, "quiesce_limit_s": 3, "frozen_limit_s": 3}
LIMIT_OF_PHASE = {"init": 3, "copy": 15, "io_quiesce": 3, "frozen": 3, "committing": 3, "roll_forward": 3}
# The latest moment within a phase a fault is aimed at, seconds after the phase was seen to begin.
MOMENT_MAX_S = {
    "init": 0.3,
    "copy": 1.0,
    "io_quiesce": 0.6,
    "frozen": 0.5,
    "committing": 0,
    "roll_forward": 0,
}
PAST_LIMIT_S = 2.0  # a pause or stall lasts the phase's limit plus this
OUTCOME_TIMEOUT_S = 90.0
FLEET_READY_TIMEOUT_S = 30.0  # six inventory intervals of the soak's stack
POLL_S = 0.005
# QEMU under TCG on a loaded 2-core machine: starting the target's QEMU and hashing RAM take seconds.
QEMU_LIMITS = {"init_limit_s": 15, "copy_limit_s": 30, "quiesce_limit_s": 5, "frozen_limit_s": 10}
QEMU_LIMIT_OF_PHASE = {"init": 15, "copy": 30, "io_quiesce": 5, "frozen": 10, "committing": 5}
QEMU_MEMORY_MIB = (128, 192)  # 128: the driver's smallest (96 MiB of it for the kernel)
QEMU_PAGES_PER_S = (0, 200, 1000)  # converges on QEMU_BANDWIDTH_MBPS
QEMU_BOOT_TIMEOUT_S = 120.0  # until the guest's memwriter has passed its first self-check
# "stall-copy": Copy unlimited, a no-progress limit of NO_PROGRESS_S, a bandwidth cap so that a large
# guest's Copy lasts seconds and leaves more to send than loopback's TCP buffers and the proxy absorb
# (~40 MB here) when the target stops; the pause lasts past the limit by STALL_HOLD_EXTRA_S.
NO_PROGRESS_S = 4
STALL_CAP_MB_S = 20
STALL_HOLD_EXTRA_S = 8.0
DISK_BYTES = 32 << 20  # each guest's disk on the shared pool: a sparse raw volume of 32 MiB
DISK_WRITER_TIMEOUT_S = 10.0  # until the source's agent records the new guest as its disk's writer
# Issue 20, a guest with its disk on a local pool: the harness writes PREFILL_MIB of random data into it
# at PREFILL_AT before the guest first runs (an image's data: the mirror has something to copy), and a
# bandwidth cap (simulated) makes that copy last about a second, so that a fault can strike in it.
PREFILL_AT = 4 << 20
PREFILL_MIB = (8, 16, 24)
QEMU_PREFILL_MIB = (8, 16)
MIRROR_CAP_MB_S = (16, 24)
MIRROR_AT = (0.05, 0.8)  # phase "mirror": strike once this fraction of the disk's data was sent
MIRROR_READY_MAX_S = 1.0  # phase "mirror-ready": strike up to this long after the mirror said ready
MIRROR_POLL_S = 0.02  # how often the source agent's progress is read while aiming at the mirror
LOCAL_SHARE = 4  # of the seeds of a MIRROR_KINDS kind, all but every LOCAL_SHARE-th round are local


@dataclass
class Scenario:
    seed: int
    kind: str
    phase: str
    moment_s: float
    source: str
    target: str
    memory_mib: int
    dirty_pages_per_s: int
    fill_percent: int
    io_latency_ms: int
    state_save_ms: int
    driver: str = "simulated"
    disk: str = "shared"  # where the guest's disk is: "shared" (the shared pool) or "local" (mirrored)
    prefill_mib: int = 0  # local: MiB of random data the harness writes into the disk first
    cap_mb_s: int = 0  # local, simulated: the migration's bandwidth cap (MB/s; 0: none)
    mirror_at: float = 0.0  # phase "mirror": the fraction of the disk's data sent when the fault strikes

    @classmethod
    def from_seed(cls, seed: int, driver: str = "simulated", mirrors: bool | None = None) -> Scenario:
        """The run of ``seed``. ``mirrors``: whether the driver's agents mirror local disks (None: the
        driver's own; simulated agents do, QEMU ones say so in their health once they can)."""
        if driver == "qemu":
            return cls.qemu_from_seed(seed, bool(mirrors))
        rng = random.Random(seed)
        kind = FAULT_KINDS[seed % len(FAULT_KINDS)]
        phase = rng.choice(PHASES)
        source, target = rng.sample(AGENT_NAMES, 2)
        scenario = cls(
            seed=seed,
            kind=kind,
            phase=phase,
            moment_s=round(rng.uniform(0, MOMENT_MAX_S[phase]), 3),
            source=source,
            target=target,
            memory_mib=rng.choice((32, 64, 128, 192)),
            dirty_pages_per_s=rng.choice((0, 200, 2000, 8000)),
            fill_percent=rng.choice((10, 25, 60, 100)),
            io_latency_ms=rng.choice((20, 300, 800)),
            state_save_ms=rng.choice((0, 200, 600)),
        )
        scenario = issue_18_scenario(scenario, rng)
        rounds = seed // len(FAULT_KINDS)
        local = kind in LOCAL_ONLY_KINDS or (kind in MIRROR_KINDS and rounds % LOCAL_SHARE != 0)
        return mirror_scenario(scenario, rng, local)

    @classmethod
    def qemu_from_seed(cls, seed: int, mirrors: bool = False) -> Scenario:
        """A QEMU run; with agents that mirror local disks (``mirrors``), every run of a MIRROR_KINDS
        kind has its disk on a local pool (QEMU runs are few: each is a mirror's)."""
        rng = random.Random(seed)
        kinds = QEMU_MIRROR_FAULT_KINDS if mirrors else QEMU_FAULT_KINDS
        kind = kinds[seed % len(kinds)]
        phase = rng.choice(QEMU_PHASES)
        if kind in QEMU_COPY_KINDS:
            phase = "copy"
        source, target = rng.sample(QEMU_AGENT_NAMES, 2)
        scenario = cls(
            seed=seed,
            kind=kind,
            phase=phase,
            moment_s=round(rng.uniform(0, MOMENT_MAX_S[phase]), 3),
            source=source,
            target=target,
            memory_mib=rng.choice(QEMU_MEMORY_MIB),
            dirty_pages_per_s=rng.choice(QEMU_PAGES_PER_S),
            fill_percent=100,
            io_latency_ms=0,
            state_save_ms=0,
            driver="qemu",
        )
        return mirror_scenario(scenario, rng, mirrors and kind in MIRROR_KINDS)

    @property
    def local(self) -> bool:
        return self.disk == "local"

    def moment(self) -> str:
        """Where the fault is aimed, in words: "copy+0.42s", "mirror at 37%", "mirror-ready+0.5s"."""
        if self.phase == "mirror":
            return f"mirror at {self.mirror_at:.0%}"
        return f"{self.phase}+{self.moment_s}s"

    def describe(self) -> str:
        cap = f", cap {self.cap_mb_s} MB/s" if self.cap_mb_s else ""
        disk = f", local disk ({self.prefill_mib} MiB of data{cap})" if self.local else ""
        if self.driver == "qemu":
            return (
                f"seed {self.seed} (qemu): {self.kind} at {self.moment()}, "
                f"{self.source}->{self.target}, {self.memory_mib} MiB, {self.dirty_pages_per_s} pages/s{disk}"
            )
        return (
            f"seed {self.seed}: {self.kind} at {self.moment()}, {self.source}->{self.target}, "
            f"{self.memory_mib} MiB, {self.dirty_pages_per_s} pages/s, fill {self.fill_percent}%, "
            f"io {self.io_latency_ms} ms, state save {self.state_save_ms} ms{disk}"
        )


def mirror_scenario(scenario: Scenario, rng: random.Random, local: bool) -> Scenario:
    """Issue 20: a ``local`` run's guest has its disk on the source's local pool, holding ``prefill_mib``
    of data, and its fault strikes in the mirror: phase "mirror" (once ``mirror_at`` of the disk's data
    was sent) or "mirror-ready" (``moment_s`` after the mirror said ready); a simulated guest is small
    (32 or 64 MiB, at most 1,000 pages/s) and its migration capped at ``cap_mb_s`` so that the copy of
    the disk lasts about a second and Copy ends within its limit. The draws are made for every seed (no
    other draw moves); a shared run is left as it was."""
    phase = rng.choice(MIRROR_PHASES)
    mirror_at = round(rng.uniform(*MIRROR_AT), 3)
    moment_s = round(rng.uniform(0, MIRROR_READY_MAX_S), 3)
    prefill = rng.choice(QEMU_PREFILL_MIB if scenario.driver == "qemu" else PREFILL_MIB)
    memory, pages = rng.choice((32, 64)), rng.choice((0, 200, 1000))
    latency, save, cap = rng.choice((20, 300)), rng.choice((0, 200)), rng.choice(MIRROR_CAP_MB_S)
    if not local:
        return scenario
    scenario.disk, scenario.prefill_mib, scenario.phase = "local", prefill, phase
    scenario.mirror_at, scenario.moment_s = (mirror_at, 0.0) if phase == "mirror" else (0.0, moment_s)
    if scenario.driver != "qemu":
        scenario.memory_mib, scenario.dirty_pages_per_s, scenario.fill_percent = memory, pages, 100
        scenario.io_latency_ms, scenario.state_save_ms, scenario.cap_mb_s = latency, save, cap
    return scenario


def issue_18_scenario(scenario: Scenario, rng: random.Random) -> Scenario:
    """The faults of issue 18 aim at one phase each: "stall-copy" pauses the target early in Copy, with a
    guest large enough for its Copy to outlast the buffers (``NO_PROGRESS_S``); "lose-source-committing"
    kills the source at the first sight of Committing. Other kinds are left as drawn (the draws above are
    made for every kind, so no other seed changes)."""
    if scenario.kind == "stall-copy":
        scenario.phase, scenario.moment_s = "copy", round(rng.uniform(0, 1.0), 3)
        scenario.memory_mib, scenario.fill_percent = 192, 100
        scenario.dirty_pages_per_s = min(scenario.dirty_pages_per_s, 2000)  # under the cap: it converges
    elif scenario.kind == "lose-source-committing":
        scenario.phase, scenario.moment_s = "committing", 0.0
    return scenario


def issue_18_policy(scenario: Scenario) -> dict[str, object] | None:
    """The migration's policy overrides for the kinds of issue 18 (None: the VM's own)."""
    if scenario.kind == "stall-copy":
        return {"preset": "custom", "no_progress_s": NO_PROGRESS_S, "bandwidth_cap_mb_s": STALL_CAP_MB_S}
    return None


def issue_18_notes(scenario: Scenario, migration: Migration) -> list[str]:
    """What the run's line says for the kinds of issue 18: why a stalled run ended, whether the source's
    release was left pending by the kill (and finished once it answered again: ``check_invariants``)."""
    migration.refresh_from_db()
    if scenario.kind == "stall-copy":
        return [f"ended {migration.state} ({migration.failure_kind or 'no failure'})"]
    if scenario.kind == "lose-source-committing":
        pending = migration.events.filter(message__contains="release of its old copy").exists()
        return ["release left pending by the kill" if pending else "released before the kill"]
    return []


def run_policy(scenario: Scenario) -> dict[str, object] | None:
    """The migration's policy overrides: issue 18's, or a local run's bandwidth cap (None: the VM's own)."""
    if scenario.cap_mb_s:
        return {"preset": "custom", "bandwidth_cap_mb_s": scenario.cap_mb_s}
    return issue_18_policy(scenario)


def issue_18_limits(scenario: Scenario) -> dict[str, int | None]:
    """The guest's phase limits: "stall-copy" has Copy unlimited (the default the issue ran with)."""
    return {**LIMITS, "copy_limit_s": None} if scenario.kind == "stall-copy" else LIMITS


@dataclass
class Result:
    scenario: Scenario
    hit_phase: str = ""  # the migration's state when the fault struck ("-" for the control group)
    outcome: str = ""  # completed | aborted | cancelled | stuck: <state>
    host_crash: bool = False  # the host that had to keep the guest was killed
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    source_qemu_pid: int | None = None  # QEMU: the guest's QEMU on the source when its agent was killed
    writer_samples: int = 0  # samples of every agent's writers while the run lasted (WriterWatch)
    writer_seen: int = 0  # of which saw the run's disk written by a running guest
    disk_written: bool = False  # its agent recorded the guest writing its disk before the migration
    disk_checked: bool = False  # the disk checks ran (issue 20: ``soak_checks.check_disk``)


def agent_client(stack: Stack, name: str, timeout_s: float = 5.0) -> AgentClient:
    agent = stack.agents[name]
    return AgentClient(agent.url, agent.secret, trust=agent.trust, timeout_s=timeout_s)


def run_once(stack: Stack, seed: int, admin: User, web: httpx.Client) -> Result:
    """One seeded run: wait until the console sees every agent again, migrate with one fault, check.

    A console that still calls a restarted agent unreachable after ``FLEET_READY_TIMEOUT_S`` is itself a
    violation (an admin could not migrate from that host); so is a refusal of the run's migration.
    """
    scenario = Scenario.from_seed(seed, stack.driver, stack.mirrors)
    result = Result(scenario)
    started = time.monotonic()
    if scenario.kind == "pool-full" and not stack.local_pools_limited:
        result.outcome = "skipped"
        result.notes.append("the local pools are plain directories here (tmpfs needs root): none can fill")
        return result
    still_unreachable = wait_for_fleet_reachable()
    if still_unreachable:
        result.outcome = "not started"
        result.violations.append(
            f"the console still calls {', '.join(still_unreachable)} unreachable "
            f"{FLEET_READY_TIMEOUT_S:.0f} s after the previous run"
        )
        result.seconds = time.monotonic() - started
        return result
    try:
        try:
            vm = create_guest(stack, scenario)
        except GuestDidNotBoot as error:
            if not error.kernel_panic:
                raise
            # TCG on a loaded machine: the guest's kernel may find no working timer and panic at boot
            # (its serial log says so). That is the test guest's boot, not a migration: boot it again once.
            result.notes.append(f"{error}: its kernel panicked at boot ({error.kernel_panic}); booted again")
            vm = create_guest(stack, scenario)
    except GuestDidNotBoot as error:
        result.outcome = "not started"
        result.violations.append(str(error))
        result.seconds = time.monotonic() - started
        return result
    result.disk_written = True
    disk = run_disk(stack, scenario, vm)
    try:
        target = VSP.objects.get(name=scenario.target)
        migration = do_request_migration(vm, target, admin, policy=run_policy(scenario))
    except MigrationRefused as refused:
        retire_guest(stack, vm)
        result.outcome = "refused"
        result.violations.append(f"the run's migration was refused: {'; '.join(refused.messages)}")
        result.seconds = time.monotonic() - started
        return result
    restarts_before = len(stack.restarted)
    checked = (scenario, migration)
    try:
        watch = WriterWatch(stack, disk_volume(vm.name))
        with watch:
            inject(stack, scenario, migration, admin, result)
            result.outcome = wait_for_outcome(migration)
            if scenario.kind == "evac-arriving":
                checked = follow_evacuation(scenario, migration, admin, result)
            elif scenario.kind == "restart-lost":
                restart_with_guests_gone(stack, scenario, migration, admin, result)
        result.violations += watch.violations
        result.writer_samples, result.writer_seen = watch.samples, watch.saw_volume
        restarted = stack.restarted[restarts_before:]
        if killed_role(scenario) in restarted:
            restarted.remove(killed_role(scenario))
        if restarted:
            result.notes.append(f"the service manager restarted {', '.join(restarted)}, which had exited")
        lost_keeper = "kill-target" if result.outcome == "completed" else "kill-source"
        # A QEMU agent's guests outlive it (re-adopted on restart): its kill is no host crash.
        lost_source = scenario.kind == "lose-source-committing" and result.outcome != "completed"
        result.host_crash = (scenario.kind == lost_keeper or lost_source) and stack.driver != "qemu"
        result.notes += issue_18_notes(scenario, migration)
        result.violations += check_invariants(stack, *checked, web, result.host_crash, disk)
        if result.source_qemu_pid is not None and result.outcome != "completed":
            result.violations += check_re_adopted(stack, scenario, migration, result)
        result.violations += check_disk(stack, *checked, disk, scenario.kind == "restart-lost")
        result.disk_checked = True
    finally:
        if scenario.kind == "pool-full":
            stack.empty_local_pool_filler(scenario.target)
        retire_guest(stack, vm)
        if scenario.kind == "pool-full":  # the console saw the pool full: the next run's checks read it
            refresh_resources(VSP.objects.get(name=scenario.target))
        if stack.driver == "qemu":
            result.violations += check_no_qemu_left(stack)
        result.seconds = time.monotonic() - started
    return result


def wait_for_fleet_reachable() -> list[str]:
    """Wait until the console marks every VSP reachable (inventory collection after a restart).

    Returns the names of the VSPs still unreachable after ``FLEET_READY_TIMEOUT_S`` (empty: all back).
    """
    deadline = time.monotonic() + FLEET_READY_TIMEOUT_S
    while True:
        down = sorted(VSP.objects.filter(agent_reachable=False).values_list("name", flat=True))
        if not down or time.monotonic() > deadline:
            return down
        time.sleep(0.2)


class GuestDidNotBoot(Exception):
    """The run's QEMU guest did not pass its first memory self-check in time, or its agent did not record
    it as its disk's writer (a sentence). ``kernel_panic``: the line of its serial log where its kernel
    panicked ("" if it did not)."""

    def __init__(self, message: str, kernel_panic: str = "") -> None:
        super().__init__(message)
        self.kernel_panic = kernel_panic


def kernel_panic_line(stack: Stack, host: str, guest_id: str) -> str:
    """The "Kernel panic" line of the QEMU guest's serial logs on ``host`` ("" if none)."""
    for log in stack.run_dir(host).glob(f"{guest_id}*.serial"):
        for line in log.read_text(errors="replace").splitlines():
            if "Kernel panic" in line:
                return line.strip()[:160]
    return ""


def disk_volume(name: str) -> str:
    """The volume of guest ``name``'s disk (in the shared pool, or the source's local pool)."""
    return f"{name}.img"


def witness_name(volume: str) -> str:
    """The harness's hard link to a local run's volume, beside it in the source's pool (a hidden file:
    no volume of the agent's)."""
    return f".soak-witness-{volume}"


def prefill_image(scenario: Scenario) -> bytes:
    """The data a local run's disk holds before its guest first runs: ``prefill_mib`` MiB, seeded."""
    return random.Random(scenario.seed * 1_000_003 + 20).randbytes(scenario.prefill_mib << 20)


def run_disk(stack: Stack, scenario: Scenario, vm: VirtualMachine) -> RunDisk:
    """What the disk checks know of the run's disk (``soak_checks.RunDisk``); a local run's witness (a
    hard link to the source's volume) is made now, before the migration is requested."""
    volume = disk_volume(vm.name)
    witness = None
    if scenario.local:
        source_pool = stack.local_pool_dir(scenario.source)
        target_pool = stack.local_pool_dir(scenario.target)
        witness = source_pool / witness_name(volume)
        os.link(source_pool / volume, witness)
    else:
        source_pool = target_pool = stack.pool_dir
    return RunDisk(
        volume=volume,
        local=scenario.local,
        source_pool=source_pool,
        target_pool=target_pool,
        witness=witness,
        size=DISK_BYTES,
        prefill=prefill_image(scenario) if scenario.local else b"",
        prefill_at=PREFILL_AT,
        guest_seed=None if scenario.driver == "qemu" else zlib.crc32(str(vm.guest_id).encode()),
    )


def create_guest(stack: Stack, scenario: Scenario) -> VirtualMachine:
    """A new guest, running with its workload on the source agent, and its records in the database:
    with its disk (``DISK_BYTES``, created by the agent on the shared pool), stored as the console's
    definition stores what the agent reported (``vms.devices.store_guest_devices``).

    A local run's guest (``Scenario.local``) has its disk on the source's local pool instead: defined
    powered off, ``prefill_image`` written into its volume at ``PREFILL_AT`` (an image's data), then
    started.

    QEMU: returns once the guest's memwriter has passed its first self-check; raises GuestDidNotBoot
    (the guest retired) if it has not within ``QEMU_BOOT_TIMEOUT_S``. Either driver: returns once the
    source's agent records the guest as its disk's writer (``GET /v1/resources``), else GuestDidNotBoot
    after ``DISK_WRITER_TIMEOUT_S``: the single-writer invariant would have nothing to check.
    """
    name = f"soak-{scenario.seed}-{time.monotonic_ns() % 1_000_000}"
    limits = QEMU_LIMITS if scenario.driver == "qemu" else issue_18_limits(scenario)
    vm = VirtualMachine.objects.create(
        name=name, os_status="up", memory_mib=scenario.memory_mib, vcpus=1, os_type="linux", **limits
    )
    spec = {
        "guest_id": str(vm.guest_id),  # agents know guests by id; the name is for display
        "name": name,
        "memory_mib": scenario.memory_mib,
        "vcpus": 1,
        "running": True,
        "dirty_pages_per_s": scenario.dirty_pages_per_s,
        "fill_percent": scenario.fill_percent,
        "io_latency_ms": scenario.io_latency_ms,
        "state_save_ms": scenario.state_save_ms,
    }
    if scenario.driver == "qemu":
        spec = {key: spec[key] for key in ("guest_id", "name", "memory_mib", "vcpus", "running")}
        spec |= {"os_type": "Linux", "dirty_pages_per_s": scenario.dirty_pages_per_s}
    pool = LOCAL_POOL if scenario.local else SOAK_POOL
    disk = {"device": "vda", "pool": pool, "volume": disk_volume(name), "format": "raw"}
    spec["disks"] = [{**disk, "virtual_size_bytes": DISK_BYTES, "create": True}]
    spec["running"] = not scenario.local
    with agent_client(stack, scenario.source, timeout_s=30) as agent:
        defined = agent.define_guest(GuestSpec.model_validate(spec))
        if scenario.local:
            with open(stack.local_pool_dir(scenario.source) / disk_volume(name), "r+b") as volume:
                volume.seek(PREFILL_AT)
                volume.write(prefill_image(scenario))
            defined = agent.start_guest(str(vm.guest_id))
    if scenario.driver == "qemu" and not wait_for_first_selfcheck(stack, scenario.source, str(vm.guest_id)):
        panic = kernel_panic_line(stack, scenario.source, str(vm.guest_id))
        retire_guest(stack, vm)
        vm.delete()  # never a guest of the console: no record left to check
        raise GuestDidNotBoot(
            f"guest {name} did not pass its first memory self-check on {scenario.source} "
            f"within {QEMU_BOOT_TIMEOUT_S:.0f} s",
            panic,
        )
    if not wait_for_disk_writer(stack, scenario.source, str(vm.guest_id), disk_volume(name)):
        retire_guest(stack, vm)
        vm.delete()
        raise GuestDidNotBoot(
            f"{scenario.source} does not record guest {name} as the writer of its disk "
            f"{disk_volume(name)} within {DISK_WRITER_TIMEOUT_S:.0f} s of its start"
        )
    source = VSP.objects.get(name=scenario.source)
    with transaction.atomic():
        Registration.objects.create(vm=vm, vsp=source, hardware_status=Registration.HardwareStatus.ON)
        store_guest_devices(vm, source, defined)
    return vm


def wait_for_first_selfcheck(stack: Stack, host: str, guest_id: str) -> bool:
    """Whether the QEMU guest's memwriter passes its first self-check within ``QEMU_BOOT_TIMEOUT_S``;
    False at once when its QEMU is seen off three times in a row (it exited: a kernel panic at boot)."""
    deadline = time.monotonic() + QEMU_BOOT_TIMEOUT_S
    off = 0
    with agent_client(stack, host) as agent:
        while time.monotonic() < deadline and off < 3:
            try:
                guest = agent.get_guest(guest_id)
                if guest.workload.get("selfchecks_passed", 0) >= 1:
                    return True
                off = off + 1 if guest.hardware_status == "off" else 0
            except AgentError:
                pass
            time.sleep(0.5)
    return False


def wait_for_disk_writer(stack: Stack, host: str, guest_id: str, volume: str) -> bool:
    """Whether ``host``'s agent comes to list ``guest_id`` as the writer of ``volume`` within
    ``DISK_WRITER_TIMEOUT_S``."""
    deadline = time.monotonic() + DISK_WRITER_TIMEOUT_S
    with agent_client(stack, host) as agent:
        while True:
            try:
                resources = agent.resources()
            except AgentError:
                resources = None
            writers = resources.writers if resources is not None else []
            if any(w.guest_id == guest_id and w.volume == volume for w in writers):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


def qemu_pid(stack: Stack, host: str, guest_id: str) -> int | None:
    try:
        with agent_client(stack, host) as agent:
            return agent.get_guest(guest_id).workload.get("pid")
    except AgentError:
        return None


def check_re_adopted(stack: Stack, scenario: Scenario, migration: Migration, result: Result) -> list[str]:
    """After its agent's kill -9, the source's restarted agent lists the same QEMU (pid) as the guest."""
    now = qemu_pid(stack, scenario.source, str(migration.vm.guest_id))
    if now != result.source_qemu_pid:
        return [
            f"the restarted {scenario.source} lists the guest with QEMU pid {now}, "
            f"not the re-adopted {result.source_qemu_pid}"
        ]
    result.notes.append(f"{scenario.source} re-adopted QEMU pid {now} after its agent's kill -9")
    return []


def check_no_qemu_left(stack: Stack, timeout_s: float = 15.0) -> list[str]:
    """After the run's guest was deleted everywhere, no QEMU process of the stack may be left."""
    deadline = time.monotonic() + timeout_s
    while (left := stack.qemu_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return [
        f"orphan QEMU process {pid} after the guest was deleted: {line[:160]}" for pid, line in left.items()
    ]


def retire_guest(stack: Stack, vm: VirtualMachine) -> None:
    """Free the run's guest on every agent and delete its disk's volume (the database keeps its records)."""
    for name in stack.agents:
        try:
            with agent_client(stack, name) as agent:
                agent.stop_guest(str(vm.guest_id))
                agent.delete_guest(str(vm.guest_id))
        except AgentError:
            pass
    volume = disk_volume(vm.name)
    (stack.pool_dir / volume).unlink(missing_ok=True)
    for name in stack.agents:
        for left in (volume, witness_name(volume), f".{volume}.matrixoe-mirror"):
            (stack.local_pool_dir(name) / left).unlink(missing_ok=True)


# -- the fault ------------------------------------------------------------------------------


def state_of(migration: Migration) -> str:
    return Migration.objects.filter(pk=migration.pk).values_list("state", flat=True).first() or "gone"


def reached(state: str, phase: str) -> bool:
    order = ["queued", "init", "copy", "io_quiesce", "frozen", "committing"]
    wanted = "committing" if phase == "roll_forward" else phase
    return state not in order or order.index(state) >= order.index(wanted)


def wait_for_phase(stack: Stack, scenario: Scenario, migration: Migration) -> None:
    """Until the migration is in (or past) the scenario's phase; roll forward: the target has resumed."""
    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    while time.monotonic() < deadline and not reached(state_of(migration), scenario.phase):
        time.sleep(POLL_S)
    if scenario.phase != "roll_forward":
        return
    with agent_client(stack, scenario.target, timeout_s=1) as target:
        while time.monotonic() < deadline and state_of(migration) == "committing":
            try:
                if target.get_guest(str(migration.vm.guest_id)).os_status == "up":
                    return
            except AgentError:
                pass
            time.sleep(POLL_S)


def aim_at_mirror(stack: Stack, scenario: Scenario, migration: Migration) -> str:
    """Wait for a local run's moment in the mirror, as the source's agent reports it
    (``ProgressSnapshot.disk_*``, read every ``MIRROR_POLL_S``): phase "mirror", once ``mirror_at`` of
    the disk's data was sent and the mirror is not ready; "mirror-ready", ``moment_s`` after it said
    ready. Returns what the moment is: "mirror" (the disk's bytes still being copied), "mirror-ready"
    (ready, the switchover not reached: Copy, I/O Quiesce or Frozen), else the migration's state (the
    moment was missed: the fault strikes at once)."""
    agent_id = agent_migration_id(migration)
    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    ready_at: float | None = None
    with agent_client(stack, scenario.source, timeout_s=2) as source:
        while time.monotonic() < deadline:
            if state_of(migration) in Migration.TERMINAL_STATES:
                break
            try:
                snapshot = source.snapshot(agent_id)
            except AgentError:
                time.sleep(MIRROR_POLL_S)  # not started on the source yet
                continue
            before_switchover = snapshot.state in ("init", "copy", "quiesce", "frozen")
            if not before_switchover:
                break
            if not snapshot.disk_mirror_ready:
                aimed = scenario.mirror_at * snapshot.disk_bytes_total
                if scenario.phase == "mirror" and aimed and snapshot.disk_bytes_sent >= aimed:
                    return "mirror"
            elif scenario.phase == "mirror":
                return "mirror-ready"  # the copy ended between two looks: strike now
            else:
                ready_at = ready_at or time.monotonic()
                if time.monotonic() >= ready_at + scenario.moment_s:
                    return "mirror-ready"
            time.sleep(MIRROR_POLL_S)
    return state_of(migration)


def fill_target_pool(stack: Stack, scenario: Scenario, migration: Migration) -> str:
    """The "pool-full" fault: fill the target's local pool (``Stack.fill_local_pool``) and hold it full
    while the migration is in Copy, then free it (the other user's data goes), before the target could
    resume the guest there; returns what it did, in words."""
    filled = stack.fill_local_pool(scenario.target)
    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    while time.monotonic() < deadline and state_of(migration) in ("queued", "init", "copy"):
        time.sleep(POLL_S)
    stack.empty_local_pool_filler(scenario.target)
    return f"filled {scenario.target}'s pool {LOCAL_POOL} with {filled / (1 << 20):.1f} MiB until Copy ended"


def inject(stack: Stack, scenario: Scenario, migration: Migration, admin: User, result: Result) -> None:
    if scenario.kind in ("none", "restart-lost"):
        result.hit_phase = "-"
        return
    if scenario.local:
        result.hit_phase = aim_at_mirror(stack, scenario, migration)
        state = state_of(migration)
    else:
        wait_for_phase(stack, scenario, migration)
        time.sleep(scenario.moment_s)
        state = state_of(migration)
        rolling = scenario.phase == "roll_forward" and state == "committing"
        result.hit_phase = "roll_forward" if rolling else state
    limit_of_phase = QEMU_LIMIT_OF_PHASE if scenario.driver == "qemu" else LIMIT_OF_PHASE
    hold_s = limit_of_phase.get(state, 3) + PAST_LIMIT_S
    kind = scenario.kind
    if kind == "stall-copy":
        stack.pause(scenario.target, NO_PROGRESS_S + STALL_HOLD_EXTRA_S)
    elif kind in (
        "kill-source",
        "kill-target",
        "kill-worker",
        "kill-web",
        "redis-restart",
        "lose-source-committing",
    ):
        role = killed_role(scenario)
        if scenario.driver == "qemu" and kind == "kill-source":
            result.source_qemu_pid = qemu_pid(stack, scenario.source, str(migration.vm.guest_id))
        stack.kill(role, down_s=3.0 if kind == "redis-restart" else RESTART_DELAY_S)  # Redis: a few seconds
        stack.wait_running(role)
    elif kind == "link-cut":
        result.notes.append(f"cut {stack.proxy.cut(hold_s=1.0)} data-plane connection(s)")
    elif kind == "link-stall":
        stack.proxy.stall(hold_s)
    elif kind == "pool-full":
        result.notes.append(fill_target_pool(stack, scenario, migration))
    elif kind.startswith("pause-"):
        role = {"pause-source": scenario.source, "pause-target": scenario.target}.get(kind, "worker")
        if role == "worker":
            hold_s = max(hold_s, HEARTBEAT_STALE_S + PAST_LIMIT_S)  # past the heartbeat limit too
        stack.pause(role, hold_s)
    elif kind == "cancel":
        try:
            do_cancel_migration(Migration.objects.get(pk=migration.pk), admin)
        except MigrationRefused as refusal:
            result.notes.append(f"cancel refused: {refusal.message}")
    elif kind == "evac-arriving":
        evacuate_target(scenario, migration, admin, result)
    elif kind == "restart-lost":
        result.hit_phase = "-"  # struck after the outcome (``restart_with_guests_gone``)
    else:
        raise ValueError(f"unknown fault kind {kind}")


def killed_role(scenario: Scenario) -> str:
    """The service a kill or Redis restart stops ("" for the other kinds)."""
    roles = {
        "kill-source": scenario.source,
        "kill-target": scenario.target,
        "redis-restart": "redis",
        "lose-source-committing": scenario.source,
    }
    if scenario.kind in roles:
        return roles[scenario.kind]
    return scenario.kind.removeprefix("kill-") if scenario.kind.startswith("kill-") else ""


def wait_for_outcome(migration: Migration) -> str:
    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    while time.monotonic() < deadline:
        state = state_of(migration)
        if state in Migration.TERMINAL_STATES:
            return state
        time.sleep(0.05)
    return f"stuck: {state_of(migration)}"


# -- issue 18: an evacuation that sees arriving guests; a guest lost with its agent -------------


def evacuate_target(scenario: Scenario, migration: Migration, admin: User, result: Result) -> None:
    """Start the evacuation of the run's target while the guest migrates to it (issue 18.1).

    Only the run's guest concerns it: every other guest on the target (earlier runs' records) is
    excluded, so the evacuation waits for the arriving guest alone and moves it on once it lands.
    """
    target = VSP.objects.get(name=scenario.target)
    others = set(
        Registration.objects.filter(vsp=target).exclude(vm=migration.vm).values_list("vm", flat=True)
    )
    for attempt in (1, 2):  # a guest that landed meanwhile changes the plan: review it again, once
        plan = build_plan(target, excluded=others, user=admin)
        chosen = {step.vm.pk: step.target.pk for step in plan.steps if step.target is not None}
        try:
            evacuation = do_start_evacuation(target, chosen, None, admin, excluded=others)
            break
        except EvacuationRefused as refusal:
            if attempt == 2:
                result.notes.append(f"evacuation refused: {refusal.message} ({plan_words(target, others)})")
                return
    arriving = [f"{a.vm.name} -> {a.target.name if a.target else '?'}" for a in plan.arriving]
    leaving = [f"{step.vm.name} -> {step.target.name if step.target else '?'}" for step in plan.steps]
    result.notes.append(
        f"evacuation {evacuation.pk} of {target.name} started; arriving: {arriving or 'none'}, "
        f"leaving: {leaving or 'none'}"
    )


def plan_words(target: VSP, excluded: set[int]) -> str:
    plan = build_plan(target, excluded=excluded)
    return f"{len(plan.arriving)} arriving, problems: {plan.problems}"


def follow_evacuation(
    scenario: Scenario, migration: Migration, admin: User, result: Result
) -> tuple[Scenario, Migration]:
    """Wait for the run's evacuation to end, take its target out of maintenance, and say what the
    invariants are checked against: the guest's onward migration when it was moved on (from the
    evacuated target to its new host), else the run's own migration."""
    migration.refresh_from_db()
    target = VSP.objects.get(name=scenario.target)
    evacuation = Evacuation.objects.filter(vsp=target).order_by("-pk").first()
    if evacuation is None or evacuation.started_at < migration.requested_at:
        leave_maintenance(target, admin, result)
        return scenario, migration
    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    while evacuation.is_running and time.monotonic() < deadline:
        time.sleep(0.2)
        evacuation.refresh_from_db()
    if evacuation.is_running:
        result.violations.append(
            f"evacuation {evacuation.pk} still running {OUTCOME_TIMEOUT_S:.0f} s after the run's outcome: "
            f"{summarize(evacuation).counts()}"
        )
        do_cancel_evacuation(evacuation, admin)
    step = evacuation.steps.filter(vm=migration.vm).select_related("migration__target").first()
    summary = summarize(evacuation)
    result.notes.append(f"evacuation {evacuation.state}: {summary.sentence()}")
    onward = step.migration if step is not None else None
    leave_maintenance(target, admin, result)
    if onward is None or migration.state != Migration.State.COMPLETED:
        return scenario, migration
    onward.refresh_from_db()
    if onward.state not in Migration.TERMINAL_STATES:
        wait_for_outcome(onward)
        onward.refresh_from_db()
    result.notes.append(f"moved on from {scenario.target} to {onward.target.name}: {onward.state}")
    moved = Scenario(**{**scenario.__dict__, "source": scenario.target, "target": onward.target.name})
    return moved, onward


def leave_maintenance(vsp: VSP, admin: User, result: Result) -> None:
    vsp.refresh_from_db()
    if not vsp.maintenance:
        return
    try:
        do_leave_maintenance(vsp, admin)
    except EvacuationRefused as refusal:
        result.violations.append(f"{vsp.name} cannot leave maintenance after the run: {refusal.message}")


LOST_WAIT_S = 20.0  # four inventory rounds of the soak's stack


def restart_with_guests_gone(
    stack: Stack, scenario: Scenario, migration: Migration, admin: User, result: Result
) -> None:
    """Kill the agent of the host that keeps the guest after the outcome and let the service manager
    start it again: a simulated host's guests die with its agent (issue 18.4). The console must come to
    show the guest Lost (never On/Up), and an admin's Start must define it there again and run it."""
    copy = Registration.objects.exclude(hardware_status=Registration.HardwareStatus.NOT_RUNNABLE)
    keeper = copy.select_related("vsp").filter(vm=migration.vm).first()
    if keeper is None:
        result.violations.append("no runnable copy of the run's guest before its host's restart")
        return
    host = keeper.vsp.name
    stack.kill(host)
    stack.wait_running(host)
    deadline = time.monotonic() + LOST_WAIT_S
    while time.monotonic() < deadline:
        keeper.refresh_from_db()
        if keeper.is_lost:
            break
        time.sleep(0.2)
    if not keeper.is_lost:
        result.violations.append(
            f"{host} restarted without the guest, but after {LOST_WAIT_S:.0f} s the console shows its copy "
            f"{keeper.get_hardware_status_display()} (OS {keeper.get_os_status_display()}), not Lost"
        )
        return
    result.notes.append(f"{host} restarted without the guest: shown Lost since {keeper.lost_since:%H:%M:%S}")
    keeper = Registration.objects.select_related("vm", "vsp").get(pk=keeper.pk)
    try:
        do_power(keeper, PowerAction.START, admin)
    except PowerRefused as refusal:
        result.violations.append(f"Start of the lost guest on {host} refused: {refusal.message}")
