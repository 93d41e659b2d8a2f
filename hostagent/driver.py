"""The driver interface: what the agent's HTTP server needs from a hypervisor.

The server talks only to these types. A driver owns its guests and moves their
memory itself; the boundary is one migration object per role (source or
target), not pages, so a hypervisor that migrates memory on its own (QEMU)
fits as well as the simulated driver with the agent's page-copying engine.

Phase map for a hypervisor with its own migration states (QEMU):
setup -> "init", active -> "copy", pre-switchover -> "quiesce",
device -> "frozen", completed (target verified, paused) -> "ready".

Rules every driver keeps:
1. Before "ready", any failure, time-out or cancel aborts: the source guest
   keeps running with its workload; the target drops its copy.
2. From "ready" on, neither side decides anything by itself: only the control
   plane's commands move it on (commit: target ``resume`` + source ``release``;
   abort: target ``discard`` + source ``resume``).
3. Commands are idempotent: a repeat answers the current snapshot.
4. Each phase's percent never goes backwards; ``seq`` grows on every change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, TypedDict, runtime_checkable

OsStatus = Literal["up", "down", "initializing", "in_efi"]
HardwareStatus = Literal["on", "off", "not_runnable"]
Role = Literal["source", "target"]
Phase = Literal["init", "copy", "quiesce", "frozen"]
MigrationState = Literal[
    "init",
    "copy",
    "quiesce",
    "frozen",
    "ready",
    "completed",
    "aborted",
    "cancelled",
    "discarded",
    "released",
]
PHASES: tuple[Phase, ...] = ("init", "copy", "quiesce", "frozen")
ACTIVE_STATES: frozenset[str] = frozenset({"init", "copy", "quiesce", "frozen"})
TERMINAL_STATES: frozenset[str] = frozenset({"completed", "aborted", "cancelled", "discarded", "released"})


class GuestSpec(TypedDict, total=False):
    """What defines a guest. ``name``, ``memory_mib`` and ``vcpus`` are required.

    ``dirty_pages_per_s`` is the simulated workload's write rate, ``fill_percent``
    how much of memory it fills at boot. ``io_latency_ms``
    (how long one simulated I/O takes, so Quiesce can be made slow) and
    ``state_save_ms`` (how long saving vCPU/device state takes, so Frozen can be
    made slow) exist for tests; other drivers may ignore all four.
    """

    name: str
    memory_mib: int
    vcpus: int
    os_type: str
    dirty_pages_per_s: int
    io_latency_ms: int
    state_save_ms: int
    fill_percent: int
    running: bool


class GuestInfo(TypedDict):
    name: str
    os_type: str
    os_status: OsStatus
    hardware_status: HardwareStatus
    memory_mib: int
    vcpus: int
    migrating: str | None
    workload: dict[str, object]


class PhaseLimits(TypedDict, total=False):
    """Seconds each phase may take; None means no limit."""

    init_s: float | None
    copy_s: float | None
    quiesce_s: float | None
    frozen_s: float | None


class MigrationParams(TypedDict, total=False):
    downtime_ms: int
    bandwidth_mbps: float | None
    max_rounds: int
    limits: PhaseLimits


class Endpoint(TypedDict):
    """Where the source connects to reach a prepared target, and its one-time token."""

    host: str
    port: int
    token: str


class PhasePercent(TypedDict):
    init: int
    copy: int
    quiesce: int
    frozen: int


class ProgressSnapshot(TypedDict):
    migration_id: str
    role: Role
    guest: str
    state: MigrationState
    phase: Phase | None
    percent: PhasePercent
    bytes_total: int
    bytes_sent: int
    bytes_remaining: int
    round: int
    dirty_rate_bytes_s: int
    throughput_bytes_s: int
    expected_downtime_ms: int | None
    downtime_ms: int | None
    converged: bool
    source_digest: str | None
    target_digest: str | None
    error: str | None
    failed_phase: Phase | None
    seq: int


DEFAULT_LIMITS: PhaseLimits = {"init_s": 10.0, "copy_s": None, "quiesce_s": 15.0, "frozen_s": 60.0}
DEFAULT_PARAMS: MigrationParams = {
    "downtime_ms": 300,
    "bandwidth_mbps": None,
    "max_rounds": 30,
    "limits": DEFAULT_LIMITS,
}


class AgentError(Exception):
    """A refusal the server turns into ``{"error": message}`` with ``status``."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(AgentError):
    status = 400


class NotFound(AgentError):
    status = 404


