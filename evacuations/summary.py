"""An evacuation's progress: each step's status, the counts, the time left, the closing sentence.

Never "stays" for a guest that runs on the evacuated VSP: a guest arriving there is a step of its own
("arriving", then moved on or "not moved"), and a guest listed as staying that runs there now (it
arrived by a path the plan could not see) is shown running there and named among those still runnable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from django.utils import timezone

from migrations_app.forecast import duration_words
from migrations_app.models import Migration
from migrations_app.steering import outlook
from vms.models import Registration

from .models import Evacuation, EvacuationStep
from .plan import NOT_RUNNING_REASONS, time_left_s

STEP_STATUS: dict[str, str] = {
    Migration.State.COMPLETED.value: "done",
    Migration.State.ABORTED.value: "failed",
}


STILL_HERE = ("failed", "cancelled", "not started", "not moved", "landed")


def step_status(step: EvacuationStep) -> str:
    """ "waiting", "running", "done", "failed", "cancelled" (stopped while moving) or "not started";
    for a guest that was migrating to the VSP: "arriving" (not landed yet), "did not arrive" (its
    migration ended otherwise: it runs on its source), "landed" (being moved on) or "not moved"
    (landed, then not moved on: ``step.note`` says why)."""
    migration = step.migration
    if migration is None and step.arriving_id is not None:
        return arrival_status(step)
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


def arrival_status(step: EvacuationStep) -> str:
    """The status of a step still waiting for its guest to land (see ``step_status``)."""
    arriving = step.arriving
    if step.note:
        return "not moved"
    if arriving is not None and arriving.is_active:
        return "arriving"
    if arriving is not None and arriving.state == Migration.State.COMPLETED:
        return "landed"
    return "did not arrive"


def status_words(step: EvacuationStep, status: str, vsp_name: str) -> str:
    """The status cell's text for ``step``, e.g. "Arriving from vsp1: moved on to vsp2 once it lands"."""
    arriving = step.arriving
    source = arriving.source.name if arriving is not None and arriving.source else "its source"
    if status == "arriving":
        return f"Arriving from {source}: moved on to {step.target.name} once it lands"
    if status == "landed":
        return f"Landed on {vsp_name}: being moved on"
    if status == "did not arrive":
        return f"Did not arrive: its migration from {source} ended without it, so it runs on {source}"
    if status == "not moved":
        return f"Not moved: {step.note}; it runs on {vsp_name}"
    if status == "failed" and step.migration is not None and step.migration.alert:
        return f"Failed: {step.migration.alert}"
    return status.capitalize()


@dataclass(frozen=True)
class StayingRow:
    """A guest the plan listed as staying: ``runs_here`` when it runs on the evacuated VSP now."""

    vm_name: str
    reason: str
    runs_here: bool

    @property
    def words(self) -> str:
        if self.runs_here:
            return f"Runs here now: not moved by this evacuation (when it started: {self.reason})"
        return f"Stays: {self.reason}"


