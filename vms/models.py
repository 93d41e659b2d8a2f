"""Inventory: VSPs (VM hosts), VMs and vPars, and where each VM is registered.

Invariant: a VM is runnable (hardware status not Not Runnable) on at most one VSP.
The database enforces it with the partial unique constraint ``one_runnable_registration_per_vm``.
"""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q
from django.urls import reverse

from vms.fields import EncryptedSecretField


class VSP(models.Model):
    """A VM Server Platform (VM host) with its host agent."""

    name = models.CharField(max_length=64, unique=True)
    agent_url = models.URLField(help_text="The host agent's HTTP API, e.g. http://127.0.0.1:7101")
    agent_secret = EncryptedSecretField(
        help_text="Credential for the host agent; stored encrypted, never shown."
    )
    migration_enabled = models.BooleanField(default=True)
    licensed = models.BooleanField(default=True)
    processor_family = models.CharField(max_length=64, blank=True)
    processor_model = models.CharField(max_length=64, blank=True)
    memory_mib = models.PositiveIntegerField()
    cpus = models.PositiveIntegerField()
    agent_reachable = models.BooleanField(default=True)
    agent_checked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "VSP"
        verbose_name_plural = "VSPs"

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        # Spelled out so that agent_secret can never leak through a repr in a log or traceback.
        return f"<VSP {self.pk}: {self.name}>"

    def get_absolute_url(self) -> str:
        return reverse("vms:vsp_detail", args=[self.pk])


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


class Registration(models.Model):
    """A VM's configuration on one VSP, with its virtual hardware status there."""

    class HardwareStatus(models.TextChoices):
        ON = "on", "On"
        OFF = "off", "Off"
        NOT_RUNNABLE = "not_runnable", "Not Runnable"

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

    @property
    def os_status(self) -> str:
        """The guest's OS status as seen on this copy: a Not Runnable copy never runs, so it is Down."""
        return self.vm.os_status if self.is_runnable else VirtualMachine.OSStatus.DOWN

    def get_os_status_display(self) -> str:
        return VirtualMachine.OSStatus(self.os_status).label
