"""The migrate dialog, cancel and "migrate selected": what an admin sees and that refusals start nothing.

Django's test client against the real views and templates; on_commit work (queueing the Celery task) does
not run in these non-transactional tests, which is what keeps them to the pages themselves.
"""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse

from migrations_app.models import Migration
from tests.factories import make_migration, make_vm, make_vsp

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet(settings):
    settings.MIGRATE_DIALOG_PROBE_TIMEOUT_S = 0  # these VSPs have no agents: the rows show the checks
    vsps = {
        "vsp1": make_vsp("vsp1"),
        "vsp2": make_vsp("vsp2"),
        "vsp3": make_vsp("vsp3", licensed=False),
        "vsp4": make_vsp("vsp4", migration_enabled=False),
        "vsp5": make_vsp("vsp5", memory_mib=100),
    }
    return vsps, make_vm("web01", vsps["vsp1"], memory_mib=512)


def dialog_url(vm) -> str:
    return reverse("migrations_app:migrate", args=[vm.pk])


def target_row(html: str, vsp_name: str) -> str:
    start = html.index(f'data-vsp="{vsp_name}"')
    return html[start : html.index("</tr>", start)]


def test_it_lists_every_vsp_with_its_pre_check_in_plain_words(fleet, migration_admin_client):
    vsps, vm = fleet
    html = migration_admin_client.get(dialog_url(vm)).content.decode()
    expected = {
        "vsp1": "Same host",
        "vsp3": "Host not licensed",
        "vsp4": "Host disabled",
        "vsp5": "Not enough free memory (needs 512 MiB, 100 MiB free)",
    }
    for name, reason in expected.items():
        row = target_row(html, name)
        assert reason in row and "disabled" in row and 'data-ok="false"' in row
    assert "Ready" in target_row(html, "vsp2") and " disabled" not in target_row(html, "vsp2")


def test_a_vpar_is_refused_on_every_target(fleet, migration_admin_client):
    vsps, _ = fleet
    vpar = make_vm("vpar01", vsps["vsp1"], kind="vpar")
    html = migration_admin_client.get(dialog_url(vpar)).content.decode()
    for name in vsps:
        assert "vPars do not migrate" in target_row(html, name)
    response = migration_admin_client.post(dialog_url(vpar), {"target": vsps["vsp2"].pk})
    assert response.status_code == 400 and "vPars do not migrate" in response.content.decode()
    assert not Migration.objects.exclude(state=Migration.State.REFUSED).exists()


@pytest.mark.parametrize("target", ["vsp1", "vsp3", "vsp4", "vsp5"])
def test_posting_a_refused_target_starts_nothing_and_says_why(fleet, migration_admin_client, target):
    vsps, vm = fleet
    response = migration_admin_client.post(dialog_url(vm), {"target": vsps[target].pk})
    assert response.status_code == 400
    assert f"web01 cannot migrate to {target}" in response.content.decode()
    assert not Migration.objects.exclude(state=Migration.State.REFUSED).exists()


@pytest.mark.parametrize("value", ["", "abc", "-1", "999999"])
def test_a_missing_or_unknown_target_starts_nothing(fleet, migration_admin_client, value):
    _, vm = fleet
    response = migration_admin_client.post(dialog_url(vm), {"target": value})
    assert response.status_code == 400 and "Choose a target VSP" in response.content.decode()
    assert not Migration.objects.exclude(state=Migration.State.REFUSED).exists()


def test_an_ok_target_queues_the_migration_and_the_tab_shows_it(fleet, migration_admin_client):
    vsps, vm = fleet
    response = migration_admin_client.post(dialog_url(vm), {"target": vsps["vsp2"].pk})
    assert response.status_code == 302
    migration = Migration.objects.get()
    assert (migration.vm, migration.source, migration.target) == (vm, vsps["vsp1"], vsps["vsp2"])
    page = migration_admin_client.get(response.url).content.decode()
    assert "Waiting its turn to migrate to VSP vsp2" in page and "migration-icon-queued" in page


def test_with_htmx_an_ok_target_answers_with_the_phases_to_swap_in(fleet, migration_admin_client):
    vsps, vm = fleet
    response = migration_admin_client.post(
        dialog_url(vm), {"target": vsps["vsp2"].pk}, headers={"HX-Request": "true"}
    )
    html = response.content.decode()
    assert response.status_code == 200 and 'id="migration-phases"' in html and 'hx-swap-oob="true"' in html


