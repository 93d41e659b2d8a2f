from __future__ import annotations

from django import forms

from vms.actions import REASON_MAX_LENGTH
from vms.models import VSP, Registration, VirtualMachine


def with_any(choices: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [("", "Any"), *choices]


class VMFilterForm(forms.Form):
    q = forms.CharField(label="Name", max_length=64, required=False)
    vsp = forms.ModelChoiceField(label="VSP", queryset=VSP.objects.all(), required=False, empty_label="Any")
    kind = forms.ChoiceField(label="Type", choices=with_any(VirtualMachine.Kind.choices), required=False)
    os_status = forms.ChoiceField(
        label="OS status", choices=with_any(VirtualMachine.OSStatus.choices), required=False
    )
    hardware_status = forms.ChoiceField(
        label="Hardware status", choices=with_any(Registration.HardwareStatus.choices), required=False
    )
    page = forms.IntegerField(min_value=1, required=False, widget=forms.HiddenInput)


class PageForm(forms.Form):
    page = forms.IntegerField(min_value=1, required=False)


class OnlineMigrationForm(forms.Form):
    enabled = forms.TypedChoiceField(
        choices=[("true", "Enabled"), ("false", "Disabled")], coerce=lambda value: value == "true"
    )


class NotRunnableForm(forms.Form):
    reason = forms.CharField(max_length=REASON_MAX_LENGTH, strip=True)


class ShownVSPForm(forms.Form):
    """``?vsp=<id>`` on the General tab: which VSP's copy to show."""

    vsp = forms.IntegerField(
        label="VSP",
        min_value=1,
        required=False,
        error_messages={
            "invalid": "the address names no VSP (?vsp= takes a VSP's number). "
            "Open the VM from its VSP's page or from the VM list.",
            "min_value": "the address names no VSP (?vsp= takes a VSP's number, 1 or more). "
            "Open the VM from its VSP's page or from the VM list.",
        },
    )
