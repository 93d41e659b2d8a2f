"""Inventory collection and Refresh Data: what real host agents say reaches the database."""

import re

import pytest
from django.urls import reverse

from agentprotocol import GuestSpec
from tests.factories import make_registration, make_vm, make_vsp
from tests.migrations_app.guests import place_vm
from vms.inventory import collect_all_inventory
from vms.models import VSP, Registration, VirtualMachine
from vms.refresh import refresh_vm_state

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.postgres  # the conditional UPDATEs of reachability and of the round, on PostgreSQL too
def test_it_marks_an_agent_unreachable_after_three_unanswered_collections_and_the_others_reachable(
    host_agents, fleet
):
    from tests.conftest import free_port

    silent = make_vsp("silent", agent_url=f"http://127.0.0.1:{free_port()}", agent_reachable=True)
    VSP.objects.filter(pk=fleet["hosta"].pk).update(agent_reachable=False, agent_failures=4)

    seen = []
    for _ in range(3):  # INVENTORY_UNREACHABLE_AFTER
        collect_all_inventory()
        seen.append(VSP.objects.values_list("agent_reachable", "agent_failures").get(pk=silent.pk))

    assert seen == [(True, 1), (True, 2), (False, 3)]
    reachable = dict(VSP.objects.values_list("name", "agent_reachable"))
    assert reachable == {"silent": False, "hosta": True, "hostb": True, "hostc": True}
    assert VSP.objects.get(pk=silent.pk).agent_checked_at is not None
    assert VSP.objects.get(pk=silent.pk).unreachable_since is not None
    hosta = VSP.objects.get(pk=fleet["hosta"].pk)
    assert (hosta.agent_failures, hosta.unreachable_since) == (0, None)


def test_it_stores_what_the_agent_says_about_the_runnable_copy_only(host_agents, fleet):
    vm = place_vm(host_agents, fleet, on="hosta")  # running on hosta's agent
    Registration.objects.filter(vm=vm).update(hardware_status="off")
    VirtualMachine.objects.filter(pk=vm.pk).update(os_status="down")
    leftover = make_registration(vm, fleet["hostb"], "not_runnable", "migrate", "guest migrated to VSP hosta")

    collect_all_inventory()

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


def refresh_page(vm, permissions=("vms.view_virtualmachine",)) -> str:
    from django.test import Client
    from django.urls import reverse

    from tests.factories import make_user

    client = Client()
    client.force_login(make_user(permissions=permissions))
    response = client.get(reverse("vms:vm_refresh", args=[vm.pk]), headers={"HX-Request": "true"})
    assert response.status_code == 200
    return response.content.decode()


def data_time(html: str) -> str:
    start = html.index('id="data-time">') + len('id="data-time">')
    return html[start : html.index("</span>", start)]


@pytest.fixture
def hung_agent(tmp_path):
    """An agent of its own, to be SIGSTOPped (the shared ones must keep answering)."""
    from tests.hostagent.conftest import AgentFactory

    factory = AgentFactory(tmp_path)
    yield factory("frozen")
    factory.stop_all()


def test_refresh_data_says_when_the_agent_did_not_answer_and_keeps_the_last_known_time(hung_agent):
    import os
    import signal
    import time

    from django.utils import timezone

    agent = hung_agent
    vsp = make_vsp("vsp4", agent_url=agent.url, agent_secret=agent.secret, agent_certificate=agent.trust)
    vm = place_vm({"vsp4": agent}, {"vsp4": vsp}, on="vsp4")
    fresh = refresh_page(vm)
    assert 'id="refresh-warning"' not in fresh
    known_at = Registration.objects.get(vm=vm).state_collected_at
    assert known_at is not None

    os.killpg(agent.process.process.pid, signal.SIGSTOP)  # alive but silent: a hung host
    try:
        started = time.monotonic()
        html = refresh_page(vm)
        elapsed = time.monotonic() - started
    finally:
        os.killpg(agent.process.process.pid, signal.SIGCONT)

    shown = timezone.localtime(known_at)
    assert f"Host vsp4 did not answer; showing the last known state from {shown:%H:%M:%S}." in html
    assert data_time(html) == f"Data as of {shown:%Y-%m-%d %H:%M:%S} UTC"
    assert elapsed < 6
    assert Registration.objects.get(vm=vm).state_collected_at == known_at
    assert not VSP.objects.get(pk=vsp.pk).agent_reachable