def test_with_htmx_a_refusal_re_renders_the_dialog_in_its_slot(fleet, migration_admin_client):
    vsps, vm = fleet
    response = migration_admin_client.post(
        dialog_url(vm), {"target": vsps["vsp3"].pk}, headers={"HX-Request": "true"}
    )
    assert response.status_code == 400 and response["HX-Retarget"] == "#migrate-dialog-slot"
    assert "host not licensed" in response.content.decode() and "<dialog" in response.content.decode()


def test_a_read_only_operator_can_neither_open_the_dialog_nor_migrate_nor_cancel(fleet, viewer_client):
    vsps, vm = fleet
    assert viewer_client.get(dialog_url(vm)).status_code == 403
    assert viewer_client.post(dialog_url(vm), {"target": vsps["vsp2"].pk}).status_code == 403
    assert Migration.objects.get().state == Migration.State.REFUSED  # the attempt is kept, nothing started
    migration = make_migration(vm, vsps["vsp1"], vsps["vsp2"])
    assert viewer_client.post(reverse("migrations_app:cancel", args=[migration.pk])).status_code == 403
    assert Migration.objects.get(pk=migration.pk).state == Migration.State.QUEUED
    page = viewer_client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()
    assert 'id="migrate-button"' not in page
    assert 'class="migration-cancel"' not in page  # not drawn at all (it used to be hidden by CSS)


def test_anonymous_users_are_sent_to_log_in(fleet):
    _, vm = fleet
    response = Client().get(dialog_url(vm))
    assert response.status_code == 302 and "/login/" in response.url


def test_cancel_ends_a_queued_migration(fleet, migration_admin_client):
    vsps, vm = fleet
    migration = make_migration(vm, vsps["vsp1"], vsps["vsp2"])
    response = migration_admin_client.post(reverse("migrations_app:cancel", args=[migration.pk]))
    assert response.status_code == 302
    assert Migration.objects.get().state == Migration.State.CANCELLED


def test_the_page_and_refresh_data_show_the_same_numbers(fleet, migration_admin_client):
    vsps, vm = fleet
    make_migration(
        vm,
        vsps["vsp1"],
        vsps["vsp2"],
        state=Migration.State.COPY,
        init_percent=100,
        copy_percent=63,
        bytes_sent=300 * 2**20,
        bytes_remaining=212 * 2**20,
        rounds=5,
    )
    page = migration_admin_client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()
    refreshed = migration_admin_client.get(
        reverse("vms:vm_refresh", args=[vm.pk]), headers={"HX-Request": "true"}
    )
    for html in (page, refreshed.content.decode()):
        assert "63%" in html and "300.0\xa0MB" in html and "212.0\xa0MB" in html and 'data-round="5"' in html
        assert "Migrating to VSP vsp2: Copy phase." in html


def test_migrate_selected_queues_each_vm_and_reports_refusals(fleet, migration_admin_client):
    vsps, web01 = fleet
    web02 = make_vm("web02", vsps["vsp1"])
    vpar = make_vm("vpar01", vsps["vsp1"], kind="vpar")
    url = reverse("migrations_app:migrate_selected", args=[vsps["vsp1"].pk])
    response = migration_admin_client.post(
        url, {"vm": [web01.pk, web02.pk, vpar.pk], "target": vsps["vsp2"].pk}, follow=True
    )
    html = response.content.decode()
    started = Migration.objects.exclude(state=Migration.State.REFUSED)
    assert set(started.values_list("vm__name", flat=True)) == {"web01", "web02"}
    assert Migration.objects.get(state=Migration.State.REFUSED).vm_name == "vpar01"
    assert "vpar01 cannot migrate to vsp2: vPars do not migrate." in html
    assert html.count("migration-icon-queued") == 2 and "Waiting to migrate to vsp2" in html


def test_migrate_selected_refuses_vms_of_another_vsp(fleet, migration_admin_client):
    vsps, web01 = fleet
    elsewhere = make_vm("db01", vsps["vsp2"])
    url = reverse("migrations_app:migrate_selected", args=[vsps["vsp1"].pk])
    response = migration_admin_client.post(
        url, {"vm": [web01.pk, elsewhere.pk], "target": vsps["vsp2"].pk}, follow=True
    )
    assert "not registered on vsp1; nothing was started" in response.content.decode()
    assert not Migration.objects.exclude(state=Migration.State.REFUSED).exists()


