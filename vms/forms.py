from __future__ import annotations

import math

from django import forms

from vms.actions import REASON_MAX_LENGTH
from vms.define import DISK_MAX_BYTES, DISK_MIN_BYTES, GIB
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


DISK_GIB_BOUNDS = {  # vms.define's bounds in GiB, to the thousandth the field takes (1 MiB -> 0.001)
    "min": f"{math.ceil(DISK_MIN_BYTES / GIB * 1000) / 1000:g}",
    "max": f"{DISK_MAX_BYTES // GIB}",
    "step": "0.001",
}
DISK_ROWS = 3  # disks the define page offers (the API takes up to the protocol's 16)
NIC_ROWS = 2


class DefineVMForm(forms.Form):
    """Define a VM on one VSP: the page's fields; disk rows (pool, new size in GiB or an image's name)
    and card rows (network, optional MAC) left empty are ignored. Only shapes are checked here; the
    definition itself is checked by ``vms.define``."""

    name = forms.CharField(max_length=64)
    memory_mib = forms.IntegerField(label="Memory (MiB)", min_value=1, max_value=4 * 1024 * 1024, initial=512)
    vcpus = forms.IntegerField(label="vCPUs", min_value=1, max_value=256, initial=1)
    os_type = forms.CharField(label="Operating system", max_length=64, required=False)

    def __init__(self, *args: object, pools: list[str], networks: list[str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        pool_choices = [("", "—"), *[(name, name) for name in pools]]
        network_choices = [("", "—"), *[(name, name) for name in networks]]
        for row in range(DISK_ROWS):
            self.fields[f"disk{row}_pool"] = forms.ChoiceField(
                label=f"Disk {row + 1}: pool", choices=pool_choices, required=False
            )
            # No bound here: vms.define refuses a size out of its bounds in words (0 typed is a size);
            # the browser is told the same bounds, in GiB to the field's thousandth.
            self.fields[f"disk{row}_size_gib"] = forms.DecimalField(
                label=f"Disk {row + 1}: new volume (GiB)",
                max_digits=13,
                decimal_places=3,
                required=False,
                widget=forms.NumberInput(attrs=DISK_GIB_BOUNDS),
            )
            self.fields[f"disk{row}_image"] = forms.CharField(
                label=f"Disk {row + 1}: or an image in the pool", max_length=200, required=False
            )
        for row in range(NIC_ROWS):
            self.fields[f"nic{row}_network"] = forms.ChoiceField(
                label=f"Network card {row}: network", choices=network_choices, required=False
            )
            self.fields[f"nic{row}_mac"] = forms.CharField(
                label=f"Network card {row}: MAC (empty: generated)", max_length=32, required=False
            )

    def disk_rows(self) -> list[tuple[forms.BoundField, forms.BoundField, forms.BoundField]]:
        return [
            (self[f"disk{row}_pool"], self[f"disk{row}_size_gib"], self[f"disk{row}_image"])
            for row in range(DISK_ROWS)
        ]

    def nic_rows(self) -> list[tuple[forms.BoundField, forms.BoundField]]:
        return [(self[f"nic{row}_network"], self[f"nic{row}_mac"]) for row in range(NIC_ROWS)]
