"""Bad input to every form and URL: a clear error, and nothing changed."""

import pytest

from tests.vms.conftest import snapshot
from vms.models import Registration

pytestmark = pytest.mark.django_db

UNKNOWN = 999_999


@pytest.mark.parametrize(
    "url",
    [
        f"/vsps/{UNKNOWN}/",
        f"/vms/{UNKNOWN}/general/",
        f"/vms/{UNKNOWN}/general/refresh/",
        "/vms/not-a-number/general/",
    ],
)
def test_unknown_ids_in_pages_are_not_found(vm_admin_client, url):
    assert vm_admin_client.get(url).status_code == 404


@pytest.mark.parametrize(
    ("url", "data"),
    [
        (f"/vms/{UNKNOWN}/online-migration/", {"enabled": "true"}),
        (f"/registrations/{UNKNOWN}/not-runnable/", {"reason": "x"}),
        (f"/registrations/{UNKNOWN}/runnable/", {}),
    ],
)
def test_unknown_ids_in_changes_are_not_found_and_change_nothing(vm_admin_client, fleet, url, data):
    before = snapshot()
    assert vm_admin_client.post(url, data).status_code == 404
    assert snapshot() == before


def test_a_general_tab_for_a_vsp_without_that_vm_is_not_found(vm_admin_client, fleet):
    response = vm_admin_client.get(f"/vms/{fleet['vpar'].pk}/general/?vsp={fleet['vsp_b'].pk}")
    assert response.status_code == 404


@pytest.mark.parametrize("value", ["abc", "-1", "0", "1.5"])
def test_a_malformed_vsp_on_the_general_tab_is_a_clear_error(vm_admin_client, fleet, value):
    response = vm_admin_client.get(f"/vms/{fleet['web'].pk}/general/?vsp={value}")
    assert response.status_code == 400
    assert "Vsp" in response.text or "VSP" in response.text


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("vsp=abc", "Select a valid choice"),
        (f"vsp={UNKNOWN}", "Select a valid choice"),
        ("kind=container", "Select a valid choice"),
        ("os_status=sleeping", "Select a valid choice"),
        ("hardware_status=broken", "Select a valid choice"),
        ("page=abc", "Enter a whole number"),
        ("page=0", "greater than or equal to 1"),
        ("q=" + "x" * 65, "at most 64 characters"),
    ],
)
def test_malformed_vm_list_filters_are_a_clear_error(vm_admin_client, fleet, query, says):
    response = vm_admin_client.get(f"/?{query}")
    assert response.status_code == 400
    assert says in response.text


def test_a_page_past_the_end_is_not_found(vm_admin_client, fleet):
    assert vm_admin_client.get("/?page=99").status_code == 404
    assert vm_admin_client.get(f"/vsps/{fleet['vsp_a'].pk}/?page=99").status_code == 404


def test_a_malformed_page_of_a_vsp_is_a_clear_error(vm_admin_client, fleet):
    response = vm_admin_client.get(f"/vsps/{fleet['vsp_a'].pk}/?page=x")
    assert response.status_code == 400
    assert "Enter a whole number" in response.text


@pytest.mark.parametrize("data", [{}, {"enabled": "maybe"}, {"enabled": ""}, {"enabled": "1"}])
def test_a_malformed_online_migration_value_is_refused(vm_admin_client, fleet, data):
    before = snapshot()
    response = vm_admin_client.post(f"/vms/{fleet['web'].pk}/online-migration/", data)
    assert response.status_code == 400
    assert "Enabled:" in response.text
    assert snapshot() == before


@pytest.mark.parametrize("enabled", ["true", "false"])
def test_online_migration_of_a_vpar_is_refused(vm_admin_client, fleet, enabled):
    before = snapshot()
    response = vm_admin_client.post(f"/vms/{fleet['vpar'].pk}/online-migration/", {"enabled": enabled})
    assert response.status_code == 400
    assert "vpar1 is a vPar: a vPar does not support migration." in response.text
    assert snapshot() == before


@pytest.mark.parametrize(
    ("reason", "says"),
    [
        ("", "This field is required"),
        ("   ", "This field is required"),
        ("x" * 201, "at most 200 characters"),
    ],
)
def test_a_missing_or_over_long_reason_is_refused(vm_admin_client, fleet, reason, says):
    before = snapshot()
    url = f"/registrations/{fleet['stopped_registration'].pk}/not-runnable/"
    response = vm_admin_client.post(url, {"reason": reason})
    assert response.status_code == 400
    assert says in response.text
    assert snapshot() == before


@pytest.mark.parametrize(
    ("copy", "change", "data", "says"),
    [
        (
            "web_running",
            "not-runnable",
            {"reason": "maintenance"},
            "stop the VM before marking it Not Runnable",
        ),
        ("web_copy", "runnable", {}, "Refused: web is runnable on VSP vsp-b"),
        ("stopped_registration", "runnable", {}, "is already runnable"),
        ("web_copy", "not-runnable", {"reason": "again"}, "is already Not Runnable"),
    ],
    ids=["running-copy-not-runnable", "second-runnable-copy", "runnable-again", "not-runnable-again"],
)
def test_a_refused_runnable_mark_says_why_and_changes_nothing(
    vm_admin_client, fleet, copy, change, data, says
):
    before = snapshot()
    response = vm_admin_client.post(f"/registrations/{fleet[copy].pk}/{change}/", data)
    assert response.status_code == 400
    assert says in response.text
    assert snapshot() == before
    assert fleet["web_copy"].not_runnable_set_by == Registration.SetBy.MIGRATE