def test_with_htmx_cancel_answers_with_a_notice_and_the_new_state(fleet, migration_admin_client):
    vsps, vm = fleet
    migration = make_migration(vm, vsps["vsp1"], vsps["vsp2"])
    url = reverse("migrations_app:cancel", args=[migration.pk])
    response = migration_admin_client.post(url, headers={"HX-Request": "true"})
    html = response.content.decode()
    assert response.status_code == 200 and 'id="migration-notice"' in html
    assert "Cancel of the migration of web01 requested." in html
    assert '<section id="migration-alerts"' in html and "cancelled" in html

    again = migration_admin_client.post(url, headers={"HX-Request": "true"}).content.decode()
    assert "notice-error" in again and "already ended" in again


def powered_off_vm(vsps):
    from vms.models import Registration

    build01 = make_vm("build01", vsps["vsp1"], os_status="down")
    Registration.objects.filter(vm=build01).update(hardware_status=Registration.HardwareStatus.OFF)
    return build01


def test_a_powered_off_vm_is_refused_in_the_dialog_the_post_and_migrate_selected(
    fleet, migration_admin_client
):
    vsps, web01 = fleet
    build01 = powered_off_vm(vsps)
    reason = "VM is not running (Off): online migration moves running guests only"

    dialog = migration_admin_client.get(dialog_url(build01)).content.decode()
    assert reason in target_row(dialog, "vsp2") and "Ready" not in target_row(dialog, "vsp2")

    posted = migration_admin_client.post(dialog_url(build01), {"target": vsps["vsp2"].pk})
    assert posted.status_code == 400
    assert f"build01 cannot migrate to vsp2: {reason}." in posted.content.decode()
    assert not Migration.objects.exclude(state=Migration.State.REFUSED).exists()

    url = reverse("migrations_app:migrate_selected", args=[vsps["vsp1"].pk])
    selected = migration_admin_client.post(
        url, {"vm": [web01.pk, build01.pk], "target": vsps["vsp2"].pk}, follow=True
    )
    assert f"build01 cannot migrate to vsp2: {reason}." in selected.content.decode()
    started = Migration.objects.exclude(state=Migration.State.REFUSED)
    assert list(started.values_list("vm__name", flat=True)) == ["web01"]


def test_an_alert_says_once_where_the_vm_stays(fleet, migration_admin_client):
    vsps, web01 = fleet
    alert = "Cancelled by admin during the Copy phase. The VM keeps running on vsp1."
    make_migration(web01, vsps["vsp1"], vsps["vsp2"], state="cancelled", failed_phase="copy", alert=alert)
    html = migration_admin_client.get(reverse("vms:vm_general", args=[web01.pk])).content.decode()
    assert alert in html
    assert html.count("keeps running") == 1


def test_opened_by_its_address_the_dialog_is_a_styled_page_of_the_console(fleet, migration_admin_client):
    _, vm = fleet
    html = migration_admin_client.get(dialog_url(vm)).content.decode()
    assert 'class="topbar"' in html and "/static/css/migrations.css" in html
    assert "/static/css/console.css" in html  # where .visually-hidden hides the "Choose" header
    assert "dialog-backdrop" not in html and "hx-post" not in html  # a plain form posting to itself
    assert re.search(rf'href="/vms/{vm.pk}/general/"\s*>Back to web01</a>', html)


def test_with_htmx_the_dialog_is_a_modal_posting_into_its_slot(fleet, migration_admin_client):
    _, vm = fleet
    html = migration_admin_client.get(dialog_url(vm), headers={"HX-Request": "true"}).content.decode()
    assert "dialog-backdrop" in html and 'hx-target="#migrate-dialog-slot"' in html
    assert 'class="topbar"' not in html


