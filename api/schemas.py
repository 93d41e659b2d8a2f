"""The API's typed shapes (pydantic via django-ninja); units are in the names (``_mib``, ``_ms``, ``_s``).

Every ``*_out`` builder reads what the pages read (``vms.general_tab``, ``vms.status``,
``migrations_app.progress``) so the API and the General tab never disagree.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Annotated, Any, Literal

from ninja import Field, Schema
from pydantic import ConfigDict, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from migrations_app import migration_policy
from migrations_app.access import HIDDEN_VSP_NAME, hide_unseen, hide_unseen_events
from migrations_app.downtime import allowed_for, downtime_excess
from migrations_app.limits import phase_limits_of
from migrations_app.models import Migration, MigrationEvent
from vms.define import DISK_MAX_BYTES, DISK_MIN_BYTES, disk_size_refusal
from vms.devices import places_seen
from vms.general_tab import general_tab_context
from vms.models import VSP, Registration, VirtualMachine
from vms.status import online_migration_status


class Choice(Schema):
    """A coded value with the words the page shows for it."""

    value: str
    label: str


class VSPOut(Schema):
    id: int
    name: str
    migration_enabled: bool
    licensed: bool
    processor_family: str
    processor_model: str
    memory_mib: int
    cpus: int
    agent_reachable: bool
    agent_checked_at: datetime | None
    # When the VSP was marked unreachable (after 3 unanswered inventory collections, or a migration's
    # failed call); null while it is reachable.
    unreachable_since: datetime | None
    agent_problem: str = Field(
        description=(
            "Why its agent's last call failed ('TLS certificate not trusted (SHA-256 fingerprint ...)', "
            "'agent not running (connection refused)', 'no answer in 10 s'); empty once it answers"
        )
    )
    maintenance: bool
    maintenance_since: datetime | None
    resources_collected_at: datetime | None = Field(
        None, description="When its agent last reported pools and networks; null: not known (an older agent)"
    )
    pools: list[PoolOut] = Field(default_factory=list, description="Its storage pools, with free space")
    networks: list[NetworkOut] = Field(default_factory=list)


class PoolOut(Schema):
    """A storage pool of a VSP as its agent last reported it (bytes); ``identity`` is equal on every VSP
    that mounts the same shared storage."""

    name: str
    kind: str = Field(description="'shared' | 'local'")
    identity: str
    capacity_bytes: int
    free_bytes: int
    location: str


class NetworkOut(Schema):
    name: str
    kind: str = Field(description="'bridge' | 'user' | 'simulated'")
    bridge: str


class DiskOut(Schema):
    """A disk of a VM: a volume in a pool of the VSP it runs on (bytes). ``pool`` and ``pool_identity``
    are null for a caller who may not see that VSP (another host group's: ``vms.devices.places_seen``)."""

    device: str
    pool: str | None
    pool_identity: str | None
    volume: str
    virtual_size_bytes: int
    allocated_bytes: int
    format: str
    bus: str
    read_only: bool
    shareable: bool
    boot: bool


class NicOut(Schema):
    index: int = Field(description="nic 0, nic 1, ... as the pre-checks name them")
    network: str | None = Field(
        description="A network of the VSP the VM runs on; null for a caller who may not see that VSP"
    )
    mac: str
    model: str


class RegistrationOut(Schema):
    """One VM's configuration on one VSP (a "copy"); only one copy is runnable at a time."""

    vsp: str
    vsp_id: int
    runnable: bool
    hardware_status: Choice
    os_status: Choice
    not_runnable_set_by: Choice
    not_runnable_reason: str
    online_migration: Choice
    state_collected_at: datetime | None
    lost_since: datetime | None = Field(
        default=None, description="Lost: since when its host no longer reports the guest (null: not lost)"
    )


class PhaseOut(Schema):
    phase: str = Field(description="init, copy, io_quiesce or frozen")
    label: str
    percent: int = Field(ge=0, le=100)
    status: str = Field(description="pending, running, done or failed")
    started_at: datetime | None
    ended_at: datetime | None
    limit_s: int | None = Field(
        description="The phase's time limit it ran under (s; null: unlimited), kept when it was requested"
    )
    limit_recorded: bool = Field(
        description="false for a migration from before limits were kept: limit_s is then the VM's of today"
    )


class StatisticsOut(Schema):
    bytes_sent: int
    bytes_remaining: int
    rounds: int
    dirty_rate_bytes_s: int
    throughput_bytes_s: int = Field(description="The source agent's own figure (some agents average it)")
    recent_throughput_bytes_s: int = Field(
        description="Memory bytes sent per second over the last 5 s, as the console measured them (the live "
        "rate)"
    )
    expected_downtime_ms: int | None
    downtime_ms: int | None = Field(description="Measured time the guest was frozen (Frozen phase)")
    disk_bytes_total: int = Field(
        0, description="Local disks mirrored (live storage migration): data to copy (bytes; 0: no mirror)"
    )
    disk_bytes_sent: int = Field(0, description="Of the mirrored disks: bytes sent so far")
    disk_bytes_remaining: int = Field(0, description="Of the mirrored disks: bytes left to send")
    disk_dirty_rate_bytes_s: int = Field(0, description="How fast the guest writes its mirrored disks")
    disk_throughput_bytes_s: int = Field(0, description="The disk mirror's throughput (bytes/s)")


class EventOut(Schema):
    at: datetime
    from_state: str
    to_state: str
    message: str
    actor: str | None


class MigrationOut(Schema):
    id: int
    vm: str  # the VM's name when it was requested, if the VM was deleted since
    vm_id: int | None  # None once the VM was deleted
    source: str | None  # None for a refused attempt of a VM that was runnable nowhere
    source_id: int | None  # also None where the caller may not see that VSP (another host group's)
    target: str
    target_id: int | None  # None where the caller may not see that VSP (another host group's)
    state: Choice
    active: bool
    requested_by: str | None
    requested_at: datetime
    state_changed_at: datetime
    cancel_requested: bool
    phases: list[PhaseOut]
    statistics: StatisticsOut
    failed_phase: str
    failure_kind: str
    alert: str = Field(description="What went wrong, in the words of the General tab's Alerts")
    allowed_downtime_ms: int = Field(description="The downtime its policy allowed (ms), as it ran")
    downtime_over: str = Field(
        description="A downtime over the allowed one: by how much and why, in the report's words ('' if not)"
    )
    warning: str = Field(
        description="While it runs: what holds it up now (no progress; a host the roll forward cannot reach)"
    )
    release_pending: bool = Field(
        description="Completed while its source had not answered the release of its copy (asked again)"
    )
    policy: dict[str, Any] = Field(
        description="The effective migration policy (migrations_app.migration_policy)"
    )


class MigrationStartedOut(MigrationOut):
    forecast_warning: str = Field(
        description="Why it is forecast not to converge under its policy (the guest's dirty rate against "
        "what the link or the cap carries, where it would stop), as the Migrate dialog asks the admin to "
        "confirm; '' when it is not. The API starts it all the same."
    )


class MigrationChangedOut(MigrationOut):
    done: str = Field(description="What was done, in the words the page shows")


class MigrationDetailOut(MigrationOut):
    events: list[EventOut]


class VMOut(Schema):
    """The VM Properties General tab: every field it shows, plus the online migration status."""

    id: int
    name: str
    guest_id: str
    kind: Choice
    vsp: str | None = Field(
        description="Where the VM is runnable now (None: nowhere, or on a VSP outside your host groups)"
    )
    vsp_id: int | None
    operating_system: str
    os_status: Choice
    migration_icon: str = Field(description="'' | 'queued' (hourglass) | 'outgoing' (to another VSP)")
    hardware_status: Choice | None
    lost_since: datetime | None = Field(
        default=None, description="Lost: since when its host no longer reports the guest (null: not lost)"
    )
    host_unreachable: str = Field(
        default="",
        description="The statuses are only the last reported when the copy's host does not answer: "
        "'as last reported: vsp2 unreachable since 20:13:05' (console's local time); '' while it answers",
    )
    boot_attribute: Choice
    graceful_stop_timeout_s: int
    online_migration: Choice = Field(description="Online Migration Enabled, as the General tab shows it")
    online_migration_enabled_for_vm: bool
    not_runnable_set_by: Choice
    not_runnable_reason: str
    memory_mib: int
    vcpus: int
    phase_time_limits_s: dict[str, int | None]
    registrations: list[RegistrationOut]
    disks: list[DiskOut] = Field(default_factory=list, description="The Storage tab")
    nics: list[NicOut] = Field(default_factory=list, description="The Network tab")
    migration: MigrationOut | None = Field(description="Online Migration Phases: active or just completed")
    alert: MigrationOut | None = Field(
        description="Alerts: the last attempt, when it failed or was cancelled"
    )


# What an admin types: an id (a number) or a name.
IdOrName = Annotated[str, Field(min_length=1, max_length=64)]


# Every input shape refuses a field it does not know (422 naming it), rather than ignoring it: a setting
# sent in the wrong place would otherwise be dropped silently.
INPUT_CONFIG = ConfigDict(strict=True, extra="forbid")  # strict: no 0 for false, no 5 for "5"

Whole = Annotated[int, Field(ge=1, le=migration_policy.MAX_DOWNTIME_MS)]
# The bounds of the forms' field (``migration_policy.INPUT_BOUNDS``); a value out of them never reaches
# pydantic's own check: the fields' validator refuses it first, in the dialog's words.
_CAP_LOW, _CAP_HIGH, _CAP_STEP = migration_policy.INPUT_BOUNDS["bandwidth_cap_mb_s"]
BandwidthCap = Annotated[float, Field(ge=_CAP_LOW, le=_CAP_HIGH, json_schema_extra={"multipleOf": _CAP_STEP})]
TEXT_SETTINGS = frozenset({"preset", "at_limit"})  # the only settings whose values are words


def policy_value(field: str, value: Any) -> Any:
    """A policy setting from JSON, checked by ``migration_policy.check_value`` (the dialog's words).

    Raises ``ValueError`` (shown as a 422 at the setting's place): out of bounds, not a whole number
    where one is needed, or a number or true/false sent as text.
    """
    checked = migration_policy.check_value(field, value)
    if isinstance(value, str) and field not in TEXT_SETTINGS:  # passed as form text ("5", "on")
        kind = "true or false" if field == "auto_converge" else "a number"
        raise ValueError(f"send {kind}, not the text {value[:40]!r}.")
    return checked


class PolicyIn(Schema):
    """Overrides of the VM's migration policy for one migration, as in the Migrate dialog: a ``preset``
    (taken whole unless ``custom``) or values; what is not sent comes from the VM's own policy."""

    model_config = INPUT_CONFIG

    preset: (
        Literal["default", "minimal_downtime", "guaranteed_completion", "custom"] | SkipJsonSchema[None]
    ) = Field(None, description="A named policy; another preset than custom ignores the values")
    max_downtime_ms: Whole | SkipJsonSchema[None] = Field(None, description="Allowed downtime (ms), whole")
    bandwidth_cap_mb_s: BandwidthCap | None = Field(None, description="MB/s (10^6 bytes); 0 or null: no cap")
    auto_converge: bool | SkipJsonSchema[None] = Field(None, description="Throttle the guest if Copy stalls")
    throttle_max_pct: Annotated[int, Field(ge=1, le=99)] | SkipJsonSchema[None] = Field(
        None, description="The throttle's ceiling (% of vCPU time), whole"
    )
    downtime_step_ms: Annotated[int, Field(ge=0, le=migration_policy.MAX_DOWNTIME_MS)] | None = Field(
        None, description="Raise the allowed downtime by this much per stalled round (ms); 0: never"
    )
    downtime_max_ms: Whole | None = Field(None, description="... up to this (ms); needed with a step")
    at_limit: Literal["abort", "switchover"] | SkipJsonSchema[None] = Field(
        None, description="At the round or Copy time limit: abort (the guest stays) or switch over"
    )
    no_progress_s: (
        Annotated[int, Field(ge=1, le=migration_policy.MAX_NO_PROGRESS_S)] | SkipJsonSchema[None]
    ) = Field(None, description="The no-progress limit (s): a phase in which nothing moves this long aborts")

    @field_validator(*migration_policy.FIELDS, mode="before")
    @classmethod
    def in_the_dialogs_words(cls, value: Any, info: Any) -> Any:
        return policy_value(info.field_name, value)


class MigrationIn(Schema):
    model_config = INPUT_CONFIG

    vm: IdOrName = Field(description="VM id or name, as text")
    target: IdOrName = Field(description="Target VSP id or name, as text")
    policy: PolicyIn | None = Field(
        default=None,
        description=(
            "Overrides of the VM's migration policy for this migration (nested here, not beside vm and "
            'target), e.g. {"max_downtime_ms": 500, "auto_converge": true}'
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def policy_settings_go_under_policy(cls, data: Any) -> Any:
        """A policy setting sent beside ``vm`` is refused with where it belongs (not as merely unknown)."""
        if isinstance(data, dict):
            misplaced = [key for key in data if key in migration_policy.FIELDS]
            if misplaced:
                raise ValueError(
                    f'{", ".join(misplaced)}: a policy setting goes inside "policy", e.g. '
                    f'{{"vm": ..., "target": ..., "policy": {{"{misplaced[0]}": ...}}}}.'
                )
        return data

    def policy_overrides(self) -> dict[str, Any] | None:
        """The settings sent (for ``do_request_migration``), or None when no policy was sent."""
        return None if self.policy is None else self.policy.model_dump(exclude_unset=True)


class PolicyChangeIn(Schema):
    """A change to a running migration's policy (Init or Copy): any of these at once, the rest unchanged.

    A value out of bounds or not a number is refused (422) with the Migrate dialog's words, before
    anything is sent to the agent (``migrations_app.steering.check_change`` checks it again).
    """

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"minProperties": 1})

    max_downtime_ms: Whole | SkipJsonSchema[None] = Field(
        None, description="The allowed downtime (ms), whole; raising it lets a stalled Copy finish"
    )
    bandwidth_cap_mb_s: BandwidthCap | None = Field(
        None, description="The bandwidth cap (MB/s, 10^6 bytes); 0 or null: no cap"
    )
    auto_converge: bool | SkipJsonSchema[None] = Field(
        None, description="Throttle the guest's vCPUs stepwise while Copy stalls (true) or stop (false)"
    )

    @field_validator("max_downtime_ms", "bandwidth_cap_mb_s", "auto_converge", mode="before")
    @classmethod
    def in_the_dialogs_words(cls, value: Any, info: Any) -> Any:
        """A bad value is refused with the dialog's words (``PolicyError`` is a ``ValueError``)."""
        return policy_value(info.field_name, value)


class OnlineMigrationIn(Schema):
    model_config = INPUT_CONFIG

    enabled: bool


class NotRunnableIn(Schema):
    model_config = INPUT_CONFIG

    reason: str = Field(max_length=1000, description="Why, in plain words (at most 200 characters kept)")


def choice(value: str, label: str) -> Choice:
    return Choice(value=value, label=label)


def vsp_out(vsp: VSP) -> VSPOut:
    # ``.all()`` sorted here: a list prefetches both (``list_vsps``), so a page costs two queries in all.
    pools = sorted(vsp.pools.all(), key=lambda pool: pool.name)
    networks = sorted(vsp.networks.all(), key=lambda network: network.name)
    fields = {name: getattr(vsp, name) for name in VSPOut.model_fields if name not in ("pools", "networks")}
    return VSPOut(
        **fields,
        pools=[PoolOut.model_validate(pool, from_attributes=True) for pool in pools],
        networks=[NetworkOut.model_validate(network, from_attributes=True) for network in networks],
    )


def registration_out(registration: Registration) -> RegistrationOut:
    status = online_migration_status(registration.vm, registration.vsp)
    return RegistrationOut(
        vsp=registration.vsp.name,
        vsp_id=registration.vsp_id,
        runnable=registration.is_runnable,
        hardware_status=choice(registration.hardware_status, registration.get_hardware_status_display()),
        os_status=choice(registration.os_status, registration.get_os_status_display()),
        not_runnable_set_by=choice(
            registration.not_runnable_set_by, registration.get_not_runnable_set_by_display()
        ),
        not_runnable_reason=registration.not_runnable_reason,
        online_migration=choice(status.value, status.label),
        state_collected_at=registration.state_collected_at,
        lost_since=registration.lost_since,
    )


def phases_out(migration: Migration) -> list[PhaseOut]:
    rows = []
    limits = phase_limits_of(migration)
    for phase, (label, percent, status) in zip(Migration.PHASES, migration.phase_rows(), strict=True):
        prefix = {"init": "init", "copy": "copy", "io_quiesce": "quiesce", "frozen": "frozen"}[phase]
        rows.append(
            PhaseOut(
                phase=phase,
                label=label,
                percent=percent,
                status=status,
                started_at=getattr(migration, f"{prefix}_started_at"),
                ended_at=getattr(migration, f"{prefix}_ended_at"),
                limit_s=limits.of(phase),
                limit_recorded=limits.recorded,
            )
        )
    return rows


def migration_out(migration: Migration) -> MigrationOut:
    return MigrationOut(**_migration_fields(migration))


def migration_started_out(migration: Migration, forecast_warning: str) -> MigrationStartedOut:
    """A migration just started (or an idempotent replay of it) with its ``forecast_warning``."""
    return MigrationStartedOut(**_migration_fields(migration), forecast_warning=forecast_warning)


def migration_changed_out(migration: Migration, done: str) -> MigrationChangedOut:
    return MigrationChangedOut(**_migration_fields(migration), done=done)


def migration_detail_out(
    migration: Migration, seen_vsp_ids: frozenset[int] | None = None
) -> MigrationDetailOut:
    """``migration`` with its timeline, as a user who sees the VSPs ``seen_vsp_ids`` (``None``: all) may
    read it: where he sees one end only, the other end's VSP and who acted are not named, in its fields
    (``access.hide_unseen``) and its events' words and actors (``access.hide_unseen_events``), as the
    report page shows them."""
    events = hide_unseen_events(migration, migration.events.select_related("actor"), seen_vsp_ids)
    shown = hide_unseen(migration, seen_vsp_ids) or migration
    return MigrationDetailOut(**_migration_fields(shown), events=[event_out(event) for event in events])


def _seen_vsp_id(vsp: VSP | None) -> int | None:
    """``vsp``'s id, or None for no VSP or the stand-in of one the caller may not see
    (``access.hide_unseen``): its id would name it as surely as its name."""
    return None if vsp is None or vsp.name == HIDDEN_VSP_NAME else vsp.pk


def _migration_fields(migration: Migration) -> dict:
    return {
        "id": migration.pk,
        "policy": migration.policy or {},
        "vm": migration.vm.name if migration.vm is not None else migration.vm_name,
        "vm_id": migration.vm_id,
        "source": migration.source.name if migration.source is not None else None,
        "source_id": _seen_vsp_id(migration.source),
        "target": migration.target.name,
        "target_id": _seen_vsp_id(migration.target),
        "state": choice(migration.state, migration.get_state_display()),
        "active": migration.is_active,
        "requested_by": migration.requested_by.get_username() if migration.requested_by else None,
        "requested_at": migration.requested_at,
        "state_changed_at": migration.state_changed_at,
        "cancel_requested": migration.cancel_requested,
        "phases": phases_out(migration),
        "statistics": StatisticsOut.model_validate(migration, from_attributes=True),
        "failed_phase": migration.failed_phase,
        "failure_kind": migration.failure_kind,
        "alert": migration.alert,
        "allowed_downtime_ms": allowed_for(migration),
        "downtime_over": excess.sentence if (excess := downtime_excess(migration)) else "",
        "warning": migration.warning,
        "release_pending": migration.release_pending,
    }


def event_out(event: MigrationEvent) -> EventOut:
    return EventOut(
        at=event.at,
        from_state=event.from_state,
        to_state=event.to_state,
        message=event.message,
        actor=event.actor.get_username() if event.actor else None,
    )


def vm_out(vm: VirtualMachine, seen_vsp_ids: Collection[int] | None = None) -> VMOut:
    """``vm`` with ``registrations__vsp`` prefetched (``vms.queries.vm_with_registrations``), as a user
    who sees the VSPs ``seen_vsp_ids`` (``None``: all; ``api.routes.seen_vsp_ids``) may see it: only his
    VSPs' copies, and of a migration only one touching them, another group's VSP and the requester
    unnamed (as the General tab)."""
    context = general_tab_context(vm, None, seen_vsp_ids, seen_vsp_ids)
    shown: Registration | None = context["registration"]
    vsp: VSP | None = context["vsp"]
    runnable = vm.runnable_registration
    if seen_vsp_ids is not None and runnable is not None and runnable.vsp_id not in seen_vsp_ids:
        vsp = None  # it runs on a VSP he may not see: not named, and his copy is not where it runs
    status = context["online_migration"]
    migration: Migration | None = context.get("migration")
    failed: Migration | None = context.get("failed_migration")
    not_runnable_here = shown if shown is not None and not shown.is_runnable else None
    set_by = not_runnable_here.not_runnable_set_by if not_runnable_here else ""
    disks, nics = devices_out(vm, seen_vsp_ids)
    return VMOut(
        id=vm.pk,
        name=vm.name,
        guest_id=str(vm.guest_id),
        kind=choice(vm.kind, vm.get_kind_display()),
        vsp=vsp.name if vsp else None,
        vsp_id=vsp.pk if vsp else None,
        operating_system=vm.os_type,
        os_status=choice(shown.os_status, shown.get_os_status_display())
        if shown
        else choice(vm.os_status, vm.get_os_status_display()),
        migration_icon=_migration_icon(migration),
        hardware_status=choice(shown.hardware_status, shown.get_hardware_status_display()) if shown else None,
        lost_since=shown.lost_since if shown is not None and shown.is_lost else None,
        host_unreachable=shown.unreachable_note() if shown is not None else "",
        boot_attribute=choice(vm.boot_attribute, vm.get_boot_attribute_display()),
        graceful_stop_timeout_s=vm.graceful_stop_timeout_s,
        online_migration=choice(status.value, status.label),
        online_migration_enabled_for_vm=vm.online_migration_enabled,
        not_runnable_set_by=choice(set_by, Registration.SetBy(set_by).label),
        not_runnable_reason=not_runnable_here.not_runnable_reason if not_runnable_here else "",
        memory_mib=vm.memory_mib,
        vcpus=vm.vcpus,
        phase_time_limits_s={
            "init": vm.init_limit_s,
            "copy": vm.copy_limit_s,
            "io_quiesce": vm.quiesce_limit_s,
            "frozen": vm.frozen_limit_s,
        },
        registrations=[
            registration_out(r)
            for r in vm.registrations.all()
            if seen_vsp_ids is None or r.vsp_id in seen_vsp_ids
        ],
        disks=disks,
        nics=nics,
        migration=migration_out(migration) if migration else None,
        alert=migration_out(failed) if failed else None,
    )


def devices_out(
    vm: VirtualMachine, seen_vsp_ids: Collection[int] | None
) -> tuple[list[DiskOut], list[NicOut]]:
    """``vm``'s disks and cards; their pools and networks null unless the caller may see the VSP they are
    on (``vms.devices.places_seen``)."""
    disks = [DiskOut.model_validate(disk, from_attributes=True) for disk in vm.disks.order_by("device")]
    nics = [NicOut.model_validate(nic, from_attributes=True) for nic in vm.nics.order_by("index")]
    if places_seen(vm, seen_vsp_ids):
        return disks, nics
    return (
        [disk.model_copy(update={"pool": None, "pool_identity": None}) for disk in disks],
        [nic.model_copy(update={"network": None}) for nic in nics],
    )


def _migration_icon(migration: Migration | None) -> str:
    if migration is None or not migration.is_active:
        return ""
    return "queued" if migration.is_queued else "outgoing"


class VSPPage(Schema):
    items: list[VSPOut]
    count: int = Field(description="How many match, over all pages")
    limit: int
    offset: int


class VMPage(Schema):
    items: list[VMOut]
    count: int
    limit: int
    offset: int


class MigrationPage(Schema):
    items: list[MigrationOut]
    count: int
    limit: int
    offset: int


# Unknown fields refused; numbers as JSON Schema reads "integer" (20.0 is 20).
DEFINE_CONFIG = ConfigDict(extra="forbid")


class DiskIn(Schema):
    """A disk of a VM to define: a new volume of ``size_bytes`` in ``pool``, or ``image``: the name of a
    volume already in ``pool`` (a name, never a path)."""

    model_config = DEFINE_CONFIG

    pool: str = Field(min_length=1, max_length=64)
    size_bytes: int | None = Field(
        None,
        description="A new volume's size in bytes",
        json_schema_extra={"minimum": DISK_MIN_BYTES, "maximum": DISK_MAX_BYTES},
    )
    image: str = Field("", max_length=200)

    @field_validator("size_bytes")
    @classmethod
    def in_the_consoles_words(cls, value: int | None) -> int | None:
        """A size out of ``vms.define``'s bounds is refused with its words (the page's)."""
        if value is not None and (refusal := disk_size_refusal(value)):
            raise ValueError(refusal[0].upper() + refusal[1:] + ".")
        return value


class NicIn(Schema):
    """A network card: on ``network`` of the VSP; ``mac`` empty: generated (unique in the console)."""

    model_config = DEFINE_CONFIG

    network: str = Field(min_length=1, max_length=64)
    mac: str = Field("", max_length=32)


class VMDefineIn(Schema):
    """A VM to define on ``vsp`` (id or name), with its disks (vda, vdb, ...) and cards (nic 0, ...)."""

    model_config = DEFINE_CONFIG

    name: str = Field(min_length=1, max_length=64)
    vsp: IdOrName
    memory_mib: int = Field(ge=1, le=4 * 1024 * 1024)
    vcpus: int = Field(1, ge=1, le=256)
    os_type: str = Field("", max_length=64)
    disks: list[DiskIn] = Field(default_factory=list, max_length=16)
    nics: list[NicIn] = Field(default_factory=list, max_length=8)
