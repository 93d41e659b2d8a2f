"""The Django admin of the inventory, held to the same rules as the pages.

Runnable / Not Runnable changes go through ``vms.actions`` (the same refusals, the same audit event);
every other change made here is recorded as an ``AuditEvent`` with ``via_admin`` set.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.db import models, transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from vms.actions import (
    check_can_mark_not_runnable,
    check_can_mark_runnable,
    check_no_other_runnable_copy,
    check_reason,
    do_mark_not_runnable,
    do_mark_runnable,
)
from vms.agent_client import check_trust
from vms.fit import host_problems, registration_problems
from vms.models import (
    VSP,
    AuditEvent,
    HostGroup,
    HostGroupMembership,
    PairEncryption,
    Registration,
    VirtualMachine,
)

NOT_RUNNABLE = Registration.HardwareStatus.NOT_RUNNABLE
MARK_FIELDS = {"hardware_status", "not_runnable_set_by", "not_runnable_reason"}

ADDRESS_CHANGED_MESSAGE = (
    "The agent address changed: enter the agent's secret again. The current secret is never sent to a "
    "new address."
)


class VSPAdminForm(forms.ModelForm):
    """The agent secret is write-only: never rendered back; left empty on change, it is kept, unless
    the agent address changes too (the old secret must never reach another listener)."""

    agent_secret = forms.CharField(
        widget=forms.PasswordInput(render_value=False),
        required=False,
        max_length=128,
        help_text=(
            "Credential for the host agent. Leave empty to keep the current one; "
            "required again whenever the agent URL changes."
        ),
    )

    class Meta:
        model = VSP
        # An address typed without a scheme is https: agents serve HTTPS (plain http: vms.agent_address).
        formfield_callback = staticmethod(
            lambda field, **kwargs: (
                field.formfield(assume_scheme="https", **kwargs)
                if field.name == "agent_url"
                else field.formfield(**kwargs)
            )
        )
        fields = [
            "name",
            "group",
            "agent_url",
            "agent_secret",
            "agent_certificate",
            "migration_enabled",
            "max_concurrent_migrations",
            "licensed",
            "processor_family",
            "processor_model",
            "memory_mib",
            "cpus",
            "agent_reachable",
            "agent_checked_at",
        ]

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        if self.instance.pk is not None and not self.errors:
            edited = VSP(pk=self.instance.pk, name=cleaned.get("name", self.instance.name))
            edited.memory_mib, edited.cpus = cleaned["memory_mib"], cleaned["cpus"]
            if problems := host_problems(edited):
                raise forms.ValidationError(problems)
        return cleaned

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "max_concurrent_migrations" in self.fields:  # left out (an older form): kept as it is
            self.fields["max_concurrent_migrations"].required = False

    def clean_max_concurrent_migrations(self) -> int:
        value: int | None = self.cleaned_data.get("max_concurrent_migrations")
        if value is None:
            if "max_concurrent_migrations" in self.changed_data:  # not a change: nothing to audit
                self.changed_data.remove("max_concurrent_migrations")
            return self.instance.max_concurrent_migrations
        return value

    def clean_agent_certificate(self) -> str:
        try:
            return check_trust(self.cleaned_data.get("agent_certificate", ""))
        except ValueError as error:
            raise forms.ValidationError(str(error)) from None

    def clean_agent_secret(self) -> str:
        secret = self.cleaned_data["agent_secret"]
        if secret:
            return secret
        if not self.instance.pk:
            raise forms.ValidationError("A new VSP needs its agent's secret.")
        if "agent_url" in self.fields and "agent_url" in self.changed_data:
            raise forms.ValidationError(ADDRESS_CHANGED_MESSAGE)
        return VSP.objects.values_list("agent_secret", flat=True).get(pk=self.instance.pk)


class VirtualMachineAdminForm(forms.ModelForm):
    """The page's refusal too: a vPar's online migration setting cannot be changed.

    The admin gives it its model and fields (``ModelAdmin.get_form``).
    """

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        stored = VirtualMachine.objects.filter(pk=self.instance.pk).first()
        if (
            stored is not None
            and stored.is_vpar
            and cleaned.get("kind") == VirtualMachine.Kind.VPAR
            and "online_migration_enabled" in self.changed_data
        ):
            raise forms.ValidationError(f"{stored.name} is a vPar: a vPar does not support migration.")
        return cleaned


class RegistrationAdminForm(forms.ModelForm):
    """A copy must fit its VSP: the VM's memory and vCPUs at least the host's; a copy On needs free memory.

    In the VM's page (inline), ``instance.vm`` is the VM with the values just entered, so a VM grown
    beyond its host is refused too.
    """

    class Meta:
        model = Registration
        fields = ["vm", "vsp", "hardware_status", "not_runnable_set_by", "not_runnable_reason"]

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        vm, vsp = cleaned.get("vm"), cleaned.get("vsp")  # inline: ``vm`` is the parent as just edited
        if vm is not None and vsp is not None and not self.errors:
            if problems := registration_problems(vm, vsp, cleaned.get("hardware_status", "")):
                raise forms.ValidationError(problems)
            self.check_runnable_rules(cleaned)
        return cleaned

    def check_runnable_rules(self, cleaned: dict[str, Any]) -> None:
        """The pages' refusals: never two runnable copies, never an On copy marked Not Runnable."""
        status = cleaned.get("hardware_status", "")
        stored = Registration.objects.filter(pk=self.instance.pk).select_related("vm", "vsp").first()
        if stored is None:
            if status != NOT_RUNNABLE and cleaned["vm"].pk is not None:
                check_no_other_runnable_copy(Registration(vm=cleaned["vm"], vsp=cleaned["vsp"]))
            return
        if not marks_change(stored.hardware_status, status):
            return
        if set(self.changed_data) - MARK_FIELDS:
            raise forms.ValidationError(
                "Change whether a copy is runnable on its own, without changing its VM or VSP."
            )
        if status == NOT_RUNNABLE:
            check_can_mark_not_runnable(stored)
            cleaned["not_runnable_reason"] = check_reason(cleaned.get("not_runnable_reason", ""))
            cleaned["not_runnable_set_by"] = Registration.SetBy.ADMIN
        else:
            check_can_mark_runnable(stored)
            if status != Registration.HardwareStatus.OFF:
                raise forms.ValidationError(
                    "A copy marked runnable is Off; its host agent reports when it runs."
                )


