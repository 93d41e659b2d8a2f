"""Setup pages: add a VSP (trust on first use), change or retire one, host groups and their roles.

Each view reads the request, checks the right (``vms.host_setup``), calls one function there, renders.
A refusal changes nothing and says why. The agent secret typed on the add page is kept, encrypted
(``vms.fields``), in the session between the connection test and the final **Add VSP**, and never
rendered back.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from vms import host_setup
from vms.fields import decrypt_secret, encrypt_secret
from vms.host_setup import SetupRefused
from vms.http import HtmxHttpRequest
from vms.models import MAX_CONCURRENT_MIGRATIONS, VSP, HostGroup, HostGroupMembership, Role

PENDING_KEY = "vsp_setup_pending"


def _refusal(error: SetupRefused) -> str:
    return str(error.message)


def _require_setup(user: Any) -> None:
    if not host_setup.may_set_up_hosts(user):
        raise PermissionDenied(
            "Your account may not set up hosts: ask a superuser or a host group's administrator."
        )


def setup_home(request: HtmxHttpRequest) -> HttpResponse:
    """Hosts and rights: the VSPs the user may manage, and the host groups with their members."""
    _require_setup(request.user)
    user = request.user
    managed_groups = {group.pk for group in host_setup.manageable_groups(user)}
    host_groups = {group.pk for group in host_setup.groups_for_hosts(user, host_setup.CHANGE_VSP_PERMISSION)}
    vsps = VSP.objects.select_related("group").order_by("retired_at", "name")
    if not user.is_superuser:
        vsps = vsps.filter(group_id__in=host_groups)
    groups = HostGroup.objects.prefetch_related("memberships__user").order_by("name")
    if not user.is_superuser:
        groups = groups.filter(pk__in=managed_groups)
    context = {
        "vsps": vsps,
        "groups": groups,
        "may_add_vsp": bool(host_setup.groups_for_hosts(user)),
        "may_create_group": user.is_superuser,
        "nav": "setup",
    }
    return render(request, "vms/setup/home.html", context)


class AddressForm(forms.Form):
    agent_url = forms.CharField(
        label="Agent address",
        max_length=200,
        help_text="The host agent's address, e.g. https://10.0.0.11:7101 (https is assumed).",
    )


class ConnectForm(forms.Form):
    confirm = forms.BooleanField(
        label="The fingerprint above is the one the agent printed when it started", required=False
    )
    agent_secret = forms.CharField(
        label="Agent secret", max_length=128, widget=forms.PasswordInput(render_value=False)
    )


class VSPForm(forms.Form):
    """What the admin decides about a VSP: name, group, capacity, switches."""

    name = forms.CharField(max_length=64)
    group = forms.ModelChoiceField(
        queryset=HostGroup.objects.none(), required=False, empty_label="(no group: superusers only)"
    )
    memory_mib = forms.IntegerField(label="Memory (MiB)", min_value=1, max_value=2**31 - 1)
    cpus = forms.IntegerField(label="CPUs", min_value=1, max_value=2**31 - 1)
    migration_enabled = forms.BooleanField(label="Online migration enabled", required=False)
    licensed = forms.BooleanField(label="Licensed for online migration", required=False)
    max_concurrent_migrations = forms.IntegerField(
        label="Migrations at once", min_value=1, max_value=MAX_CONCURRENT_MIGRATIONS
    )

    def __init__(self, *args: Any, user: Any, permission: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["group"]
        assert isinstance(field, forms.ModelChoiceField)
        field.queryset = HostGroup.objects.filter(
            pk__in=[g.pk for g in host_setup.groups_for_hosts(user, permission)]
        )
        if not user.is_superuser:
            field.required = True
            field.empty_label = None


def _form_error(form: forms.Form) -> str:
    parts: list[str] = []
    for name, errors in form.errors.items():
        label = form.fields[name].label or name.replace("_", " ").capitalize() if name in form.fields else ""
        parts.extend(f"{label}: {error}" if label else str(error) for error in errors)
    return " ".join(parts)


def _pending(request: HtmxHttpRequest) -> dict[str, Any]:
    pending = request.session.get(PENDING_KEY)
    return pending if isinstance(pending, dict) else {}


@require_http_methods(["GET", "POST"])
def change_agent(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """The add page's first two steps for an existing VSP (a reinstalled host, a new certificate): the
    new address, its fingerprint to confirm, the secret; the pinned check, then it is saved
    (``host_setup.do_change_agent``)."""
    vsp = _managed_vsp(request, pk)
    step = request.POST.get("step", "") if request.method == "POST" else ""
    context: dict[str, Any] = {
        "nav": "setup",
        "address_form": AddressForm(initial={"agent_url": vsp.agent_url}),
        "step": "address",
        "vsp": vsp,
    }
    if step == "contact":
        return _contact(request, context)
    if step != "connect":
        request.session.pop(PENDING_KEY, None)
        return render(request, "vms/setup/add_vsp.html", context)
    response = _connect(request, context)
    if response.status_code != 200:
        return response
    pending = _pending(request)
    try:
        host_setup.do_change_agent(
            request.user,
            vsp,
            url=pending["url"],
            secret=decrypt_secret(pending["secret"]),
            pin=host_setup.pin_of(pending.get("fingerprint")),
            driver=str(pending.get("report", {}).get("driver", "")),
        )
    except SetupRefused as error:
        context.update(step="address", error=_refusal(error))
        return render(request, "vms/setup/add_vsp.html", context, status=400)
    request.session.pop(PENDING_KEY, None)
    guests = len(pending.get("report", {}).get("guests", []))
    messages.success(request, f"{vsp.name} now talks to {pending['url']} ({guests} guests reported).")
    return redirect("vms:setup_vsp", pk=vsp.pk)


@require_http_methods(["GET", "POST"])
def add_vsp(request: HtmxHttpRequest) -> HttpResponse:
    """Three steps on one page, each a POST naming its ``step``:

    1. ``contact``: the address; the console reads the agent's certificate (nothing sent) and shows its
       fingerprint;
    2. ``connect``: the admin confirms the fingerprint and types the secret; the pinned connection asks
       the agent for its driver, memory, CPUs and guests, shown with the VSP's form prefilled;
    3. ``add``: the VSP is stored (``host_setup.do_add_vsp``).
    """
    user = request.user
    if not host_setup.groups_for_hosts(user):
        raise PermissionDenied(
            "You may not add VSPs: you are not an administrator of a host group with the right to add them."
        )
    step = request.POST.get("step", "") if request.method == "POST" else ""
    context: dict[str, Any] = {"nav": "setup", "address_form": AddressForm(), "step": "address"}
    if step == "contact":
        return _contact(request, context)
    if step == "connect":
        return _connect(request, context)
    if step == "add":
        return _add(request, context)
    request.session.pop(PENDING_KEY, None)
    return render(request, "vms/setup/add_vsp.html", context)


def _contact(request: HtmxHttpRequest, context: dict[str, Any]) -> HttpResponse:
    form = AddressForm(request.POST)
    context["address_form"] = form
    if not form.is_valid():
        context["error"] = _form_error(form)
        return render(request, "vms/setup/add_vsp.html", context, status=400)
    try:
        contact = host_setup.first_contact(form.cleaned_data["agent_url"])
    except SetupRefused as error:
        context["error"] = _refusal(error)
        return render(request, "vms/setup/add_vsp.html", context, status=400)
    request.session[PENDING_KEY] = {"url": contact.url, "fingerprint": contact.fingerprint}
    context.update(step="confirm", contact=contact, connect_form=ConnectForm())
    return render(request, "vms/setup/add_vsp.html", context)


def _connect(request: HtmxHttpRequest, context: dict[str, Any]) -> HttpResponse:
    pending = _pending(request)
    if "url" not in pending:
        context["error"] = "Start again: enter the agent's address and test the connection."
        return render(request, "vms/setup/add_vsp.html", context, status=400)
    contact = host_setup.FirstContact(pending["url"], pending.get("fingerprint"))
    form = ConnectForm(request.POST)
    context.update(step="confirm", contact=contact, connect_form=form)
    if not form.is_valid():
        context["error"] = _form_error(form)
        return render(request, "vms/setup/add_vsp.html", context, status=400)
    if contact.fingerprint and not form.cleaned_data["confirm"]:
        context["error"] = (
            "Compare the fingerprint with the one the agent printed, then tick to confirm it: the secret is "
            "sent only to the certificate you confirmed."
        )
        return render(request, "vms/setup/add_vsp.html", context, status=400)
    secret = form.cleaned_data["agent_secret"]
    try:
        report = host_setup.check_agent(contact.url, secret, host_setup.pin_of(contact.fingerprint))
    except SetupRefused as error:
        context["error"] = _refusal(error)
        return render(request, "vms/setup/add_vsp.html", context, status=400)
    request.session[PENDING_KEY] = {**pending, "secret": encrypt_secret(secret), "report": report.as_json()}
    initial = {
        "name": report.name,
        "memory_mib": report.memory_mib or "",
        "cpus": report.cpus or "",
        "migration_enabled": True,
        "licensed": True,
        "max_concurrent_migrations": 1,
    }
    vsp_form = VSPForm(initial=initial, user=request.user, permission=host_setup.ADD_VSP_PERMISSION)
    context.update(step="report", report=report.as_json(), vsp_form=vsp_form)
    return render(request, "vms/setup/add_vsp.html", context)


def _add(request: HtmxHttpRequest, context: dict[str, Any]) -> HttpResponse:
    pending = _pending(request)
    if "secret" not in pending:
        context["error"] = "Start again: enter the agent's address and test the connection."
        return render(request, "vms/setup/add_vsp.html", context, status=400)
    form = VSPForm(request.POST, user=request.user, permission=host_setup.ADD_VSP_PERMISSION)
    context.update(step="report", report=pending.get("report", {}), vsp_form=form, contact=pending)
    if not form.is_valid():
        context["error"] = _form_error(form)
        return render(request, "vms/setup/add_vsp.html", context, status=400)
    values = form.cleaned_data
    try:
        vsp = host_setup.do_add_vsp(
            request.user,
            name=values["name"],
            group=values["group"],
            url=pending["url"],
            secret=decrypt_secret(pending["secret"]),
            pin=host_setup.pin_of(pending.get("fingerprint")),
            memory_mib=values["memory_mib"],
            cpus=values["cpus"],
            migration_enabled=values["migration_enabled"],
            licensed=values["licensed"],
            driver=str(pending.get("report", {}).get("driver", "")),
        )
    except SetupRefused as error:
        context["error"] = _refusal(error)
        return render(request, "vms/setup/add_vsp.html", context, status=400)
    if values["max_concurrent_migrations"] != vsp.max_concurrent_migrations:
        host_setup.do_change_vsp(
            request.user, vsp, {"max_concurrent_migrations": values["max_concurrent_migrations"]}
        )
    request.session.pop(PENDING_KEY, None)
    messages.success(request, f"VSP {vsp.name} added; its guests appear with the next inventory collection.")
    return redirect("vms:setup_vsp", pk=vsp.pk)


def _managed_vsp(request: HtmxHttpRequest, pk: int) -> VSP:
    vsp = VSP.objects.select_related("group").filter(pk=pk).first()
    if vsp is None:
        raise Http404()
    try:
        host_setup.check_can_manage_vsp(request.user, vsp)
    except PermissionDenied:
        raise Http404() from None  # a VSP the user may not manage: not found, names do not leak
    return vsp


@require_http_methods(["GET", "POST"])
def edit_vsp(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """A VSP's settings (POST: save them, audited) and its Retire form."""
    vsp = _managed_vsp(request, pk)
    permission = host_setup.CHANGE_VSP_PERMISSION
    status = 200
    error = ""
    if request.method == "POST":
        form = VSPForm(request.POST, user=request.user, permission=permission)
        if form.is_valid():
            try:
                changed = host_setup.do_change_vsp(request.user, vsp, form.cleaned_data)
            except (SetupRefused, PermissionDenied) as refusal:
                error = _refusal(refusal) if isinstance(refusal, SetupRefused) else str(refusal)
                status = 400 if isinstance(refusal, SetupRefused) else 403
            else:
                messages.success(
                    request, f"{vsp.name}: {', '.join(changed)} changed." if changed else "Nothing changed."
                )
                return redirect("vms:setup_vsp", pk=vsp.pk)
        else:
            error, status = _form_error(form), 400
    else:
        initial = {name: getattr(vsp, name) for name in host_setup.VSP_FIELDS}
        form = VSPForm(initial=initial, user=request.user, permission=permission)
    context = {
        "vsp": vsp,
        "form": form,
        "error": error,
        "retire_refusal": host_setup.retire_refusal(vsp) if vsp.retired_at is None else "",
        "nav": "setup",
    }
    return render(request, "vms/setup/edit_vsp.html", context, status=status)


