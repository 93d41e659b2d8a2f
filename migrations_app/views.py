"""Migration pages: the migrate dialog, cancel, and "migrate selected" on a VSP's Virtual Machines tab.

Each view reads the request, checks access, calls one action from ``actions.py``, renders.
Refusals change nothing and say why in plain words.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST
from django_htmx.http import reswap, retarget

from vms.http import HtmxHttpRequest
from vms.inventory import probe_reachability
from vms.models import VSP, VirtualMachine

from .actions import (
    ADD_MIGRATION_PERMISSION,
    CHANGE_MIGRATION_PERMISSION,
    MigrationRefused,
    do_cancel_migration,
    do_request_migration,
    do_request_migrations,
)
from .checks import TargetCheck, check_targets
from .models import Migration
from .progress import get_migration_display, render_vm_fragments

DIALOG_TEMPLATE = "migrations_app/migrate_dialog.html"


def parse_id(value: str | None) -> int | None:
    try:
        number = int(value or "")
    except ValueError:
        return None
    return number if number > 0 else None


@require_http_methods(["GET", "POST"])
@permission_required(ADD_MIGRATION_PERMISSION, raise_exception=True)
def migrate(request: HtmxHttpRequest, vm_id: int) -> HttpResponse:
    """GET: every VSP with its pre-check result. POST: start the migration to the chosen target."""
    vm = get_object_or_404(VirtualMachine, pk=vm_id)
    if request.method == "GET":
        # Reachability is checked now, not taken from the last inventory (up to 30 s old).
        if settings.MIGRATE_DIALOG_PROBE_TIMEOUT_S:
            probe_reachability(list(VSP.objects.all()), settings.MIGRATE_DIALOG_PROBE_TIMEOUT_S)
        return render_dialog(request, vm)
    target_id = parse_id(request.POST.get("target"))
    target = VSP.objects.filter(pk=target_id).first() if target_id else None
    if target is None:
        checks = check_targets(vm)
        error = refused_everywhere(vm, checks) or "Choose a target VSP from the list."
        return render_dialog(request, vm, error=error, status=400)
    try:
        do_request_migration(vm, target, request.user)
    except MigrationRefused as refusal:
        return render_dialog(request, vm, error=str(refusal.message), status=400)
    if request.htmx:
        # The dialog closes (empty slot) and the phases appear at once; the websocket takes over from here.
        return HttpResponse(render_vm_fragments(get_migration_display(vm), oob=True))
    messages.success(request, f"Migration of {vm.name} to {target.name} requested.")
    return redirect("vms:vm_general", pk=vm.pk)


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
    if reason := common_refusal(checks):
        return f"{vm.name} cannot migrate to any VSP: {reason}."
    return f"No VSP can take {vm.name} now; each row says why."


def render_dialog(
    request: HtmxHttpRequest, vm: VirtualMachine, *, error: str = "", status: int = 200
) -> HttpResponse:
    checks = check_targets(vm)
    blocked = refused_everywhere(vm, checks)
    context = {
        "vm": vm,
        "checks": checks,
        # Said once above the table, not on every row; the Migrate button is disabled then.
        "blocked": blocked,
        "common_refusal": common_refusal(checks),
        "error": "" if error == blocked else error,
        "full_page": not request.htmx,
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
    try:
        do_cancel_migration(migration, request.user)
    except MigrationRefused as refusal:
        return respond_notice(request, migration.vm, str(refusal.message), ok=False)
    return respond_notice(request, migration.vm, f"Cancel of the migration of {migration.vm.name} requested.")


def respond_notice(
    request: HtmxHttpRequest, vm: VirtualMachine, text: str, *, ok: bool = True
) -> HttpResponse:
    if request.htmx:
        context = {"notice": text, "ok": ok, **get_migration_display(vm).context(oob=True)}
        return render(request, "migrations_app/progress.html#notice_and_state", context)
    (messages.success if ok else messages.error)(request, text)
    return redirect("vms:vm_general", pk=vm.pk)


@require_POST
@permission_required(ADD_MIGRATION_PERMISSION, raise_exception=True)
def migrate_selected(request: HtmxHttpRequest, vsp_id: int) -> HttpResponse:
    """Several VMs of one VSP to one target: they leave one at a time, the rest wait (hourglass)."""
    vsp = get_object_or_404(VSP, pk=vsp_id)
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
