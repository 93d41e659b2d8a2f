# ruff: noqa: S105, S106 - fake agent secrets in admin forms
"""The admin refuses impossible inventory (a VM bigger than its host, hosts On beyond their memory),
and the pages never show negative free memory."""

import re

import pytest

from tests.factories import make_registration, make_vm, make_vsp
from tests.vms.html_fields import read_fields
from vms.models import Registration, VirtualMachine
from vms.templatetags.console import free_memory

pytestmark = pytest.mark.django_db

ON, OFF = Registration.HardwareStatus.ON, Registration.HardwareStatus.OFF


def add_registration(client, vm, vsp, status):
    return client.post(
        "/admin/vms/registration/add/", {"vm": vm.pk, "vsp": vsp.pk, "hardware_status": status}
    )


def vm_form(name: str, memory_mib: int, vcpus: int = 1, **registration) -> dict:
    form = {
        "name": name,
        "kind": "vm",
        "os_type": "Debian 12",
        "os_status": "up",
        "boot_attribute": "auto",
        "graceful_stop_timeout_s": "30",
        "online_migration_enabled": "on",
        "memory_mib": str(memory_mib),
        "vcpus": str(vcpus),
        "init_limit_s": "10",
        "quiesce_limit_s": "15",
        "frozen_limit_s": "60",
        "registrations-TOTAL_FORMS": "1" if registration else "0",
        "registrations-INITIAL_FORMS": str(registration.pop("initial", 0)),
        "registrations-MIN_NUM_FORMS": "0",
        "registrations-MAX_NUM_FORMS": "1000",
    }
    for key, value in registration.items():
        form[f"registrations-0-{key}"] = value
    return form


def test_a_vm_of_20_gib_cannot_be_added_on_on_a_16_gib_host(admin_client):
    host = make_vsp("small", memory_mib=16384)
    form = vm_form("big", 20480, vsp=str(host.pk), hardware_status=ON, not_runnable_set_by="")
    response = admin_client.post("/admin/vms/virtualmachine/add/", form)
    assert response.status_code == 200
    assert "big needs 20480 MiB of memory; VSP small has only 16384 MiB." in response.text
    assert not VirtualMachine.objects.filter(name="big").exists()


def test_a_vm_with_more_vcpus_than_its_host_is_refused(admin_client):
    host = make_vsp("small", cpus=4)
    form = vm_form("wide", 512, vcpus=8, vsp=str(host.pk), hardware_status=OFF, not_runnable_set_by="")
    response = admin_client.post("/admin/vms/virtualmachine/add/", form)
    assert "wide has 8 vCPUs; VSP small has only 4 CPUs." in response.text
    assert not VirtualMachine.objects.filter(name="wide").exists()


def test_growing_a_vm_beyond_its_host_is_refused(admin_client):
    host = make_vsp("small", memory_mib=16384)
    vm = make_vm("web", vsp=host, memory_mib=1024)
    registration = vm.registrations.get()
    form = vm_form(
        "web",
        20480,
        id=str(registration.pk),
        vm=str(vm.pk),
        vsp=str(host.pk),
        hardware_status=ON,
        not_runnable_set_by="",
        initial=1,
    )
    response = admin_client.post(f"/admin/vms/virtualmachine/{vm.pk}/change/", form)
    assert response.status_code == 200 and "VSP small has only 16384 MiB" in response.text
    vm.refresh_from_db()
    assert vm.memory_mib == 1024


def test_a_copy_on_needs_room_on_its_host(admin_client):
    host = make_vsp("small", memory_mib=16384)
    make_vm("a", vsp=host, memory_mib=12288)
    vm = VirtualMachine.objects.create(name="b", memory_mib=8192)
    response = add_registration(admin_client, vm, host, ON)
    assert response.status_code == 200
    assert "VSP small has no room to run b (On): it needs 8192 MiB and only 4096 MiB" in response.text
    assert not Registration.objects.filter(vm=vm).exists()
    assert add_registration(admin_client, vm, host, OFF).status_code == 302  # Off takes no memory


def test_a_copy_that_fits_is_saved(admin_client):
    host = make_vsp("small", memory_mib=16384)
    vm = VirtualMachine.objects.create(name="b", memory_mib=4096)
    assert add_registration(admin_client, vm, host, ON).status_code == 302


def test_shrinking_a_host_below_its_running_guests_is_refused(admin_client):
    host = make_vsp("h", memory_mib=16384)
    make_vm("a", vsp=host, memory_mib=8192)
    form = {
        "name": "h",
        "agent_url": host.agent_url,
        "agent_secret": "",
        "migration_enabled": "on",
        "licensed": "on",
        "memory_mib": "4096",
        "cpus": "8",
        "agent_reachable": "on",
    }
    response = admin_client.post(f"/admin/vms/vsp/{host.pk}/change/", form)
    assert response.status_code == 200 and "VSP h has only 4096 MiB" in response.text
    host.refresh_from_db()
    assert host.memory_mib == 16384


@pytest.mark.parametrize(
    ("value", "shows"), [(-12288, "overcommitted by 12 GiB"), (0, "0 MiB"), (2048, "2 GiB")]
)
def test_free_memory_is_never_shown_negative(value, shows):
    assert free_memory(value) == shows


def test_an_overcommitted_host_says_so_on_the_vsp_pages(admin_client):
    host = make_vsp("h", memory_mib=16384)
    make_registration(VirtualMachine.objects.create(name="big", memory_mib=20480), host, ON)  # past the admin
    rows = dict(re.findall(r'<tr data-vsp="([^"]+)">(.*?)</tr>', admin_client.get("/vsps/").text, re.S))
    assert read_fields(rows["h"])["free_memory"] == "overcommitted by 4 GiB"
    assert (
        read_fields(admin_client.get(f"/vsps/{host.pk}/").text)["free_memory"] == "(overcommitted by 4 GiB)"
    )
    assert "-4 GiB" not in admin_client.get("/vsps/").text
