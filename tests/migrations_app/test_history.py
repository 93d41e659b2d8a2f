"""Migration history, CSV export, reports, the VM's own history, refusals kept, and deleted VMs kept.

Django's test client against the real views and templates (no worker: rows are made directly, as the
engine would have left them). The report of a real migration is in ``test_history_live.py``.
"""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from migrations_app.actions import MigrationRefused, do_request_migration
from migrations_app.models import Migration, MigrationEvent
from migrations_app.samples import add_round_sample
from tests.factories import MIGRATION_ADMIN_PERMISSIONS, make_migration, make_user, make_vm, make_vsp

pytestmark = pytest.mark.django_db

HISTORY = reverse("migration_history:list")
CSV_URL = reverse("migration_history:csv")


@pytest.fixture
def fleet():
    return make_vsp("vsp1"), make_vsp("vsp2")


@pytest.fixture
def alice():
    return make_user("alice", MIGRATION_ADMIN_PERMISSIONS)


@pytest.fixture
def admin_client(alice) -> Client:
    client = Client()
    client.force_login(alice)
    return client


def finished(vm, source, target, *, state="completed", at=None, seconds=12, user=None, **fields):
    """A migration as the engine leaves it: started ``seconds`` before it ended, at ``at``."""
    at = at or timezone.now()
    return make_migration(
        vm,
        source,
        target,
        state=state,
        requested_at=at - timedelta(seconds=seconds + 1),
        init_started_at=at - timedelta(seconds=seconds),
        state_changed_at=at,
        requested_by=user,
        **fields,
    )


def table_rows(html: str) -> list[str]:
    return re.findall(r'<tr data-migration="(\d+)" data-outcome="(\w+)"', html)


def test_it_lists_every_migration_newest_first_with_its_figures(fleet, admin_client, alice):
    vsp1, vsp2 = fleet
    web = make_vm("web01", vsp1)
    old = finished(web, vsp1, vsp2, at=timezone.now() - timedelta(days=1), user=alice, downtime_ms=85)
    new = finished(web, vsp2, vsp1, state="aborted", failed_phase="copy", seconds=4, user=alice)
    response = admin_client.get(HISTORY)
    html = response.content.decode()
    assert response.status_code == 200
    assert [pk for pk, _ in table_rows(html)] == [str(new.pk), str(old.pk)]
    row = html[html.index(f'data-migration="{old.pk}"') :]
    assert "12.0 s" in row[: row.index("</tr>")] and "85 ms" in row[: row.index("</tr>")]
    aborted = html[html.index(f'data-migration="{new.pk}"') :]
    aborted = aborted[: aborted.index("</tr>")]
    assert "Aborted" in aborted and "Copy" in aborted and "alice" in aborted
    assert 'id="nav-migrations"' in html


def test_it_filters_by_vm_vsp_outcome_user_and_dates(fleet, admin_client, alice):
    vsp1, vsp2 = fleet
    vsp3 = make_vsp("vsp3")
    bob = make_user("bob", MIGRATION_ADMIN_PERMISSIONS)
    web, db = make_vm("web01", vsp1), make_vm("db01", vsp1)
    yesterday = timezone.now() - timedelta(days=1)
    a = finished(web, vsp1, vsp2, user=alice, at=yesterday)
    b = finished(db, vsp1, vsp2, state="cancelled", user=bob)
    c = finished(db, vsp2, vsp3, user=alice)

    def listed(**query) -> set[str]:
        response = admin_client.get(HISTORY, query)
        assert response.status_code == 200
        return {pk for pk, _ in table_rows(response.content.decode())}

    assert listed(vm="db01") == {str(b.pk), str(c.pk)}
    assert listed(vsp=vsp3.pk) == {str(c.pk)}
    assert listed(outcome="cancelled") == {str(b.pk)}
    assert listed(user="alice") == {str(a.pk), str(c.pk)}
    today = timezone.now().date().isoformat()
    assert listed(since=today) == {str(b.pk), str(c.pk)}
    assert listed(until=yesterday.date().isoformat()) == {str(a.pk)}
    assert listed(vm="db01", user="bob", outcome="cancelled", vsp=vsp1.pk) == {str(b.pk)}


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"outcome": "exploded"}, "Outcome: Select a valid choice."),
        ({"vsp": "abc"}, "VSP: Select a valid choice."),
        ({"user": "nobody"}, "Requested by: Select a valid choice."),
        ({"since": "yesterday"}, "From: Enter a valid date."),
        ({"since": "2026-02-02", "until": "2026-02-01"}, "The From date must not be after the To date."),
        ({"page": "0"}, "Ensure this value is greater than or equal to 1."),
    ],
)
def test_it_answers_bad_filters_with_a_clear_error_and_no_rows(fleet, admin_client, query, message):
    vsp1, vsp2 = fleet
    finished(make_vm("web01", vsp1), vsp1, vsp2)
    response = admin_client.get(HISTORY, query)
    html = response.content.decode()
    assert response.status_code == 400
    assert message in html and 'id="filter-error"' in html
    assert table_rows(html) == []
    assert admin_client.get(CSV_URL, query).status_code == 400


