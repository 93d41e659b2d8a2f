"""Personal API tokens and idempotency keys for the REST API (``/api/v1/``).

A token is shown once, when created; only its SHA-256 digest is stored (a token is 32 random bytes, so a
fast hash is enough: there is nothing to brute-force). ``prefix`` (the first characters) lets a user tell
their tokens apart on the tokens page without the secret being kept.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

NAME_MAX_LENGTH = 64  # of a token's name (characters)


class ApiToken(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(
        max_length=NAME_MAX_LENGTH, help_text="What the token is for, e.g. 'cron on backup01'."
    )
    prefix = models.CharField(
        max_length=16, help_text="The token's first characters, shown to tell it apart."
    )
    digest = models.CharField(max_length=64, unique=True, help_text="SHA-256 of the token, hex.")
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…) of {self.user_id}"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class IdempotencyKey(models.Model):
    """A client's ``Idempotency-Key`` on POST /api/v1/migrations: a retry returns the first migration."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    migration = models.ForeignKey("migrations_app.Migration", on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "key"], name="one_migration_per_idempotency_key")
        ]

    def __str__(self) -> str:
        return f"{self.key} -> migration {self.migration_id}"


class OutcomeTally(models.Model):
    """A running total of ended migrations for ``/metrics``, kept by following their outcome events
    (``api.tallies``), so that a scrape reads these few rows and never the migration history.

    One row per series part: ``family`` (``api.tallies``: ``migrations``, ``refusals``, ``phase_seconds``,
    ``downtime_seconds``), ``label`` (the outcome, the refusal's kind, the phase; "" for none) and
    ``detail`` (an outcome's failed phase; a histogram bucket's upper bound, "+Inf" or "sum").
    ``value``: how many (a histogram bucket holds the observations of that bucket alone, not the
    cumulative count), or the sum of the observations in seconds.
    """

    family = models.CharField(max_length=32)
    label = models.CharField(max_length=32, blank=True)
    detail = models.CharField(max_length=32, blank=True)
    value = models.FloatField(default=0.0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["family", "label", "detail"], name="one_tally_per_series_part")
        ]

    def __str__(self) -> str:
        return f"{self.family}[{self.label}|{self.detail}] = {self.value:g}"


class TalliedOutcome(models.Model):
    """A migration whose outcome is in the tallies: an outcome may be delivered more than once
    (``migrations_app.outcomes``), this row (written in the same transaction as the additions) makes the
    second delivery add nothing."""

    migration = models.OneToOneField(
        "migrations_app.Migration", primary_key=True, on_delete=models.CASCADE, related_name="+"
    )
    at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"migration {self.migration_id} tallied at {self.at:%H:%M:%S}"
