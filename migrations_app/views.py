"""Migration pages: the migrate dialog, cancel, and "migrate selected" on a VSP's Virtual Machines tab.

Each view reads the request, checks access (``vms.access``: what the user cannot see is a 404), calls
one action from ``actions.py`` (which decides the right to act), renders. Refusals change nothing and
say why in plain words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.core.exceptions import PermissionDenied
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import reswap, retarget

from vms.access import check_can_change_vm, get_visible_vm, get_visible_vsp
from vms.http import HtmxHttpRequest
from vms.inventory import probe_reachability
from vms.models import VSP, VirtualMachine
from vms.views import apply_change

from . import estimates, migration_policy, recommend, steering
from .access import (
    ADD_MIGRATION_PERMISSION,
    CHANGE_MIGRATION_PERMISSION,
    check_can_migrate,
    migration_targets,
)
from .actions import (
    MigrationRefused,
    already_migrating_message,
    do_cancel_migration,
    do_request_migration,
    do_request_migrations,
    do_set_migration_policy,
)
from .checks import ALREADY_MIGRATING_REASON, TargetCheck, check_targets
from .models import Migration
from .progress import get_migration_display, render_vm_fragments, user_view

DIALOG_TEMPLATE = "migrations_app/migrate_dialog.html"
CONFIRM_FIELD = "confirm_not_converging"  # its value: the target the admin confirmed starting anyway


def parse_id(value: str | None) -> int | None:
    try:
        number = int(value or "")
    except ValueError:
        return None
    return number if number > 0 else None


@require_http_methods(["GET", "POST"])
def migrate(request: HtmxHttpRequest, vm_id: int) -> HttpResponse:
    """GET: every VSP the user may migrate to, with its pre-check result. POST: start the migration.

    A VM the user cannot see is a 404; one they may not migrate (the permission, or the operator role
    on its source's host group) a short 403. A forged target outside the user's groups is refused by
    the action (403, the dialog says why, nothing changes). Every refused POST with a target is kept in
    the history, permission refusals included (the action records them).
    """
    if request.method == "GET" and not request.user.has_perm(ADD_MIGRATION_PERMISSION):
        raise PermissionDenied  # no dialog for an account that may never migrate, whichever VM
    vm = get_visible_vm(request.user, vm_id)
    if request.method == "GET":
        check_can_migrate(request.user, vm)  # PermissionDenied: the project's handler403, a short refusal
        # Reachability is checked now, not taken from the last inventory (up to 30 s old).
        if settings.MIGRATE_DIALOG_PROBE_TIMEOUT_S:
            probe_reachability(list(VSP.objects.all()), settings.MIGRATE_DIALOG_PROBE_TIMEOUT_S)
        return render_dialog(request, vm)
    target_id = parse_id(request.POST.get("target"))
    target = VSP.objects.filter(pk=target_id).first() if target_id else None
    if target is None:  # no attempt to keep: nothing was asked of a VSP
        check_can_migrate(request.user, vm)
        checks = offered_checks(request, vm)
        error = refused_everywhere(vm, checks) or "Choose a target VSP from the list."
        return render_dialog(request, vm, error=error, status=400)
    overrides = policy_overrides(request.POST)
    # A refused dialog keeps the target chosen and every value typed (issue 21.4).
    kept: dict[str, Any] = {"policy": overrides, "chosen": target.pk}
    if request.POST.get(CONFIRM_FIELD) != str(target.pk):
        warning = recommend.convergence_warning(request.user, vm, target, overrides)
        if warning:  # nothing started: the admin confirms, in the dialog, with the reason before them
            return render_dialog(request, vm, status=409, confirm_warning=warning, **kept)
    try:
        do_request_migration(vm, target, request.user, policy=overrides)
    except migration_policy.PolicyError as error:
        errors = migration_policy.policy_errors(overrides, base=vm.migration_policy) or {
            error.field: str(error)
        }
        words = (
            str(error)
            if len(errors) == 1
            else f"{len(errors)} values are not valid: each says why beside it."
        )
        return render_dialog(request, vm, error=words, status=400, **kept)
    except MigrationRefused as refusal:
        return render_dialog(request, vm, error=str(refusal.message), status=400, **kept)
    except PermissionDenied as denied:
        check_can_migrate(request.user, vm)  # may not migrate it at all: the short refusal page
        return render_dialog(request, vm, error=str(denied), status=403, **kept)
    if request.htmx:
        # The dialog closes (empty slot) and the phases appear at once; the websocket takes over from here.
        display = get_migration_display(vm)
        view = user_view(request.user, display)
        return HttpResponse(render_vm_fragments(display, oob=True, request=request, view=view))
    messages.success(request, f"Migration of {vm.name} to {target.name} requested.")
    return redirect("vms:vm_general", pk=vm.pk)


def policy_overrides(post: Any) -> dict[str, str]:
    """The dialog's policy fields (a preset, or Custom with its values); an unticked checkbox is off."""
    fields = {key: post.get(key, "") for key in migration_policy.FIELDS if key in post}
    if fields.get("preset") == "custom" and "auto_converge" not in post:
        fields["auto_converge"] = "false"
    return fields


def common_refusal(checks: list[TargetCheck]) -> str | None:
    """The one reason every target is refused for (a vPar, migration disabled for the VM...), or None."""
    reasons = {check.reason for check in checks}
    if len(checks) > 1 and len(reasons) == 1 and not checks[0].ok:
        return checks[0].reason
    return None


def refused_everywhere(vm: VirtualMachine, checks: list[TargetCheck]) -> str | None:
    """What the dialog says when no target can take ``vm``, or None when one can."""
    if any(check.ok for check in checks):
        return None
    if vm.is_vpar:
        return f"{vm.name} is a vPar: vPars never migrate, so there is no VSP to choose."
    if common_refusal(checks) == ALREADY_MIGRATING_REASON:  # who won, to where and when: one message
        return already_migrating_message(vm)
    if reason := common_refusal(checks):
        return f"{vm.name} cannot migrate to any VSP: {reason}."
    return f"No VSP can take {vm.name} now; each row says why."


def offered_checks(request: HtmxHttpRequest, vm: VirtualMachine) -> list[TargetCheck]:
    """The dialog's rows: only VSPs where the user is an operator (others are not offered at all)."""
    offered = set(migration_targets(request.user).values_list("pk", flat=True))
    return [check for check in check_targets(vm) if check.vsp.pk in offered]


@dataclass(frozen=True)
class TargetRow:
    """A target's pre-check with its forecast (None: not known yet, the dialog fetches it)."""

    check: TargetCheck
    forecast: estimates.TargetForecast | None

    @property
    def vsp(self) -> VSP:
        return self.check.vsp

    @property
    def ok(self) -> bool:
        return self.check.ok

    @property
    def reason(self) -> str:
        return self.check.reason

    @property
    def encryption(self) -> str:
        return self.check.encryption

    @property
    def encrypted(self) -> bool:
        return self.check.encrypted

    @property
    def streams_label(self) -> str:
        return self.check.streams_label

    @property
    def free_mib(self) -> int | None:
        return self.check.free_mib

    @property
    def left_after_mib(self) -> int | None:
        return self.check.left_after_mib


LINK_POLL_S = 3  # while a link probe runs, the dialog asks for its forecasts again this often


def target_rows(
    vm: VirtualMachine, checks: list[TargetCheck], policy: dict[str, Any], *, measure: bool
) -> list[TargetRow]:
    """Each target with its forecast; ``measure``: ask the source agent for the dirty rate if not cached."""
    guest = estimates.cached_dirty_rate(vm)
    if guest is None and measure and any(check.ok for check in checks):
        guest = estimates.measure_dirty_rate(vm)
    known = guest is not None or measure
    return [
        TargetRow(check, estimates.forecast_to(vm, check.vsp, policy, guest) if check.ok and known else None)
        for check in checks
    ]


@require_GET
@permission_required(ADD_MIGRATION_PERMISSION, raise_exception=True)
def forecast_cells(request: HtmxHttpRequest, vm_id: int) -> HttpResponse:
    """The dialog's forecast cells (out-of-band swaps), after measuring the dirty rate (about 0.5 s).

    The dialog sends its fields along (``preset`` and the other policy fields, as the Migrate form posts
    them, and the chosen ``target``): the forecast is then the one of that policy, and the policy's
    summary line, field errors and the recommendation are swapped too; the target is moved to the
    recommended one unless the admin chose another (the one sent is not the last recommendation).
    Every bad value is said beside its field and the cells stay as they were, a note saying they show
    the last valid policy. Without policy fields (an old page), the VM's saved policy.
    """
    vm = get_visible_vm(request.user, vm_id)
    vm_policy = migration_policy.effective(vm.migration_policy)
    from_form = "preset" in request.GET
    overrides = policy_overrides(request.GET)
    errors = migration_policy.policy_errors(overrides, base=vm_policy) if from_form else {}
    if errors:
        return HttpResponse(policy_feedback(request, vm, errors=errors))
    policy = migration_policy.check_policy(overrides, base=vm_policy) if from_form else vm_policy
    rows = target_rows(vm, offered_checks(request, vm), policy, measure=True)
    sent, shown = parse_id(request.GET.get("target")), parse_id(request.GET.get("recommended"))
    pick = recommendation(rows)
    chosen = sent if sent is not None and sent != shown else (pick.vsp_id if pick else sent)
    context = {"vm": vm, "forecast_oob": True, "recommendation": pick, "chosen": chosen}
    html = "".join(
        render_to_string(f"{DIALOG_TEMPLATE}#target_cells", {**context, "check": row}, request=request)
        for row in rows
    )
    html += render_to_string(f"{DIALOG_TEMPLATE}#recommendation", context, request=request)
    if from_form:
        html += policy_feedback(request, vm, policy=policy)
    if measuring_link(rows):  # ask again once the link probe may have landed (one loader, replaced)
        context = {"vm": vm, "forecast_oob": True, "forecast_delay_s": LINK_POLL_S}
        html += render_to_string(f"{DIALOG_TEMPLATE}#forecast_loader", context, request=request)
    return HttpResponse(html)


def recommendation(rows: list[TargetRow]) -> recommend.Recommendation | None:
    """The dialog's recommended target (``recommend.recommend``) among its rows."""
    return recommend.recommend([(row.check, row.forecast) for row in rows])


def policy_feedback(
    request: HtmxHttpRequest,
    vm: VirtualMachine,
    *,
    policy: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
) -> str:
    """Out-of-band swaps of the dialog's policy summary (for a valid ``policy``), every field's error
    (``errors``: ``migration_policy.policy_errors``; none: each cleared) and the forecast's note."""
    context: dict[str, Any] = {"vm": vm, "forecast_oob": True, **policy_error_context(errors)}
    html = "".join(
        render_to_string(
            "migrations_app/_policy_field_error.html", {**context, "key": key, "oob": True}, request=request
        )
        for key in POLICY_ERROR_FIELDS
    )
    if policy is not None:
        context["policy_words"] = migration_policy.describe(policy)
        html += render_to_string(f"{DIALOG_TEMPLATE}#policy_words", context, request=request)
    html += render_to_string(f"{DIALOG_TEMPLATE}#forecast_note", context, request=request)
    return html


POLICY_ERROR_FIELDS = (*migration_policy.FIELDS, "")  # "": words about no one field


def policy_error_context(errors: dict[str, str] | None) -> dict[str, Any]:
    """What the policy fields' error spans show (``migrations_app/_policy_field_error.html``): each bad
    field's words at once (issue 21.4: only the first was shown)."""
    return {"policy_errors_id": "migrate-policy-error", "policy_errors": errors or {}}


def measuring_link(rows: list[TargetRow]) -> bool:
    """Whether a target's link is being probed (``estimates.known_link_rate``): the dialog asks again."""
    return any(row.forecast is not None and row.forecast.measuring_link for row in rows)


def render_dialog(
    request: HtmxHttpRequest,
    vm: VirtualMachine,
    *,
    error: str = "",
    status: int = 200,
    policy: dict[str, Any] | None = None,
    chosen: int | None = None,
    confirm_warning: str = "",
) -> HttpResponse:
    """The dialog: every offered target with its memory, pre-check and forecast, the recommended one
    marked and preselected (``chosen``: the target the admin had chosen, kept after a refusal), the
    policy as typed with every bad field's words beside it; ``confirm_warning``: why the migration
    to ``chosen`` will not converge, with a button that starts it anyway."""
    checks = offered_checks(request, vm)
    vm_policy = migration_policy.effective(vm.migration_policy)
    errors = migration_policy.policy_errors(policy or {}, base=vm_policy)
    shown_policy = vm_policy if errors else migration_policy.check_policy(policy or {}, base=vm_policy)
    form_policy = shown_policy
    if errors and policy:  # the form keeps what was typed, the errors beside the bad fields
        typed = {key: value for key, value in policy.items() if key != "auto_converge"}
        form_policy = {**vm_policy, **typed, "auto_converge": policy.get("auto_converge") == "true"}
    blocked = refused_everywhere(vm, checks)
    rows = target_rows(vm, checks, shown_policy, measure=not request.htmx)
    pick = recommendation(rows)
    context = {
        "vm": vm,
        "checks": rows,
        "recommendation": pick,
        "chosen": chosen if chosen is not None else (pick.vsp_id if pick else None),
        "forecast_pending": any(row.ok and row.forecast is None for row in rows) or measuring_link(rows),
        "forecast_delay_s": 0 if any(row.ok and row.forecast is None for row in rows) else LINK_POLL_S,
        # Said once above the table, not on every row; the Migrate button is disabled then.
        "blocked": blocked,
        "common_refusal": common_refusal(checks),
        "error": "" if error == blocked else error,
        "confirm_warning": confirm_warning,
        "confirm_field": CONFIRM_FIELD,
        "full_page": not request.htmx,
        "vm_policy": vm_policy,
        "policy": form_policy,
        "policy_words": migration_policy.describe(shown_policy),
        "presets": [(key, label, words) for key, (label, words, _) in migration_policy.PRESETS.items()],
        **policy_error_context(errors),
    }
    template = f"{DIALOG_TEMPLATE}#dialog" if request.htmx else DIALOG_TEMPLATE
    response = render(request, template, context, status=status)
    if request.htmx:
        response = reswap(retarget(response, "#migrate-dialog-slot"), "innerHTML")
    return response


@require_POST
@permission_required(CHANGE_MIGRATION_PERMISSION, raise_exception=True)
def cancel(request: HtmxHttpRequest, migration_id: int) -> HttpResponse:
    migration = get_object_or_404(Migration.objects.select_related("vm"), pk=migration_id, vm__isnull=False)
    get_visible_vm(request.user, migration.vm_id)  # 404 for a migration of a guest the user cannot see
    vm = migration.require_vm()
    try:
        do_cancel_migration(migration, request.user)  # PermissionDenied: handler403, as above
    except MigrationRefused as refusal:
        return respond_notice(request, vm, str(refusal.message), ok=False)
    return respond_notice(request, vm, f"Cancel of the migration of {vm.name} requested.")


@require_POST
def change(request: HtmxHttpRequest, migration_id: int) -> HttpResponse:
    """Steer a running migration from its phases panel (``steering.do_change_migration``)."""
    migration = get_object_or_404(Migration.objects.select_related("vm"), pk=migration_id, vm__isnull=False)
    vm = get_visible_vm(request.user, migration.require_vm().pk)  # 404 for a guest the user cannot see
    try:
        done = steering.do_change_migration(migration, request.POST.dict(), request.user)
    except steering.ChangeRefused as refusal:
        if request.htmx:  # said beside the buttons that asked (progress.html#steer_error), not at the top
            context = {"steer_migration_id": migration.pk, "steer_error": refusal.message, "oob": True}
            return render(request, "migrations_app/progress.html#steer_refused", context, status=400)
        return respond_notice(request, vm, refusal.message, ok=False)
    return respond_notice(request, vm, done, steered=migration)


def respond_notice(
    request: HtmxHttpRequest,
    vm: VirtualMachine,
    text: str,
    *,
    ok: bool = True,
    steered: Migration | None = None,
) -> HttpResponse:
    """``text`` as the page's notice (htmx: with the panel's fragments; else a message and a redirect).
    ``steered``: the migration a change went through for, whose earlier refusal beside its buttons clears."""
    if request.htmx:
        display = get_migration_display(vm)
        view = user_view(request.user, display)  # what he may see of it, as his socket would
        context = {"notice": text, "ok": ok, **display.for_view(view).context(oob=True)}
        context["view_controls"] = view.controls
        if steered is not None:
            context |= {"steered": True, "steer_error": "", "steer_migration_id": steered.pk}
        return render(request, "migrations_app/progress.html#notice_and_state", context)
    (messages.success if ok else messages.error)(request, text)
    return redirect("vms:vm_general", pk=vm.pk)


@require_POST
def migrate_selected(request: HtmxHttpRequest, vsp_id: int) -> HttpResponse:
    """Several VMs of one VSP to one target: they leave N at a time (the VSP's setting), the rest wait.

    The action decides each VM's rights (and keeps each refusal in the history), so no permission
    decorator answers first."""
    vsp = get_visible_vsp(request.user, vsp_id)
    target_id = parse_id(request.POST.get("target"))
    target = VSP.objects.filter(pk=target_id).first() if target_id else None
    vm_ids = [parse_id(value) for value in request.POST.getlist("vm")]
    if target is None or not vm_ids or None in vm_ids:
        messages.error(request, "Select one or more VMs and a target VSP.")
        return redirect("vms:vsp_detail", pk=vsp.pk)
    vms = list(VirtualMachine.objects.filter(pk__in=vm_ids, registrations__vsp=vsp).order_by("name"))
    if len(vms) != len(set(vm_ids)):
        messages.error(request, f"Some selected VMs are not registered on {vsp.name}; nothing was started.")
        return redirect("vms:vsp_detail", pk=vsp.pk)
    for result in do_request_migrations(vms, target, request.user):
        if result.refusal:
            messages.error(request, result.refusal)
        else:
            messages.success(request, f"{result.vm.name}: migration to {target.name} queued.")
    return redirect("vms:vsp_detail", pk=vsp.pk)


@require_POST
def vm_set_migration_policy(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """The General tab's migration policy form (a preset, or Custom with its values); answers with the
    tab, as the inventory's own forms do (``vms.views.apply_change``)."""
    vm = get_visible_vm(request.user, pk)
    check_can_change_vm(request.user, vm)  # PermissionDenied: the project's handler403, a short refusal

    def change(data: dict[str, Any]) -> str:
        fields = {key: request.POST.get(key, "") for key in migration_policy.FIELDS if key in request.POST}
        if "auto_converge" not in request.POST and request.POST.get("preset") == "custom":
            fields["auto_converge"] = "false"  # an unticked checkbox sends nothing
        policy = do_set_migration_policy(vm, fields, request.user)
        return f"Migration policy of {vm.name} set. {migration_policy.describe(policy)}"

    return apply_change(request, vm, forms.Form(request.POST), change)