def test_it_paginates_and_keeps_the_filters_in_the_page_links(fleet, admin_client):
    vsp1, vsp2 = fleet
    web = make_vm("web01", vsp1)
    now = timezone.now()
    for minutes in range(55):
        finished(web, vsp1, vsp2, at=now - timedelta(minutes=minutes))
    first = admin_client.get(HISTORY, {"vm": "web01"}).content.decode()
    assert len(table_rows(first)) == 50 and "Page 1 of 2 (55 rows)" in first
    assert "?vm=web01&amp;page=2" in first
    second = admin_client.get(HISTORY, {"vm": "web01", "page": 2}).content.decode()
    assert len(table_rows(second)) == 5
    assert admin_client.get(HISTORY, {"page": 3}).status_code == 404


@pytest.mark.parametrize("count", [3, 60])
def test_its_query_count_does_not_grow_with_the_history(
    fleet, admin_client, alice, count, django_assert_num_queries
):
    vsp1, vsp2 = fleet
    web = make_vm("web01", vsp1)
    Migration.objects.bulk_create(
        Migration(vm=web, vm_name="web01", source=vsp1, target=vsp2, state="completed", requested_by=alice)
        for _ in range(count)
    )
    # session, user, user and group permissions, the roles' permissions, the count, the page's rows, the
    # VSP and user choices, the user's VSPs (a row whose other end is another group's names neither that
    # VSP nor who asked)
    with django_assert_num_queries(10):
        assert admin_client.get(HISTORY).status_code == 200
    with django_assert_num_queries(11):  # and the chosen VSP, validated
        assert admin_client.get(HISTORY, {"vsp": vsp1.pk, "outcome": "completed"}).status_code == 200


def test_it_exports_the_filtered_history_as_csv_with_formula_cells_neutralised(fleet, admin_client, alice):
    vsp1, vsp2 = fleet
    evil = make_vm('=HYPERLINK("http://evil")', vsp1)
    finished(evil, vsp1, vsp2, user=alice, downtime_ms=40, alert="-2+3 went wrong")
    finished(make_vm("web01", vsp1), vsp1, vsp2, state="cancelled")
    response = admin_client.get(CSV_URL, {"outcome": "completed"})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0][:3] == ["id", "vm", "source"]
    assert len(rows) == 2
    line = dict(zip(rows[0], rows[1], strict=True))
    assert line["vm"] == '\'=HYPERLINK("http://evil")'
    assert line["reason"] == "'-2+3 went wrong"
    assert (line["target"], line["requested_by"], line["outcome"], line["downtime_ms"]) == (
        "vsp2",
        "alice",
        "Completed",
        "40",
    )


def test_it_requires_login_and_the_view_permission(fleet):
    vsp1, vsp2 = fleet
    migration = finished(make_vm("web01", vsp1), vsp1, vsp2)
    urls = [
        HISTORY,
        CSV_URL,
        reverse("migration_history:report", args=[migration.pk]),
        reverse("migration_history:report_data", args=[migration.pk]),
    ]
    anonymous = Client()
    for url in urls:
        response = anonymous.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"]
    viewer = Client()
    # view permissions given in the admin, but no role anywhere (a role would carry view_migration)
    viewer.force_login(make_user("viewer", ("vms.view_virtualmachine", "vms.view_vsp"), role=None))
    for url in urls:
        assert viewer.get(url).status_code == 403
    assert 'id="nav-migrations"' not in viewer.get(reverse("vms:vm_list")).content.decode()


