"""Inventory: VSPs (VM hosts), VMs and vPars, where each VM is registered, and the audit trail.

Invariant: a VM is runnable (hardware status not Not Runnable) on at most one VSP.
The database enforces it with the partial unique constraint ``one_runnable_registration_per_vm``.
Runnable / Not Runnable marks change only through ``Registration.mark_runnable`` and
``Registration.mark_not_runnable``, each leaving an ``AuditEvent`` (``docs/architecture.md``).
"""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from agentprotocol import ALL_FORMATS, MAX_STREAMS, Encryption
from vms.agent_address import check_agent_address
from vms.fields import EncryptedSecretField


def validate_agent_trust(value: str) -> None:
    """A VSP's ``agent_certificate``: a PEM CA certificate or a SHA-256 fingerprint (or empty)."""
    from django.core.exceptions import ValidationError

    from vms.agent_client import check_trust

    try:
        check_trust(value)
    except ValueError as error:
        raise ValidationError(str(error)) from None


class HostGroup(models.Model):
    """A group of VSPs (like an oVirt cluster or a vSphere folder): the unit that rights are given on.

    A VSP belongs to at most one group; a VSP in no group is seen and used by superusers only.
    Who may do what on a group's VSPs is a ``HostGroupMembership`` (see ``vms.access``).
    """

    name = models.CharField(max_length=64, unique=True)
    description = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "host group"

    def __str__(self) -> str:
        return self.name


class Role(models.TextChoices):
    """A user's role in a host group; each role includes the rights of those before it."""

    VIEWER = "viewer", "Viewer (sees the group's VSPs and guests)"
    OPERATOR = "operator", "Operator (may also migrate and power guests)"
    ADMINISTRATOR = "administrator", "Administrator (may also change settings and runnable marks)"

    @classmethod
    def at_least(cls, role: str) -> list[str]:
        """The roles that include ``role``'s rights: ``at_least(OPERATOR) == [operator, administrator]``."""
        order = list(cls)
        return [str(r) for r in order[order.index(cls(role)) :]]


class HostGroupMembership(models.Model):
    """One user's role in one host group (at most one row per user and group)."""

    group = models.ForeignKey(HostGroup, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="host_roles")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.VIEWER)

    class Meta:
        ordering = ["group__name", "user__username"]
        verbose_name = "host group membership"
        constraints = [
            models.UniqueConstraint(fields=["group", "user"], name="one_role_per_user_and_host_group"),
        ]

    def __str__(self) -> str:
        return f"{self.user} is {self.role} of {self.group}"


MAX_CONCURRENT_MIGRATIONS = 8


