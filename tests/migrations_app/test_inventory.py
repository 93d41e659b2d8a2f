"""Inventory collection and Refresh Data: what real host agents say reaches the database."""

import pytest

from migrations_app.tasks import collect_inventory
from tests.factories import make_registration, make_vm, make_vsp
from tests.migrations_app.guests import place_vm
from vms.models import VSP, Registration, VirtualMachine
from vms.refresh import refresh_vm_state

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_marks_an_agent_that_does_not_answer_unreachable_and_the_others_reachable(host_agents, fleet):
    from tests.conftest import free_port

    silent = make_vsp("silent", agent_url=f"http://127.0.0.1:{free_port()}", agent_reachable=True)
    VSP.objects.filter(pk=fleet["hosta"].pk).update(agent_reachable=False)

    collect_inventory()

    reachable = dict(VSP.objects.values_list("name", "agent_reachable"))
    assert reachable == {"silent": False, "hosta": True, "hostb": True, "hostc": True}
    assert VSP.objects.get(pk=silent.pk).agent_checked_at is not None


def test_it_stores_what_the_agent_says_about_the_runnable_copy_only(host_agents, fleet):
    vm = place_vm(host_agents, fleet, on="hosta")  # running on hosta's agent
    Registration.objects.filter(vm=vm).update(hardware_status="off")
    VirtualMachine.objects.filter(pk=vm.pk).update(os_status="down")
    leftover = make_registration(vm, fleet["hostb"], "not_runnable", "migrate", "guest migrated to VSP hosta")

    collect_inventory()

    assert Registration.objects.get(vm=vm, vsp=fleet["hosta"]).hardware_status == "on"
    assert VirtualMachine.objects.get(pk=vm.pk).os_status == "up"
    leftover.refresh_from_db()
    assert (leftover.hardware_status, leftover.not_runnable_reason) == (
        "not_runnable",
        "guest migrated to VSP hosta",
    )


def test_refresh_data_asks_the_vms_agent_now(host_agents, fleet):
    vm = place_vm(host_agents, fleet, on="hostb")
    VirtualMachine.objects.filter(pk=vm.pk).update(os_status="in_efi")

    refreshed = refresh_vm_state(vm)

    assert refreshed.os_status == "up"


def test_refresh_data_shows_the_database_when_the_agent_is_down():
    from tests.conftest import free_port

    vm = make_vm(
        "lonely", vsp=make_vsp("gone", agent_url=f"http://127.0.0.1:{free_port()}"), os_status="down"
    )

    assert refresh_vm_state(vm).os_status == "down"
    assert not VSP.objects.get(name="gone").agent_reachable
