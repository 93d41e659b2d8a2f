"""The VM Properties view, General tab: every field, the other copies, Refresh Data and the forms."""

import re

import pytest

from tests.factories import make_admin
from tests.vms.html_fields import read_all_fields, read_fields
from vms import general_tab
from vms.models import VirtualMachine
from vms.queries import vm_with_registrations

pytestmark = pytest.mark.django_db


def test_it_shows_every_field_of_the_running_copy(vm_admin_client, fleet):
    VirtualMachine.objects.filter(pk=fleet["web"].pk).update(
        os_type="HP-UX 11i v3", boot_attribute="manual", graceful_stop_timeout_s=45
    )
    fields = read_fields(vm_admin_client.get(f"/vms/{fleet['web'].pk}/general/").text)
    assert fields["vsp"] == "vsp-b"
    assert fields["os_type"] == "HP-UX 11i v3"
    assert fields["os_status"] == "Up"
    assert fields["hardware_status"] == "On"
    assert fields["boot_attribute"] == "Manual start"
    assert fields["graceful_stop_timeout"] == "45 seconds"
    assert fields["online_migration"] == "VM enabled"
    assert fields["not_runnable_set_by"] == "—"
    assert fields["not_runnable_reason"] == "—"
    assert fields["phase_limits"] == "Init 10 s · Copy unlimited · I/O Quiesce 15 s · Frozen 60 s"
    assert fields["no_progress_limit"] == "150 s, in every phase"


def test_it_lists_the_copies_on_other_vsps_with_their_status(vm_admin_client, fleet):
    fields = read_all_fields(vm_admin_client.get(f"/vms/{fleet['web'].pk}/general/").text)
    assert fields["hardware_status"] == ["On", "Not Runnable"]
    assert fields["not_runnable_set_by"] == ["—", "Migrate"]
    assert fields["not_runnable_reason"] == ["—", "guest migrated to VSP vsp-b"]


def test_it_shows_the_not_runnable_copy_when_asked_for_its_vsp(vm_admin_client, fleet):
    url = f"/vms/{fleet['web'].pk}/general/?vsp={fleet['vsp_a'].pk}"
    fields = read_fields(vm_admin_client.get(url).text)
    assert fields["vsp"] == "vsp-a"
    assert fields["hardware_status"] == "Not Runnable"
    assert fields["not_runnable_set_by"] == "Migrate"
    assert fields["not_runnable_reason"] == "guest migrated to VSP vsp-b"


def test_the_phases_and_alerts_sections_are_hidden_when_there_is_nothing_to_show(vm_admin_client, fleet):
    html = vm_admin_client.get(f"/vms/{fleet['web'].pk}/general/").text
    assert re.search(r'<section id="migration-phases"[^>]*\shidden', html)
    assert re.search(r'<section id="migration-alerts"[^>]*\shidden', html)
    assert "Online Migration Phases" not in html
    assert "Alerts" not in html


def test_a_context_provider_adds_to_the_tab_context(fleet, monkeypatch):
    monkeypatch.setattr(
        general_tab, "_context_providers", [lambda vm, seen: {"alerts": [f"{vm.name} failed"]}]
    )
    vm = vm_with_registrations().get(pk=fleet["web"].pk)
    context = general_tab.general_tab_context(vm)
    assert context["alerts"] == ["web failed"]
    assert context["vsp"] == fleet["vsp_b"]


