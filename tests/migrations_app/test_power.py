"""VM power with a real host agent: Start, Stop and Force stop, and their refusals.

Lives beside the migration tests because it shares their agents and worker (a migration in flight
is one of the refusals).
"""

from __future__ import annotations

import pytest

from migrations_app.actions import do_request_migration
from tests.factories import make_not_runnable_copy, make_user
from tests.migrations_app.guests import guest_on, place_vm, wait_for_state
from vms.models import AuditEvent, Registration
from vms.power import PowerAction, PowerRefused, do_power

pytestmark = pytest.mark.django_db(transaction=True)

POWER = ("vms.change_registration", "vms.view_virtualmachine", "vms.view_vsp")


@pytest.fixture
def operator():
    return make_user("olga", POWER)


def copy_of(vm):
    return Registration.objects.select_related("vm", "vsp").get(vm=vm, hardware_status__in=["on", "off"])


@pytest.mark.parametrize("stop", [PowerAction.STOP, PowerAction.FORCE_STOP])
def test_it_stops_and_starts_a_guest_on_its_agent(host_agents, fleet, operator, stop):
    vm = place_vm(host_agents, fleet)

    do_power(copy_of(vm), stop, operator)
    assert guest_on(host_agents["hosta"], vm.name).hardware_status == "off"
    assert copy_of(vm).hardware_status == "off"

    do_power(copy_of(vm), PowerAction.START, operator)
    assert guest_on(host_agents["hosta"], vm.name).hardware_status == "on"
    assert copy_of(vm).hardware_status == "on"
    events = list(AuditEvent.objects.filter(object_name=f"{vm.name} on hosta").order_by("pk"))
    assert [
        (e.action, e.actor_name, e.before["hardware_status"], e.after["hardware_status"]) for e in events
    ] == [
        (f"vm_{stop.value.replace('-', '_')}ped", "olga", "on", "off"),
        ("vm_started", "olga", "off", "on"),
    ]


def test_it_refuses_to_start_a_not_runnable_copy_and_says_why(host_agents, fleet, operator, client):
    vm = place_vm(host_agents, fleet)
    leftover = make_not_runnable_copy(vm, fleet["hostb"])

    with pytest.raises(PowerRefused, match="This copy is Not Runnable and cannot be started"):
        do_power(leftover, PowerAction.START, operator)
    client.force_login(operator)
    page = client.get(f"/vms/{vm.pk}/general/?vsp={fleet['hostb'].pk}").content.decode()
    assert 'data-power="start" disabled title="This copy is Not Runnable' in page
    assert not AuditEvent.objects.filter(action="vm_started").exists()


def test_it_refuses_power_while_the_vm_migrates(
    host_agents, fleet, operator, admin, migration_worker, wait_for
):
    vm = place_vm(host_agents, fleet, memory_mib=64, fill_percent=100)
    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_for, migration, "copy")

    with pytest.raises(PowerRefused, match="is migrating"):
        do_power(copy_of(vm), PowerAction.FORCE_STOP, operator)
    assert guest_on(host_agents["hosta"], vm.name).hardware_status == "on"
    wait_for_state(wait_for, migration, "completed", "aborted")


def test_it_refuses_what_makes_no_sense_and_who_may_not(host_agents, fleet, operator, client):
    vm = place_vm(host_agents, fleet)
    with pytest.raises(PowerRefused, match="is already running"):
        do_power(copy_of(vm), PowerAction.START, operator)

    client.force_login(make_user("reader", ("vms.view_virtualmachine", "vms.view_vsp")))
    assert client.post(f"/registrations/{copy_of(vm).pk}/power/stop/").status_code == 403
    client.force_login(operator)
    assert client.post(f"/registrations/{copy_of(vm).pk}/power/reboot/").status_code == 404
    response = client.post(f"/registrations/{copy_of(vm).pk}/power/stop/", {"back": "vsp"})
    assert response.status_code == 302 and response.url == f"/vsps/{fleet['hosta'].pk}/"
    assert copy_of(vm).hardware_status == "off"
    assert guest_on(host_agents["hosta"], vm.name).hardware_status == "off"


def test_it_stops_a_guest_gracefully_within_its_timeout_and_says_so(host_agents, fleet, operator, client):
    vm = place_vm(host_agents, fleet, vm_fields={"graceful_stop_timeout_s": 30}, shutdown_ms=200)
    client.force_login(operator)

    general = client.get(f"/vms/{vm.pk}/general/").content.decode()
    assert 'data-power="stop" title="Shut the guest down: it gets its Graceful Stop Timeout (30 s)' in general

    page = client.post(f"/registrations/{copy_of(vm).pk}/power/stop/", follow=True).content.decode()

    assert "message-success" in page and "the guest shut down cleanly in" in page
    assert guest_on(host_agents["hosta"], vm.name).workload["io_lost_at_stop"] == 0
    event = AuditEvent.objects.get(action="vm_stopped", object_name=f"{vm.name} on hosta")
    assert event.after == {"hardware_status": "off", "os_status": "down", "stop": "shut_down"}


def test_it_says_when_a_graceful_stop_ran_out_of_time_and_the_guest_was_forced(
    host_agents, fleet, operator, client
):
    vm = place_vm(host_agents, fleet, vm_fields={"graceful_stop_timeout_s": 1}, shutdown_ms=60_000)
    client.force_login(operator)

    page = client.post(f"/registrations/{copy_of(vm).pk}/power/stop/", follow=True).content.decode()

    assert "message-warning" in page
    assert "did not shut down within its Graceful Stop Timeout (1 s), so it was forced off" in page
    assert copy_of(vm).hardware_status == "off"
    assert guest_on(host_agents["hosta"], vm.name).hardware_status == "off"
    event = AuditEvent.objects.get(action="vm_stopped", object_name=f"{vm.name} on hosta")
    assert event.after["stop"] == "timed_out" and "forced off" in event.message
