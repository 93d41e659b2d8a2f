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
4. Each phase's percent never goes backwards; ``seq`` grows on every change
   (``hostagent.progress.Progress`` keeps this for both drivers).
5. Every abort sets the snapshot's ``failure_kind`` (``agentprotocol.FailureKind``): the
   control plane decides by it, never by the words of ``error``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from agentprotocol import (
    DirtyRate,
    Encryption,
    Endpoint,
    ErrorCode,
    FailureKind,
    GuestInfo,
    GuestSpec,
    HostResources,
    LocalDisks,
    MigrationParams,
    MigrationState,
    PhaseLimits,
    ProgressSnapshot,
    Role,
    StoppedGuest,
)
from hostagent.hostconfig import NetworkConfig, PoolConfig
from hostagent.tls import TlsSettings


def plain_connection_error(error: BaseException) -> str:
    """An error of a data-plane socket in an admin's words (no ``[Errno 104]``); the detail goes to the log.

    Maps the ``OSError`` subclasses of the standard library (``ConnectionResetError``, ...) and
    time-outs; anything else (e.g. a ``ProtocolError`` of the wire format) keeps its own sentence.
    """
    if isinstance(error, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "the peer closed the connection"
    if isinstance(error, ConnectionRefusedError):
        return "the peer refused the connection"
    if isinstance(error, TimeoutError):
        return "the peer stopped answering"
    if isinstance(error, ConnectionError) and not error.strerror:  # raised with words, not an errno
        return "the connection was lost"
    if isinstance(error, OSError):
        return f"the network failed ({error.strerror or type(error).__name__})"
    return str(error)


class MigrationAborted(Exception):
    """Inside a driver: the migration cannot go on. ``str()`` says why in words, ``kind`` for decisions,
    ``side`` the host at fault when it is not the one that noticed (None: this one)."""

    def __init__(
        self, message: str, kind: FailureKind = FailureKind.INTERNAL, *, side: Role | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.side = side


class AgentError(Exception):
    """A refusal the server turns into ``{"error": message, "code": code}`` with ``status``.

    ``code`` (``agentprotocol.ErrorCode``) is set where the control plane decides by the refusal.
    """

    status = 400
    code: ErrorCode | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(AgentError):
    status = 400


class NotFound(AgentError):
    status = 404


class UnknownMigration(NotFound):
    """This agent holds no migration of that id: it restarted since, or was never told of it."""

    code = "unknown_migration"


class UnknownGuest(NotFound):
    """No guest of that id on this host."""

    code = "unknown_guest"


class Conflict(AgentError):
    """Guest already migrating, not running, no room, command not valid in this state."""

    status = 409


@runtime_checkable
class Migration(Protocol):
    """One side of one migration. Commands answer the snapshot after they took effect."""

    migration_id: str
    role: Role
    guest_id: str

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
    tls: TlsSettings | None = None  # None: the agent cannot encrypt its data plane (policy "off" only)
    pools: list[PoolConfig] = field(default_factory=list)  # ``--pool`` (``hostagent.hostconfig``)
    networks: list[NetworkConfig] = field(default_factory=list)  # ``--network``


@runtime_checkable
class Driver(Protocol):
    """A hypervisor behind the agent. Constructed as ``DriverClass(settings: DriverSettings)``.

    Guests are known by ``guest_id``; messages are ``agentprotocol`` models, already checked.
    Errors are raised as ``InvalidRequest`` / ``NotFound`` / ``Conflict``.
    """

    name: str

    async def open(self) -> None: ...

    async def close(self) -> None:
        """Stop workloads and listeners; called once at agent shutdown."""
        ...

    def list_guests(self) -> list[GuestInfo]: ...

    def resources(self) -> HostResources:
        """This host's pools (with free bytes now), networks, and which guest process writes which volume."""
        ...

    def get_guest(self, guest_id: str) -> GuestInfo: ...

    async def define_guest(self, spec: GuestSpec) -> GuestInfo:
        """Create the guest (idempotent when the spec is the same; Conflict when it differs)."""
        ...

    async def start_guest(self, guest_id: str) -> GuestInfo: ...

    async def stop_guest(self, guest_id: str, *, graceful_timeout_s: float | None = None) -> StoppedGuest:
        """Stop the guest: ask its OS to shut down and wait up to ``graceful_timeout_s`` (s), then cut
        the power; None cuts it at once. Conflict while it migrates. Says how it ended (``stop``)."""
        ...

    async def delete_guest(self, guest_id: str) -> None:
        """Refused (Conflict) while the guest runs or migrates."""
        ...

    async def prepare_incoming(
        self,
        spec: GuestSpec,
        migration_id: str,
        limits: PhaseLimits,
        *,
        encryption: Encryption = "required",
        streams: int | None = None,
        local_disks: LocalDisks = "refuse",
    ) -> tuple[Migration, Endpoint]:
        """Reserve memory, create the paused guest, open a listener with a one-time token.

        ``local_disks`` "mirror": allocate a new volume for each disk on a local pool (a driver that
        cannot mirror refuses such a disk with Conflict, as with "refuse").

        ``encryption`` "required": the listener speaks mutual TLS (``DriverSettings.tls``); a driver
        that cannot encrypt raises ``InvalidRequest`` rather than listen in clear. ``streams``: the
        pair's stream policy (1..``agentprotocol.MAX_STREAMS``, None: automatic), the same as the source's.
        """
        ...

    async def start_outgoing(
        self,
        guest_id: str,
        migration_id: str,
        target: Endpoint,
        params: MigrationParams,
        *,
        encryption: Encryption = "required",
        streams: int | None = None,
        local_disks: LocalDisks = "refuse",
    ) -> Migration:
        """Connect to the target and start Init; returns as soon as the migration exists.

        ``local_disks`` "mirror": copy the disks on local pools to the target's new volumes (as given to
        the target's ``prepare_incoming``).

        ``encryption`` as in ``prepare_incoming``: both sides must be given the same policy.
        ``streams``: parallel data-plane connections (1..``agentprotocol.MAX_STREAMS``, None: automatic).
        """
        ...

    async def measure_dirty_rate(self, guest_id: str, seconds: float) -> DirtyRate:
        """The running guest's dirty rate over ``seconds`` without migrating it (Conflict if not running)."""
        ...


DRIVERS: dict[str, str] = {
    "simulated": "hostagent.drivers.simulated:SimulatedDriver",
    "qemu": "hostagent.drivers.qemu:QemuDriver",
    "libvirt": "hostagent.drivers.libvirt.driver:LibvirtDriver",
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
