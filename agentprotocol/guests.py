"""Guests: what defines one, how an agent reports one, stopping one, and the agent's own health."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator
from pydantic_core import PydanticCustomError

from .base import (
    MAX_DELAY_MS,
    MAX_GRACEFUL_STOP_S,
    MAX_LIMIT_S,
    MAX_MEMORY_MIB,
    MAX_VCPUS,
    ByteRate,
    Bytes,
    GuestId,
    GuestName,
    Message,
    Seconds,
    between,
    chars,
)
from .storage import MAX_DISKS, MAX_NICS, DiskInfo, DiskSpec, NicSpec, check_unique_devices

OsStatus = Literal["up", "down", "initializing", "in_efi"]
HardwareStatus = Literal["on", "off", "not_runnable"]


class GuestSpec(Message):
    """What defines a guest (``PUT /v1/guests/{guest_id}``, and the guest of an incoming migration).

    ``dirty_pages_per_s`` is the simulated workload's write rate (pages/s), ``fill_percent`` how much
    of memory it fills at boot; ``io_latency_ms`` (one simulated I/O, so Quiesce can be slow) and
    ``state_save_ms`` (saving vCPU/device state, so Frozen can be slow) exist for tests;
    ``shutdown_ms`` is how long the simulated OS takes to shut down once asked (after its I/O in
    flight completed; a graceful stop with a shorter timeout is forced). Other drivers may ignore
    all five. ``running`` is a wish (start it once defined), not part of the
    definition. ``disks`` (volumes in the host's pools) and ``nics`` (cards on its networks): no two
    disks on one device or volume, no two cards with one MAC.
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
    disks: Annotated[list[DiskSpec], Field(max_length=MAX_DISKS)] = Field(default_factory=list)
    nics: Annotated[list[NicSpec], Field(max_length=MAX_NICS)] = Field(default_factory=list)
    running: StrictBool = False

    @model_validator(mode="after")
    def _unique_devices(self) -> GuestSpec:
        check_unique_devices(self.disks, self.nics)
        return self

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
    disks: list[DiskInfo] = Field(default_factory=list)
    nics: list[NicSpec] = Field(default_factory=list)
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
    # The host's memory guests may use (MiB) and its CPUs, as the agent knows them (None: an older
    # agent, or not known): what the console proposes when an admin adds the VSP.
    memory_mib: Annotated[StrictInt, AfterValidator(between(0, 1 << 40))] | None = None
    cpus: Annotated[StrictInt, AfterValidator(between(0, 1 << 20))] | None = None
    # The driver's hypervisor commits a migration by itself at the switchover (libvirt's peer-to-peer
    # migration): no "ready, the source could resume" point; a cancel after the switchover answers 409.
    switchover_commits: StrictBool = False
    # The driver mirrors a guest's disks on local pools during a migration (``LocalDisks`` "mirror"), as
    # source and as target: the console offers such a guest a move only between two agents that say so
    # (an older agent, or a driver that cannot, leaves it False: the console refuses with that reason).
    mirrors_local_disks: StrictBool = False


# What a refusal is about, for decisions (the words of ``error`` are for people): the agent does not
# know the migration (it restarted, or never was told of it) or the guest (gone from this host).
ErrorCode = Literal["unknown_migration", "unknown_guest"]


class ErrorReply(Message):
    """Every refusal: ``{"error": "<plain words>", "code": <ErrorCode or absent>}`` with a 4xx/5xx status."""

    error: StrictStr
    code: ErrorCode | None = None


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
