"""Evacuations in the API: the plan, starting it, its progress, cancelling it, leaving maintenance.

The same functions as the VSP page's **Evacuate…** (``evacuations``): the plan is built
by ``build_plan``, started by ``do_start_evacuation`` (re-checked there), cancelled by
``do_cancel_evacuation``; refusals arrive as their problem ``detail`` word for word.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest
from ninja import Field, Path, Query, Router, Schema
from ninja.responses import Status
from pydantic import ConfigDict

from evacuations.actions import (
    do_cancel_evacuation,
    do_leave_maintenance,
    do_start_evacuation,
    latest_evacuation,
)
from evacuations.models import Evacuation
from evacuations.plan import Plan, build_plan, dirty_rates
from evacuations.returns import build_return_plan, candidates, do_start_return, return_rates
from evacuations.rights import may_view_evacuation
from evacuations.summary import summarize
from vms.access import visible_vsps

from .lookups import MAX_ID, get_vm, get_vsp
from .routes import OBJECT_ERRORS, WRITE_ERRORS, IdRef
from .schemas import VSPOut, vsp_out

router = Router(tags=["Evacuations"])
EvacuationId = Path(..., ge=1, le=MAX_ID)
# forecast.Verdict's values, spelt out for the OpenAPI schema (tests/api check they match)
VerdictName = Literal[
    "converges", "converges_with_throttle", "switchover_at_limit", "may_not_converge", "will_not_converge"
]
MAX_GUESTS = 10_000


class PlanStepOut(Schema):
    vm: str
    vm_id: int
    source: str | None = Field(
        default=None,
        description='A return plan\'s: where the guest runs now ("a VSP outside your host groups" for one '
        "you do not see); null in an evacuation plan (the source is the VSP)",
    )
    target: str | None
    target_id: int | None
    predicted_s: float | None = Field(description="Forecast total time (s); null: not known yet")
    verdict: VerdictName | None = Field(
        description=(
            "The forecast's verdict under the VM's policy (docs/convergence.md); null: not known yet. "
            "converges; converges_with_throttle (only with auto-converge); switchover_at_limit (switches "
            "over at the limit, with a longer freeze); may_not_converge (too close to promise: the measured "
            "rates converge, but not with the model's margin; predicted_s is the time if they hold); "
            "will_not_converge (stops at the limit, the guest stays on its source; predicted_s runs to "
            "the limit)"
        )
    )
    verdict_label: str | None = Field(
        description='The verdict in words, e.g. "may not converge under this policy: too close to promise"'
    )
    problem: str


class StayingOut(Schema):
    vm: str
    reason: str
    runs_here: bool = Field(
        default=False, description="It runs on the evacuated VSP now (never reported as staying then)"
    )


class ArrivingOut(Schema):
    vm: str
    source: str | None = Field(description="The VSP it is migrating from")
    target: str | None = Field(description="Where it is moved on once it lands; null: no VSP has room")
    words: str = Field(description="What the plan says of it")


class PlanOut(Schema):
    vsp: str
    steps: list[PlanStepOut] = Field(description="In the order they would run")
    staying: list[StayingOut] = Field(description="Guests that cannot leave, each with its reason")
    arriving: list[ArrivingOut] = Field(
        description="Guests migrating to the VSP now: moved on once they land", default_factory=list
    )
    problems: list[str]
    can_start: bool
    known_total_s: float = Field(
        description="When the steps with a forecast would all be done (s); steps forecast not to converge "
        "are not counted (not_converging_count)"
    )
    unknown_count: int = Field(description="Steps whose time is not known yet")
    not_converging_count: int = Field(
        description="Steps forecast not to converge (will_not_converge), left out of known_total_s"
    )


class EvacuationIn(Schema):
    """Targets by VM (id or name -> VSP id or name) and the order (VM ids or names); omitted: the plan's."""

    model_config = ConfigDict(extra="forbid")  # a misspelt "order" is refused, not silently the plan's

    targets: dict[str, str] = Field(default_factory=dict, max_length=MAX_GUESTS)
    order: list[str] | None = Field(default=None, max_length=MAX_GUESTS)
    exclude: list[str] = Field(
        default_factory=list, max_length=MAX_GUESTS, description="VMs (ids or names) that stay on the VSP"
    )
    confirm: list[str] = Field(
        default_factory=list,
        max_length=MAX_GUESTS,
        description="VMs started although their forecast may or will not converge (else: refused)",
    )