def marks_change(stored_status: str, new_status: str) -> bool:
    """Whether going from ``stored_status`` to ``new_status`` marks the copy runnable or Not Runnable."""
    return (stored_status == NOT_RUNNABLE) != (new_status == NOT_RUNNABLE)


def field_values(obj: models.Model, names: list[str] | set[str]) -> dict[str, Any]:
    """``obj``'s values of ``names`` as JSON (foreign keys as their text)."""
    values: dict[str, Any] = {}
    for name in sorted(names):
        field = obj._meta.get_field(name)
        if name == "agent_secret":
            continue  # never recorded
        value = getattr(obj, name)
        values[name] = str(value) if field.is_relation or not isinstance(value, bool | int | str) else value
        if value is None:
            values[name] = None
    return values


def save_audited(request: HttpRequest, form: forms.ModelForm, change: bool) -> models.Model:
    """Save one admin form: runnable marks through ``vms.actions``, anything else with an audit event."""
    obj = form.instance
    stored = type(obj)._default_manager.filter(pk=obj.pk).first() if change else None
    if isinstance(obj, Registration) and isinstance(stored, Registration):
        if marks_change(stored.hardware_status, obj.hardware_status):
            if obj.hardware_status == NOT_RUNNABLE:
                do_mark_not_runnable(obj, obj.not_runnable_reason, request.user, via_admin=True)
            else:
                do_mark_runnable(obj, request.user, via_admin=True)
            obj.refresh_from_db()
            return obj
    changed = set(form.changed_data) & {field.name for field in obj._meta.concrete_fields}
    with transaction.atomic():
        obj.save()
        if stored is None or changed:
            AuditEvent.record(
                AuditEvent.Action.CHANGED if stored is not None else AuditEvent.Action.CREATED,
                obj,
                actor=request.user,
                before=field_values(stored, changed) if stored is not None else {},
                after=field_values(
                    obj,
                    changed
                    if stored is not None
                    else set(form.fields) & {field.name for field in obj._meta.concrete_fields},
                ),
                via_admin=True,
            )
    return obj


class AuditedAdmin(admin.ModelAdmin):
    """Records every save and delete made in the admin as an ``AuditEvent``."""

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        save_audited(request, form, change)

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        for deleted in formset.deleted_forms:
            if deleted.instance.pk is not None:
                record_deletion(request, deleted.instance)
        formset.save(commit=False)
        for inline_form in formset.forms:
            if inline_form in formset.deleted_forms or not inline_form.has_changed():
                continue
            save_audited(request, inline_form, inline_form.instance.pk is not None)
        formset.save_m2m()

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        with transaction.atomic():
            record_deletion(request, obj)
            super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        with transaction.atomic():
            for obj in queryset:
                record_deletion(request, obj)
            super().delete_queryset(request, queryset)


