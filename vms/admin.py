from django import forms
from django.contrib import admin

from vms.fit import host_problems, registration_problems
from vms.models import VSP, Registration, VirtualMachine

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
        if not self.instance.pk:
            raise forms.ValidationError("A new VSP needs its agent's secret.")
        if "agent_url" in self.fields and "agent_url" in self.changed_data:
            raise forms.ValidationError(ADDRESS_CHANGED_MESSAGE)
        return VSP.objects.values_list("agent_secret", flat=True).get(pk=self.instance.pk)


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

    # Where the console sends a VSP's secret (and, through its agent, guests' memory) is a
    # superuser's decision: anyone else sees the address read-only and never the secret field.
    AGENT_FIELDS = ("agent_url", "agent_secret")

    def get_fields(self, request, obj=None):  # noqa: ANN001, ANN201 - Django admin API
        fields = super().get_fields(request, obj)
        if request.user.is_superuser:
            return fields
        return [field for field in fields if field != "agent_secret"]

    def get_readonly_fields(self, request, obj=None):  # noqa: ANN001, ANN201 - Django admin API
        readonly = list(super().get_readonly_fields(request, obj))
        return readonly if request.user.is_superuser else [*readonly, "agent_url"]

    def has_add_permission(self, request) -> bool:  # noqa: ANN001 - a new VSP sets an agent address
        return request.user.is_superuser and super().has_add_permission(request)


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