class VSP(models.Model):
    """A VM Server Platform (VM host) with its host agent, in at most one host group."""

    name = models.CharField(max_length=64, unique=True)
    group = models.ForeignKey(
        HostGroup,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="vsps",
        help_text="Who may see and use this VSP; in no group, only superusers do.",
    )
    agent_url = models.URLField(help_text="The host agent's API, e.g. https://10.0.0.11:7101")
    agent_secret = EncryptedSecretField(
        help_text="Credential for the host agent; stored encrypted, never shown."
    )
    agent_certificate = models.TextField(
        blank=True,
        validators=[validate_agent_trust],
        help_text=(
            "How the console recognises the agent over HTTPS: the deployment CA's certificate (PEM), or "
            "the SHA-256 fingerprint of the agent's own certificate (pinned). Empty: the system's CAs."
        ),
    )
    migration_enabled = models.BooleanField(default=True)
    licensed = models.BooleanField(default=True)
    processor_family = models.CharField(max_length=64, blank=True)
    processor_model = models.CharField(max_length=64, blank=True)
    memory_mib = models.PositiveIntegerField()
    cpus = models.PositiveIntegerField()
    # Reachability (``vms.inventory``): inventory collection marks the VSP unreachable only after
    # ``INVENTORY_UNREACHABLE_AFTER`` unanswered calls in a row; a call a migration, the migrate dialog or
    # Refresh Data waits on marks it at once. Any answer resets all three.
    agent_reachable = models.BooleanField(default=True)
    agent_checked_at = models.DateTimeField(null=True, blank=True)
    agent_failures = models.PositiveIntegerField(
        default=0, help_text="Calls to the agent left unanswered in a row (0 once it answers)."
    )
    unreachable_since = models.DateTimeField(
        null=True, blank=True, help_text="When the VSP was marked unreachable (empty while reachable)."
    )
    agent_problem = models.CharField(
        max_length=300,
        blank=True,
        help_text=(
            "Why the agent's last call failed, in words ('TLS certificate not trusted (SHA-256 fingerprint "
            "...)', 'agent not running (connection refused)', 'no answer in 10 s'); empty once it answers."
        ),
    )
    # The host agent's driver ("simulated", "qemu") from its last health answer (``vms.inventory``); empty
    # until it answered one. What a running migration can be changed with depends on it (QEMU cannot
    # turn auto-converge on mid-migration).
    agent_collect_ms = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="How long the last inventory call to the agent took (ms), answered or not.",
    )
    agent_driver = models.CharField(
        max_length=64,
        blank=True,
        help_text="The agent's driver as its health answer last said ('simulated', 'qemu'; empty: not yet).",
    )
    # Whether the agent's driver mirrors local disks during a migration (``agentprotocol.Health.
    # mirrors_local_disks``), from its last health answer; None: not asked yet (the next inventory
    # collection asks). A guest with a disk on a local pool moves only between two VSPs that say True.
    agent_mirrors_local_disks = models.BooleanField(
        null=True,
        blank=True,
        help_text="Whether the agent said it mirrors local disks during a migration (empty: not asked yet).",
    )
    # When the agent last reported its storage pools and networks (``GET /v1/resources``); empty: never
    # (an agent older than pools answers 404: its pools and networks are not known, see ``vms.inventory``).
    resources_collected_at = models.DateTimeField(
        null=True, blank=True, help_text="When the agent last reported its storage pools and networks."
    )
    # In maintenance (being or having been evacuated): refused as a migration target until the admin
    # leaves maintenance.
    maintenance = models.BooleanField(default=False)
    maintenance_since = models.DateTimeField(null=True, blank=True)
    # Retired (``vms.host_setup.do_retire_vsp``): out of the lists and inventory collection, takes no
    # guests, its agent secret erased; kept for the history that names it.
    retired_at = models.DateTimeField(
        null=True, blank=True, help_text="When the VSP was retired (empty: in service)."
    )
    # How many migrations may leave this VSP at once (the migrations' scheduling); the others wait
    # queued, in the order they were requested. Evacuations go through the same queue.
    max_concurrent_migrations = models.PositiveSmallIntegerField(
        "migrations at once",
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_CONCURRENT_MIGRATIONS)],
        help_text=(
            f"How many migrations may leave this VSP at the same time (1-{MAX_CONCURRENT_MIGRATIONS}); "
            "the others wait their turn. More at once share the host's network and CPU."
        ),
    )

    class Meta:
        ordering = ["name"]
        verbose_name = "VSP"
        verbose_name_plural = "VSPs"
        constraints = [
            models.CheckConstraint(
                condition=Q(max_concurrent_migrations__gte=1)
                & Q(max_concurrent_migrations__lte=MAX_CONCURRENT_MIGRATIONS),
                name="vsp_migrations_at_once_1_to_8",
            )
        ]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        # Spelled out so that agent_secret can never leak through a repr in a log or traceback.
        return f"<VSP {self.pk}: {self.name}>"

    def get_absolute_url(self) -> str:
        return reverse("vms:vsp_detail", args=[self.pk])

    def clean(self) -> None:
        """Model validation (the admin's form, every ModelForm, ``full_clean``): an agent address the
        console may send the secret to (``vms.agent_address``)."""
        try:
            check_agent_address(self.agent_url or "", self.agent_certificate or "")
        except ValueError as error:
            raise ValidationError({"agent_url": str(error)}) from None

    def split_brain_copies(self) -> models.QuerySet[Registration]:
        """Split-brain copies (``Registration.split_brain``) of the VMs registered on this VSP."""
        return Registration.split_brain().filter(vm__registrations__vsp=self).distinct()