def test_a_report_shows_the_timeline_limits_downtime_and_chart_data(fleet, admin_client, alice):
    vsp1, vsp2 = fleet
    vm = make_vm("db01", vsp1, copy_limit_s=10)
    start = timezone.now() - timedelta(seconds=30)
    migration = finished(
        vm,
        vsp1,
        vsp2,
        state="aborted",
        user=alice,
        failed_phase="copy",
        copy_started_at=start,
        copy_ended_at=start + timedelta(seconds=12),
        bytes_sent=3 * 2**20,
        rounds=2,
        downtime_ms=None,
        alert="Copy phase failed: it ran over its time limit of 10 s.",
    )
    MigrationEvent.objects.create(
        migration=migration, to_state="queued", message="Migration requested", actor=alice
    )
    MigrationEvent.objects.create(
        migration=migration, from_state="copy", to_state="aborted", message="Aborted in Copy: over the limit"
    )
    for round_number, remaining in ((1, 2 * 2**20), (2, 2**20)):
        migration.rounds, migration.bytes_remaining = round_number, remaining
        add_round_sample(migration, now=start + timedelta(seconds=round_number * 5))
    migration.save()

    html = admin_client.get(reverse("migration_history:report", args=[migration.pk])).content.decode()
    assert "Migration requested" in html and "by alice" in html
    assert 'data-kind="abort"' in html and "Aborted in Copy: over the limit" in html
    copy_row = re.search(r'<tr data-phase="Copy" class="over-limit">(.*?)</tr>', html, re.S).group(1)
    assert "12.0 s" in copy_row and "10 s" in copy_row
    assert "(allowed 300 ms)" in html
    assert "3.0\xa0MB" in html
    data = admin_client.get(reverse("migration_history:report_data", args=[migration.pk])).json()
    assert data["series"]["round"] == [1, 2]
    assert data["series"]["bytes_remaining"] == [2 * 2**20, 2**20]
    assert data["series"]["t_s"] == [0.0, 5.0]
    assert data["active"] is False


def test_a_refused_attempt_is_recorded_and_listed_as_refused(fleet, alice, admin_client):
    vsp1, _ = fleet
    full = make_vsp("full", memory_mib=100)
    vm = make_vm("web01", vsp1)
    with pytest.raises(MigrationRefused):
        do_request_migration(vm, full, alice)
    refusal = Migration.objects.get()
    assert (refusal.state, refusal.requested_by, refusal.source, refusal.target) == (
        "refused",
        alice,
        vsp1,
        full,
    )
    assert "not enough free memory" in refusal.alert
    assert refusal.events.get().message == refusal.alert
    html = admin_client.get(HISTORY, {"outcome": "refused"}).content.decode()
    assert table_rows(html) == [(str(refusal.pk), "refused")] and "Refused" in html
    # A refusal is history, not state: the General tab shows no phases and no alert for it.
    general = admin_client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()
    assert re.search(r'<section id="migration-phases"[^>]*hidden', general)
    assert re.search(r'<section id="migration-alerts"[^>]*hidden', general)


def test_deleting_a_vm_keeps_its_migrations_and_events_with_its_name(fleet, admin_client, alice):
    vsp1, vsp2 = fleet
    vm = make_vm("gone01", vsp1)
    migration = finished(vm, vsp1, vsp2, user=alice)
    MigrationEvent.objects.create(
        migration=migration, to_state="queued", message="Migration requested", actor=alice
    )
    vm.delete()
    migration.refresh_from_db()
    assert migration.vm is None and migration.vm_name == "gone01"
    assert migration.events.count() == 1
    html = admin_client.get(HISTORY, {"vm": "gone01"}).content.decode()
    assert (
        table_rows(html) == [(str(migration.pk), "completed")]
        and 'gone01 <span class="muted">(deleted)' in html
    )
    report = admin_client.get(reverse("migration_history:report", args=[migration.pk]))
    assert report.status_code == 200 and "(VM deleted)" in report.content.decode()


def test_the_general_tab_lists_the_vms_last_migrations_and_how_long_the_last_took(fleet, admin_client, alice):
    vsp1, vsp2 = fleet
    vm = make_vm("web01", vsp1)
    now = timezone.now()
    for minutes in range(7):
        finished(vm, vsp1, vsp2, at=now - timedelta(minutes=10 + minutes), seconds=30, user=alice)
    latest = finished(vm, vsp2, vsp1, at=now, seconds=42, user=alice, downtime_ms=77)
    html = admin_client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()
    section = html[html.index('id="vm-migration-history"') :]
    assert len(re.findall(r"<tr data-migration=", section)) == 5
    assert f'href="/migrations/history/{latest.pk}/report/"' in section and "77 ms" in section
    assert re.search(r'data-field="last_took">Last time this took 42 s\.', html)


