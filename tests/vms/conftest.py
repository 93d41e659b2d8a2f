import pytest

from tests.factories import make_not_runnable_copy, make_vm, make_vsp
from vms.models import Registration, VirtualMachine


@pytest.fixture
def fleet(db):
    """Two hosts; web runs on one with a Not Runnable copy on the other; a vPar; a stopped VM."""
    vsp_a, vsp_b = make_vsp("vsp-a"), make_vsp("vsp-b")
    web = make_vm("web", vsp=vsp_b, hardware_status=Registration.HardwareStatus.ON)
    web_copy = make_not_runnable_copy(web, vsp_a, reason="guest migrated to VSP vsp-b")
    vpar = make_vm("vpar1", vsp=vsp_a, kind=VirtualMachine.Kind.VPAR)
    stopped = make_vm("stopped", vsp=vsp_a, hardware_status=Registration.HardwareStatus.OFF, os_status="down")
    return {
        "vsp_a": vsp_a,
        "vsp_b": vsp_b,
        "web": web,
        "web_running": web.registrations.get(vsp=vsp_b),
        "web_copy": web_copy,
        "vpar": vpar,
        "stopped": stopped,
        "stopped_registration": stopped.registrations.get(),
    }


def snapshot() -> list[tuple]:
    """Everything the console's changes could touch, to prove a refused change changed nothing."""
    vms = list(VirtualMachine.objects.order_by("pk").values_list("pk", "online_migration_enabled"))
    registrations = list(
        Registration.objects.order_by("pk").values_list(
            "pk", "hardware_status", "not_runnable_set_by", "not_runnable_reason"
        )
    )
    return vms + registrations
