from django import forms
from django.contrib import admin

from vms.fit import host_problems, registration_problems
from vms.models import VSP, Registration, VirtualMachine


class VSPAdminForm(forms.ModelForm):
    """The agent secret is write-only: never rendered back; left empty on change, it is kept."""

    agent_secret = forms.CharField(
        widget=forms.PasswordInput(render_value=False),
        required=False,
        max_length=128,
        help_text="Credential for the host agent. Leave empty to keep the current one.",
    )

    class Meta:
        model = VSP
        # Agents listen on plain http on loopback in the demo; without this Django warns about https.
        formfield_callback = staticmethod(
            lambda field, **kwargs: (
                field.formfield(assume_scheme="http", **kwargs)
                if field.name == "agent_url"
                else field.formfield(**kwargs)
            )
        )
        fields = [
            "name",
            "agent_url",
            "agent_secret",
            "migration_enabled",
            "licensed",
            "processor_family",
            "processor_model",
            "memory_mib",
            "cpus",
            "agent_reachable",
            "agent_checked_at",
        ]

    def clean(self) -> dict:
        cleaned = super().clean()
        if self.instance.pk is not None and not self.errors:
            edited = VSP(pk=self.instance.pk, name=cleaned.get("name", self.instance.name))
            edited.memory_mib, edited.cpus = cleaned.get("memory_mib"), cleaned.get("cpus")
            if problems := host_problems(edited):
                raise forms.ValidationError(problems)
        return cleaned

    def clean_agent_secret(self) -> str:
        secret = self.cleaned_data["agent_secret"]
        if secret:
            return secret
        if self.instance.pk:
            return VSP.objects.values_list("agent_secret", flat=True).get(pk=self.instance.pk)
        raise forms.ValidationError("A new VSP needs its agent's secret.")


class RegistrationAdminForm(forms.ModelForm):
    """A copy must fit its VSP: the VM's memory and vCPUs at least the host's; a copy On needs free memory.

    In the VM's page (inline), ``instance.vm`` is the VM with the values just entered, so a VM grown
    beyond its host is refused too.
    """

    class Meta:
        model = Registration
        fields = ["vm", "vsp", "hardware_status", "not_runnable_set_by", "not_runnable_reason"]

    def clean(self) -> dict:
        cleaned = super().clean()
        vm, vsp = cleaned.get("vm"), cleaned.get("vsp")  # inline: ``vm`` is the parent as just edited
        if vm is not None and vsp is not None and not self.errors:
            if problems := registration_problems(vm, vsp, cleaned.get("hardware_status", "")):
                raise forms.ValidationError(problems)
        return cleaned


class RegistrationInline(admin.TabularInline):
    model = Registration
    form = RegistrationAdminForm
    extra = 0
    autocomplete_fields = ["vsp"]


@admin.register(VSP)
class VSPAdmin(admin.ModelAdmin):
    form = VSPAdminForm
    list_display = [
        "name",
        "agent_url",
        "migration_enabled",
        "licensed",
        "memory_mib",
        "cpus",
        "agent_reachable",
    ]
    list_filter = ["migration_enabled", "licensed", "agent_reachable"]
    search_fields = ["name"]


@admin.register(VirtualMachine)
class VirtualMachineAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "os_type", "os_status", "online_migration_enabled", "memory_mib", "vcpus"]
    list_filter = ["kind", "os_status", "online_migration_enabled"]
    search_fields = ["name", "os_type"]
    inlines = [RegistrationInline]


@admin.register(Registration)
class RegistrationAdmin(admin.ModelAdmin):
    form = RegistrationAdminForm
    list_display = ["vm", "vsp", "hardware_status", "not_runnable_set_by", "not_runnable_reason"]
    list_filter = ["hardware_status", "not_runnable_set_by", "vsp"]
    list_select_related = ["vm", "vsp"]
    search_fields = ["vm__name", "vsp__name"]
    autocomplete_fields = ["vm", "vsp"]
