"""The migration record: one row per attempt to move a VM from a source VSP to a target VSP.

State changes go only through ``migrations_app.transitions.transition`` (compare-and-set, one event row each).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from vms.models import VSP, VirtualMachine


class Migration(models.Model):
    class State(models.TextChoices):
        QUEUED = "queued", "Queued"
        INIT = "init", "Init"
        COPY = "copy", "Copy"
        IO_QUIESCE = "io_quiesce", "I/O Quiesce"
        FROZEN = "frozen", "Frozen"
        COMMITTING = "committing", "Committing"
        COMPLETED = "completed", "Completed"
        ABORTED = "aborted", "Aborted"
        CANCELLED = "cancelled", "Cancelled"
        # Never started: the pre-check or the one-active constraint said no. Created in this state
        # (``migrations_app.history.record_refusal``), never transitioned into or out of.
        REFUSED = "refused", "Refused"

    ACTIVE_STATES = (
        State.QUEUED,
        State.INIT,
        State.COPY,
        State.IO_QUIESCE,
        State.FROZEN,
        State.COMMITTING,
    )
    TERMINAL_STATES = (State.COMPLETED, State.ABORTED, State.CANCELLED, State.REFUSED)
    PHASES = (State.INIT, State.COPY, State.IO_QUIESCE, State.FROZEN)
    # States before the commit point: a failure here aborts; from COMMITTING on, only roll forward.
    ABORTABLE_STATES = (State.QUEUED, State.INIT, State.COPY, State.IO_QUIESCE, State.FROZEN)

    # SET_NULL: deleting a VM keeps its migrations and their events; ``vm_name`` keeps what it was called.
    vm = models.ForeignKey(
        "vms.VirtualMachine", null=True, blank=True, on_delete=models.SET_NULL, related_name="migrations"
    )
    vm_name = models.CharField(max_length=255, blank=True, help_text="The VM's name when it was requested")
    # Null only for a refused attempt of a VM that was runnable nowhere.
    source = models.ForeignKey(
        "vms.VSP", null=True, blank=True, on_delete=models.PROTECT, related_name="outgoing_migrations"
    )
    target = models.ForeignKey("vms.VSP", on_delete=models.PROTECT, related_name="incoming_migrations")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_at = models.DateTimeField(default=timezone.now)
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    state_changed_at = models.DateTimeField(default=timezone.now)
    cancel_requested = models.BooleanField(default=False)
    cancel_requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    init_percent = models.PositiveSmallIntegerField(default=0)
    copy_percent = models.PositiveSmallIntegerField(default=0)
    quiesce_percent = models.PositiveSmallIntegerField(default=0)
    frozen_percent = models.PositiveSmallIntegerField(default=0)

    init_started_at = models.DateTimeField(null=True, blank=True)
    init_ended_at = models.DateTimeField(null=True, blank=True)
    copy_started_at = models.DateTimeField(null=True, blank=True)
    copy_ended_at = models.DateTimeField(null=True, blank=True)
    quiesce_started_at = models.DateTimeField(null=True, blank=True)
    quiesce_ended_at = models.DateTimeField(null=True, blank=True)
    frozen_started_at = models.DateTimeField(null=True, blank=True)
    frozen_ended_at = models.DateTimeField(null=True, blank=True)

    bytes_sent = models.BigIntegerField(default=0)
    bytes_remaining = models.BigIntegerField(default=0)
    rounds = models.BigIntegerField(default=0)
    dirty_rate_bytes_s = models.BigIntegerField(default=0)
    throughput_bytes_s = models.BigIntegerField(default=0)  # the source agent's own figure
    # Memory bytes sent per second over the last few seconds (``samples.RecentRate``), measured by the
    # worker from the agent's bytes sent: the phases panel's live rate (an agent may report an average).
    recent_throughput_bytes_s = models.BigIntegerField(default=0)
    expected_downtime_ms = models.IntegerField(null=True, blank=True)
    downtime_ms = models.IntegerField(null=True, blank=True)
    # Auto-converge's throttle in force now (percent of the guest's vCPU time taken away), as the source
    # agent last reported it: the live forecast continues from it (``steering.outlook``).
    throttle_pct = models.PositiveSmallIntegerField(default=0)
    # I/O Quiesce as the source reported it: guest I/O requests outstanding when it began and how long
    # they took to complete (ms); the network blackout a client of the guest saw (the longest gap in its
    # heartbeats around the switchover, ms). Null: not reported (an older agent, or no disk / no card).
    io_outstanding = models.PositiveIntegerField(null=True, blank=True)
    io_drain_ms = models.FloatField(null=True, blank=True)
    network_blackout_ms = models.FloatField(null=True, blank=True)
    # The mirror of the guest's local disks (live storage migration; all 0 / None without one), as the
    # source agent last reported it (``agentprotocol.ProgressSnapshot.disk_*``): the data to copy, what
    # went, what is left (bytes), the guest's write rate to them and the disk stream's throughput
    # (bytes/s); ``disk_ready_at``: when every mirror caught up (the guest's writes reach both sides from
    # then on; the memory's pre-copy begins), so Copy's time on disk is ``disk_ready_at - copy_started_at``.
    disk_bytes_total = models.BigIntegerField(default=0)
    disk_bytes_sent = models.BigIntegerField(default=0)
    disk_bytes_remaining = models.BigIntegerField(default=0)
    disk_dirty_rate_bytes_s = models.BigIntegerField(default=0)
    disk_throughput_bytes_s = models.BigIntegerField(default=0)
    disk_ready_at = models.DateTimeField(null=True, blank=True)
    # The guest's disks and network cards when it was requested, for the history and the report:
    # {"disks": [{"device", "pool", "volume", "virtual_size_bytes"}], "nics": [{"network", "mac"}]}; a disk
    # on a local pool of the source (mirrored: ``placement``) also has "local": true.
    guest_devices = models.JSONField(default=dict, blank=True)
    source_digest = models.CharField(max_length=128, blank=True)
    target_digest = models.CharField(max_length=128, blank=True)

    failed_phase = models.CharField(max_length=16, blank=True)
    failure_kind = models.CharField(max_length=24, blank=True, help_text="hostagent.protocol.FailureKind")
    # Per-round convergence samples, compact: a list of [seconds since Copy began (float), round,
    # bytes_sent, bytes_remaining, dirty_rate_bytes_s, throughput_bytes_s], one per round.
    round_samples = models.JSONField(default=list, blank=True)
    policy = models.JSONField(
        default=dict,
        blank=True,
        help_text="The effective policy (migrations_app.migration_policy)",
    )
    # The VM's phase time limits in force when it was requested (s; None: unlimited), by phase:
    # {"init": 10, "copy": None, "io_quiesce": 15, "frozen": 60} (``migrations_app.limits``). The worker,
    # the agents and the report read these, not the VM's limits of today; {} only for a row recorded
    # before they were kept (``limits.phase_limits_of`` then says so).
    phase_limits = models.JSONField(default=dict, blank=True)
    # When an administrator asked to switch over now (None: never): one switch-over per migration
    # (``steering``), and the report's explanation of a downtime longer than allowed (``downtime``).
    switchover_requested_at = models.DateTimeField(null=True, blank=True)
    alert = models.TextField(blank=True)
    # What is wrong now while it runs, for the page beside the phases (no bytes moving for a while; a host
    # the roll forward cannot reach): set and cleared with a timeline event. ``alert`` says how it ended.
    warning = models.TextField(blank=True)
    # COMPLETED (the target runs the guest) while the source's release was not answered: its host did not
    # answer after the commit. Recovery asks again until it answers (``recovery.retry_pending_releases``),
    # or an administrator forgets the source copy (``endings.forget_release``); docs/migrations.md.
    release_pending = models.BooleanField(default=False)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # The decider's lease (``migrations_app.lease``): who decides this migration now (a worker or
    # recovery); it expires MIGRATION_HEARTBEAT_STALE_S after ``heartbeat_at``, its last renewal.
    lease_owner = models.CharField(max_length=100, blank=True)
    # Set when an abort is recorded, cleared once both agents answered the undo (target discard, source
    # resume); recovery retries the undo of ended migrations still marked, for a bounded time.
    undo_pending = models.BooleanField(default=False)
    # Recovery's tries of that undo (and of a leftover copy's), backed off per migration
    # (``recovery.claim_undo_try``): the number made, and when the next one may start.
    undo_tries = models.PositiveIntegerField(default=0)
    undo_retry_at = models.DateTimeField(null=True, blank=True)
    # Bumped by one on every push of this migration's progress (``progress.publish_progress``): a page
    # that sees a version jump knows it missed a push and re-fetches (channels-redis drops silently).
    progress_version = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["requested_at", "pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["vm"],
                condition=Q(
                    state__in=["queued", "init", "copy", "io_quiesce", "frozen", "committing"],
                ),
                name="one_active_migration_per_vm",
            )
        ]
        indexes = [
            models.Index(fields=["source", "state"], name="migration_source_state"),
            # The history page: newest first, whole or filtered by VM, VSP, outcome or user.
            models.Index(fields=["-requested_at", "-id"], name="migration_history"),
            models.Index(fields=["vm", "-requested_at"], name="migration_vm_history"),
            models.Index(fields=["vm_name", "-requested_at"], name="migration_vm_name_history"),
            models.Index(fields=["target", "-requested_at"], name="migration_target_history"),
            models.Index(fields=["state", "-requested_at"], name="migration_state_history"),
            models.Index(fields=["requested_by", "-requested_at"], name="migration_user_history"),
        ]

    def __str__(self) -> str:
        vm = self.vm_name or self.vm_id
        return f"migration {self.pk} of {vm}: {self.source_id} -> {self.target_id} ({self.state})"

    def save(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self.vm_name and self.vm is not None:
            self.vm_name = self.vm.name
        if self.pk is None and not self.guest_devices and self.vm is not None:
            self.guest_devices = devices_record(self.vm)
        super().save(*args, **kwargs)

    def require_vm(self) -> VirtualMachine:
        """The VM this migration moves; raises ``VirtualMachine.DoesNotExist`` once it was deleted.

        ``vm`` is null only after the VM's deletion (its migrations stay in the history).
        """
        if self.vm is None:
            raise VirtualMachine.DoesNotExist(f"the VM of migration {self.pk} ({self.vm_name}) was deleted")
        return self.vm

    def require_source(self) -> VSP:
        """The source VSP; raises ``VSP.DoesNotExist`` for a refused attempt of a VM runnable nowhere."""
        if self.source is None:
            raise VSP.DoesNotExist(f"migration {self.pk} has no source VSP (refused: runnable nowhere)")
        return self.source

    @property
    def is_active(self) -> bool:
        return self.state in self.ACTIVE_STATES

    @property
    def is_terminal(self) -> bool:
        return self.state in self.TERMINAL_STATES

    @property
    def is_queued(self) -> bool:
        return self.state == self.State.QUEUED

    def phase_rows(self) -> list[tuple[str, int, str]]:
        """Each phase as (label, percent, "pending" | "running" | "done" | "failed")."""
        return [
            (self.State(phase).label, getattr(self, PHASE_PERCENT_FIELD[phase]), self._phase_status(phase))
            for phase in self.PHASES
        ]

    def _phase_status(self, phase: str) -> str:
        if self.failed_phase == phase:
            return "failed"
        if self.state == phase:
            return "running"
        if getattr(self, f"{PHASE_FIELD_PREFIX[phase]}_ended_at") is not None:
            return "done"
        return "pending"


# The field name prefix of each phase's percent/started/ended columns.
PHASE_FIELD_PREFIX: dict[str, str] = {
    Migration.State.INIT: "init",
    Migration.State.COPY: "copy",
    Migration.State.IO_QUIESCE: "quiesce",
    Migration.State.FROZEN: "frozen",
}
PHASE_PERCENT_FIELD: dict[str, str] = {
    phase: f"{prefix}_percent" for phase, prefix in PHASE_FIELD_PREFIX.items()
}

S = Migration.State
TRANSITIONS: dict[Migration.State, set[Migration.State]] = {
    S.QUEUED: {S.INIT, S.ABORTED, S.CANCELLED},
    S.INIT: {S.COPY, S.ABORTED, S.CANCELLED},
    S.COPY: {S.IO_QUIESCE, S.ABORTED, S.CANCELLED},
    S.IO_QUIESCE: {S.FROZEN, S.ABORTED, S.CANCELLED},
    S.FROZEN: {S.COMMITTING, S.ABORTED, S.CANCELLED},
    # ABORTED after the commit only when the target confirmed it does not hold the guest and the source,
    # never released, runs it again (``endings.keep_on_source``).
    S.COMMITTING: {S.COMPLETED, S.ABORTED},
    S.COMPLETED: set(),
    S.ABORTED: set(),
    S.CANCELLED: set(),
    S.REFUSED: set(),
}
del S


class MigrationEvent(models.Model):
    """One state change of a migration: the audit trail and the timeline the page shows."""

    migration = models.ForeignKey(Migration, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now)
    from_state = models.CharField(max_length=16, choices=Migration.State.choices, blank=True)
    to_state = models.CharField(max_length=16, choices=Migration.State.choices)
    message = models.TextField(blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["at", "pk"]
        indexes = [models.Index(fields=["migration", "at"], name="migration_event_timeline")]

    def __str__(self) -> str:
        return f"{self.at:%H:%M:%S} {self.from_state or '-'} -> {self.to_state}: {self.message}"


class LinkProbe(models.Model):
    """The last link probe from ``source`` to ``target`` (``migrations_app/link_probes.py``): the link rate
    the forecast uses for a pair with no migration history, with its time.

    ``rate_bytes_s``: bytes/s the target's data plane received, ``measured_at`` when (None: never
    measured). ``requested_at``: when the last probe was asked for (one per pair per
    ``link_probes.PROBE_INTERVAL_S``, claimed by compare-and-set). ``error``: why the last attempt
    failed, in words ('' when it worked).
    """

    source = models.ForeignKey(VSP, on_delete=models.CASCADE, related_name="+")
    target = models.ForeignKey(VSP, on_delete=models.CASCADE, related_name="+")
    rate_bytes_s = models.FloatField(null=True, blank=True)
    measured_at = models.DateTimeField(null=True, blank=True)
    requested_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["source", "target"], name="one_link_probe_per_pair")]

    def __str__(self) -> str:
        rate = f"{self.rate_bytes_s / 1e6:.0f} MB/s" if self.rate_bytes_s else "not measured"
        return f"{self.source} -> {self.target}: {rate}"


class MigrationOutcome(models.Model):
    """The end of one migration as an event: written in the transaction that records the terminal state
    (``transitions.transition``; ``history.record_refusal`` for a refusal), read by its followers
    (``migrations_app.outcomes``: an evacuation ends after its last step, ...), so the migration core
    calls none of them.

    One row per ended migration (the one-to-one says so). ``delivered_at``: when every follower took it
    (None: not yet). ``attempts``: deliveries claimed; ``retry_at``: when a later pass may claim it again
    (a deliverer that died mid-way leaves it undelivered; ``outcomes.deliver_pending`` takes it then).
    """

    migration = models.OneToOneField(Migration, on_delete=models.CASCADE, related_name="outcome_event")
    outcome = models.CharField(max_length=16, choices=Migration.State.choices)
    at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    retry_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["delivered_at", "at"], name="migration_outcome_pending")]

    def __str__(self) -> str:
        delivered = "delivered" if self.delivered_at else "not delivered yet"
        return f"migration {self.migration_id} {self.outcome} at {self.at:%H:%M:%S} ({delivered})"


__all__ = ["PHASE_FIELD_PREFIX", "LinkProbe", "Migration", "MigrationEvent", "MigrationOutcome"]


def devices_record(vm: VirtualMachine) -> dict[str, Any]:
    """What a migration keeps of ``vm``'s disks and cards (``Migration.guest_devices``): a disk on a local
    pool of the VSP it runs on is marked ``"local": True`` (its migration mirrors it)."""
    fields = ("device", "pool", "volume", "virtual_size_bytes")
    disks: list[dict[str, Any]] = [dict(disk) for disk in vm.disks.order_by("device").values(*fields)]
    source = vm.current_vsp
    if disks and source is not None:
        local = set(source.pools.filter(kind="local").values_list("name", flat=True))
        for disk in disks:
            if disk["pool"] in local:
                disk["local"] = True
    nics = vm.nics.order_by("index").values("network", "mac")
    return {"disks": disks, "nics": list(nics)}
