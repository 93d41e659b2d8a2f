"""A downtime over the allowed one: by how much, and why, from what the console knows.

``downtime_excess(migration)`` compares a migration's measured downtime (``Migration.downtime_ms``, the
source agent's pause of the guest) with the downtime its policy allowed (``allowed_for``: the policy it
ran under, as last changed while it ran) and, when it is over, explains it from the agent's progress
figures the row keeps (``round_samples``: what was left to send when the guest froze, at what rate) and
from what was decided (a switch-over asked by an administrator, the policy's switch-over at the limit):

- **what was left, at the freeze rate**: the memory still to send when the guest was paused, over the
  link's last measured throughput: the time the frozen guest waited for it;
- **the rest**: the downtime beyond that went to saving the guest's state (vCPUs, devices, queued I/O)
  and starting it on the target: a slow state save.

The report, the history row and the alert of a completed migration all say it with these words.
Nothing here writes or asks anything: a pure reading of one row (no query).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from . import migration_policy
from .forecast import ms as ms_words
from .models import Migration
from .samples import BYTES_REMAINING, THROUGHPUT

MB = 1_000_000


def allowed_downtime_ms() -> int:
    """The downtime the agents aim at (ms): ``MIGRATION_DOWNTIME_MS`` as sent to the source agent."""
    explicit = getattr(settings, "MIGRATION_DOWNTIME_MS", None)
    configured = explicit if explicit is not None else settings.MIGRATION_AGENT_PARAMS["downtime_ms"]
    if configured is None:
        raise ImproperlyConfigured("MIGRATION_AGENT_PARAMS needs a downtime_ms (ms)")
    return int(configured)


def allowed_for(migration: Migration) -> int:
    """The downtime ``migration`` was allowed (ms): its policy's (as last changed while it ran), else the
    site's (``allowed_downtime_ms``) for a migration recorded before policies."""
    chosen = (migration.policy or {}).get("max_downtime_ms")
    return int(chosen) if isinstance(chosen, int | float) and chosen > 0 else allowed_downtime_ms()


@dataclass(frozen=True)
class DowntimeExcess:
    """A downtime over the allowed one (ms both), with ``reasons``: why, in words, most telling first."""

    downtime_ms: int
    allowed_ms: int
    reasons: tuple[str, ...]

    @property
    def over_ms(self) -> int:
        return self.downtime_ms - self.allowed_ms

    @property
    def short(self) -> str:
        """ "3.7 s over the allowed 300 ms" (the history row's flag)."""
        return f"{ms_words(self.over_ms)} over the allowed {ms_words(self.allowed_ms)}"

    @property
    def sentence(self) -> str:
        """ "The guest was frozen 4.0 s, 3.7 s over the allowed 300 ms: <reasons>." (the alert)."""
        why = "; ".join(self.reasons)
        return f"The guest was frozen {ms_words(self.downtime_ms)}, {self.short}: {why}."


def downtime_excess(migration: Migration) -> DowntimeExcess | None:
    """How far ``migration``'s downtime went over the allowed one, and why; None when it did not (or
    none was measured)."""
    downtime = migration.downtime_ms
    allowed = allowed_for(migration)
    if downtime is None or downtime <= allowed:
        return None
    return DowntimeExcess(downtime, allowed, tuple(reasons(migration, downtime, allowed)))


def reasons(migration: Migration, downtime_ms: int, allowed_ms: int) -> list[str]:
    """Why the guest stayed frozen ``downtime_ms``, over ``allowed_ms``: what decided to freeze it with
    much left, what was left at what rate, and what the state save took beyond that."""
    why = [decided] if (decided := what_decided(migration)) else []
    left, rate = left_at_freeze(migration)
    sending_ms = 1000 * left / rate if left and rate else None
    if sending_ms is not None and left:
        why.append(
            f"{left / MB:.1f} MB were still to send when the guest froze, at {rate / MB:.1f} MB/s "
            f"(the freeze rate): about {ms_words(sending_ms)} of it"
        )
    rest_ms = downtime_ms - (sending_ms or 0)
    if sending_ms is not None and rest_ms > allowed_ms:
        why.append(
            f"about {ms_words(rest_ms)} more went to saving the guest's state (vCPUs, devices, queued "
            f"I/O) and starting it on {migration.target.name}: a slow state save"
        )
    elif sending_ms is None:
        why.append(
            "no pre-copy round was recorded, so what was left to send is not known: the memory left, "
            "or a slow state save"
        )
    return why


def what_decided(migration: Migration) -> str:
    """Why the guest was frozen with more left than the allowed downtime can send, when the console
    decided it: an administrator's switch-over, or the policy's switch-over at the limit."""
    if migration.switchover_requested_at is not None:
        return "an administrator asked to switch over before Copy converged"
    policy = migration_policy.effective(migration.policy)
    expected = migration.expected_downtime_ms
    if policy["at_limit"] == "switchover" and expected is not None and expected > allowed_for(migration):
        return "Copy did not converge within its limit and the policy switches over anyway"
    if policy["downtime_step_ms"] and policy["downtime_max_ms"]:
        ceiling = ms_words(policy["downtime_max_ms"])
        return f"the policy raised the allowed downtime while Copy stalled (up to {ceiling})"
    return ""


def left_at_freeze(migration: Migration) -> tuple[int, float]:
    """(bytes left when the guest froze, the last measured throughput in bytes/s) from the last round's
    sample (``samples``: the freeze keeps what was left then); (0, 0) when no round was recorded."""
    samples = migration.round_samples or []
    if not samples:
        return 0, 0.0
    left = int(samples[-1][BYTES_REMAINING])
    rates = [float(sample[THROUGHPUT]) for sample in samples if sample[THROUGHPUT]]
    rate = rates[-1] if rates else float(migration.throughput_bytes_s)
    return left, rate