def test_refresh_data_for_htmx_renders_only_the_tab_with_fresh_values(vm_admin_client, fleet):
    VirtualMachine.objects.filter(pk=fleet["web"].pk).update(os_status="in_efi")
    response = vm_admin_client.get(f"/vms/{fleet['web'].pk}/general/refresh/", headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert response.text.strip().startswith('<div id="general-tab"')
    assert "<html" not in response.text
    assert read_fields(response.text)["os_status"] == "In EFI"


def test_refresh_data_without_javascript_renders_the_whole_page(vm_admin_client, fleet):
    response = vm_admin_client.get(f"/vms/{fleet['web'].pk}/general/refresh/")
    assert "<html" in response.text
    assert 'id="refresh-data"' in response.text


def test_the_refresh_button_is_a_real_link_and_an_htmx_get(vm_admin_client, fleet):
    html = vm_admin_client.get(f"/vms/{fleet['web'].pk}/general/").text
    refresh = f"/vms/{fleet['web'].pk}/general/refresh/"
    assert f'href="{refresh}"' in html
    assert f'hx-get="{refresh}" hx-target="#general-tab" hx-swap="outerHTML"' in html


def test_toggling_online_migration_with_htmx_answers_with_the_updated_tab(vm_admin_client, fleet):
    url = f"/vms/{fleet['web'].pk}/online-migration/"
    response = vm_admin_client.post(url, {"enabled": "false"}, headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert read_fields(response.text)["online_migration"] == "VM disabled"
    assert "Online migration disabled for web." in response.text
    response = vm_admin_client.post(url, {"enabled": "true"}, headers={"HX-Request": "true"})
    assert read_fields(response.text)["online_migration"] == "VM enabled"


def test_toggling_online_migration_without_javascript_redirects_back_with_a_message(vm_admin_client, fleet):
    response = vm_admin_client.post(
        f"/vms/{fleet['web'].pk}/online-migration/", {"enabled": "false"}, follow=True
    )
    assert response.redirect_chain == [(f"/vms/{fleet['web'].pk}/general/?", 302)]
    assert "Online migration disabled for web." in response.text
    assert read_fields(response.text)["online_migration"] == "VM disabled"


def test_marking_not_runnable_then_runnable_shows_the_admin_as_setter(vm_admin_client, fleet):
    registration = fleet["stopped_registration"]
    vsp_query = f"?vsp={fleet['vsp_a'].pk}"
    response = vm_admin_client.post(
        f"/registrations/{registration.pk}/not-runnable/{vsp_query}",
        {"reason": "disk replaced"},
        headers={"HX-Request": "true"},
    )
    fields = read_fields(response.text)
    assert (fields["hardware_status"], fields["not_runnable_set_by"]) == ("Not Runnable", "Admin")
    assert fields["not_runnable_reason"] == "disk replaced"
    response = vm_admin_client.post(
        f"/registrations/{registration.pk}/runnable/{vsp_query}", headers={"HX-Request": "true"}
    )
    fields = read_fields(response.text)
    assert (fields["hardware_status"], fields["not_runnable_set_by"]) == ("Off", "—")


def test_a_superuser_sees_the_change_buttons(client, fleet):
    client.force_login(make_admin())
    html = client.get(f"/vms/{fleet['web'].pk}/general/").text
    assert "Disable for VM" in html
    assert "Mark Runnable on vsp-a" in html


def test_a_not_runnable_copy_shows_the_guest_is_not_running_there(vm_admin_client, fleet):
    url = f"/vms/{fleet['web'].pk}/general/?vsp={fleet['vsp_a'].pk}"
    fields = read_fields(vm_admin_client.get(url).text)
    assert fields["os_status"] == "Down"
    note = "Not running here: this copy is Not Runnable; the guest runs on VSP vsp-b."
    assert fields["os_status_note"] == note


def test_a_not_runnable_copy_offers_no_migrate_and_says_which_copy_migrates(client, fleet):
    client.force_login(make_admin())
    html = client.get(f"/vms/{fleet['web'].pk}/general/?vsp={fleet['vsp_a'].pk}").text
    assert 'id="migrate-button"' not in html
    assert "only the runnable copy migrates" in html
    assert f'href="/vms/{fleet["web"].pk}/general/?vsp={fleet["vsp_b"].pk}"' in html
    running = client.get(f"/vms/{fleet['web'].pk}/general/").text
    assert 'id="migrate-button"' in running
    assert "only the runnable copy migrates" not in running


def test_a_running_copy_says_what_can_be_done_instead_of_marking_it_not_runnable(vm_admin_client, fleet):
    fields = read_fields(vm_admin_client.get(f"/vms/{fleet['web'].pk}/general/").text)
    assert "Stop the guest" not in fields["registration_hint"]
    assert "cannot be marked Not Runnable" in fields["registration_hint"]
    assert "migrate the guest to another VSP" in fields["registration_hint"]


def test_a_guest_on_a_host_that_stopped_answering_is_shown_as_last_reported_everywhere(admin_client):
    """QA: with vsp2's agent killed, its guests read Up/On for minutes on every page, as if known now."""
    from datetime import timedelta

    from django.urls import reverse
    from django.utils import timezone

    from tests.factories import make_vm, make_vsp

    host, other = make_vsp("vsp-down"), make_vsp("vsp-up")
    vm, fine = make_vm("db-on-down", vsp=host), make_vm("db-on-up", vsp=other)
    since = timezone.now() - timedelta(minutes=2)
    host.unreachable_since = since
    host.save(update_fields=["unreachable_since"])
    words = f"as last reported: vsp-down unreachable since {timezone.localtime(since):%H:%M:%S}"

    general = read_fields(admin_client.get(f"/vms/{vm.pk}/general/").text)
    assert general["hardware_status"] == "On"
    assert general["host_unreachable"] == words
    assert general["os_host_unreachable"] == words
    assert "host_unreachable" not in read_fields(admin_client.get(f"/vms/{fine.pk}/general/").text)
    listed = admin_client.get(reverse("vms:vm_list")).text
    assert listed.count(words) == 3  # the note, and the title of both grey badges
    # QA: the list kept a green "Up": a status known only as last reported is never drawn as known now
    stale = f'title="{words}" data-stale="true"'
    for page in (listed, admin_client.get(f"/vms/{vm.pk}/general/").text):
        assert f'<span class="badge badge-muted" data-field="os_status" data-value="up" {stale}>' in page
        hardware = f'<span class="badge badge-muted" data-field="hardware_status" data-value="on" {stale}>'
        assert hardware in page
    assert words in admin_client.get(reverse("vms:vsp_detail", args=[host.pk])).text
    assert "unreachable since" not in admin_client.get(reverse("vms:vsp_detail", args=[other.pk])).text
