"""The host agent's protocol: every message between the console and an agent, in one place.

This module is shared by the agent (server, engines, both drivers) and the console (its agent
client and the migration control plane). It imports nothing from Django or the console, so the
agent package still installs alone on a host. The HTTP API is described in ``hostagent/README.md``.

Messages are pydantic v2 models (one model library across the project: the console's REST API,
django-ninja, is pydantic too). Every bound is in the models, so an absurd value is refused with
plain words (``plain_words``) before any driver sees it. Numbers and flags are strict (``"5"`` is
not a whole number, ``"yes"`` is not true); unknown keys are ignored, so a newer peer may add some.

Guests are known by ``guest_id`` (the console's ``VirtualMachine.guest_id``, a UUID as text); the
display ``name`` is any printable text up to ``GUEST_NAME_MAX_CHARS`` characters.

Decisions are made by ``FailureKind``, never by the words of an error; the words are for people.
"""

from __future__ import annotations

import json
import re
import unicodedata
import uuid
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12


class FailureKind(StrEnum):
    """Why a migration attempt ended before its commit; the console builds the alert's words from it."""

    TIME_LIMIT = "time_limit"  # a phase ran over its time limit
    CANCELLED = "cancelled"  # an administrator (or the control plane) cancelled it
    REFUSED = "refused"  # the target refused (no room, already has the guest, bad token, ...)
    UNREACHABLE = "unreachable"  # a peer (agent or data plane) stopped answering
    DIGEST_MISMATCH = "digest_mismatch"  # the target's memory digest differs from the source's
    NOT_CONVERGED = "not_converged"  # pre-copy hit its round limit without converging
    INTERNAL = "internal"  # anything else: a bug or an unexpected error


# -- names of phases, states and roles --------------------------------------------------------

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
Encryption = Literal["required", "off"]
"""The data plane's encryption policy for a pair of hosts: mutual TLS ("required", the default) or
plain TCP ("off", for a trusted dedicated migration network). Both sides get it; they must agree."""
Command = Literal["quiesce", "freeze", "resume", "discard", "release", "cancel"]
PHASES: tuple[Phase, ...] = ("init", "copy", "quiesce", "frozen")
COMMANDS: tuple[Command, ...] = ("quiesce", "freeze", "resume", "discard", "release", "cancel")
ACTIVE_STATES: frozenset[str] = frozenset(PHASES)
TERMINAL_STATES: frozenset[str] = frozenset({"completed", "aborted", "cancelled", "discarded", "released"})
# A side in one of these states gave up before the decision: its snapshot says why (failure_kind).
FAILED_STATES: frozenset[str] = frozenset({"aborted", "cancelled", "discarded"})

# -- bounds ---------------------------------------------------------------------------------------

GUEST_NAME_MAX_CHARS = 64  # the console's VirtualMachine.name max_length: the same limit everywhere
MAX_MEMORY_MIB = 1024 * 1024
MAX_VCPUS = 256
MAX_DELAY_MS = 10 * 60 * 1000
MAX_LIMIT_S = 7 * 24 * 3600
MAX_GRACEFUL_STOP_S = 3600  # a graceful stop holds its HTTP request open this long at most
MAX_BYTES = 1 << 62  # byte counters in a snapshot: far beyond any guest, refuses nonsense
MIGRATION_ID_CHARS = "letters, digits, '.', '_', ':' or '-'"
MAX_STREAMS = 16  # data-plane connections of one migration (QEMU: multifd-channels)
AUTO_STREAM_MIB = 512  # automatic sizing: at most one stream per this much guest memory


def between(low: int, high: int) -> Callable[[int], int]:
    """A check that a whole number lies in ``[low, high]``, refused in plain words otherwise."""

    def check(value: int) -> int:
        if not low <= value <= high:
            raise PydanticCustomError(
                "out_of_range",
                "must be between {low} and {high}, not {value}",
                {"low": low, "high": high, "value": value},
            )
        return value

    return check


def chars(max_chars: int, what: str) -> Callable[[str], str]:
    """A check that a text has 1 to ``max_chars`` characters (never cut: a longer one is refused)."""

    def check(value: str) -> str:
        if not 0 < len(value) <= max_chars:
            raise PydanticCustomError(
                "text_length", "must be {what} of 1-{max} characters", {"what": what, "max": max_chars}
            )
        return value

    return check


def _seconds(value: float | int) -> float:
    if isinstance(value, bool) or not 0 < value <= MAX_LIMIT_S:
        raise PydanticCustomError(
            "seconds",
            "must be more than 0 and at most {max} seconds, not {value}",
            {"max": MAX_LIMIT_S, "value": value},
        )
    return float(value)