@dataclass
class Summary:
    """An evacuation's progress: its steps with their status, the counts, the time left (s)."""

    evacuation: Evacuation
    rows: list[tuple[EvacuationStep, str]]
    time_left_s: float | None  # None: not known (a step without a forecast or past it is still to run)
    staying_rows: list[StayingRow] = field(default_factory=list)

    @property
    def time_left_words(self) -> str:
        """The panel's "Time left": "unknown" without an estimate, "about to finish" under a second (never
        "0 s": it is shown only while the evacuation runs, so something is left), else "42 s"."""
        if self.time_left_s is None:
            return "unknown"
        if self.time_left_s < 1:
            return "about to finish"
        return duration_words(self.time_left_s)

    @property
    def lines(self) -> list[tuple[EvacuationStep, str, str]]:
        """Each step with its status and the status cell's words (``status_words``)."""
        vsp_name = self.evacuation.vsp.name
        return [(step, status, status_words(step, status, vsp_name)) for step, status in self.rows]

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
        statuses = ("done", "running", "waiting", "failed", "cancelled", "not started")
        arrivals = ("arriving", "landed", "did not arrive", "not moved")
        counts = {status: self.count(status) for status in statuses}
        counts |= {status: self.count(status) for status in arrivals if self.count(status)}
        return counts | {"staying": sum(1 for row in self.staying_rows if not row.runs_here)}

    def sentence(self) -> str:
        counts = self.counts()
        parts = [f"{counts['done']} moved", f"{counts['failed']} failed"]
        if counts["cancelled"] or counts["not started"]:
            parts.append(f"{counts['cancelled']} cancelled, {counts['not started']} not started")
        if counts.get("did not arrive"):
            parts.append(f"{counts['did not arrive']} did not arrive (still on their source)")
        parts.append(f"{counts['staying']} stayed")
        failed = [step.vm_name for step, status in self.rows if status in STILL_HERE]
        failed += [row.vm_name for row in self.staying_rows if row.runs_here]
        if failed:
            # A return's guests that did not come back stay on the hosts they were on.
            where = "where they were" if self.evacuation.is_return else f"on {self.evacuation.vsp.name}"
            parts.append(f"still runnable {where}: {', '.join(failed)}")
        return "; ".join(parts)


def summarize(evacuation: Evacuation) -> Summary:
    """The evacuation's progress in two queries (its steps with their migrations and targets), the time
    left counting ``max_concurrent_migrations`` at once (its VSP: one more query unless loaded)."""
    steps = list(evacuation.steps.select_related("migration", "target", "arriving__source"))
    rows = [(step, step_status(step)) for step in steps]
    staying_rows = staying_now(evacuation)
    now = timezone.now()
    left: list[float] = []
    for step, status in rows:
        if status not in ("waiting", "running", "arriving", "landed"):
            continue
        step_left = step_left_s(step, status, now)
        if step_left is None:
            return Summary(evacuation, rows, None, staying_rows)
        left.append(step_left)
    at_once = evacuation.vsp.max_concurrent_migrations
    return Summary(evacuation, rows, time_left_s(left, at_once), staying_rows)


def step_left_s(step: EvacuationStep, status: str, now: datetime) -> float | None:
    """How long ``step`` (of ``status``, one still to end) has left (s), None when not known.

    Its forecast counted down from its migration's Init; a running step past its forecast has its
    migration's own live estimate (``steering.outlook``, from what is left and the rate now) when there
    is one, else none: the countdown's 0 s said it was over while it still ran (issue 21).
    """
    if step.predicted_s is None:
        return None
    migration = step.migration
    if status != "running" or migration is None or migration.init_started_at is None:
        return step.predicted_s
    remaining = step.predicted_s - (now - migration.init_started_at).total_seconds()
    if remaining > 0:
        return remaining
    live = outlook(migration, now)
    return live.time_left_s if live is not None else None


def staying_now(evacuation: Evacuation) -> list[StayingRow]:
    """The guests the plan listed as staying, each checked against the database now (one query): one
    the plan said did not run there (``said_not_running``) whose copy there is now runnable and On
    runs there, whatever the plan said."""
    names = [stay["vm"] for stay in evacuation.staying]
    running = set(
        Registration.objects.filter(
            vsp_id=evacuation.vsp_id, vm__name__in=names, hardware_status=Registration.HardwareStatus.ON
        ).values_list("vm__name", flat=True)
    )
    return [
        StayingRow(stay["vm"], stay["reason"], stay["vm"] in running and said_not_running(stay["reason"]))
        for stay in evacuation.staying
    ]


def said_not_running(reason: str) -> bool:
    """Whether a stay ``reason`` says the guest did not run on the VSP (Not Runnable copy, powered off,
    lost); a guest that stays for another reason (a vPar, online migration disabled, no room) runs
    there and is rightly said to stay."""
    return reason.startswith(NOT_RUNNING_REASONS)
