# ruff: noqa: S105, S106 - fake agent secrets are the point of these tests
"""The VSP list and a VSP's Virtual Machines tab; free memory per host."""

import re

import pytest

from tests.factories import make_admin, make_not_runnable_copy, make_viewer, make_vm, make_vsp
from tests.vms.html_fields import read_fields
from vms.capacity import free_memory_by_vsp, free_memory_mib

pytestmark = pytest.mark.django_db


def test_free_memory_counts_only_guests_with_hardware_on():
    vsp, other = make_vsp(memory_mib=8192), make_vsp(memory_mib=4096)
    make_vm(vsp=vsp, memory_mib=1024, hardware_status="on")
    make_vm(vsp=vsp, memory_mib=2048, hardware_status="off")
    moved = make_vm(vsp=other, memory_mib=512, hardware_status="on")
    make_not_runnable_copy(moved, vsp)
    assert free_memory_mib(vsp) == 8192 - 1024
    assert free_memory_by_vsp([vsp.pk, other.pk]) == {vsp.pk: 7168, other.pk: 3584}


def test_free_memory_of_an_empty_host_is_all_of_it():
    assert free_memory_mib(make_vsp(memory_mib=2048)) == 2048


def test_the_vsp_list_shows_each_host_state(client):
    make_vsp("good", memory_mib=4096)
    make_vsp("unlicensed", licensed=False)
    make_vsp("disabled", migration_enabled=False)
    make_vm(vsp=make_vsp("busy", memory_mib=2048), memory_mib=512)
    client.force_login(make_admin())
    html = client.get("/vsps/").text
    rows = dict(re.findall(r'<tr data-vsp="([^"]+)">(.*?)</tr>', html, re.S))
    assert "Enabled" in rows["good"] and "Licensed" in rows["good"]
    assert "Not licensed" in rows["unlicensed"]
    assert "Disabled" in rows["disabled"]
    assert "1.5 GiB" in rows["busy"]


def test_the_vsp_list_never_shows_agent_secrets(client):
    make_vsp("h", agent_secret="very-secret-value")
    client.force_login(make_admin())
    assert "very-secret-value" not in client.get("/vsps/").text


def test_the_virtual_machines_tab_lists_each_guest_with_its_statuses(client, fleet):
    client.force_login(make_admin())
    html = client.get(f"/vsps/{fleet['vsp_a'].pk}/").text
    rows = dict(re.findall(r'<tr data-vm="([^"]+)">(.*?)</tr>', html, re.S))
    assert set(rows) == {"web", "vpar1", "stopped"}
    assert "Not Runnable" in rows["web"]
    assert "vPar" in rows["vpar1"]
    assert "Down" in rows["stopped"] and "Off" in rows["stopped"]
    assert all("data-icon-slot" in row for row in rows.values())
    assert f"/vms/{fleet['web'].pk}/general/?vsp={fleet['vsp_a'].pk}" in rows["web"]


def test_repr_and_str_of_a_vsp_leave_out_its_secret():
    vsp = make_vsp("h", agent_secret="very-secret-value")
    assert "very-secret-value" not in repr(vsp)
    assert "very-secret-value" not in str(vsp)


def vsp_tab_rows(client, vsp) -> dict[str, str]:
    return dict(re.findall(r'<tr data-vm="([^"]+)">(.*?)</tr>', client.get(f"/vsps/{vsp.pk}/").text, re.S))


def test_a_not_runnable_copy_on_the_vsp_tab_is_down_and_cannot_be_selected(client, fleet):
    client.force_login(make_admin())
    rows = vsp_tab_rows(client, fleet["vsp_a"])
    assert read_fields(rows["web"])["os_status"] == "Down"
    checkbox = re.search(r'<input type="checkbox"[^>]*>', rows["web"]).group(0)
    assert " disabled" in checkbox
    assert 'title="Not Runnable on vsp-a: only the runnable copy migrates"' in checkbox
    running = re.search(r'<input type="checkbox"[^>]*>', vsp_tab_rows(client, fleet["vsp_b"])["web"]).group(0)
    assert "disabled" not in running
    assert read_fields(vsp_tab_rows(client, fleet["vsp_b"])["web"])["os_status"] == "Up"


def test_the_vsp_tab_has_a_header_for_every_column_and_checkboxes_in_their_own(client, fleet):
    client.force_login(make_admin())
    html = client.get(f"/vsps/{fleet['vsp_a'].pk}/").text
    head = html.split("<thead>")[1].split("</thead>")[0]
    assert all(re.sub("<[^>]+>", "", text).strip() for text in re.findall(r"<th[^>]*>(.*?)</th>", head))
    assert "Migration" in head and "Select" in head
    cells = re.findall(r"<td[^>]*>(.*?)</td>", vsp_tab_rows(client, fleet["vsp_a"])["web"], re.S)
    assert cells[0].startswith('<input type="checkbox"')
    assert 'type="checkbox"' not in cells[2]  # the Name column holds only the name


def test_an_operator_sees_no_select_column_on_the_vsp_tab(client, fleet):
    client.force_login(make_viewer())
    html = client.get(f"/vsps/{fleet['vsp_a'].pk}/").text
    assert "Select" not in html.split("<thead>")[1].split("</thead>")[0]
    assert 'type="checkbox"' not in html


def test_the_vsp_list_counts_runnable_guests_and_not_runnable_copies_apart(client, fleet):
    client.force_login(make_admin())
    rows = dict(re.findall(r'<tr data-vsp="([^"]+)">(.*?)</tr>', client.get("/vsps/").text, re.S))
    vsp_a = read_fields(rows["vsp-a"])
    assert vsp_a["guests"].startswith("2 ")  # vpar1 and stopped; web's copy there is Not Runnable
    assert vsp_a["not_runnable_copies"] == "+ 1 Not Runnable"
    assert read_fields(rows["vsp-b"])["guests"] == "1"
    assert "not_runnable_copies" not in read_fields(rows["vsp-b"])