class EvacuationStepOut(Schema):
    position: int
    vm: str
    target: str
    predicted_s: float | None
    status: str = Field(
        description="waiting, running, done, failed, cancelled or not started; for a guest that was "
        "migrating to the VSP: arriving, landed, did not arrive or not moved"
    )
    words: str = Field(default="", description="The status in words, as the VSP page shows it")
    migration_id: int | None


class EvacuationOut(Schema):
    id: int
    vsp: str
    kind: str = Field(
        description="evacuation (guests leave vsp) or return (the guests its last evacuation moved come back)"
    )
    state: str
    requested_by: str
    started_at: datetime
    ended_at: datetime | None
    cancel_requested: bool
    counts: dict[str, int]
    time_left_s: float | None
    time_left: str = Field(
        description="Time left in the VSP page's words: 'unknown' without an estimate, 'about to finish' "
        "under a second while it runs, else e.g. '1 min 5 s'"
    )
    summary: str
    steps: list[EvacuationStepOut]
    staying: list[StayingOut]


def plan_out(plan: Plan) -> PlanOut:
    sources: dict[int, str] = getattr(plan, "sources", {})  # a ReturnPlan's
    return PlanOut(
        vsp=plan.vsp.name,
        steps=[
            PlanStepOut(
                vm=step.vm.name,
                vm_id=step.vm.pk,
                source=sources.get(step.vm.pk),
                target=step.target.name if step.target else None,
                target_id=step.target.pk if step.target else None,
                predicted_s=step.predicted_s,
                verdict=step.verdict.value if step.verdict else None,
                verdict_label=step.verdict.label if step.verdict else None,
                problem=step.problem,
            )
            for step in plan.steps
        ],
        staying=[StayingOut(vm=stay.vm_name, reason=stay.reason) for stay in plan.staying],
        arriving=[
            ArrivingOut(
                vm=arriving.vm.name,
                source=arriving.migration.source.name if arriving.migration.source else None,
                target=arriving.target.name if arriving.target else None,
                words=arriving.words,
            )
            for arriving in plan.arriving
        ],
        problems=plan.problems,
        can_start=plan.ok,
        known_total_s=plan.known_total_s,
        unknown_count=plan.unknown_count,
        not_converging_count=plan.not_converging_count,
    )


def evacuation_out(evacuation: Evacuation) -> EvacuationOut:
    summary = summarize(evacuation)
    return EvacuationOut(
        id=evacuation.pk,
        vsp=evacuation.vsp.name,
        kind=evacuation.kind,
        state=evacuation.state,
        requested_by=evacuation.requested_by_name,
        started_at=evacuation.started_at,
        ended_at=evacuation.ended_at,
        cancel_requested=evacuation.cancel_requested,
        counts=summary.counts(),
        time_left_s=summary.time_left_s,
        time_left=summary.time_left_words,
        summary=summary.sentence(),
        steps=[
            EvacuationStepOut(
                position=step.position,
                vm=step.vm_name,
                target=step.target.name,
                predicted_s=step.predicted_s,
                status=status,
                words=words,
                migration_id=step.migration_id,
            )
            for step, status, words in summary.lines
        ],
        staying=[
            StayingOut(vm=row.vm_name, reason=row.reason, runs_here=row.runs_here)
            for row in summary.staying_rows
        ],
    )


