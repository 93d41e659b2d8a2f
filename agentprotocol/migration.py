"""Migrations: the requests that start one on each side, its policy and limits, and its progress."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from .base import (
    AUTO_STREAM_MIB,
    MAX_BYTES,
    MAX_LIMIT_S,
    MAX_STREAMS,
    ByteRate,
    Bytes,
    Digest,
    Encryption,
    GuestId,
    Message,
    MigrationId,
    Percent,
    Seconds,
    between,
    chars,
)
from .guests import GuestSpec
from .storage import MAX_DISKS, Device


class FailureKind(StrEnum):
    """Why a migration attempt ended before its commit; the console builds the alert's words from it."""

    TIME_LIMIT = "time_limit"  # a phase ran over its time limit
    NO_PROGRESS = "no_progress"  # nothing moved for the no-progress limit (the console's watchdog decides)
    CANCELLED = "cancelled"  # an administrator (or the control plane) cancelled it
    REFUSED = "refused"  # the target refused (no room, already has the guest, bad token, ...)
    UNREACHABLE = "unreachable"  # a peer (agent or data plane) stopped answering
    DIGEST_MISMATCH = "digest_mismatch"  # the target's memory digest differs from the source's
    NOT_CONVERGED = "not_converged"  # pre-copy hit its round limit without converging
    INTERNAL = "internal"  # anything else: a bug or an unexpected error


# -- names of phases, states and roles --------------------------------------------------------

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
Command = Literal["quiesce", "freeze", "resume", "discard", "release", "cancel"]
PHASES: tuple[Phase, ...] = ("init", "copy", "quiesce", "frozen")
COMMANDS: tuple[Command, ...] = ("quiesce", "freeze", "resume", "discard", "release", "cancel")
ACTIVE_STATES: frozenset[str] = frozenset(PHASES)
TERMINAL_STATES: frozenset[str] = frozenset({"completed", "aborted", "cancelled", "discarded", "released"})
# A side in one of these states gave up before the decision: its snapshot says why (failure_kind).
FAILED_STATES: frozenset[str] = frozenset({"aborted", "cancelled", "discarded"})

# -- requests --------------------------------------------------------------------------------------


class PhaseLimits(Message):
    """Seconds each phase may take (None: no limit). Omitted ones take the defaults below."""

    init_s: Seconds | None = 10.0
    copy_s: Seconds | None = None
    quiesce_s: Seconds | None = 15.0
    frozen_s: Seconds | None = 60.0

    def of(self, phase: str) -> float | None:
        """The limit of ``phase`` ("init", "copy", "quiesce", "frozen") in seconds, or None."""
        limit: float | None = getattr(self, f"{phase}_s", None)
        return limit


DowntimeMs = Annotated[StrictInt, AfterValidator(between(1, 600_000))]
BandwidthMbps = Annotated[StrictFloat | StrictInt, Field(gt=0, le=1_000_000)]
ThrottlePercent = Annotated[StrictInt, AfterValidator(between(1, 99))]
AtLimit = Literal["abort", "switchover"]


class MigrationParams(Message):
    """How the source migrates (the effective migration policy; ``migrations_app.forecast.Policy``).

    ``downtime_ms``: the allowed downtime (ms). ``bandwidth_mbps``: a cap in Mbit/s (None: none).
    ``max_rounds``: the round limit. ``auto_converge``: throttle the guest's vCPUs after each stalled
    round, ``throttle_initial_pct`` first, ``throttle_increment_pct`` more each time, up to
    ``throttle_max_pct`` (QEMU's ``cpu-throttle-initial`` / ``-increment`` / ``max-cpu-throttle``).
    ``downtime_step_ms`` / ``downtime_max_ms``: raise the allowed downtime after each stalled round
    (0: never). ``at_limit``: at the round or Copy time limit, ``abort`` or ``switchover`` anyway.
    """

    downtime_ms: DowntimeMs = 300
    bandwidth_mbps: BandwidthMbps | None = None
    max_rounds: Annotated[StrictInt, AfterValidator(between(1, 10_000))] = 30
    auto_converge: StrictBool = False
    throttle_initial_pct: ThrottlePercent = 20
    throttle_increment_pct: ThrottlePercent = 10
    throttle_max_pct: ThrottlePercent = 99
    downtime_step_ms: Annotated[StrictInt, AfterValidator(between(0, 600_000))] = 0
    downtime_max_ms: DowntimeMs | None = None
    at_limit: AtLimit = "abort"
    limits: PhaseLimits = Field(default_factory=PhaseLimits)