class InventoryRound(models.Model):
    """One periodic inventory collection: the fan-out of one task per VSP, counted as each one ends.

    ``done`` grows by one per VSP (and ``unanswered`` or ``skipped`` with it), each by one conditional
    ``UPDATE``, so concurrent workers never lose a count; ``finished_at`` is set by the update that brings
    ``done`` to ``vsps``. A VSP whose task did not start before the next round was due is skipped (not
    asked). A round whose tasks were lost (a worker killed) never finishes. Only the last rounds are kept.
    """

    started_at = models.DateTimeField(default=timezone.now)
    vsps = models.PositiveIntegerField()
    done = models.PositiveIntegerField(default=0)
    unanswered = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0)  # not started before the next round was due
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-pk"]

    def __str__(self) -> str:
        return f"inventory round {self.pk}: {self.done}/{self.vsps}"

    @property
    def duration_s(self) -> float | None:
        """Seconds from the fan-out to the last VSP's answer or time-out; None until it finishes."""
        if self.finished_at is None:
            return None
        return max((self.finished_at - self.started_at).total_seconds(), 0.0)


class PairEncryption(models.Model):
    """The data plane's policy between two VSPs (either direction): encryption and parallel streams.

    Encryption, like encrypted vMotion. No row: "required" (mutual TLS between the agents). "off" is
    for a trusted, dedicated migration network: guest memory then crosses it in clear (the one-time
    token is still required). ``streams``: how many parallel data-plane connections a migration
    between them uses, 1..16 (QEMU: multifd channels), or empty for automatic (the source agent sizes
    it from its cores and the guest's memory). The pair is stored with the lower VSP id first;
    ``policy_between`` and ``streams_between`` read it either way round.
    """

    class Policy(models.TextChoices):
        REQUIRED = "required", "Required (mutual TLS)"
        OFF = "off", "Off (trusted migration network)"

    vsp_a = models.ForeignKey(VSP, on_delete=models.CASCADE, related_name="+", verbose_name="VSP")
    vsp_b = models.ForeignKey(VSP, on_delete=models.CASCADE, related_name="+", verbose_name="other VSP")
    encryption = models.CharField(max_length=16, choices=Policy.choices, default=Policy.REQUIRED)
    streams = models.PositiveSmallIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_STREAMS)],
        help_text=f"Parallel data-plane connections per migration, 1-{MAX_STREAMS}; empty: automatic "
        "(sized by the source host from its cores and the guest's memory).",
    )
    reason = models.CharField(max_length=200, blank=True, help_text="Why, e.g. the dedicated network's name.")

    class Meta:
        verbose_name = "data-plane encryption policy"
        verbose_name_plural = "data-plane encryption policies"
        constraints = [
            models.UniqueConstraint(fields=["vsp_a", "vsp_b"], name="one_encryption_policy_per_pair"),
            models.CheckConstraint(condition=Q(vsp_a__lt=models.F("vsp_b")), name="encryption_pair_ordered"),
            models.CheckConstraint(
                condition=Q(streams__isnull=True) | Q(streams__gte=1, streams__lte=MAX_STREAMS),
                name="pair_streams_in_bounds",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.vsp_a} <-> {self.vsp_b}: {self.get_encryption_display()}, {self.streams_display}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.vsp_a_id and self.vsp_b_id and self.vsp_a_id > self.vsp_b_id:
            self.vsp_a_id, self.vsp_b_id = self.vsp_b_id, self.vsp_a_id
        super().save(*args, **kwargs)

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        if self.vsp_a_id and self.vsp_a_id == self.vsp_b_id:
            raise ValidationError("A policy is between two different VSPs.")
        if self.vsp_a_id and self.vsp_b_id:
            low, high = sorted((self.vsp_a_id, self.vsp_b_id))
            self.vsp_a_id, self.vsp_b_id = low, high  # stored in order (checked by a constraint)
            clash = PairEncryption.objects.filter(vsp_a_id=low, vsp_b_id=high).exclude(pk=self.pk)
            if clash.exists():
                raise ValidationError("This pair of VSPs already has a policy; change that one.")

    @classmethod
    def policy_between(cls, source: VSP, target: VSP) -> Encryption:
        """ "required" or "off" for a migration from ``source`` to ``target`` (default "required")."""
        low, high = sorted((source.pk, target.pk))
        found = cls.objects.filter(vsp_a_id=low, vsp_b_id=high).values_list("encryption", flat=True).first()
        return "off" if found == cls.Policy.OFF else "required"

    @property
    def streams_display(self) -> str:
        return streams_label(self.streams)

    @classmethod
    def streams_between(cls, source: VSP, target: VSP) -> int | None:
        """The pair's stream count (1..16), or None for automatic (also when the pair has no row)."""
        low, high = sorted((source.pk, target.pk))
        found: int | None = (
            cls.objects.filter(vsp_a_id=low, vsp_b_id=high).values_list("streams", flat=True).first()
        )
        return found


def streams_label(streams: int | None) -> str:
    """ "4 streams", "1 stream" or "streams: automatic", as the console shows a pair's stream policy."""
    if streams is None:
        return "streams: automatic"
    return f"{streams} stream{'' if streams == 1 else 's'}"


class VirtualMachine(models.Model):
    """A guest: a VM (which can migrate) or a vPar (which never migrates)."""

    class Kind(models.TextChoices):
        VM = "vm", "VM"
        VPAR = "vpar", "vPar"

    class OSStatus(models.TextChoices):
        UP = "up", "Up"
        DOWN = "down", "Down"
        INITIALIZING = "initializing", "Initializing"
        IN_EFI = "in_efi", "In EFI"
        LOST = "lost", "Lost"  # its host no longer reports the guest (``Registration.lost_since``)

    class BootAttribute(models.TextChoices):
        AUTO = "auto", "Auto start"
        MANUAL = "manual", "Manual start"

    name = models.CharField(max_length=64, unique=True)
    # The guest's identity on every host agent (the protocol's ``guest_id``); the name is only displayed.
    guest_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    kind = models.CharField(max_length=8, choices=Kind.choices, default=Kind.VM)
    os_type = models.CharField("operating system", max_length=64, blank=True)
    os_status = models.CharField(max_length=16, choices=OSStatus.choices, default=OSStatus.DOWN)
    boot_attribute = models.CharField(
        max_length=8, choices=BootAttribute.choices, default=BootAttribute.MANUAL
    )
    graceful_stop_timeout_s = models.PositiveIntegerField(default=30)
    online_migration_enabled = models.BooleanField(default=True)
    migration_policy = models.JSONField(
        default=dict,
        blank=True,
        help_text="The default migration policy, a JSON object (the migrations app checks and reads it)",
    )
    memory_mib = models.PositiveIntegerField()
    vcpus = models.PositiveIntegerField(default=1)
    init_limit_s = models.PositiveIntegerField(default=10)
    copy_limit_s = models.PositiveIntegerField(null=True, blank=True, help_text="Empty means unlimited.")
    quiesce_limit_s = models.PositiveIntegerField(default=15)
    frozen_limit_s = models.PositiveIntegerField(default=60)

    class Meta:
        ordering = ["name"]
        verbose_name = "virtual machine"

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("vms:vm_general", args=[self.pk])

    @property
    def is_vpar(self) -> bool:
        return self.kind == self.Kind.VPAR

    @property
    def runnable_registration(self) -> Registration | None:
        """The registration that is not Not Runnable, or None.

        Uses prefetched ``registrations`` when present so list pages stay at a fixed query count.
        """
        for registration in self.registrations.all():
            if registration.is_runnable:
                return registration
        return None

    @property
    def current_vsp(self) -> VSP | None:
        registration = self.runnable_registration
        return registration.vsp if registration else None

    @property
    def current_vsp_id(self) -> int | None:
        """The id of ``current_vsp`` without reading the VSP (the push's facts need only the id)."""
        registration = self.runnable_registration
        return registration.vsp_id if registration else None


def vm_split_brain_copies(vm: VirtualMachine) -> models.QuerySet[Registration]:
    """``vm``'s copies found running where they are Not Runnable (``Registration.split_brain``)."""
    return Registration.split_brain().filter(vm=vm)


class Registration(models.Model):
    """A VM's configuration on one VSP, with its virtual hardware status there."""

    class HardwareStatus(models.TextChoices):
        ON = "on", "On"
        OFF = "off", "Off"
        NOT_RUNNABLE = "not_runnable", "Not Runnable"
        # The runnable copy whose host agent no longer reports the guest (it died with its agent, or
        # was removed behind the console's back): still the runnable one, started again from its record.
        LOST = "lost", "Lost"

    class SetBy(models.TextChoices):
        NONE = "", "—"
        MIGRATE = "migrate", "Migrate"
        ADMIN = "admin", "Admin"

    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="registrations")
    vsp = models.ForeignKey(VSP, on_delete=models.PROTECT, related_name="registrations")
    hardware_status = models.CharField(
        max_length=16, choices=HardwareStatus.choices, default=HardwareStatus.OFF
    )
    not_runnable_set_by = models.CharField(
        max_length=8, choices=SetBy.choices, default=SetBy.NONE, blank=True
    )
    not_runnable_reason = models.CharField(max_length=200, blank=True)
    state_collected_at = models.DateTimeField(
        null=True, blank=True, help_text="When the host agent last reported this copy's state."
    )
    found_running_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Split brain: when the host agent reported this Not Runnable copy running "
        "(cleared once it reports it stopped). Never changes which copy is runnable.",
    )
    lost_since = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Lost: since when the host agent no longer reports this runnable copy's guest "
        "(cleared once it reports it again).",
    )

    class Meta:
        ordering = ["vm__name", "vsp__name"]
        constraints = [
            models.UniqueConstraint(fields=["vm", "vsp"], name="one_registration_per_vm_and_vsp"),
            models.UniqueConstraint(
                fields=["vm"],
                condition=~Q(hardware_status="not_runnable"),
                name="one_runnable_registration_per_vm",
                violation_error_message="This VM is already runnable on another VSP.",
            ),
            models.CheckConstraint(
                condition=Q(hardware_status="not_runnable")
                | (Q(not_runnable_set_by="") & Q(not_runnable_reason="")),
                name="not_runnable_details_only_when_not_runnable",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.vm} on {self.vsp}"

    @property
    def is_runnable(self) -> bool:
        return self.hardware_status != self.HardwareStatus.NOT_RUNNABLE

    @classmethod
    def split_brain(cls) -> models.QuerySet[Registration]:
        """Not Runnable copies whose host agent reported the guest running: a second running copy."""
        return cls.objects.filter(
            hardware_status=cls.HardwareStatus.NOT_RUNNABLE, found_running_at__isnull=False
        ).select_related("vm", "vsp")

    def split_brain_alert(self) -> str:
        """The critical alert for this copy (``split_brain``), naming where the guest may run."""
        runnable = (
            Registration.objects.filter(vm_id=self.vm_id)
            .exclude(hardware_status=self.HardwareStatus.NOT_RUNNABLE)
            .select_related("vsp")
            .first()
        )
        where = f"it is runnable on {runnable.vsp.name}" if runnable else "it is runnable nowhere"
        return (
            f"Split brain: {self.vm.name} runs on {self.vsp.name}, where its copy is Not Runnable; {where}. "
            f"Two running copies may corrupt the guest's disks: stop the copy on {self.vsp.name}."
        )

    @property
    def is_lost(self) -> bool:
        return self.hardware_status == self.HardwareStatus.LOST

    def lost_alert(self) -> str:
        """The alert for a lost copy (``is_lost``): what is known, since when, and what the admin can do."""
        since = timezone.localtime(self.lost_since).strftime("%Y-%m-%d %H:%M:%S") if self.lost_since else "?"
        return (
            f"Lost: {self.vsp.name} no longer reports {self.vm.name} (since {since}); the guest is not "
            f"running there (its host agent restarted without it, or it was removed). Its copy on "
            f"{self.vsp.name} is still the runnable one: Start defines it there again and starts it."
        )

    def unreachable_note(self) -> str:
        """For a copy whose host does not answer (``VSP.unreachable_since``): the words saying its status is
        only the last one reported ("as last reported: vsp2 unreachable since 20:13:05", local time), else
        "". A status read before the host stopped answering is not the truth now: the pages, the API and
        the command say so."""
        if self.vsp.unreachable_since is None:
            return ""
        since = timezone.localtime(self.vsp.unreachable_since).strftime("%H:%M:%S")
        return f"as last reported: {self.vsp.name} unreachable since {since}"

    @classmethod
    def lost(cls) -> models.QuerySet[Registration]:
        """Runnable copies whose host agent no longer reports the guest (``is_lost``)."""
        return cls.objects.filter(hardware_status=cls.HardwareStatus.LOST).select_related("vm", "vsp")

    @property
    def os_status(self) -> str:
        """The guest's OS status as seen on this copy: a Not Runnable copy never runs, so it is Down; a
        lost one is Lost; with hardware Off it is Down whatever was last stored (never Up and Off)."""
        if not self.is_runnable:
            return VirtualMachine.OSStatus.DOWN
        if self.is_lost:
            return VirtualMachine.OSStatus.LOST
        if self.hardware_status == self.HardwareStatus.OFF:
            return VirtualMachine.OSStatus.DOWN
        return self.vm.os_status

    def get_os_status_display(self) -> str:
        return VirtualMachine.OSStatus(self.os_status).label

    def audit_state(self) -> dict[str, str]:
        """What an audit event keeps of this copy: its hardware status and Not Runnable details."""
        return {
            "hardware_status": self.hardware_status,
            "not_runnable_set_by": self.not_runnable_set_by,
            "not_runnable_reason": self.not_runnable_reason,
        }

    def mark_not_runnable(
        self, *, set_by: str, reason: str, actor: Any = None, via_admin: bool = False
    ) -> AuditEvent:
        """Make this copy Not Runnable (``set_by`` Migrate or Admin, ``reason`` up to 200 characters).

        Saves the copy and records who, when, why, before and after. The caller checks that the change
        is allowed (``vms.actions``) and holds the row lock; call it inside a transaction.
        """
        return self._set_marks(
            self.HardwareStatus.NOT_RUNNABLE,
            set_by,
            reason,
            AuditEvent.Action.MARKED_NOT_RUNNABLE,
            actor=actor,
            message=reason,
            via_admin=via_admin,
        )

    def mark_runnable(
        self,
        hardware_status: str = HardwareStatus.OFF,
        *,
        actor: Any = None,
        message: str = "",
        via_admin: bool = False,
    ) -> AuditEvent:
        """Make this copy runnable with ``hardware_status`` (Off, or On for a migration's target copy).

        A copy not yet saved is created. Raises ``IntegrityError`` if another copy is runnable (the
        constraint ``one_runnable_registration_per_vm``); the caller checks first for a clear message.
        """
        return self._set_marks(
            hardware_status,
            self.SetBy.NONE,
            "",
            AuditEvent.Action.MARKED_RUNNABLE,
            actor=actor,
            message=message,
            via_admin=via_admin,
        )

    def _set_marks(
        self, hardware_status: str, set_by: str, reason: str, action: str, **event: Any
    ) -> AuditEvent:
        before = self.audit_state() if self.pk is not None else {}
        self.hardware_status, self.not_runnable_set_by, self.not_runnable_reason = (
            hardware_status,
            set_by,
            reason,
        )
        if self.pk is None:
            self.save()
        else:
            self.save(update_fields=list(self.audit_state()))
        return AuditEvent.record(action, self, before=before, **event)


class AuditEvent(models.Model):
    """One change to the inventory or to migrations: who, when, what, why, before and after.

    The object and the actor are kept as text too, so the trail survives their deletion.
    ``before`` and ``after`` hold the changed fields only (JSON objects; ``{}`` before a creation).
    """

    class Action(models.TextChoices):
        # Labels are the names in words ("Marked Not Runnable"); the values are stored.
        ONLINE_MIGRATION_ENABLED = "online_migration_enabled"
        ONLINE_MIGRATION_DISABLED = "online_migration_disabled"
        MARKED_RUNNABLE = "marked_runnable"
        MARKED_NOT_RUNNABLE = "marked_not_runnable"
        POLICY_CHANGED = "policy_changed"
        MIGRATION_POLICY_CHANGED = "migration_policy_changed"
        MIGRATION_CHANGED = "migration_changed"
        MIGRATION_REQUESTED = "migration_requested"
        MIGRATION_REFUSED = "migration_refused"
        MIGRATION_CANCELLED = "migration_cancelled"
        # A migration that mirrored local disks: the source's volumes deleted once the target ran the guest,
        # or left there (its agent could not delete them, or no longer knew the migration).
        SOURCE_DISKS_DELETED = "source_disks_deleted"
        SOURCE_DISKS_LEFT = "source_disks_left"
        EVACUATION_STARTED = "evacuation_started"
        EVACUATION_CANCELLED = "evacuation_cancelled"
        EVACUATION_FINISHED = "evacuation_finished"
        MAINTENANCE_ENTERED = "maintenance_entered"
        MAINTENANCE_LEFT = "maintenance_left"
        VM_STARTED = "vm_started"
        VM_STOPPED = "vm_stopped"
        VM_FORCE_STOPPED = "vm_force_stopped"
        CREATED = "created"
        CHANGED = "changed"
        DELETED = "deleted"

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_name = models.CharField(max_length=150, blank=True, help_text="Kept if the user is deleted.")
    action = models.CharField(max_length=32, choices=Action.choices)
    via_admin = models.BooleanField(default=False, help_text="Made in the Django admin.")
    object_type = models.CharField(max_length=64, help_text='"app_label.model", e.g. "vms.registration"')
    object_id = models.CharField(max_length=64)
    object_name = models.CharField(max_length=200)
    before = models.JSONField(default=dict, blank=True)
    after = models.JSONField(default=dict, blank=True)
    message = models.TextField(blank=True)

    class Meta:
        ordering = ["-at", "-pk"]
        indexes = [
            models.Index(fields=["object_type", "object_id", "at"], name="audit_by_object"),
            models.Index(fields=["actor", "at"], name="audit_by_actor"),
        ]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor_name or 'system'}: {self.get_action_display()}"

    @classmethod
    def record(
        cls,
        action: str,
        obj: models.Model,
        *,
        actor: Any = None,
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
        message: str = "",
        via_admin: bool = False,
        object_name: str = "",
    ) -> AuditEvent:
        """Save one event about ``obj``; ``after`` defaults to ``obj.audit_state()`` when it has one.

        ``object_name`` is what the trail calls ``obj`` (default ``str(obj)``, cut to 200 characters).

        ``actor`` is a user (an anonymous or missing one is recorded as the system, ``actor=None``).
        """
        user = actor if getattr(actor, "is_authenticated", False) else None
        if after is None:
            audit_state = getattr(obj, "audit_state", None)
            after = audit_state() if callable(audit_state) else {}
        return cls.objects.create(
            actor=user,
            actor_name=user.get_username() if user is not None else "",
            action=action,
            via_admin=via_admin,
            object_type=obj._meta.label_lower,
            object_id=str(obj.pk),
            object_name=(object_name or str(obj))[:200],
            before=before or {},
            after=after,
            message=message,
        )


