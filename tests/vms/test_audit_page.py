"""The audit trail page: every change with who, when, what, before and after; filters, pages, access."""

from __future__ import annotations

import datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tests.factories import make_admin, make_user, make_vm, make_vsp
from vms.actions import do_mark_not_runnable, do_set_online_migration
from vms.models import AuditEvent

pytestmark = pytest.mark.django_db

URL = "/audit/"


@pytest.fixture
def changes():
    """Three changes by two people and the system, on two days."""
    carol, dave = make_admin("carol"), make_admin("dave")
    web = make_vm("web01", vsp=make_vsp("vsp1"), hardware_status="off")
    db = make_vm("db01", vsp=make_vsp("vsp2"), hardware_status="off")
    do_set_online_migration(web, False, carol)
    do_mark_not_runnable(db.registrations.get(), "disk <b>broken</b>", dave)
    old = AuditEvent.record(
        AuditEvent.Action.CHANGED, db, before={"memory_mib": 512}, after={"memory_mib": 1024}
    )
    AuditEvent.objects.filter(pk=old.pk).update(at=timezone.now() - datetime.timedelta(days=3))
    return {"carol": carol, "dave": dave}


def rows(response) -> list[tuple[str, str, str]]:
    html = response.content.decode()
    assert response.status_code == 200, html
    page_events = response.context["page"].object_list
    return [(event.actor_name or "system", event.action, event.object_name) for event in page_events]


def test_it_lists_every_change_with_who_what_before_and_after(admin_client, changes):
    response = admin_client.get(URL)

    assert rows(response) == [
        ("dave", "marked_not_runnable", "db01 on vsp2"),
        ("carol", "online_migration_disabled", "web01"),
        ("system", "changed", "db01"),
    ]
    html = response.content.decode()
    assert "Marked Not Runnable" in html
    assert "disk &lt;b&gt;broken&lt;/b&gt;" in html and "<b>broken" not in html  # user text escaped
    assert (
        '<span class="muted">memory_mib:</span> 512' in html
        and '<span class="muted">memory_mib:</span> 1024' in html
    )
    assert 'id="nav-audit"' in html


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"user": "carol"}, ["web01"]),
        ({"user": "system"}, ["db01"]),
        ({"object": "DB01"}, ["db01 on vsp2", "db01"]),
        ({"action": "marked_not_runnable"}, ["db01 on vsp2"]),
        ({"since": str(timezone.localdate())}, ["db01 on vsp2", "web01"]),
        ({"until": str(timezone.localdate() - datetime.timedelta(days=1))}, ["db01"]),
    ],
)
def test_it_filters_by_user_object_change_and_date(admin_client, changes, query, expected):
    assert [name for _, _, name in rows(admin_client.get(URL, query))] == expected


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ({"since": "yesterday"}, "Enter a valid date."),
        ({"since": "2026-02-02", "until": "2026-02-01"}, "The From date is after the To date."),
        ({"page": "0"}, "Ensure this value is greater than or equal to 1."),
    ],
)
def test_it_refuses_bad_filters_with_a_clear_error(admin_client, changes, query, error):
    response = admin_client.get(URL, query)
    assert response.status_code == 400
    assert error in response.content.decode()


def test_it_pages_at_a_fixed_query_count(admin_client, changes):
    def queries(page: int = 1) -> int:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(URL, {"page": page}).status_code == 200
        return len(captured)

    few = queries()
    vm = make_vm("busy", vsp=make_vsp("vsp3"), hardware_status="off")
    for number in range(120):
        do_set_online_migration(vm, number % 2 == 0, changes["carol"])
    assert queries() == few
    assert queries(3) == few
    last = admin_client.get(URL, {"page": 3})
    assert len(last.context["page"].object_list) == 123 - 100
    assert admin_client.get(URL, {"page": 4}).status_code == 404


def test_it_requires_the_view_permission(client, changes):
    client.force_login(make_user("viewer", ("vms.view_vsp", "vms.view_virtualmachine")))
    assert client.get(URL).status_code == 403
    assert 'id="nav-audit"' not in client.get("/vsps/").content.decode()
    client.force_login(make_user("auditor", ("vms.view_auditevent",)))
    assert client.get(URL).status_code == 200
    client.logout()
    assert client.get(URL).status_code == 302  # to the login page