def get_evacuation(request: HttpRequest, evacuation_id: int) -> Evacuation:
    evacuation = Evacuation.objects.select_related("vsp").filter(pk=evacuation_id).first()
    if evacuation is None or not visible_vsps(request.user).filter(pk=evacuation.vsp_id).exists():
        raise Http404(f"No evacuation with the id {evacuation_id}.")
    if not may_view_evacuation(request.user, evacuation.vsp):
        raise PermissionDenied("Your account lacks the permission to see this.")
    return evacuation


# A URL must stay well within what servers and proxies take (uvicorn's h11: 16 KiB for the request
# line and headers; it answers a longer one with a bare 400 before the console sees it), so the plan's
# query lists are bounded far below a body's MAX_GUESTS; POST /vsps/{vsp}/evacuations takes more.
MAX_QUERY_GUESTS = 100
ExcludeQuery = Query(
    default_factory=list, max_length=MAX_QUERY_GUESTS, description="VMs that stay (ids or names), at most 100"
)
ConfirmQuery = Query(
    default_factory=list,
    max_length=MAX_QUERY_GUESTS,
    description="VMs started although their forecast warns (ids or names), at most 100",
)


@router.get("/vsps/{vsp}/evacuation-plan", response={200: PlanOut, **OBJECT_ERRORS})
def get_plan(
    request: HttpRequest,
    vsp: str = IdRef,
    exclude: list[str] = ExcludeQuery,
    confirm: list[str] = ConfirmQuery,
) -> PlanOut:
    """What evacuating this VSP would do: each guest's target and forecast (each guest's dirty rate is
    measured now unless cached), who stays and why. ``exclude`` and ``confirm`` as the start takes them:
    ``can_start`` is false while a step that may or will not converge is neither."""
    host = get_vsp(vsp, request.user)
    if not may_view_evacuation(request.user, host):
        raise PermissionDenied("Your account lacks the permission to see this.")
    excluded = {get_vm(vm_ref, request.user).pk for vm_ref in exclude}
    confirmed = {get_vm(vm_ref, request.user).pk for vm_ref in confirm}
    plan = build_plan(
        host, rates=dirty_rates(host), excluded=excluded, confirmed=confirmed, user=request.user
    )
    return plan_out(plan)


@router.post("/vsps/{vsp}/evacuations", response={201: EvacuationOut, **WRITE_ERRORS})
def start_evacuation(request: HttpRequest, body: EvacuationIn, vsp: str = IdRef) -> Status[EvacuationOut]:
    """Start evacuating: the VSP enters maintenance, its guests leave through its migration queue.

    They go one at a time, or as many at once as the VSP's ``max_concurrent_migrations`` allows.

    Without ``targets`` the plan's own targets are taken (as shown by ``evacuation-plan``); a target given
    for a VM replaces the plan's. Refused (409, nothing changed) when an evacuation of this VSP runs, the
    plan no longer fits, or a step may or will not converge and is not in ``confirm``.
    """
    host = get_vsp(vsp, request.user)
    chosen = {
        get_vm(vm_ref, request.user).pk: get_vsp(vsp_ref, request.user).pk
        for vm_ref, vsp_ref in body.targets.items()
    }
    excluded = {get_vm(vm_ref, request.user).pk for vm_ref in body.exclude}
    confirmed = {get_vm(vm_ref, request.user).pk for vm_ref in body.confirm}
    proposed = build_plan(host, chosen, excluded=excluded, user=request.user)
    targets = {step.vm.pk: step.target.pk for step in proposed.steps if step.target is not None} | chosen
    order = [get_vm(vm_ref, request.user).pk for vm_ref in body.order] if body.order is not None else None
    choices = {"excluded": excluded, "confirmed": confirmed}
    evacuation = do_start_evacuation(host, targets, order, request.user, **choices)
    return Status(201, evacuation_out(evacuation))


@router.get("/evacuations/{evacuation_id}", response={200: EvacuationOut, **OBJECT_ERRORS})
def get_one_evacuation(request: HttpRequest, evacuation_id: int = EvacuationId) -> EvacuationOut:
    """Progress: each step's status, the counts, the time left, the summary sentence."""
    return evacuation_out(get_evacuation(request, evacuation_id))