# -- storage and networks ---------------------------------------------------------------------------------


def all_formats() -> list[str]:
    """Every volume format (``StoragePool.formats`` of a row stored before the formats were kept)."""
    return list(ALL_FORMATS)


class StoragePool(models.Model):
    """A storage pool of one VSP, as its agent last reported it (``GET /v1/resources``).

    ``identity`` is the same on every VSP that reaches the same storage (a shared pool: one SAN or NFS
    export, whatever each host calls it); a local pool's is its host's alone. Sizes are bytes.
    """

    class Kind(models.TextChoices):
        SHARED = "shared", "Shared"
        LOCAL = "local", "Local"

    vsp = models.ForeignKey(VSP, on_delete=models.CASCADE, related_name="pools")
    name = models.CharField(max_length=64)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    identity = models.CharField(max_length=128, db_index=True)
    capacity_bytes = models.BigIntegerField(default=0)
    free_bytes = models.BigIntegerField(default=0)
    location = models.CharField(max_length=4096, blank=True)
    # The volume formats the host can create and write in this pool (``agentprotocol.StoragePool.formats``).
    formats = models.JSONField(default=all_formats, blank=True)

    class Meta:
        ordering = ["vsp__name", "name"]
        verbose_name = "storage pool"
        constraints = [models.UniqueConstraint(fields=["vsp", "name"], name="one_pool_name_per_vsp")]

    def __str__(self) -> str:
        return f"{self.name} on {self.vsp}"


