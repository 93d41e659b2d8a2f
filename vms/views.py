"""Pages: each view reads the request, checks access, calls one query or action, renders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.core.exceptions import ValidationError
from django.core.paginator import EmptyPage, Page, Paginator
from django.db.models import Count, Q, QuerySet
from django.db.models.functions import Lower
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from vms.access import (
    CHANGE_REGISTRATION_PERMISSION,
    VIEW_VM_PERMISSION,
    VIEW_VSP_PERMISSION,
    allowed,
    check_can_change_registration,
    check_can_change_vm,
    get_visible_vm,
    get_visible_vsp,
    may_act_on_vsp,
    registration_changeable_vsp_ids,
    visible_registrations,
    visible_vms,
    visible_vsps,
    vsps_with_role,
)
from vms.actions import do_mark_not_runnable, do_mark_runnable, do_set_online_migration
from vms.capacity import with_free_memory
from vms.define import GIB, Definition, DiskRequest, NicRequest, check_can_define, do_define_vm
from vms.devices import HIDDEN_NETWORK, HIDDEN_POOL, RESOURCES_UNKNOWN, device_summary, places_seen
from vms.forms import (
    DISK_ROWS,
    NIC_ROWS,
    DefineVMForm,
    NotRunnableForm,
    OnlineMigrationForm,
    PageForm,
    ShownVSPForm,
    VMFilterForm,
)
from vms.general_tab import general_tab_context
from vms.hooks import busy_reasons, vsp_page_context
from vms.http import HtmxHttpRequest
from vms.inventory import RefreshOutcome
from vms.models import VSP, Network, Registration, Role, StoragePool, VirtualMachine, vm_split_brain_copies
from vms.queries import filter_registrations, filter_vms, vm_with_registrations
from vms.refresh import refresh_vm

PAGE_SIZE = 25


def form_errors_text(form: forms.Form) -> str:
    """The form's errors as one sentence per error, each prefixed by its field's label."""
    parts: list[str] = []
    for field_name, errors in form.errors.items():
        field = form.fields.get(field_name)
        label = (field.label or field_name.replace("_", " ").capitalize()) if field else ""
        parts.extend(f"{label}: {error}" if label else str(error) for error in errors)
    return " ".join(parts)


def bad_request(request: HtmxHttpRequest, message: str, status: int = 400) -> HttpResponse:
    return render(request, "vms/error.html", {"message": message}, status=status)


def paginate(rows: QuerySet[Any], page_number: int | None) -> Page:
    try:
        return Paginator(rows, PAGE_SIZE).page(page_number or 1)
    except EmptyPage:
        raise Http404("No such page.") from None


@require_GET
@permission_required(VIEW_VSP_PERMISSION, raise_exception=True)
def vsp_list(request: HtmxHttpRequest) -> HttpResponse:
    # Count over the same join as the free-memory sum: one grouped query, no per-row subquery.
    status = Registration.HardwareStatus
    vsps = with_free_memory(visible_vsps(request.user).filter(retired_at=None)).annotate(
        # Guests that can run there; leftover Not Runnable copies are counted apart.
        guest_count=Count(
            "registrations", filter=Q(registrations__hardware_status__in=[status.ON, status.OFF, status.LOST])
        ),
        not_runnable_count=Count(
            "registrations", filter=Q(registrations__hardware_status=status.NOT_RUNNABLE)
        ),
    )
    split_brain = list(Registration.split_brain())
    # A VSP shows the alert if a split-brain VM is registered there (running stray or runnable there).
    involved = set(
        Registration.objects.filter(vm_id__in=[copy.vm_id for copy in split_brain]).values_list(
            "vsp_id", flat=True
        )
    )
    context = {
        "vsps": vsps,
        "nav": "vsps",
        "split_brain": [copy.split_brain_alert() for copy in split_brain],
        "split_brain_vsps": involved,
        "lost": [
            copy.lost_alert() for copy in Registration.lost().filter(vsp__in=visible_vsps(request.user))
        ],
    }
    return render(request, "vms/vsp_list.html", context)


@require_GET
@permission_required(VIEW_VSP_PERMISSION, raise_exception=True)
def vsp_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    vsp = get_visible_vsp(request.user, pk, with_free_memory(VSP.objects.all()))
    form = PageForm(request.GET)
    if not form.is_valid():
        return bad_request(request, form_errors_text(form))
    guests = vsp.registrations.select_related("vm").order_by(Lower("vm__name"), "vm__name")
    page = paginate(guests, form.cleaned_data["page"])
    vm_ids = [registration.vm_id for registration in page]
    may_power_here = may_act_on_vsp(request.user, CHANGE_REGISTRATION_PERMISSION, vsp.pk)
    context = {
        "vsp": vsp,
        "page": page,
        "nav": "vsps",
        "split_brain": [copy.split_brain_alert() for copy in vsp.split_brain_copies()],
        "lost": [copy.lost_alert() for copy in Registration.lost().filter(vsp=vsp)],
        # Per-row controls, decided once for the page (every row is a copy on this VSP):
        "may_power_here": may_power_here,
        "busy": busy_reasons(vm_ids) if may_power_here else {},
        # What other apps add (their slots' context, e.g. a column per row): ``vms.hooks``.
        **vsp_page_context(request, vsp, vm_ids),
    }
    context |= {  # its storage pools (free space) and networks, as its agent last reported them
        "pools": StoragePool.objects.filter(vsp=vsp).order_by("name"),
        "networks": Network.objects.filter(vsp=vsp).order_by("name"),
        "unknown_reason": RESOURCES_UNKNOWN,
        "may_define_here": allowed(check_can_define, request.user, vsp),
    }
    # Name, Type, OS status, Hardware status, Memory, vCPUs; Power; other apps' columns.
    context["column_count"] = 6 + int(may_power_here) + context["row_columns"]
    return render(request, "vms/vsp_detail.html", context)


@require_GET
@permission_required(VIEW_VM_PERMISSION, raise_exception=True)
def vm_list(request: HtmxHttpRequest) -> HttpResponse:
    form = VMFilterForm(request.GET)
    form.fields["vsp"].queryset = visible_vsps(request.user)  # type: ignore[attr-defined]
    if not form.is_valid():
        invalid = {"form": form, "page": None, "error": form_errors_text(form), "nav": "vms"}
        return render(request, "vms/vm_list.html", invalid, status=400)
    filters = form.cleaned_data
    criteria = {
        "name": filters["q"],
        "kind": filters["kind"],
        "os_status": filters["os_status"],
        "vsp_id": filters["vsp"].pk if filters["vsp"] else None,
        "hardware_status": filters["hardware_status"],
    }
    by_copy = criteria["vsp_id"] is not None or bool(criteria["hardware_status"])
    if by_copy:
        # Filtering by VSP or hardware status matches copies: list each matching copy, so every row
        # shows the VSP and status that matched (not the VM's runnable copy on another VSP).
        page = paginate(
            visible_registrations(request.user, filter_registrations(**criteria)), filters["page"]
        )
        rows = [VMListRow(registration.vm, registration) for registration in page]
    else:
        page = paginate(
            filter_vms(visible_vms(request.user, vm_with_registrations()), **criteria), filters["page"]
        )
        seen_vsps = set(visible_vsps(request.user).values_list("pk", flat=True))
        rows = [
            VMListRow(vm, copy, vsp_hidden=_runs_outside(copy, seen_vsps))
            for vm in page
            for copy in [vm.runnable_registration]
        ]
    query_without_page = request.GET.copy()
    query_without_page.pop("page", None)
    context: dict[str, Any] = {
        "form": form,
        "page": page,
        "rows": rows,
        "by_copy": by_copy,
        "query": query_without_page.urlencode(),
        "nav": "vms",
    }
    return render(request, "vms/vm_list.html", context)


@dataclass(frozen=True)
class VMListRow:
    """One row of the VM list: a guest and the copy the row shows (None: runnable nowhere)."""

    vm: VirtualMachine
    registration: Registration | None
    vsp_hidden: bool = False  # the copy runs on a VSP outside the user's host groups: its name is not shown

    @property
    def os_status(self) -> str:
        # Runnable nowhere: the guest cannot be running anywhere.
        return self.registration.os_status if self.registration else VirtualMachine.OSStatus.DOWN

    @property
    def os_status_label(self) -> str:
        return VirtualMachine.OSStatus(self.os_status).label


def _runs_outside(registration: Registration | None, seen_vsp_ids: set[int]) -> bool:
    return registration is not None and registration.vsp_id not in seen_vsp_ids


def shown_vsp_id(request: HtmxHttpRequest) -> int | None:
    form = ShownVSPForm(request.GET)
    if not form.is_valid():
        raise ValidationError(form_errors_text(form))
    return form.cleaned_data["vsp"]


def render_general(
    request: HtmxHttpRequest, vm: VirtualMachine, status: int = 200, *, refresh: RefreshOutcome | None = None
) -> HttpResponse:
    """The General tab: the whole page, or only its ``general`` partial for htmx requests.

    ``refresh``: what Refresh Data collected; when nothing, "Data as of" keeps the last known time and warns.
    """
    user = request.user
    registration_vsp_ids = [registration.vsp_id for registration in vm.registrations.all()]
    seen_vsp_ids = set(visible_vsps(user).filter(pk__in=registration_vsp_ids).values_list("pk", flat=True))
    try:
        vsp_id = shown_vsp_id(request)
        # Only copies on VSPs the user sees: the one shown too (another group's VSP is not named).
        # Other apps' parts of the tab (a migration's other end) name only VSPs of the user's host groups.
        role_vsp_ids = (
            None if user.is_superuser else set(vsps_with_role(user, Role.VIEWER).values_list("pk", flat=True))
        )
        context = general_tab_context(vm, vsp_id, seen_vsp_ids, role_vsp_ids)
    except ValidationError as error:
        return bad_request(request, " ".join(error.messages))
    except Registration.DoesNotExist as error:
        raise Http404(str(error)) from None
    shown = context["registration"]
    current = vm.current_vsp
    context |= {
        "nav": "vms",
        "pin_query": f"?vsp={vsp_id}" if vsp_id else "",
        "refresh": refresh,
        # Copies on VSPs of other host groups are not listed: their VSPs' names are not the user's to see.
        "other_registrations": [row for row in context["other_registrations"] if row.vsp.pk in seen_vsp_ids],
        "can_change_vm": allowed(check_can_change_vm, user, vm),
        "changeable_vsp_ids": registration_changeable_vsp_ids(user, registration_vsp_ids),
        "current_vsp_seen": current if current is not None and current.pk in seen_vsp_ids else None,
        "may_power": shown is not None and may_act_on_vsp(user, CHANGE_REGISTRATION_PERMISSION, shown.vsp_id),
        "split_brain": [copy.split_brain_alert() for copy in vm_split_brain_copies(vm)],
    }
    # Why its power buttons are off now (another app's say: ``vms.hooks.register_busy_check``).
    context["busy"] = busy_reasons([vm.pk]).get(vm.pk, "") if context["may_power"] else ""
    template = "vms/vm_general.html#general" if request.htmx else "vms/vm_general.html"
    return render(request, template, context, status=status)


@require_GET
@permission_required(VIEW_VM_PERMISSION, raise_exception=True)
def vm_general(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    return render_general(request, get_visible_vm(request.user, pk, vm_with_registrations()))


@dataclass(frozen=True)
class DiskRow:
    disk: Any
    pool: StoragePool | None  # the disk's pool on the VSP shown (None: not reported there)
    hidden: bool = False  # the pool is another host group's VSP's: not named (``devices.places_seen``)


@dataclass(frozen=True)
class NicRow:
    nic: Any
    network: Network | None  # the card's network on the VSP shown (None: that VSP has none of the name)
    hidden: bool = False  # the network is another host group's VSP's: not named


@require_GET
@permission_required(VIEW_VM_PERMISSION, raise_exception=True)
def vm_storage(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """VM Properties, Storage tab: the VM's disks with their pools on the VSP it runs on."""
    return render_devices(request, pk, "storage")


