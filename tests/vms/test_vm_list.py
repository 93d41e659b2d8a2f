"""The VM list: search, filters, pagination, and a query count that does not grow with the rows."""

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.factories import make_admin, make_not_runnable_copy, make_vm, make_vsp
from vms.views import PAGE_SIZE

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    client.force_login(make_admin())
    return client


def listed(html: str) -> list[str]:
    return re.findall(r'<tr data-vm="([^"]+)">', html)


def test_it_searches_by_name(admin_client, fleet):
    assert listed(admin_client.get("/?q=WE").text) == ["web"]


def test_it_filters_by_kind_and_os_status(admin_client, fleet):
    assert listed(admin_client.get("/?kind=vpar").text) == ["vpar1"]
    assert listed(admin_client.get("/?os_status=down").text) == ["stopped"]


def test_it_filters_by_vsp_including_not_runnable_copies(admin_client, fleet):
    assert listed(admin_client.get(f"/?vsp={fleet['vsp_a'].pk}").text) == ["stopped", "vpar1", "web"]
    assert listed(admin_client.get(f"/?vsp={fleet['vsp_b'].pk}").text) == ["web"]


def test_vsp_and_hardware_status_apply_to_the_same_copy(admin_client, fleet):
    query = f"/?vsp={fleet['vsp_a'].pk}&hardware_status=not_runnable"
    assert listed(admin_client.get(query).text) == ["web"]
    query = f"/?vsp={fleet['vsp_b'].pk}&hardware_status=not_runnable"
    assert listed(admin_client.get(query).text) == []


def test_it_shows_where_each_guest_runs(admin_client, fleet):
    html = admin_client.get("/?q=web").text
    assert "vsp-b" in html
    assert "Not Runnable" not in html.split('id="vm-table"')[1]


def test_it_pages_and_keeps_the_filters(admin_client):
    vsp = make_vsp()
    for number in range(PAGE_SIZE + 3):
        make_vm(f"guest-{number:03}", vsp=vsp)
    first = admin_client.get("/?q=guest").text
    assert len(listed(first)) == PAGE_SIZE
    assert "?q=guest&amp;page=2" in first
    second = admin_client.get("/?q=guest&page=2").text
    assert listed(second) == [f"guest-{number:03}" for number in range(PAGE_SIZE, PAGE_SIZE + 3)]


def count_queries(client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


@pytest.mark.parametrize("url", ["/", "/?hardware_status=on", "/vsps/"])
def test_its_query_count_does_not_grow_with_the_number_of_guests(admin_client, url):
    vsps = [make_vsp(), make_vsp()]
    make_vm(vsp=vsps[0])
    few = count_queries(admin_client, url)
    for number in range(40):
        vm = make_vm(vsp=vsps[number % 2])
        make_not_runnable_copy(vm, vsps[(number + 1) % 2])
    assert count_queries(admin_client, url) == few


def test_the_vsp_tab_query_count_does_not_grow_with_the_number_of_guests(admin_client):
    vsp = make_vsp()
    make_vm(vsp=vsp)
    few = count_queries(admin_client, f"/vsps/{vsp.pk}/")
    for _ in range(30):
        make_vm(vsp=vsp)
    assert count_queries(admin_client, f"/vsps/{vsp.pk}/") == few


def test_the_general_tab_query_count_does_not_grow_with_the_number_of_copies(admin_client):
    vm = make_vm()
    few = count_queries(admin_client, f"/vms/{vm.pk}/general/")
    for _ in range(10):
        make_not_runnable_copy(vm, make_vsp())
    assert count_queries(admin_client, f"/vms/{vm.pk}/general/") == few