def test_a_vpar_dialog_says_once_that_vpars_never_migrate_and_disables_migrate(fleet, migration_admin_client):
    vsps, _ = fleet
    vpar = make_vm("vpar01", vsps["vsp1"], kind="vpar")
    html = migration_admin_client.get(dialog_url(vpar)).content.decode()
    assert "vpar01 is a vPar: vPars never migrate" in html
    assert html.count("Refused (see above)") == len(vsps)
    assert re.search(r'<button type="submit"[^>]*id="migrate-submit"[^>]*\sdisabled', html)
    response = migration_admin_client.post(dialog_url(vpar), {})
    assert response.status_code == 400
    assert "vPars never migrate" in response.content.decode()
    assert "Choose a target VSP" not in response.content.decode()


def test_a_refusal_shared_by_every_target_is_a_banner_not_a_row_each(fleet, migration_admin_client):
    _, vm = fleet
    vm.online_migration_enabled = False
    vm.save()
    html = migration_admin_client.get(dialog_url(vm)).content.decode()
    banner = re.search(r'id="migrate-dialog-blocked">([^<]*)<', html).group(1)
    assert banner == "web01 cannot migrate to any VSP: VM not enabled for online migration."
    assert "Refused (see above)" in target_row(html, "vsp2")
    assert re.search(r'id="migrate-submit"[^>]*\sdisabled', html)


def test_different_refusals_stay_on_their_rows_and_migrate_stays_enabled(fleet, migration_admin_client):
    _, vm = fleet
    html = migration_admin_client.get(dialog_url(vm)).content.decode()
    assert 'id="migrate-dialog-blocked"' not in html and "see above" not in html
    assert not re.search(r'id="migrate-submit"[^>]*\sdisabled', html)


def test_the_cancel_requested_notice_gives_way_to_the_final_state_once_pushed(fleet, migration_admin_client):
    from migrations_app.controls import EVERYTHING
    from migrations_app.progress import build_progress_messages, render_message, vm_group

    def pushed_html() -> str:  # as a web process renders the pushed facts for a watcher who sees all
        return render_message(build_progress_messages(migration.pk)[vm_group(vm.pk)], EVERYTHING)

    vsps, vm = fleet
    migration = make_migration(vm, vsps["vsp1"], vsps["vsp2"], state="copy")
    answer = migration_admin_client.post(
        reverse("migrations_app:cancel", args=[migration.pk]), headers={"HX-Request": "true"}
    )
    assert "Cancel of the migration of web01 requested." in answer.content.decode()

    empty_notice = (
        '<div id="migration-notice" class="migration-notice" hx-swap-oob="true" aria-live="assertive"></div>'
    )
    while_cancelling = pushed_html()
    assert 'id="migration-notice"' not in while_cancelling  # still running: the notice stays

    alert = "Cancelled by admin during the Copy phase. The VM keeps running on vsp1."
    Migration.objects.filter(pk=migration.pk).update(state="cancelled", failed_phase="copy", alert=alert)
    pushed = pushed_html()
    assert empty_notice in pushed
    assert alert in pushed and pushed.count("keeps running") == 1


def test_the_vsp_tab_socket_names_the_vms_of_its_page(fleet, migration_admin_client):
    vsps, vm = fleet
    other = make_vm("web02", vsps["vsp1"])
    html = migration_admin_client.get(reverse("vms:vsp_detail", args=[vsps["vsp1"].pk])).content.decode()
    assert f'ws-connect="/ws/vsps/{vsps["vsp1"].pk}/?vms={vm.pk},{other.pk}"' in html


def test_after_a_completed_migration_the_phases_give_way_to_one_line(fleet, migration_admin_client):
    vsps, vm = fleet
    make_migration(
        vm,
        vsps["vsp1"],
        vsps["vsp2"],
        state=Migration.State.COMPLETED,
        downtime_ms=120,
        init_percent=100,
        copy_percent=100,
        quiesce_percent=100,
        frozen_percent=100,
    )
    migration = Migration.objects.get()
    html = migration_admin_client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()
    line = re.search(r'data-field="last_migration"[^>]*>([^<]*)<', html).group(1)
    assert line == (
        f"Last migration: completed to VSP vsp2 at {migration.state_changed_at:%H:%M} UTC, downtime 120 ms."
    )
    assert "Online Migration Phases" not in html
    assert re.search(r"<details[^>]*>\s*<summary>Phase details</summary>", html)  # folded, not gone