@require_GET
@permission_required(VIEW_VM_PERMISSION, raise_exception=True)
def vm_network(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """VM Properties, Network tab: the VM's network cards with their networks on its VSP."""
    return render_devices(request, pk, "network")


def render_devices(request: HtmxHttpRequest, pk: int, tab: str) -> HttpResponse:
    vm = get_visible_vm(request.user, pk, vm_with_registrations())
    seen = set(visible_vsps(request.user).values_list("pk", flat=True))
    try:
        vsp_id = shown_vsp_id(request)
    except ValidationError as error:
        return bad_request(request, " ".join(error.messages))
    copies = [copy for copy in vm.registrations.all() if copy.vsp_id in seen]
    shown = next((c for c in copies if c.vsp_id == vsp_id), None) if vsp_id else None
    if shown is None:
        runnable = vm.runnable_registration
        shown = runnable if runnable in copies else (copies[0] if copies else None)
    vsp = shown.vsp if shown else None
    places = places_seen(vm, seen)
    pools = {pool.name: pool for pool in StoragePool.objects.filter(vsp=vsp)} if vsp and places else {}
    networks = {net.name: net for net in Network.objects.filter(vsp=vsp)} if vsp and places else {}
    context = {
        "vm": vm,
        "vsp": vsp,
        "tab": tab,
        "nav": "vms",
        "pin_query": f"?vsp={vsp_id}" if vsp_id else "",
        "resources_known": vsp is None or vsp.resources_collected_at is not None,
        "unknown_reason": RESOURCES_UNKNOWN,
        "summary": device_summary(vm, places),
        "places_seen": places,
        "hidden_pool": HIDDEN_POOL,
        "hidden_network": HIDDEN_NETWORK,
        "disks": [DiskRow(disk, pools.get(disk.pool), not places) for disk in vm.disks.order_by("device")],
        "nics": [NicRow(nic, networks.get(nic.network), not places) for nic in vm.nics.order_by("index")],
    }
    return render(request, "vms/vm_devices.html", context)


@require_GET
@permission_required(VIEW_VM_PERMISSION, raise_exception=True)
def vm_refresh(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    refreshed = refresh_vm(get_visible_vm(request.user, pk))
    return render_general(request, refreshed.vm, refresh=refreshed.outcome)


def apply_change(
    request: HtmxHttpRequest,
    vm: VirtualMachine,
    form: forms.Form,
    change: Callable[[dict[str, Any]], str],
) -> HttpResponse:
    """Validate ``form``, run ``change`` (which returns a success message) and show the General tab.

    Without htmx a success redirects (POST/redirect/GET); a refusal re-renders with 400 or 403.
    """
    status = 200
    if not form.is_valid():
        messages.error(request, form_errors_text(form))
        status = 400
    else:
        try:
            messages.success(request, change(form.cleaned_data))
        except ValidationError as error:
            messages.error(request, " ".join(error.messages))
            status = 400
    if status == 200 and not request.htmx:
        return redirect(f"{reverse('vms:vm_general', args=[vm.pk])}?{request.GET.urlencode()}")
    return render_general(request, vm_with_registrations().get(pk=vm.pk), status=status)


@require_POST
def vm_set_online_migration(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    vm = get_visible_vm(request.user, pk)
    check_can_change_vm(request.user, vm)  # PermissionDenied: the project's handler403, a short refusal

    def change(data: dict[str, Any]) -> str:
        do_set_online_migration(vm, data["enabled"], request.user)
        return f"Online migration {'enabled' if data['enabled'] else 'disabled'} for {vm.name}."

    return apply_change(request, vm, OnlineMigrationForm(request.POST), change)


@require_POST
def registration_mark_not_runnable(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    return change_registration(request, pk, runnable=False)


@require_POST
def registration_mark_runnable(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    return change_registration(request, pk, runnable=True)


def change_registration(request: HtmxHttpRequest, pk: int, *, runnable: bool) -> HttpResponse:
    """Mark one copy runnable or Not Runnable: 404 for a copy the user cannot see, the right, the action."""
    registration = get_object_or_404(
        visible_registrations(request.user, Registration.objects.select_related("vm", "vsp")), pk=pk
    )
    check_can_change_registration(request.user, registration)

    def change(data: dict[str, Any]) -> str:
        if runnable:
            do_mark_runnable(registration, request.user)
            return f"{registration} is now runnable."
        do_mark_not_runnable(registration, data["reason"], request.user)
        return f"{registration} is now Not Runnable."

    form = forms.Form(request.POST) if runnable else NotRunnableForm(request.POST)
    return apply_change(request, registration.vm, form, change)


@require_http_methods(["GET", "POST"])
def vm_define(request: HtmxHttpRequest) -> HttpResponse:
    """Define a VM on the VSP ``?vsp=`` (its pools and networks offered); refusals say why, nothing made."""
    vsp = get_visible_vsp(request.user, shown_vsp_id(request) or 0)
    check_can_define(request.user, vsp)  # PermissionDenied: the project's handler403, a short refusal
    pools = list(StoragePool.objects.filter(vsp=vsp).order_by("name").values_list("name", flat=True))
    networks = list(Network.objects.filter(vsp=vsp).order_by("name").values_list("name", flat=True))
    data = request.POST if request.method == "POST" else None
    form = DefineVMForm(data, pools=pools, networks=networks)
    errors: list[str] = []
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                vm = do_define_vm(definition_from(form.cleaned_data, vsp), request.user)
            except ValidationError as error:
                errors = error.messages
            else:
                messages.success(request, f"{vm.name} defined on {vsp.name}.")
                return redirect("vms:vm_general", pk=vm.pk)
        else:
            errors = [form_errors_text(form)]
        status = 400
    context = {
        "vsp": vsp,
        "form": form,
        "errors": errors,
        "nav": "vsps",
        "pools": StoragePool.objects.filter(vsp=vsp).order_by("name"),
        "unknown_reason": RESOURCES_UNKNOWN,
    }
    return render(request, "vms/vm_define.html", context, status=status)


def definition_from(data: dict[str, Any], vsp: VSP) -> Definition:
    """The define form's cleaned data as a ``Definition`` (empty rows left out)."""
    disks = []
    for row in range(DISK_ROWS):
        pool, size, image = (data[f"disk{row}_{key}"] for key in ("pool", "size_gib", "image"))
        if pool or size is not None or image:  # a size of 0 typed is a size, refused with the bounds
            disks.append(
                DiskRequest(
                    pool=pool, size_bytes=int(size * GIB) if size is not None else None, image=image.strip()
                )
            )
    nics = [
        NicRequest(network=data[f"nic{row}_network"], mac=data[f"nic{row}_mac"])
        for row in range(NIC_ROWS)
        if data[f"nic{row}_network"] or data[f"nic{row}_mac"]
    ]
    return Definition(
        name=data["name"],
        vsp=vsp,
        memory_mib=data["memory_mib"],
        vcpus=data["vcpus"],
        os_type=data["os_type"],
        disks=disks,
        nics=nics,
    )