class ParamsChange(Message):
    """``POST /v1/migrations/{id}/params`` on the source: change a running Copy (omitted: unchanged).

    ``downtime_ms`` raises (or lowers) the allowed downtime; ``bandwidth_mbps`` sets the cap (0: none);
    ``auto_converge`` turns throttling on or off; ``switchover_now`` ends Copy at once, accepting a
    downtime of what is left / the link rate. Refused (Conflict) once Copy is over.
    """

    downtime_ms: DowntimeMs | None = None
    bandwidth_mbps: Annotated[StrictFloat | StrictInt, Field(ge=0, le=1_000_000)] | None = None
    auto_converge: StrictBool | None = None
    switchover_now: StrictBool = False


Streams = Annotated[StrictInt, AfterValidator(between(1, MAX_STREAMS))]
"""How many parallel data-plane connections a migration uses (1..``MAX_STREAMS``); None: automatic."""


def auto_streams(memory_mib: int, cpu_count: int | None) -> int:
    """The automatic stream count: one per core, one per ``AUTO_STREAM_MIB`` of guest, 1..``MAX_STREAMS``.

    A small guest gains nothing from more connections (each first pass is short); a host with few cores
    has nobody to drive them.
    """
    by_size = memory_mib // AUTO_STREAM_MIB
    return max(1, min(MAX_STREAMS, cpu_count or 1, by_size))


def resolve_streams(requested: int | None, memory_mib: int, cpu_count: int | None) -> int:
    """``requested`` if set (already bounded by ``Streams``), else ``auto_streams``."""
    return requested if requested is not None else auto_streams(memory_mib, cpu_count)


class Endpoint(Message):
    """Where the source connects to reach a prepared target, and its one-time token."""

    host: Annotated[StrictStr, AfterValidator(chars(255, "a host name or address"))]
    port: Annotated[StrictInt, AfterValidator(between(1, 65535))]
    token: Annotated[StrictStr, AfterValidator(chars(512, "the token the target gave"))]


LocalDisks = Literal["refuse", "mirror"]
"""What a migration does with a guest's disks on a ``local`` pool: ``refuse`` them at prepare (the
default, as before live storage migration), or ``mirror`` them: the target allocates a new volume for
each in one of its own local pools, the source copies the disk to it while the guest runs, and the
guest's writes reach both sides once the mirror is ready (``hostagent/README.md``). Both sides must be
given the same value."""


class IncomingRequest(Message):
    """``POST /v1/migrations/incoming`` on the target.

    ``local_disks``: ``LocalDisks``; with "mirror" the target allocates a volume of each local disk's
    virtual size in one of its local pools with room (409 naming the disk if none, nothing created).
    """

    migration_id: MigrationId
    guest: GuestSpec
    limits: PhaseLimits = Field(default_factory=PhaseLimits)
    encryption: Encryption = "required"
    # The pair's stream policy, the same as the source's: the simulated target takes whatever count the
    # source announces (up to MAX_STREAMS); QEMU must set its multifd-channels before migrate-incoming.
    streams: Streams | None = None
    local_disks: LocalDisks = "refuse"


class PreparedIncoming(Message):
    """The target's answer to ``IncomingRequest``: its data-plane listener and one-time token."""

    migration_id: MigrationId
    data_host: Annotated[StrictStr, AfterValidator(chars(255, "a host name or address"))]
    data_port: Annotated[StrictInt, AfterValidator(between(1, 65535))]
    token: Annotated[StrictStr, AfterValidator(chars(512, "a token"))]

    def endpoint(self) -> Endpoint:
        return Endpoint(host=self.data_host, port=self.data_port, token=self.token)


class OutgoingRequest(Message):
    """``POST /v1/migrations/outgoing`` on the source; ``guest`` is the guest's id."""

    migration_id: MigrationId
    guest: GuestId
    target: Endpoint
    params: MigrationParams = Field(default_factory=MigrationParams)
    encryption: Encryption = "required"
    streams: Streams | None = None  # parallel data-plane connections, None: automatic (``auto_streams``)
    local_disks: LocalDisks = "refuse"  # as given to the target's ``IncomingRequest``


# -- progress -----------------------------------------------------------------------------------------


class PhasePercent(TypedDict):
    """Percent done per phase, 0-100, each never going backwards."""

    init: Percent
    copy: Percent
    quiesce: Percent
    frozen: Percent


