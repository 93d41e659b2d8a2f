"""An evacuation's progress: each step's status, the counts, the time left, the closing sentence."""

from __future__ import annotations

from dataclasses import dataclass

from django.utils import timezone

from migrations_app.models import Migration

from .models import Evacuation, EvacuationStep
from .plan import time_left_s

STEP_STATUS: dict[str, str] = {
    Migration.State.COMPLETED.value: "done",
    Migration.State.ABORTED.value: "failed",
}


def step_status(step: EvacuationStep) -> str:
    """ "waiting", "running", "done", "failed", "cancelled" (stopped while moving) or "not started"."""
    migration = step.migration
    if migration is None:
        return "not started"
    if migration.state == Migration.State.QUEUED:
        return "waiting"
    if migration.is_active:
        return "running"
    if migration.state == Migration.State.CANCELLED:
        return (
            "not started"
            if migration.init_started_at is None and migration.failed_phase == ""
            else "cancelled"
        )
    return STEP_STATUS.get(str(migration.state), str(migration.state))


@dataclass
class Summary:
    """An evacuation's progress: its steps with their status, the counts, the time left (s)."""

    evacuation: Evacuation
    rows: list[tuple[EvacuationStep, str]]
    time_left_s: float | None  # None: not known (a step without a forecast is still to run)

    def count(self, status: str) -> int:
        return sum(1 for _, row_status in self.rows if row_status == status)

    @property
    def count_done(self) -> int:
        return self.count("done")

    @property
    def count_running(self) -> int:
        return self.count("running")

    @property
    def count_waiting(self) -> int:
        return self.count("waiting")

    @property
    def count_failed(self) -> int:
        return self.count("failed")

    def counts(self) -> dict[str, int]:
        return {
            status: self.count(status)
            for status in ("done", "running", "waiting", "failed", "cancelled", "not started")
        } | {"staying": len(self.evacuation.staying)}

    def sentence(self) -> str:
        counts = self.counts()
        parts = [f"{counts['done']} moved", f"{counts['failed']} failed"]
        if counts["cancelled"] or counts["not started"]:
            parts.append(f"{counts['cancelled']} cancelled, {counts['not started']} not started")
        parts.append(f"{counts['staying']} stayed")
        failed = [
            step.vm_name for step, status in self.rows if status in ("failed", "cancelled", "not started")
        ]
        if failed:
            # A return's guests that did not come back stay on the hosts they were on.
            where = "where they were" if self.evacuation.is_return else f"on {self.evacuation.vsp.name}"
            parts.append(f"still runnable {where}: {', '.join(failed)}")
        return "; ".join(parts)


def summarize(evacuation: Evacuation) -> Summary:
    """The evacuation's progress in two queries (its steps with their migrations and targets), the time
    left counting ``max_concurrent_migrations`` at once (its VSP: one more query unless loaded)."""
    steps = list(evacuation.steps.select_related("migration", "target"))
    rows = [(step, step_status(step)) for step in steps]
    now = timezone.now()
    left: list[float] = []
    for step, status in rows:
        if status not in ("waiting", "running"):
            continue
        if step.predicted_s is None:
            return Summary(evacuation, rows, None)
        elapsed = 0.0
        if status == "running" and step.migration is not None and step.migration.init_started_at:
            elapsed = (now - step.migration.init_started_at).total_seconds()
        left.append(max(step.predicted_s - elapsed, 0.0))
    return Summary(evacuation, rows, time_left_s(left, evacuation.vsp.max_concurrent_migrations))
