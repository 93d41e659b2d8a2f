from django import forms
from django.contrib import admin

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

    def clean_agent_secret(self) -> str:
        secret = self.cleaned_data["agent_secret"]
        if secret:
            return secret
        if self.instance.pk:
            return VSP.objects.values_list("agent_secret", flat=True).get(pk=self.instance.pk)
        raise forms.ValidationError("A new VSP needs its agent's secret.")


class RegistrationInline(admin.TabularInline):
    model = Registration
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
    list_display = ["vm", "vsp", "hardware_status", "not_runnable_set_by", "not_runnable_reason"]
    list_filter = ["hardware_status", "not_runnable_set_by", "vsp"]
    list_select_related = ["vm", "vsp"]
    search_fields = ["vm__name", "vsp__name"]
    autocomplete_fields = ["vm", "vsp"]