def test_while_a_migration_runs_the_phases_panel_shows_in_full(fleet, migration_admin_client):
    vsps, vm = fleet
    make_migration(vm, vsps["vsp1"], vsps["vsp2"], state=Migration.State.COPY, copy_percent=30)
    html = migration_admin_client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()
    assert "Online Migration Phases" in html and "<details" not in html
    assert 'data-field="last_migration"' not in html


def test_an_htmx_answer_of_the_general_tab_carries_the_breadcrumb_out_of_band(fleet, migration_admin_client):
    vsps, vm = fleet
    html = migration_admin_client.get(
        reverse("vms:vm_general", args=[vm.pk]), headers={"HX-Request": "true"}
    ).text
    crumb = re.search(r'<p class="breadcrumb" id="vm-breadcrumb" hx-swap-oob="true">.*?</p>', html, re.S)
    assert crumb and ">vsp1</a>" in crumb.group(0)
    page = migration_admin_client.get(reverse("vms:vm_general", args=[vm.pk])).text
    assert page.count('id="vm-breadcrumb"') == 1 and 'id="vm-breadcrumb" hx-swap-oob' not in page


def test_a_cancelled_migration_leaves_no_warning_beside_the_vm_on_the_vsp_page(fleet, migration_admin_client):
    """Issue 21.5: a cancel is the admin's choice, not a failure; an abort still warns."""
    vsps, web01 = fleet
    web02 = make_vm("web02", vsps["vsp1"])
    make_migration(web01, vsps["vsp1"], vsps["vsp2"], state="cancelled", failed_phase="copy")
    make_migration(web02, vsps["vsp1"], vsps["vsp2"], state="aborted", failed_phase="copy")
    html = migration_admin_client.get(reverse("vms:vsp_detail", args=[vsps["vsp1"].pk])).content.decode()
    cancelled = re.search(rf'id="vm-{web01.pk}-migration".*?</span>\s*</span>', html, re.S).group(0)
    aborted = re.search(rf'id="vm-{web02.pk}-migration".*?</span>\s*</span>', html, re.S).group(0)
    assert "Migration to vsp2 cancelled" in cancelled and "migration-icon-failed" not in cancelled
    assert "migration-icon-failed" in aborted


def test_the_steering_form_and_the_dialog_bound_the_bandwidth_cap_as_the_server_does(
    fleet, migration_admin_client
):
    """QA: the running migration's Set bandwidth cap field had no maximum (and any step), so the browser
    let through what the server then refused; both forms now carry the server's own bounds."""
    vsps, vm = fleet
    make_migration(vm, vsps["vsp1"], vsps["vsp2"], state=Migration.State.COPY, init_percent=100)
    general = migration_admin_client.get(reverse("vms:vm_general", args=[vm.pk])).text
    dialog = migration_admin_client.get(dialog_url(make_vm("web02", vsps["vsp1"]))).text
    bounds = 'name="bandwidth_cap_mb_s" min="0" max="100000" step="0.001"'
    assert 'id="steer-bandwidth"' in general and bounds in general
    assert bounds in dialog
    assert 'name="downtime_ms" min="1" max="600000" step="1"' in general


def test_the_history_says_a_first_migration_runs_now_not_that_there_was_none(fleet, migration_admin_client):
    """QA: the General tab said "web01 has not been migrated" beside the phases of its first migration.
    The tab, and the fragments that swap in when Migrate is clicked or a push arrives, say it migrates now
    with a link to its live report."""
    vsps, vm = fleet
    tab = reverse("vms:vm_general", args=[vm.pk])
    assert "web01 has not been migrated." in migration_admin_client.get(tab).text

    started = migration_admin_client.post(
        dialog_url(vm), {"target": vsps["vsp2"].pk}, headers={"HX-Request": "true"}
    )
    migration = Migration.objects.get()
    now = re.search(r'<p id="vm-history-now"[^>]*hx-swap-oob="true"[^>]*>(.*?)</p>', started.text, re.S)
    assert now, started.text
    assert re.sub(r"<[^>]+>", "", now.group(1)).startswith(
        "web01 is migrating now to VSP vsp2, requested by admin"
    )
    assert f'href="/migrations/history/{migration.pk}/report/"' in now.group(1)

    page = migration_admin_client.get(tab).text
    assert "has not been migrated" not in page
    assert "web01 is migrating now</strong> to VSP vsp2" in page