@require_POST
def retire_vsp(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    vsp = _managed_vsp(request, pk)
    try:
        host_setup.do_retire_vsp(request.user, vsp)
    except SetupRefused as refusal:
        messages.error(request, _refusal(refusal))
    else:
        messages.success(request, f"{vsp.name} retired: it takes no guests and its agent secret was erased.")
    return redirect("vms:setup_vsp", pk=vsp.pk)


class GroupForm(forms.Form):
    name = forms.CharField(max_length=64)
    description = forms.CharField(max_length=200, required=False)


@require_POST
def create_group(request: HtmxHttpRequest) -> HttpResponse:
    form = GroupForm(request.POST)
    if not form.is_valid():
        messages.error(request, _form_error(form))
        return redirect("vms:setup")
    try:
        group = host_setup.do_create_group(
            request.user, form.cleaned_data["name"], form.cleaned_data["description"]
        )
    except SetupRefused as refusal:
        messages.error(request, _refusal(refusal))
        return redirect("vms:setup")
    messages.success(request, f"Host group {group.name} created: give people roles in it below.")
    return redirect("vms:setup_group", pk=group.pk)


class RoleForm(forms.Form):
    username = forms.CharField(label="User", max_length=150)
    role = forms.ChoiceField(choices=Role.choices)


def _managed_group(request: HtmxHttpRequest, pk: int) -> HostGroup:
    group = HostGroup.objects.filter(pk=pk).first()
    if group is None:
        raise Http404()
    try:
        host_setup.check_can_manage_group(request.user, group)
    except PermissionDenied:
        raise Http404() from None
    return group


@require_http_methods(["GET", "POST"])
def edit_group(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """A host group: its description, its members and their roles (POST ``action``: describe, set_role,
    remove, delete)."""
    group = _managed_group(request, pk)
    if request.method == "POST":
        response = _group_action(request, group)
        if response is not None:
            return response
        return redirect("vms:setup_group", pk=group.pk)
    return _render_group(request, group)


def _render_group(
    request: HtmxHttpRequest,
    group: HostGroup,
    *,
    error: str = "",
    status: int = 200,
    role_form: RoleForm | None = None,
) -> HttpResponse:
    context = {
        "group": group,
        "members": HostGroupMembership.objects.filter(group=group)
        .select_related("user")
        .order_by("user__username"),
        "vsps": VSP.objects.filter(group=group, retired_at=None).order_by("name"),
        "role_form": role_form or RoleForm(),
        "roles": Role.choices,
        "error": error,
        "may_delete": request.user.is_superuser,
        "nav": "setup",
    }
    return render(request, "vms/setup/group.html", context, status=status)


def _group_action(request: HtmxHttpRequest, group: HostGroup) -> HttpResponse | None:
    action = request.POST.get("action", "")
    try:
        if action == "describe":
            host_setup.do_describe_group(request.user, group, request.POST.get("description", ""))
            messages.success(request, f"{group.name}: description saved.")
        elif action == "set_role":
            form = RoleForm(request.POST)
            if not form.is_valid():
                return _render_group(request, group, error=_form_error(form), status=400, role_form=form)
            member = _user_named(form.cleaned_data["username"])
            host_setup.do_set_role(request.user, group, member, form.cleaned_data["role"])
            messages.success(
                request, f"{member.get_username()} is now {form.cleaned_data['role']} of {group.name}."
            )
            note = host_setup.role_note(group, _user_named(member.get_username()), form.cleaned_data["role"])
            if note:
                messages.warning(request, note)
        elif action == "remove":
            member = _user_named(request.POST.get("username", ""))
            host_setup.do_remove_member(request.user, group, member)
            messages.success(request, f"{member.get_username()} no longer has a role in {group.name}.")
        elif action == "delete":
            name = group.name
            host_setup.do_delete_group(request.user, group)
            messages.success(request, f"Host group {name} deleted.")
            return redirect("vms:setup")
        else:
            return _render_group(request, group, error="Unknown action: reload the page.", status=400)
    except SetupRefused as refusal:
        return _render_group(request, group, error=_refusal(refusal), status=400)
    return None


def _user_named(username: str) -> Any:
    member = get_user_model().objects.filter(username=username.strip()[:150]).first()
    if member is None:
        raise SetupRefused(f"There is no user {username.strip()[:150]!r}.")
    return member
