"""The audit trail per host group: a user limited to some groups reads only the events about objects in
them (the QA case: a viewer of Lab only listed Production's VSPs, guests, policies and migrations).

Real changes through the console's own actions and the Django admin, read through the real page.
"""

from __future__ import annotations

import pytest

from migrations_app.actions import do_request_migration, do_set_migration_policy
from tests.factories import make_admin, make_host_group, make_user, make_vm, make_vsp
from vms.actions import do_mark_not_runnable, do_set_online_migration
from vms.models import Role

pytestmark = pytest.mark.django_db

URL = "/audit/"
# The demo operator's global permissions (it reads the audit trail too).
OPERATOR_PERMISSIONS = (
    "vms.view_vsp",
    "vms.view_virtualmachine",
    "vms.view_registration",
    "vms.view_auditevent",
    "migrations_app.view_migration",
)
PRODUCTION_NAMES = ("vsp1", "vsp2", "web01", "reports01", "db01")


@pytest.fixture
def trail(client):
    """Production (vsp1, vsp2: web01, reports01, db01) and Lab (vsp3: build01), changed by a superuser."""
    production, lab = make_host_group("Production"), make_host_group("Lab")
    vsp1, vsp2 = make_vsp("vsp1", group=production), make_vsp("vsp2", group=production)
    vsp3 = make_vsp("vsp3", group=lab)
    web, reports = make_vm("web01", vsp1), make_vm("reports01", vsp1)
    db = make_vm("db01", vsp2, hardware_status="off")
    build = make_vm("build01", vsp3)
    root = make_admin("root")
    do_set_online_migration(web, False, root)
    do_set_migration_policy(reports, {"max_downtime_ms": 400}, root)
    do_mark_not_runnable(db.registrations.get(), "disk broken", root)
    do_request_migration(reports, vsp2, root)
    do_set_online_migration(build, False, root)
    client.force_login(root)
    gone = make_vm("gone01", vsp3)
    response = client.post(f"/admin/vms/virtualmachine/{gone.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    response = client.post(f"/admin/vms/hostgroup/{lab.pk}/change/", lab_change_form(lab))
    assert response.status_code == 302, response.content.decode()[:2000]
    client.logout()
    lab_viewer = make_user("lab-viewer", OPERATOR_PERMISSIONS, role=Role.VIEWER, group=lab)
    return {"lab_viewer": lab_viewer, "root": root}


def lab_change_form(lab) -> dict[str, str]:
    return {
        "name": lab.name,
        "description": "the lab, renamed in words",
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
        "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
    }


def objects(response) -> set[str]:
    assert response.status_code == 200, response.content.decode()[:2000]
    return {event.object_name for event in response.context["page"].object_list}


def test_a_viewer_of_lab_only_reads_lab_events_and_never_a_production_name(client, trail):
    client.force_login(trail["lab_viewer"])

    response = client.get(URL)

    assert objects(response) == {"build01"}
    html = response.content.decode()
    for name in PRODUCTION_NAMES:
        assert name not in html, name
    assert "gone01" not in html  # deleted since: its group is not known any more
    assert "renamed in words" not in html  # host groups are inventory-wide: superusers only
    assert "1 change," in html


def test_the_filters_do_not_reach_hidden_events_either(client, trail):
    client.force_login(trail["lab_viewer"])

    assert objects(client.get(URL, {"object": "web01"})) == set()
    assert objects(client.get(URL, {"user": "root", "action": "migration_requested"})) == set()
    assert objects(client.get(URL, {"object": "build"})) == {"build01"}


def test_a_superuser_still_reads_every_event(client, trail):
    client.force_login(trail["root"])

    seen = objects(client.get(URL))

    assert {"web01", "reports01", "build01", "gone01", "Lab"} <= seen
    assert any(name.startswith("migration ") and "reports01" in name for name in seen)  # the migration
    assert "db01 on vsp2" in seen


def test_a_viewer_of_production_reads_its_migration_and_settings_but_not_lab(client, trail):
    production_viewer = make_user("prod-viewer", OPERATOR_PERMISSIONS, role=Role.VIEWER, group="Production")
    client.force_login(production_viewer)

    seen = objects(client.get(URL))

    assert "build01" not in seen and "gone01" not in seen and "Lab" not in seen
    assert {"web01", "reports01", "db01 on vsp2"} <= seen
    assert any(name.startswith("migration ") and "reports01" in name for name in seen)
