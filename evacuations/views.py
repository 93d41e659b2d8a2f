"""Evacuation pages: the plan (view, change targets and order, start), live progress, cancel, maintenance.

Each view reads the request, checks the right (``rights.may_*``), calls one function of ``actions`` (or
builds the ``plan``), renders. Refusals change nothing and say why in plain words.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse, QueryDict
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from vms.access import LACKS_PERMISSION, get_visible_vsp
from vms.http import HtmxHttpRequest
from vms.models import VSP, Registration

from .actions import EvacuationRefused, do_cancel_evacuation, do_leave_maintenance, do_start_evacuation
from .models import Evacuation
from .panel import panel_context
from .plan import Plan, build_plan, dirty_rates
from .returns import (
    ReturnPlan,
    build_return_plan,
    candidates,
    do_start_return,
    return_rates,
    returnable_count,
)
from .rights import may_cancel_evacuation, may_evacuate, may_leave_maintenance, may_view_evacuation


class BadPlanInput(ValueError):
    """A target or position field that is not a positive whole number; ``str()`` names the guest."""


FIELD_WORDS = {
    "target_": ("Target for {vm}", "is not a VSP"),
    "position_": ("Position of {vm}", "is not a whole number of 1 or more"),
}


def plan_input(
    data: QueryDict, names: Mapping[int, str] | None = None
) -> tuple[dict[int, int], list[int] | None]:
    """The admin's choices from ``target_<vm id>`` and ``position_<vm id>`` fields.

    Returns (target VSP id per VM id, VM ids in the chosen order or None when no position was sent).
    Raises ``BadPlanInput`` for a field that is not a positive whole number, in the page's words: the
    guest's name from ``names`` (VM id -> name), e.g. "Target for web01: 'abc' is not a VSP.".
    """
    names = names or {}
    targets: dict[int, int] = {}
    positions: dict[int, int] = {}
    for key, value in data.items():
        for prefix, into in (("target_", targets), ("position_", positions)):
            if not key.startswith(prefix):
                continue
            vm_id = _id(key[len(prefix) :])
            if vm_id is None:
                raise BadPlanInput(f"The plan has no field {key[:60]!r}: reload the plan.")
            label, not_valid = FIELD_WORDS[prefix]
            label = label.format(vm=names.get(vm_id, f"the guest with id {vm_id}"))
            number = _id(str(value))
            if number is None:
                raise BadPlanInput(f"{label}: {str(value)[:40]!r} {not_valid}.")
            into[vm_id] = number
    order = sorted(positions, key=lambda vm_id: (positions[vm_id], vm_id)) if positions else None
    return targets, order


def checked_vms(data: QueryDict, prefix: str) -> set[int]:
    """VM ids of the ticked ``<prefix><vm id>`` boxes (``exclude_``, ``confirm_``); ``BadPlanInput``
    for a box that names no guest id."""
    ids = set()
    for key in data:
        if key.startswith(prefix):
            vm_id = _id(key[len(prefix) :])
            if vm_id is None:
                raise BadPlanInput(f"The plan has no field {key[:60]!r}: reload the plan.")
            ids.add(vm_id)
    return ids


def _id(text: str) -> int | None:
    """A positive whole number from ``text``, or None."""
    try:
        number = int(text)
    except ValueError:
        return None
    return number if number > 0 else None


def _denied() -> PermissionDenied:
    return PermissionDenied(LACKS_PERMISSION)


@require_http_methods(["GET", "POST"])
def evacuate(request: HtmxHttpRequest, vsp_id: int) -> HttpResponse:
    """GET: the plan (with the admin's changes, if any). POST: start it, re-checked now."""
    vsp = get_visible_vsp(request.user, vsp_id)  # another group's VSP: not found, like a missing one
    data = request.POST if request.method == "POST" else request.GET
    names = dict(Registration.objects.filter(vsp=vsp).values_list("vm_id", "vm__name"))
    try:
        targets, order = plan_input(data, names)
        excluded, confirmed = checked_vms(data, "exclude_"), checked_vms(data, "confirm_")
    except BadPlanInput as error:
        return render_plan(request, vsp, {}, None, error=str(error), status=400)
    if request.method == "GET" or "update" in request.POST:  # Update plan posts (CSRF token in the body)
        return render_plan(request, vsp, targets, order, excluded=excluded, confirmed=confirmed)
    if not may_evacuate(request.user, vsp):
        raise _denied()
    try:
        do_start_evacuation(vsp, targets, order, request.user, excluded=excluded, confirmed=confirmed)
    except EvacuationRefused as refusal:
        refused = str(refusal.message)
        return render_plan(
            request, vsp, targets, order, error=refused, status=400, excluded=excluded, confirmed=confirmed
        )
    messages.success(request, f"Evacuation of {vsp.name} started; {vsp.name} is in maintenance.")
    return redirect("vms:vsp_detail", pk=vsp.pk)


def render_plan(
    request: HtmxHttpRequest,
    vsp: VSP,
    targets: dict[int, int],
    order: list[int] | None,
    *,
    error: str = "",
    status: int = 200,
    excluded: set[int] | None = None,
    confirmed: set[int] | None = None,
) -> HttpResponse:
    """The plan page; each guest's dirty rate is measured now unless cached (``dirty_rates``)."""
    excluded = excluded or set()
    plan = build_plan(
        vsp,
        targets,
        order,
        rates=dirty_rates(vsp),
        excluded=excluded,
        confirmed=confirmed or set(),
        user=request.user,
    )
    return render(
        request, "evacuations/evacuate.html", plan_context(request, vsp, plan, error), status=status
    )


def plan_is_return(plan: Plan) -> bool:
    return isinstance(plan, ReturnPlan)


def plan_context(request: HtmxHttpRequest, vsp: VSP, plan: Plan, error: str) -> dict[str, Any]:
    """What the plan page shows of ``plan`` (an evacuation's, or a return's: ``plan_mode``).

    ``startable``: Start is enabled now; ``needs_choice``: Start waits only for a choice (exclude or
    start anyway) on each warning step, enabled in the browser as soon as each has one (``console.js``);
    ``maintenance_only``: no guest can leave, Start just enters maintenance.
    """
    running = Evacuation.objects.filter(vsp=vsp, state=Evacuation.State.RUNNING).first()
    blocked = bool(plan.blocking_problems) or running is not None
    maintenance_only = not plan.steps and not blocked and not vsp.maintenance and not plan_is_return(plan)
    return {
        "vsp": vsp,
        "plan": plan,
        "running": running,
        "error": error,
        "may_start": may_evacuate(request.user, vsp),
        "startable": (plan.ok or maintenance_only) and not blocked,
        "needs_choice": bool(plan.steps) and not blocked and not plan.ok,
        "maintenance_only": maintenance_only,
        "returning": plan_is_return(plan),
        "nav": "vsps",
    }


@require_GET
def evacuation_progress(request: HtmxHttpRequest, evacuation_id: int) -> HttpResponse:
    """The progress panel alone, polled every second by the VSP page while the evacuation runs."""
    evacuation = get_object_or_404(Evacuation.objects.select_related("vsp"), pk=evacuation_id)
    if not may_view_evacuation(request.user, evacuation.vsp):
        raise Http404()  # another group's VSP: not found, like a missing one
    return render(request, "evacuations/evacuation_panel.html", panel_context(request.user, evacuation.vsp))


@require_POST
def cancel_evacuation(request: HtmxHttpRequest, evacuation_id: int) -> HttpResponse:
    evacuation = get_object_or_404(Evacuation.objects.select_related("vsp"), pk=evacuation_id)
    if not may_view_evacuation(request.user, evacuation.vsp):
        raise Http404()
    if not may_cancel_evacuation(request.user, evacuation.vsp):
        raise _denied()
    try:
        do_cancel_evacuation(evacuation, request.user)
    except EvacuationRefused as refusal:
        messages.error(request, str(refusal.message))
    else:
        messages.success(request, f"Evacuation of {evacuation.vsp.name} cancelled: waiting guests stay.")
    return redirect("vms:vsp_detail", pk=evacuation.vsp_id)


@require_http_methods(["GET", "POST"])
def return_guests(request: HtmxHttpRequest, vsp_id: int) -> HttpResponse:
    """The return plan (``returns``): GET or POST ``update`` shows it; POST starts it, re-checked now."""
    vsp = get_visible_vsp(request.user, vsp_id)
    data = request.POST if request.method == "POST" else request.GET
    try:
        excluded, confirmed = checked_vms(data, "exclude_"), checked_vms(data, "confirm_")
    except BadPlanInput as error:
        return render_return_plan(request, vsp, error=str(error), status=400)
    if request.method == "GET" or "update" in request.POST:
        return render_return_plan(request, vsp, excluded=excluded, confirmed=confirmed)
    if not may_evacuate(request.user, vsp):
        raise _denied()
    try:
        evacuation = do_start_return(vsp, request.user, excluded=excluded, confirmed=confirmed)
    except EvacuationRefused as refusal:
        refused = str(refusal.message)
        return render_return_plan(
            request, vsp, error=refused, status=400, excluded=excluded, confirmed=confirmed
        )
    count = evacuation.steps.count()
    messages.success(
        request,
        f"{count} guest{'s' if count != 1 else ''} on the way back to {vsp.name}.",
    )
    return redirect("vms:vsp_detail", pk=vsp.pk)


def render_return_plan(
    request: HtmxHttpRequest,
    vsp: VSP,
    *,
    error: str = "",
    status: int = 200,
    excluded: set[int] | None = None,
    confirmed: set[int] | None = None,
) -> HttpResponse:
    """The plan page in its return mode; each guest's dirty rate is measured now unless cached."""
    _, leaving, _ = candidates(vsp)
    plan = build_return_plan(
        vsp,
        rates=return_rates(leaving),
        excluded=excluded or set(),
        confirmed=confirmed or set(),
        user=request.user,
    )
    return render(
        request, "evacuations/evacuate.html", plan_context(request, vsp, plan, error), status=status
    )


@require_POST
def leave_maintenance(request: HtmxHttpRequest, vsp_id: int) -> HttpResponse:
    vsp = get_visible_vsp(request.user, vsp_id)
    if not may_leave_maintenance(request.user, vsp):
        raise _denied()
    try:
        do_leave_maintenance(vsp, request.user)
    except EvacuationRefused as refusal:
        messages.error(request, str(refusal.message))
    else:
        messages.success(request, f"{vsp.name} left maintenance: it may receive guests again.")
        if returnable_count(vsp):
            return redirect("evacuations:return_guests", vsp_id=vsp.pk)  # the offer to bring them back
    return redirect("vms:vsp_detail", pk=vsp.pk)