class Network(models.Model):
    """A network (virtual switch) of one VSP, as its agent last reported it; guests' cards plug in by name."""

    vsp = models.ForeignKey(VSP, on_delete=models.CASCADE, related_name="networks")
    name = models.CharField(max_length=64)
    kind = models.CharField(max_length=16)  # bridge | user | simulated (``agentprotocol.NetworkKind``)
    bridge = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["vsp__name", "name"]
        constraints = [models.UniqueConstraint(fields=["vsp", "name"], name="one_network_name_per_vsp")]

    def __str__(self) -> str:
        return f"{self.name} on {self.vsp}"


class VirtualDisk(models.Model):
    """One disk of a VM: ``volume`` in pool ``pool`` of the VSP it runs on (``pool_identity``: that
    pool's identity, so the same shared storage is found on another VSP whatever it is called there).
    Sizes are bytes; ``allocated_bytes`` is what a thin image takes on the pool now."""

    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="disks")
    device = models.CharField(max_length=8)
    pool = models.CharField(max_length=64)
    pool_identity = models.CharField(max_length=128, blank=True)
    volume = models.CharField(max_length=64)
    virtual_size_bytes = models.BigIntegerField()
    allocated_bytes = models.BigIntegerField(default=0)
    format = models.CharField(max_length=8, default="qcow2")
    bus = models.CharField(max_length=8, default="virtio")
    read_only = models.BooleanField(default=False)
    shareable = models.BooleanField(default=False)
    boot = models.BooleanField(default=False, help_text="The guest boots from this disk (at most one).")
    # The volumes below this one (a snapshot chain, ``agentprotocol.DiskInfo.backing``); empty: none.
    backing = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["vm__name", "device"]
        verbose_name = "virtual disk"
        constraints = [models.UniqueConstraint(fields=["vm", "device"], name="one_disk_per_vm_device")]

    def __str__(self) -> str:
        return f"{self.vm}'s disk {self.device}"


class NetworkCard(models.Model):
    """One network card of a VM: plugged into network ``network`` (by name) with a MAC unique in the
    console; ``index`` orders a VM's cards (nic 0, nic 1, ...)."""

    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="nics")
    index = models.PositiveSmallIntegerField()
    network = models.CharField(max_length=64)
    mac = models.CharField("MAC", max_length=17, unique=True)
    model = models.CharField(max_length=8, default="virtio")

    class Meta:
        ordering = ["vm__name", "index"]
        verbose_name = "network card"
        constraints = [models.UniqueConstraint(fields=["vm", "index"], name="one_nic_per_vm_index")]

    def __str__(self) -> str:
        return f"{self.vm}'s nic {self.index}"