def no_percent() -> PhasePercent:
    return {"init": 0, "copy": 0, "quiesce": 0, "frozen": 0}


class ProgressSnapshot(Message):
    """One side's progress (``GET /v1/migrations/{id}``, each line of ``.../progress``, every command).

    Units: bytes, bytes/s, ms. ``percent`` per phase never goes backwards and ``seq`` grows on every
    change. ``bytes_*``, ``dirty_rate_bytes_s`` and ``throughput_bytes_s`` are the memory's; the
    ``disk_*`` fields are the mirror of local disks (``LocalDisks`` "mirror"; all 0 without one):
    ``disk_bytes_total`` the data to copy (allocated bytes of the mirrored disks when the copy began),
    ``disk_bytes_sent`` what went so far (first pass and re-sent blocks), ``disk_bytes_remaining`` what
    the first pass has still to read plus the blocks written since they were copied,
    ``disk_dirty_rate_bytes_s`` the guest's write rate to them, ``disk_mirror_ready`` every mirror has
    caught up and the guest's writes now reach both sides, ``disks_deleted`` (the source, once
    released) the devices whose volume on the source was deleted. With a mirror, Copy's percentage covers disk
    and memory bytes together. When the side gave up (``FAILED_STATES``): ``error`` says why in words,
    ``failure_kind`` says why for decisions, ``failed_phase`` where, ``failed_side`` which host noticed
    first (this side, or the peer that told it), ``failed_after_s`` how long the failed phase had run (s).
    """

    migration_id: MigrationId
    role: Role
    guest: GuestId
    state: MigrationState
    phase: Phase | None = None
    percent: PhasePercent = Field(default_factory=no_percent)
    bytes_total: Bytes = 0
    bytes_sent: Bytes = 0
    bytes_remaining: Bytes = 0
    round: Annotated[StrictInt, AfterValidator(between(0, 10_000_000))] = 0
    dirty_rate_bytes_s: ByteRate = 0
    throughput_bytes_s: ByteRate = 0
    expected_downtime_ms: Annotated[StrictInt, AfterValidator(between(0, MAX_BYTES))] | None = None
    downtime_ms: Annotated[StrictInt, AfterValidator(between(0, MAX_BYTES))] | None = None
    allowed_downtime_ms: Annotated[StrictInt, AfterValidator(between(0, MAX_BYTES))] | None = None
    throttle_pct: Percent = 0
    converged: StrictBool = False
    # I/O Quiesce: guest I/O requests outstanding when it began, and how long they took to complete (ms).
    io_outstanding: Annotated[StrictInt, AfterValidator(between(0, 1_000_000))] | None = None
    io_drain_ms: Annotated[StrictFloat | StrictInt, Field(ge=0, le=MAX_LIMIT_S * 1000)] | None = None
    # The network blackout a client of the guest saw: the longest gap in the guest's heartbeats around
    # the switchover (ms), measured by whoever listens to them (``docs/qemu-driver.md``); None: unknown.
    network_blackout_ms: Annotated[StrictFloat | StrictInt, Field(ge=0, le=MAX_LIMIT_S * 1000)] | None = None
    streams: Streams | None = None  # parallel data-plane connections in use (None: not connected yet)
    disk_bytes_total: Bytes = 0
    disk_bytes_sent: Bytes = 0
    disk_bytes_remaining: Bytes = 0
    disk_dirty_rate_bytes_s: ByteRate = 0
    disk_throughput_bytes_s: ByteRate = 0
    disk_mirror_ready: StrictBool = False
    # After ``release`` on the source of a mirror: the devices whose volume on this host was deleted (the
    # target runs the guest on its own copy by then); empty otherwise.
    disks_deleted: Annotated[list[Device], Field(max_length=MAX_DISKS)] = Field(default_factory=list)
    source_digest: Digest | None = None
    target_digest: Digest | None = None
    error: StrictStr | None = None
    failure_kind: FailureKind | None = None
    failed_phase: Phase | None = None
    failed_side: Role | None = None
    failed_after_s: Annotated[StrictFloat | StrictInt, Field(ge=0, le=MAX_LIMIT_S * 10)] | None = None
    seq: Annotated[StrictInt, AfterValidator(between(0, MAX_BYTES))]

    @property
    def failed(self) -> bool:
        return self.state in FAILED_STATES

    def wire(self) -> dict[str, Any]:
        """The JSON form (what the HTTP API sends)."""
        return self.model_dump(mode="json")