def test_while_a_migration_runs_migrate_is_disabled_and_names_it(fleet, admin_client, alice):
    vsp1, vsp2 = fleet
    vm = make_vm("web01", vsp1)
    make_migration(vm, vsp1, vsp2, state="copy", requested_by=alice, init_started_at=timezone.now())
    html = admin_client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()
    assert re.search(
        r'<button type="button" class="button button-primary" id="migrate-button" disabled', html
    )
    running = re.search(r'data-field="running_migration">([^<]*)<', html).group(1)
    assert running.startswith("Migration to VSP vsp2 running: started by alice at ")
    assert 'hx-get="/migrations/vms/' not in html  # no dialog where every host would read "Refused"


def test_the_general_tab_query_count_does_not_grow_with_the_vms_history(fleet, admin_client, alice):
    vsp1, vsp2 = fleet
    vm = make_vm("web01", vsp1)
    url = reverse("vms:vm_general", args=[vm.pk])
    finished(vm, vsp1, vsp2, user=alice)
    admin_client.get(url)
    with CaptureQueriesContext(connection) as few:
        admin_client.get(url)
    for _ in range(30):
        finished(vm, vsp1, vsp2, user=alice)
    with CaptureQueriesContext(connection) as many:
        admin_client.get(url)
    assert len(many.captured_queries) == len(few.captured_queries)


def test_a_forced_switchovers_report_says_how_much_of_frozen_the_guest_still_ran(fleet, admin_client):
    """QA's forced switch-over: Frozen took 24 s while the downtime read 12 s. Both are right: the source
    sent the stalled round under way for 12 s before it paused the guest. The report says so, and judges
    the downtime against the migration's own allowed downtime."""
    vsp1, vsp2 = fleet
    vm = make_vm("db02", vsp1)
    start = timezone.now() - timedelta(seconds=60)
    migration = finished(
        vm,
        vsp1,
        vsp2,
        frozen_started_at=start,
        frozen_ended_at=start + timedelta(seconds=24),
        downtime_ms=12_000,
        rounds=2,
        policy={"preset": "custom", "max_downtime_ms": 500, "at_limit": "switchover"},
    )

    html = admin_client.get(reverse("migration_history:report", args=[migration.pk])).content.decode()

    frozen_row = re.search(r'<tr data-phase="Frozen"[^>]*>(.*?)</tr>', html, re.S).group(1)
    assert "24.0 s" in frozen_row
    assert "guest paused 12000 ms of it: for the first 12.0 s it still ran" in frozen_row
    assert "12000 ms" in html and "(allowed 500 ms)" in html


def test_a_timeline_names_who_did_it_once(fleet, admin_client, alice):
    """QA: "alice asked to switch over now by alice"; the cancel's events named alice twice too."""
    from agentprotocol import ParamsChange
    from migrations_app.actions import do_cancel_migration
    from migrations_app.steering import describe_change

    vsp1, vsp2 = fleet
    migration = do_request_migration(make_vm("web01", vsp1), vsp2, alice)
    MigrationEvent.objects.create(  # as steering.do_change_migration records a switch-over
        migration=migration,
        from_state="queued",
        to_state="queued",
        message=f"{alice} {describe_change(ParamsChange(switchover_now=True))}",
        actor=alice,
    )
    do_cancel_migration(migration, alice)

    html = admin_client.get(reverse("migration_history:report", args=[migration.pk])).content.decode()
    section = html[html.index('<ol class="timeline">') :]
    section = section[: section.index("</ol>")]
    items = re.findall(r"<li[^>]*>(.*?)</li>", section, re.S)
    lines = [re.sub(r"<[^>]+>|\s+", " ", item).strip() for item in items]
    timeline = [line for line in lines if "alice" in line]
    assert any(line.endswith("alice asked to switch over now") for line in timeline), timeline
    assert any(line.endswith("Cancelled by alice while queued") for line in timeline), timeline
    assert all(line.count("alice") == 1 for line in timeline), timeline


def test_a_sub_second_duration_reads_under_1_s_not_0_s(fleet, admin_client, alice):
    vsp1, vsp2 = fleet
    vm = make_vm("web01", vsp1)
    finished(vm, vsp1, vsp2, seconds=0.3, user=alice)

    html = admin_client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()

    assert re.search(r'data-field="last_took">Last time this took under 1 s\.', html), "took 0 s?"
