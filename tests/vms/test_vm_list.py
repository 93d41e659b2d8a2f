"""The VM list: search, filters, pagination, and a query count that does not grow with the rows."""

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.factories import make_not_runnable_copy, make_vm, make_vsp
from tests.vms.html_fields import read_fields
from vms.views import PAGE_SIZE

pytestmark = pytest.mark.django_db


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


def rows_of(html: str) -> dict[str, list[dict[str, str]]]:
    """Each listed guest's rows, as the labelled cells a user reads (VSP, statuses)."""
    table = html.split('id="vm-table"')[1].split("</table>")[0]
    rows: dict[str, list[dict[str, str]]] = {}
    for name, row in re.findall(r'<tr data-vm="([^"]+)">(.*?)</tr>', table, re.S):
        rows.setdefault(name, []).append(read_fields(row))
    return rows


def test_filtering_by_not_runnable_shows_the_not_runnable_copy(admin_client, fleet):
    rows = rows_of(admin_client.get("/?hardware_status=not_runnable").text)
    assert rows == {"web": [{"vsp": "vsp-a", "os_status": "Down", "hardware_status": "Not Runnable"}]}


def test_filtering_by_vsp_shows_the_copy_on_that_vsp(admin_client, fleet):
    rows = rows_of(admin_client.get(f"/?vsp={fleet['vsp_a'].pk}").text)
    assert rows["web"] == [{"vsp": "vsp-a", "os_status": "Down", "hardware_status": "Not Runnable"}]
    assert rows["stopped"][0]["vsp"] == "vsp-a"
    rows = rows_of(admin_client.get(f"/?vsp={fleet['vsp_b'].pk}").text)
    assert rows == {"web": [{"vsp": "vsp-b", "os_status": "Up", "hardware_status": "On"}]}


def test_a_filtered_row_links_to_the_copy_it_shows(admin_client, fleet):
    html = admin_client.get("/?hardware_status=not_runnable").text
    assert f'href="/vms/{fleet["web"].pk}/general/?vsp={fleet["vsp_a"].pk}"' in html


def test_each_matching_copy_gets_its_own_row(admin_client, fleet):
    make_not_runnable_copy(fleet["web"], make_vsp("vsp-c"))
    rows = rows_of(admin_client.get("/?hardware_status=not_runnable").text)
    assert [row["vsp"] for row in rows["web"]] == ["vsp-a", "vsp-c"]


def test_without_copy_filters_each_guest_shows_where_it_runs(admin_client, fleet):
    rows = rows_of(admin_client.get("/").text)
    assert rows["web"] == [{"vsp": "vsp-b", "os_status": "Up", "hardware_status": "On"}]


def test_the_list_has_no_empty_headerless_column(admin_client, fleet):
    html = admin_client.get("/").text
    head = html.split('id="vm-table"')[1].split("</thead>")[0]
    assert all(text.strip() for text in re.findall(r"<th[^>]*>(.*?)</th>", head))


def test_the_list_of_not_runnable_copies_has_a_fixed_query_count(admin_client):
    vsps = [make_vsp(), make_vsp()]
    make_not_runnable_copy(make_vm(vsp=vsps[0]), vsps[1])
    few = count_queries(admin_client, "/?hardware_status=not_runnable")
    for number in range(20):
        make_not_runnable_copy(make_vm(vsp=vsps[number % 2]), vsps[(number + 1) % 2])
    assert count_queries(admin_client, "/?hardware_status=not_runnable") == few