def _guest_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise PydanticCustomError(
            "guest_id", "must be a guest id (a UUID), not {value}", {"value": repr(value[:80])}
        ) from None


def _display_name(value: str) -> str:
    if not 0 < len(value) <= GUEST_NAME_MAX_CHARS:
        raise PydanticCustomError(
            "guest_name",
            "must be 1-{max} characters, not {length}",
            {"max": GUEST_NAME_MAX_CHARS, "length": len(value)},
        )
    # Cc control, Cs lone surrogates, Zl/Zp line breaks: not printable. Cf stays (emoji joiners).
    if any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in value):
        raise PydanticCustomError("guest_name", "must be printable text, without control characters", {})
    return value


def _migration_id(value: str) -> str:
    ok = 0 < len(value) <= 128 and value[0].isascii() and value[0].isalnum()
    if not ok or not all(char.isascii() and (char.isalnum() or char in "._:-") for char in value):
        raise PydanticCustomError("migration_id", "must be 1-128 " + MIGRATION_ID_CHARS, {})
    return value


Seconds = Annotated[StrictFloat | StrictInt, AfterValidator(_seconds)]
GuestId = Annotated[StrictStr, AfterValidator(_guest_id)]
GuestName = Annotated[StrictStr, AfterValidator(_display_name)]
MigrationId = Annotated[StrictStr, AfterValidator(_migration_id)]
Percent = Annotated[StrictInt, AfterValidator(between(0, 100))]
Bytes = Annotated[StrictInt, AfterValidator(between(0, MAX_BYTES))]
ByteRate = Annotated[StrictInt, AfterValidator(between(0, MAX_BYTES))]
Digest = Annotated[StrictStr, AfterValidator(chars(256, "a digest"))]


class Message(BaseModel):
    """Every protocol message: unknown keys ignored, everything else checked."""

    model_config = ConfigDict(extra="ignore", validate_default=False)


# -- guests ---------------------------------------------------------------------------------------


class GuestSpec(Message):
    """What defines a guest (``PUT /v1/guests/{guest_id}``, and the guest of an incoming migration).

    ``dirty_pages_per_s`` is the simulated workload's write rate (pages/s), ``fill_percent`` how much
    of memory it fills at boot; ``io_latency_ms`` (one simulated I/O, so Quiesce can be slow) and
    ``state_save_ms`` (saving vCPU/device state, so Frozen can be slow) exist for tests;
    ``shutdown_ms`` is how long the simulated OS takes to shut down once asked (after its I/O in
    flight completed; a graceful stop with a shorter timeout is forced). Other drivers may ignore
    all five. ``running`` is a wish (start it once defined), not part of the
    definition.
    """

    guest_id: GuestId
    name: GuestName
    memory_mib: Annotated[StrictInt, AfterValidator(between(1, MAX_MEMORY_MIB))]
    vcpus: Annotated[StrictInt, AfterValidator(between(1, MAX_VCPUS))] = 1
    os_type: Annotated[StrictStr, AfterValidator(chars(64, "a short text"))] = "linux"
    dirty_pages_per_s: Annotated[StrictInt, AfterValidator(between(0, 1_000_000))] = 100
    io_latency_ms: Annotated[StrictInt, AfterValidator(between(0, MAX_DELAY_MS))] = 20
    state_save_ms: Annotated[StrictInt, AfterValidator(between(0, MAX_DELAY_MS))] = 0
    shutdown_ms: Annotated[StrictInt, AfterValidator(between(0, MAX_DELAY_MS))] = 1500
    fill_percent: Annotated[StrictInt, AfterValidator(between(0, 100))] = 25
    running: StrictBool = False

    def same_definition(self, other: GuestSpec) -> bool:
        """Same guest, same shape: only ``running`` may differ."""
        return self.model_dump(exclude={"running"}) == other.model_dump(exclude={"running"})


class GuestInfo(Message):
    """A guest as an agent reports it (``GET /v1/guests/{guest_id}``); ``workload`` is driver-specific."""

    guest_id: GuestId
    name: GuestName
    os_type: StrictStr
    os_status: OsStatus
    hardware_status: HardwareStatus
    memory_mib: Annotated[StrictInt, AfterValidator(between(1, MAX_MEMORY_MIB))]
    vcpus: Annotated[StrictInt, AfterValidator(between(1, MAX_VCPUS))]
    migrating: StrictStr | None = None
    workload: dict[str, Any] = Field(default_factory=dict)


def _grace_seconds(value: float | int) -> float:
    if isinstance(value, bool) or not 0 <= value <= MAX_GRACEFUL_STOP_S:
        raise PydanticCustomError(
            "seconds",
            "must be from 0 to {max} seconds, not {value}",
            {"max": MAX_GRACEFUL_STOP_S, "value": value},
        )
    return float(value)