def record_deletion(request: HttpRequest, obj: models.Model) -> None:
    fields = {field.name for field in obj._meta.concrete_fields} - {"id"}
    AuditEvent.record(
        AuditEvent.Action.DELETED,
        obj,
        actor=request.user,
        before=field_values(obj, fields),
        after={},
        via_admin=True,
    )


class RegistrationInline(admin.TabularInline):
    model = Registration
    form = RegistrationAdminForm
    extra = 0
    autocomplete_fields = ["vsp"]


@admin.register(VSP)
class VSPAdmin(AuditedAdmin):
    form = VSPAdminForm
    list_display = [
        "name",
        "group",
        "agent_url",
        "migration_enabled",
        "licensed",
        "memory_mib",
        "cpus",
        "agent_reachable",
    ]
    list_filter = ["group", "migration_enabled", "licensed", "agent_reachable"]
    list_select_related = ["group"]
    search_fields = ["name"]

    # Where the console sends a VSP's secret (and, through its agent, guests' memory) is a
    # superuser's decision: anyone else sees the address read-only and never the secret field.
    # So is the VSP's host group, which decides who sees and uses it.
    AGENT_FIELDS = ("agent_url", "agent_secret", "agent_certificate")

    def get_fields(self, request: HttpRequest, obj: VSP | None = None) -> list[Any]:
        fields = list(super().get_fields(request, obj))
        if request.user.is_superuser:
            return fields
        return [field for field in fields if field != "agent_secret"]

    def get_readonly_fields(self, request: HttpRequest, obj: VSP | None = None) -> list[str]:
        readonly = list(super().get_readonly_fields(request, obj))
        return (
            readonly if request.user.is_superuser else [*readonly, "agent_url", "agent_certificate", "group"]
        )

    def has_add_permission(self, request: HttpRequest) -> bool:  # a new VSP sets an agent address
        return request.user.is_superuser and super().has_add_permission(request)


@admin.register(PairEncryption)
class PairEncryptionAdmin(AuditedAdmin):
    """Whether guest memory between two VSPs may cross the network in clear: superusers decide."""

    list_display = ["vsp_a", "vsp_b", "encryption", "streams_display", "reason"]
    list_filter = ["encryption"]
    autocomplete_fields = ["vsp_a", "vsp_b"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return request.user.is_superuser

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser


@admin.register(VirtualMachine)
class VirtualMachineAdmin(AuditedAdmin):
    form = VirtualMachineAdminForm

    list_display = ["name", "kind", "os_type", "os_status", "online_migration_enabled", "memory_mib", "vcpus"]
    list_filter = ["kind", "os_status", "online_migration_enabled"]
    search_fields = ["name", "os_type"]
    inlines = [RegistrationInline]


@admin.register(Registration)
class RegistrationAdmin(AuditedAdmin):
    form = RegistrationAdminForm
    list_display = ["vm", "vsp", "hardware_status", "not_runnable_set_by", "not_runnable_reason"]
    list_filter = ["hardware_status", "not_runnable_set_by", "vsp"]
    list_select_related = ["vm", "vsp"]
    search_fields = ["vm__name", "vsp__name"]
    autocomplete_fields = ["vm", "vsp"]


class HostGroupMembershipInline(admin.TabularInline):
    model = HostGroupMembership
    extra = 1
    autocomplete_fields = ["user"]


class SuperuserOnlyAdmin(AuditedAdmin):
    """Who may see and do what is a superuser's decision: nobody else sees these pages at all."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.is_active and request.user.is_superuser

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return request.user.is_active and request.user.is_superuser

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser


@admin.register(HostGroup)
class HostGroupAdmin(SuperuserOnlyAdmin):
    """Host groups with their members' roles; every change (members too) is an ``AuditEvent``.

    A group that still holds VSPs cannot be deleted (move them first): the VSPs would otherwise fall
    out of everyone's sight but the superusers'.
    """

    list_display = ["name", "description"]
    search_fields = ["name"]
    inlines = [HostGroupMembershipInline]


@admin.register(HostGroupMembership)
class HostGroupMembershipAdmin(SuperuserOnlyAdmin):
    list_display = ["group", "user", "role"]
    list_filter = ["group", "role"]
    list_select_related = ["group", "user"]
    search_fields = ["group__name", "user__username"]
    autocomplete_fields = ["group", "user"]