class Conflict(AgentError):
    """Guest already migrating, not running, no room, command not valid in this state."""

    status = 409


@runtime_checkable
class Migration(Protocol):
    """One side of one migration. Commands answer the snapshot after they took effect."""

    migration_id: str
    role: Role
    guest_name: str

    def snapshot(self) -> ProgressSnapshot: ...

    async def next_change(self, after_seq: int) -> ProgressSnapshot:
        """Wait until ``seq`` > ``after_seq`` (at once if it already is).

        Returns the first snapshot after ``after_seq`` whose state or phase changed,
        if there is one, else the latest: a slow reader still sees every phase.
        ``hostagent.progress.Progress`` implements this; drivers may reuse it.
        """
        ...

    async def quiesce(self) -> ProgressSnapshot:
        """Source: finish outstanding I/O within quiesce_s, queue new I/O. Returns when done."""
        ...

    async def freeze(self) -> ProgressSnapshot:
        """Source: stop vCPUs, send the rest; returns once the target reported "ready"."""
        ...

    async def resume(self) -> ProgressSnapshot:
        """Target in "ready": run the guest (-> "completed"). Source: make sure the guest runs."""
        ...

    async def discard(self) -> ProgressSnapshot:
        """Target: drop the copy and free its memory (-> "discarded")."""
        ...

    async def release(self) -> ProgressSnapshot:
        """Source in "ready": stop and drop the running copy (-> "released")."""
        ...

    async def cancel(self) -> ProgressSnapshot:
        """Abort before the decision (-> "cancelled"); the source guest keeps running."""
        ...


class SourceAbortCommands:
    """A source side's resume, cancel and discard, the same for every driver.

    Resume and cancel both put the guest back to running here through the driver's
    ``_roll_back(state, reason)``; discard is a target command.
    """

    async def _roll_back(self, state: MigrationState, reason: str) -> ProgressSnapshot:
        raise NotImplementedError

    async def resume(self) -> ProgressSnapshot:
        """After an abort decided by the control plane: the guest runs here again."""
        return await self._roll_back("aborted", "aborted by the control plane")

    async def cancel(self) -> ProgressSnapshot:
        return await self._roll_back("cancelled", "cancelled by the control plane")

    async def discard(self) -> ProgressSnapshot:
        raise Conflict("discard is a target command; the source keeps its guest")


@dataclass
class DriverSettings:
    agent_name: str
    data_host: str = "127.0.0.1"
    options: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Driver(Protocol):
    """A hypervisor behind the agent. Constructed as ``DriverClass(settings: DriverSettings)``.

    Errors are raised as ``InvalidRequest`` / ``NotFound`` / ``Conflict``.
    """

    name: str

    async def open(self) -> None: ...

    async def close(self) -> None:
        """Stop workloads and listeners; called once at agent shutdown."""
        ...

    def list_guests(self) -> list[GuestInfo]: ...

    def get_guest(self, name: str) -> GuestInfo: ...

    async def define_guest(self, spec: GuestSpec) -> GuestInfo:
        """Create the guest (idempotent when the spec is the same; Conflict when it differs)."""
        ...

    async def start_guest(self, name: str) -> GuestInfo: ...

    async def stop_guest(self, name: str) -> GuestInfo: ...

    async def delete_guest(self, name: str) -> None:
        """Refused (Conflict) while the guest runs or migrates."""
        ...

    async def prepare_incoming(
        self, spec: GuestSpec, migration_id: str, limits: PhaseLimits
    ) -> tuple[Migration, Endpoint]:
        """Reserve memory, create the paused guest, open a listener with a one-time token."""
        ...

    async def start_outgoing(
        self, guest_name: str, migration_id: str, target: Endpoint, params: MigrationParams
    ) -> Migration:
        """Connect to the target and start Init; returns as soon as the migration exists."""
        ...


DRIVERS: dict[str, str] = {
    "simulated": "hostagent.drivers.simulated:SimulatedDriver",
    "qemu": "hostagent.drivers.qemu:QemuDriver",
}


def load_driver(name: str, settings: DriverSettings) -> Driver:
    """Instantiate the driver registered under ``name`` (or given as ``module:Class``)."""
    import importlib

    dotted = DRIVERS.get(name, name)
    module_name, _, class_name = dotted.partition(":")
    if not class_name:
        raise ValueError(f"unknown driver {name!r}; known: {', '.join(sorted(DRIVERS))}")
    driver_class = getattr(importlib.import_module(module_name), class_name)
    return driver_class(settings)