def test_refresh_data_shows_a_vm_its_agent_does_not_know_as_lost(host_agents, fleet):
    """Issue 18.4: it said "Host hosta does not know this VM" and still showed Up/On."""
    vm = make_vm("stranger", vsp=fleet["hosta"])  # in the database, never defined on hosta's agent

    html = refresh_page(vm, ("vms.view_virtualmachine", "vms.view_vsp"))

    assert 'data-field="hardware_status" data-value="lost"' in html
    assert 'data-field="os_status" data-value="lost"' in html
    assert "Lost: hosta no longer reports stranger (since " in html
    assert data_time(html).startswith("Data as of ")
    assert VSP.objects.get(pk=fleet["hosta"].pk).agent_reachable


def test_refresh_data_from_an_answering_agent_warns_of_nothing(host_agents, fleet):
    vm = place_vm(host_agents, fleet, on="hostc")

    html = refresh_page(vm)

    assert 'id="refresh-warning"' not in html and "Data as of " in data_time(html)
    assert Registration.objects.get(vm=vm).state_collected_at is not None


def split_brain_shown(client, url: str) -> list[str]:
    html = client.get(url).content.decode()
    return re.findall(r'data-field="split_brain">([^<]*)</div>', html)


def test_it_raises_a_split_brain_alert_when_a_not_runnable_copy_runs(host_agents, fleet, viewer_client):
    """Issue 10: the Not Runnable copy of a migrated VM started through its old host's agent API."""
    vm = place_vm(host_agents, fleet, on="hosta")  # runnable and running on hosta
    make_registration(vm, fleet["hostb"], "not_runnable", "migrate", "guest migrated to VSP hosta")
    stray = {"guest_id": str(vm.guest_id), "name": vm.name, "memory_mib": 16, "vcpus": 1, "running": True}
    host_agents["hostb"].client.define_guest(GuestSpec.model_validate(stray))
    alert = (
        f"Split brain: {vm.name} runs on hostb, where its copy is Not Runnable; it is runnable on hosta. "
        "Two running copies may corrupt the guest&#x27;s disks: stop the copy on hostb."
    )
    try:
        collect_all_inventory()

        for url in (
            reverse("vms:vm_general", args=[vm.pk]),
            reverse("vms:vsp_list"),
            reverse("vms:vsp_detail", args=[fleet["hostb"].pk]),
            reverse("vms:vsp_detail", args=[fleet["hosta"].pk]),
        ):
            assert split_brain_shown(viewer_client, url) == [alert], url
        assert split_brain_shown(viewer_client, reverse("vms:vsp_detail", args=[fleet["hostc"].pk])) == []
        # which copy is runnable does not change by itself
        assert dict(Registration.objects.filter(vm=vm).values_list("vsp__name", "hardware_status")) == {
            "hosta": "on",
            "hostb": "not_runnable",
        }

        # Refresh Data finds it too (it asks the hosts of the Not Runnable copies as well)
        Registration.objects.filter(vm=vm).update(found_running_at=None)
        refreshed = viewer_client.get(reverse("vms:vm_refresh", args=[vm.pk]), HTTP_HX_REQUEST="true")
        assert re.findall(r'data-field="split_brain">([^<]*)</div>', refreshed.content.decode()) == [alert]
    finally:
        host_agents["hostb"].client.stop_guest(str(vm.guest_id))
        host_agents["hostb"].client.delete_guest(str(vm.guest_id))

    collect_all_inventory()  # the stray copy stopped: the alert ends
    assert split_brain_shown(viewer_client, reverse("vms:vm_general", args=[vm.pk])) == []
    assert split_brain_shown(viewer_client, reverse("vms:vsp_list")) == []


def test_it_learns_each_agents_driver_once_from_its_health(host_agents, fleet):
    """What a running migration can be changed with depends on its source's driver (QEMU cannot throttle a
    running migration): the inventory collection and the migrate dialog's probe keep it on the VSP."""
    from vms.inventory import probe_reachability

    assert VSP.objects.get(pk=fleet["hosta"].pk).agent_driver == ""
    collect_all_inventory()
    assert set(VSP.objects.values_list("agent_driver", flat=True)) == {"simulated"}

    VSP.objects.update(agent_driver="")
    probe_reachability([fleet["hostb"]], timeout_s=10)
    drivers = dict(VSP.objects.values_list("name", "agent_driver"))
    assert drivers == {"hosta": "", "hostb": "simulated", "hostc": ""}