class StopRequest(Message):
    """``POST /v1/guests/{guest_id}/stop``: how to stop the guest.

    ``graceful_timeout_s``: ask the guest's OS to shut down (QEMU: the ACPI power button; simulated:
    its writes stop, its I/O in flight completes, then ``GuestSpec.shutdown_ms``) and give it up to
    this many seconds, then stop it anyway (power cut). ``force``: the power cut at once. An empty
    body means ``force`` (what the first agents did); both at once is refused.
    """

    graceful_timeout_s: Annotated[StrictFloat | StrictInt, AfterValidator(_grace_seconds)] | None = None
    force: StrictBool = False

    @model_validator(mode="after")
    def _one_way(self) -> StopRequest:
        if self.force and self.graceful_timeout_s is not None:
            raise PydanticCustomError("stop", "must ask for either force or graceful_timeout_s, not both", {})
        return self


StopOutcome = Literal["shut_down", "timed_out", "forced", "already_off"]
"""How a stop ended: the guest shut down within its timeout; it did not and was forced off; a force
stop was asked; it was not running."""


class StoppedGuest(GuestInfo):
    """The reply to a stop: the guest as now, ``stop`` (how it ended) and ``stop_s`` (seconds it took).

    ``stop`` is None from an agent older than ``StopRequest`` (it stopped the guest at once).
    """

    stop: StopOutcome | None = None
    stop_s: Annotated[StrictFloat | StrictInt, Field(ge=0, le=MAX_LIMIT_S)] = 0.0


class GuestList(Message):
    guests: list[GuestInfo]


class Deleted(Message):
    deleted: GuestId


class Health(Message):
    name: StrictStr
    version: StrictStr
    driver: StrictStr
    guests: Annotated[StrictInt, AfterValidator(between(0, 1_000_000))] = 0
    # The longest the agent's event loop went without yielding lately (``hostagent.loopwatch``):
    # wall ms (includes the host's load) and the loop thread's CPU ms in that gap (the agent's own work).
    loop_stall_ms: float = 0.0
    loop_busy_ms: float = 0.0


# What a refusal is about, for decisions (the words of ``error`` are for people): the agent does not
# know the migration (it restarted, or never was told of it) or the guest (gone from this host).
ErrorCode = Literal["unknown_migration", "unknown_guest"]


class ErrorReply(Message):
    """Every refusal: ``{"error": "<plain words>", "code": <ErrorCode or absent>}`` with a 4xx/5xx status."""

    error: StrictStr
    code: ErrorCode | None = None


# -- migration requests -----------------------------------------------------------------------------


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


class DirtyRate(Message):
    """``GET /v1/guests/{guest_id}/dirty-rate?seconds=S``: the guest's dirty rate over ``seconds``.

    ``dirty_rate_bytes_s``: distinct bytes written per second; ``working_set_bytes``: the memory its
    writes land in, if known; ``written_bytes``: what a first pass would send.
    """

    guest_id: GuestId
    seconds: Seconds
    dirty_rate_bytes_s: ByteRate
    memory_bytes: Bytes
    written_bytes: Bytes | None = None
    working_set_bytes: Bytes | None = None


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


class IncomingRequest(Message):
    """``POST /v1/migrations/incoming`` on the target."""

    migration_id: MigrationId
    guest: GuestSpec
    limits: PhaseLimits = Field(default_factory=PhaseLimits)
    encryption: Encryption = "required"
    # The pair's stream policy, the same as the source's: the simulated target takes whatever count the
    # source announces (up to MAX_STREAMS); QEMU must set its multifd-channels before migrate-incoming.
    streams: Streams | None = None


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


# -- link probes ----------------------------------------------------------------------------------------

MAX_PROBE_BYTES = 64 << 20  # filler one probe may send: enough to fill any socket buffer on the way
MIN_PROBE_BYTES = 1 << 20
MAX_PROBE_S = 2.0  # how long the source may send filler; the whole probe ends within a few seconds
MIN_PROBE_S = 0.05


def _probe_seconds(value: float | int) -> float:
    if isinstance(value, bool) or not MIN_PROBE_S <= value <= MAX_PROBE_S:
        raise PydanticCustomError(
            "probe_seconds",
            "must be between {low} and {high} seconds, not {value}",
            {"low": MIN_PROBE_S, "high": MAX_PROBE_S, "value": value},
        )
    return float(value)


ProbeBytes = Annotated[StrictInt, AfterValidator(between(MIN_PROBE_BYTES, MAX_PROBE_BYTES))]
ProbeSeconds = Annotated[StrictFloat | StrictInt, AfterValidator(_probe_seconds)]