@router.post("/evacuations/{evacuation_id}/cancel", response={202: EvacuationOut, **WRITE_ERRORS})
def cancel_evacuation(request: HttpRequest, evacuation_id: int = EvacuationId) -> Status[EvacuationOut]:
    """Cancel as a whole: waiting guests are not started, the running migration is cancelled."""
    evacuation = get_evacuation(request, evacuation_id)
    do_cancel_evacuation(evacuation, request.user)
    return Status(202, evacuation_out(get_evacuation(request, evacuation_id)))


class ReturnIn(Schema):
    """The guests that stay where they are, and those started although their forecast warns."""

    model_config = ConfigDict(extra="forbid")

    exclude: list[str] = Field(default_factory=list, max_length=MAX_GUESTS, description="VMs (ids or names)")
    confirm: list[str] = Field(default_factory=list, max_length=MAX_GUESTS, description="VMs (ids or names)")


MAX_LISTED = 100


@router.get("/vsps/{vsp}/evacuations", response={200: list[EvacuationOut], **OBJECT_ERRORS})
def list_evacuations(
    request: HttpRequest, vsp: str = IdRef, limit: int = Query(20, ge=1, le=MAX_LISTED)
) -> list[EvacuationOut]:
    """The VSP's evacuations and returns of its guests, newest first (at most ``limit``)."""
    host = get_vsp(vsp, request.user)
    if not may_view_evacuation(request.user, host):
        raise PermissionDenied("Your account lacks the permission to see this.")
    latest_evacuation(host)  # settles the running one if its migrations have all ended
    found = Evacuation.objects.filter(vsp=host).select_related("vsp")[:limit]
    return [evacuation_out(evacuation) for evacuation in found]


@router.get("/vsps/{vsp}/return-plan", response={200: PlanOut, **OBJECT_ERRORS})
def get_return_plan(
    request: HttpRequest,
    vsp: str = IdRef,
    exclude: list[str] = ExcludeQuery,
    confirm: list[str] = ConfirmQuery,
) -> PlanOut:
    """What bringing back the guests the VSP's last evacuation moved away would do: each guest's
    forecast to the VSP, who stays where it is and why (``evacuations.returns``)."""
    host = get_vsp(vsp, request.user)
    if not may_view_evacuation(request.user, host):
        raise PermissionDenied("Your account lacks the permission to see this.")
    _, leaving, _ = candidates(host)
    plan = build_return_plan(
        host,
        rates=return_rates(leaving),
        excluded={get_vm(vm_ref, request.user).pk for vm_ref in exclude},
        confirmed={get_vm(vm_ref, request.user).pk for vm_ref in confirm},
        user=request.user,
    )
    return plan_out(plan)


@router.post("/vsps/{vsp}/returns", response={201: EvacuationOut, **WRITE_ERRORS})
def start_return(request: HttpRequest, body: ReturnIn, vsp: str = IdRef) -> Status[EvacuationOut]:
    """Bring the guests back (refused, 409, while the VSP is in maintenance or a step warns unconfirmed)."""
    host = get_vsp(vsp, request.user)
    excluded = {get_vm(vm_ref, request.user).pk for vm_ref in body.exclude}
    confirmed = {get_vm(vm_ref, request.user).pk for vm_ref in body.confirm}
    evacuation = do_start_return(host, request.user, excluded=excluded, confirmed=confirmed)
    return Status(201, evacuation_out(evacuation))


@router.post("/vsps/{vsp}/leave-maintenance", response={200: VSPOut, **WRITE_ERRORS})
def leave_maintenance(request: HttpRequest, vsp: str = IdRef) -> VSPOut:
    """The admin's explicit end of maintenance (refused while an evacuation of it runs)."""
    do_leave_maintenance(get_vsp(vsp, request.user), request.user)
    return vsp_out(get_vsp(vsp, request.user))
