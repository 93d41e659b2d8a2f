"""The evacuation record: one admin's plan to empty a VSP, as an ordered list of migrations.

Made in ``migrations_app`` before evacuations were an app of their own: the tables keep their names
(``db_table``), so a console upgraded from then keeps every evacuation (``migrations/0001_initial.py``).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Evacuation(models.Model):
    """An evacuation of ``vsp``: its steps (one migration each) run through the source's queue in order.

    ``kind``: an evacuation of ``vsp``, or the return of its guests to it (``Kind``).
    ``staying`` keeps the guests that could not leave, as ``[{"vm": name, "reason": text}, ...]``.
    RUNNING until every step's migration has ended, then FINISHED (or CANCELLED if the admin cancelled).
    """

    class State(models.TextChoices):
        RUNNING = "running", "Running"
        FINISHED = "finished", "Finished"
        CANCELLED = "cancelled", "Cancelled"

    class Kind(models.TextChoices):
        # An evacuation empties ``vsp``; a return brings back to ``vsp`` the guests its last evacuation
        # moved away (``evacuations.returns``): its steps' migrations come from several VSPs to ``vsp``.
        EVACUATION = "evacuation", "Evacuation"
        RETURN = "return", "Return of guests"

    vsp = models.ForeignKey("vms.VSP", on_delete=models.PROTECT, related_name="evacuations")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_by_name = models.CharField(max_length=150, blank=True)
    started_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.RUNNING)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.EVACUATION)
    cancel_requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    cancel_requested = models.BooleanField(default=False)
    staying = models.JSONField(default=list, blank=True)

    class Meta:
        db_table = "migrations_app_evacuation"
        ordering = ["-started_at", "-pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["vsp"], condition=Q(state="running"), name="one_running_evacuation_per_vsp"
            )
        ]

    def __str__(self) -> str:
        return f"evacuation {self.pk} of {self.vsp}"

    @property
    def is_running(self) -> bool:
        return self.state == self.State.RUNNING

    @property
    def is_return(self) -> bool:
        return self.kind == self.Kind.RETURN


class EvacuationStep(models.Model):
    """One guest of an evacuation: where it goes, in which position, its forecast, its migration."""

    evacuation = models.ForeignKey(Evacuation, on_delete=models.CASCADE, related_name="steps")
    position = models.PositiveSmallIntegerField()
    vm = models.ForeignKey("vms.VirtualMachine", null=True, on_delete=models.SET_NULL, related_name="+")
    vm_name = models.CharField(max_length=64)
    target = models.ForeignKey("vms.VSP", on_delete=models.PROTECT, related_name="+")
    predicted_s = models.FloatField(
        null=True, blank=True, help_text="Forecast total time (s); empty: not known."
    )
    migration = models.OneToOneField(
        "migrations_app.Migration", null=True, on_delete=models.SET_NULL, related_name="evacuation_step"
    )

    class Meta:
        db_table = "migrations_app_evacuationstep"
        ordering = ["evacuation", "position"]
        constraints = [
            models.UniqueConstraint(fields=["evacuation", "position"], name="one_step_per_position")
        ]

    def __str__(self) -> str:
        return f"step {self.position} of {self.evacuation_id}: {self.vm_name} -> {self.target_id}"