class ProbeRequest(Message):
    """``POST /v1/probes/incoming`` on the peer (receiving) agent: open a one-time probe listener.

    ``max_bytes`` (bytes, 1 MiB-64 MiB) and ``seconds`` (0.05-2 s) bound what the listener accepts;
    ``encryption`` is the pair's data-plane policy, as for a migration.
    """

    encryption: Encryption = "required"
    max_bytes: ProbeBytes = MAX_PROBE_BYTES
    seconds: ProbeSeconds = 0.5


class PreparedProbe(Message):
    """The receiving agent's answer to ``ProbeRequest``: its probe listener, one-time token and bounds."""

    data_host: Annotated[StrictStr, AfterValidator(chars(255, "a host name or address"))]
    data_port: Annotated[StrictInt, AfterValidator(between(1, 65535))]
    token: Annotated[StrictStr, AfterValidator(chars(512, "a token"))]
    max_bytes: ProbeBytes
    seconds: ProbeSeconds

    def endpoint(self) -> Endpoint:
        return Endpoint(host=self.data_host, port=self.data_port, token=self.token)


class ProbeRun(Message):
    """``POST /v1/probes/outgoing`` on the sending agent: probe the prepared ``target`` now.

    ``max_bytes`` and ``seconds`` must not exceed what the target granted (it refuses more).
    """

    target: Endpoint
    encryption: Encryption = "required"
    max_bytes: ProbeBytes = MAX_PROBE_BYTES
    seconds: ProbeSeconds = 0.5


class ProbeResult(Message):
    """A probe's measurement: ``bytes`` the peer received in ``seconds`` (the sender's wall clock, from the
    first filler byte to the peer's receipt), so ``rate_bytes_s`` = bytes / seconds (bytes/s)."""

    bytes: Bytes
    seconds: Annotated[StrictFloat | StrictInt, Field(gt=0, le=60, allow_inf_nan=False)]
    rate_bytes_s: ByteRate
    encryption: Encryption


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
    change. When the side gave up (``FAILED_STATES``): ``error`` says why in words, ``failure_kind``
    says why for decisions, ``failed_phase`` where, ``failed_side`` which host noticed first (this
    side, or the peer that told it), ``failed_after_s`` how long the failed phase had run (s).
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
    streams: Streams | None = None  # parallel data-plane connections in use (None: not connected yet)
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


# -- turning validation errors into plain words -------------------------------------------------------

M = TypeVar("M", bound=BaseModel)
UNION_TAG = re.compile(r"int|float|str|bool|none|[a-z-]+\[.*\]")


class ProtocolViolation(ValueError):
    """A message that is not what the protocol promises; ``str()`` is plain words for people."""


def plain_words(error: ValidationError, what: str = "the request body") -> str:
    """The first problem of ``error`` as one sentence, e.g. "memory_mib must be between 1 and 8, not 9"."""
    first = error.errors(include_url=False)[0]
    # Unions add a tag per member to the location ("bandwidth_mbps.float"): people need the field.
    path = [str(part) for part in first["loc"] if not UNION_TAG.fullmatch(str(part))]
    where = ".".join(path) or what
    kind = first["type"]
    if kind == "missing":
        return f"{where} is required"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"{where} must be a JSON object"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{where} must be a whole number"
    if kind in ("bool_type", "bool_parsing"):
        return f"{where} must be true or false"
    if kind in ("float_type", "float_parsing"):
        return f"{where} must be a number"
    if kind in ("string_type",):
        return f"{where} must be a text"
    if kind == "json_invalid":
        return f"{what} is not valid JSON"
    message = first["msg"]
    if kind in (
        "literal_error",
        "enum",
        "greater_than",
        "less_than_equal",
        "greater_than_equal",
        "less_than",
    ):
        message = message[0].lower() + message[1:]
        return f"{where}: {message}"
    return f"{where} {message}"


def load_json(raw: bytes | bytearray | str, what: str = "the request body") -> Any:
    """``raw`` decoded as JSON; anything that is not (bad UTF-8, bad syntax, nesting deep enough to
    exhaust the parser's recursion) is ``ProtocolViolation``, never another exception."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolViolation(f"{what} is not valid JSON") from None


def parse(model: type[M], body: bytes | str | dict[str, Any] | Any, what: str = "the request body") -> M:
    """``body`` (JSON text or already-decoded JSON) as ``model``; ``ProtocolViolation`` in plain words."""
    try:
        if isinstance(body, bytes | str):
            return model.model_validate_json(body)
        return model.model_validate(body)
    except ValidationError as error:
        raise ProtocolViolation(plain_words(error, what)) from None
