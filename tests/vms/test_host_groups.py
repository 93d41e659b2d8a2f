"""Permissions per host group: each role (viewer, operator, administrator), a user of another group and a
superuser, in the pages, the migrate dialog and its POSTs, cancel, "migrate selected" and the admin.

Every user here holds every global model permission of the console, so what differs is the role in a
host group alone (``vms.access``). Django's test client against the real views and templates.
"""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from migrations_app.models import Migration
from tests.factories import (
    CHANGE_PERMISSIONS,
    MIGRATION_ADMIN_PERMISSIONS,
    VIEW_PERMISSIONS,
    grant_role,
    make_admin,
    make_host_group,
    make_migration,
    make_not_runnable_copy,
    make_user,
    make_vm,
    make_vsp,
)
from tests.vms.conftest import snapshot
from vms.models import AuditEvent, HostGroup, HostGroupMembership, Registration, Role

pytestmark = pytest.mark.django_db

EVERY_PERMISSION = tuple(sorted(set(VIEW_PERMISSIONS + CHANGE_PERMISSIONS + MIGRATION_ADMIN_PERMISSIONS)))


@pytest.fixture
def groups():
    """Prod (vsp-p1, vsp-p2), Lab (vsp-l1) and vsp-x in no group, each with a guest; users of each role."""
    prod, lab = make_host_group("Prod"), make_host_group("Lab")
    vsps = {
        "p1": make_vsp("vsp-p1", group=prod),
        "p2": make_vsp("vsp-p2", group=prod),
        "l1": make_vsp("vsp-l1", group=lab),
        "x": make_vsp("vsp-x", group=None),
    }
    vms = {
        "prod": make_vm("prod-web", vsps["p1"]),
        "lab": make_vm("lab-box", vsps["l1"]),
        "lone": make_vm("lone-vm", vsps["x"]),
    }
    users = {
        "viewer": make_user("viewer", EVERY_PERMISSION, role=Role.VIEWER, group=prod),
        "operator": make_user("prod-operator", EVERY_PERMISSION, role=Role.OPERATOR, group=prod),
        "administrator": make_user("prod-admin", EVERY_PERMISSION, role=Role.ADMINISTRATOR, group=prod),
        "other": make_user("lab-operator", EVERY_PERMISSION, role=Role.ADMINISTRATOR, group=lab),
        "superuser": make_admin("root"),
    }
    return {"prod": prod, "lab": lab, "vsps": vsps, "vms": vms, "users": users}


def login(client, groups, who: str):
    client.force_login(groups["users"][who])
    return client


def dialog_url(vm) -> str:
    return reverse("migrations_app:migrate", args=[vm.pk])


PROD_USERS = ["viewer", "operator", "administrator"]


# --- what each one sees -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "seen"),
    [
        ("viewer", {"vsp-p1", "vsp-p2"}),
        ("operator", {"vsp-p1", "vsp-p2"}),
        ("administrator", {"vsp-p1", "vsp-p2"}),
        ("other", {"vsp-l1"}),
        ("superuser", {"vsp-p1", "vsp-p2", "vsp-l1", "vsp-x"}),
    ],
)
def test_it_lists_only_the_vsps_and_vms_of_the_users_groups(client, groups, who, seen):
    login(client, groups, who)
    vsp_page = client.get(reverse("vms:vsp_list")).text
    vm_page = client.get(reverse("vms:vm_list")).text
    by_copy = client.get(reverse("vms:vm_list"), {"hardware_status": "on"}).text
    guests = {"vsp-p1": "prod-web", "vsp-l1": "lab-box", "vsp-x": "lone-vm"}
    for vsp in groups["vsps"].values():
        shown = vsp.name in seen
        assert (f'data-vsp="{vsp.name}"' in vsp_page) is shown, (who, vsp.name)
        # The VM list's VSP filter offers only VSPs the user sees: no name of another group leaks.
        assert (f">{vsp.name}</option>" in vm_page) is shown, (who, vsp.name)
        if vsp.name in guests:
            assert (guests[vsp.name] in vm_page) is shown, (who, vsp.name)
            assert (guests[vsp.name] in by_copy) is shown, (who, vsp.name)


@pytest.mark.parametrize("who", ["viewer", "operator", "administrator", "superuser"])
def test_a_member_opens_the_pages_of_the_groups_vsps_and_guests(client, groups, who):
    login(client, groups, who)
    vm, vsp = groups["vms"]["prod"], groups["vsps"]["p1"]
    for url in (
        reverse("vms:vsp_detail", args=[vsp.pk]),
        reverse("vms:vm_general", args=[vm.pk]),
        reverse("vms:vm_refresh", args=[vm.pk]),
    ):
        assert client.get(url).status_code == 200, url


@pytest.mark.parametrize("who", ["other", "viewer"])
def test_another_groups_vsp_and_guest_are_not_found_and_their_names_never_shown(client, groups, who):
    """404, never 403: a user of another group cannot tell a VM of another group from a missing one."""
    login(client, groups, who)
    if who == "other":
        vm, vsp = groups["vms"]["prod"], groups["vsps"]["p1"]
    else:
        vm, vsp = groups["vms"]["lab"], groups["vsps"]["l1"]
    missing = client.get(reverse("vms:vm_general", args=[999999]))
    for url in (
        reverse("vms:vsp_detail", args=[vsp.pk]),
        reverse("vms:vm_general", args=[vm.pk]),
        reverse("vms:vm_refresh", args=[vm.pk]),
        dialog_url(vm),
    ):
        response = client.get(url)
        assert response.status_code == 404, url
        assert vm.name not in response.text and vsp.name not in response.text, url
        assert response.text.count("There is no page") == missing.text.count("There is no page") == 1


def test_an_ungrouped_vsp_is_seen_by_superusers_only(client, groups):
    lone = groups["vms"]["lone"]
    for who in ("administrator", "other"):
        login(client, groups, who)
        assert client.get(reverse("vms:vm_general", args=[lone.pk])).status_code == 404
    login(client, groups, "superuser")
    assert client.get(reverse("vms:vm_general", args=[lone.pk])).status_code == 200


def test_the_general_tab_does_not_list_copies_on_another_groups_vsps(client, groups):
    vm = groups["vms"]["prod"]
    make_not_runnable_copy(vm, groups["vsps"]["l1"], reason="left behind")
    make_not_runnable_copy(vm, groups["vsps"]["p2"], reason="left behind")
    login(client, groups, "administrator")
    page = client.get(reverse("vms:vm_general", args=[vm.pk])).text
    assert 'data-vsp="vsp-p2"' in page
    assert "vsp-l1" not in page


def test_the_vm_list_does_not_name_another_groups_vsp_where_a_visible_guest_runs(client, groups):
    """lab-box runs on vsp-l1 (Lab) and left a Not Runnable copy on vsp-p1 (Prod): Prod's viewer sees the
    guest through that copy, but not the name of the Lab VSP it runs on."""
    make_not_runnable_copy(groups["vms"]["lab"], groups["vsps"]["p1"], reason="left behind")
    login(client, groups, "viewer")
    page = client.get(reverse("vms:vm_list")).text
    row = page[page.index('<tr data-vm="lab-box">') :].split("</tr>")[0]
    assert "a VSP outside your host groups" in row
    assert "vsp-l1" not in page
    login(client, groups, "other")
    row = client.get(reverse("vms:vm_list")).text.split('<tr data-vm="lab-box">')[1].split("</tr>")[0]
    assert "vsp-l1" in row  # Lab's own member sees it


def test_the_general_tab_of_a_guest_running_in_another_group_never_names_that_vsp(client, groups):
    """lab-box runs on vsp-l1 (Lab) and left a Not Runnable copy on vsp-p1: Prod's viewer opens the guest
    (by default the runnable copy was shown, naming vsp-l1) and asks for the Lab copy by its id."""
    make_not_runnable_copy(groups["vms"]["lab"], groups["vsps"]["p1"], reason="left behind")
    login(client, groups, "viewer")
    url = reverse("vms:vm_general", args=[groups["vms"]["lab"].pk])
    page = client.get(url).text
    assert "vsp-l1" not in page
    assert "the guest runs on a VSP outside your host groups" in page
    assert client.get(url, {"vsp": groups["vsps"]["l1"].pk}).status_code == 404


STEERING = (
    'id="steer-switchover"',
    'id="steer-downtime"',
    'id="steer-bandwidth"',
    'class="migration-cancel"',
)


@pytest.mark.parametrize(("who", "shown"), [("viewer", False), ("operator", True), ("superuser", True)])
def test_the_first_render_of_a_running_migration_draws_its_controls_only_for_who_may_use_them(
    client, groups, who, shown
):
    """The QA case: a read-only user opened reports01 while it migrated and was shown Switch over now,
    Throttle the guest, Set allowed downtime, Set bandwidth cap and a hidden Cancel (each a 403)."""
    vm, vsps = groups["vms"]["prod"], groups["vsps"]
    make_migration(vm, vsps["p1"], vsps["p2"], state=Migration.State.COPY, init_percent=100, copy_percent=40)
    login(client, groups, who)
    page = client.get(reverse("vms:vm_general", args=[vm.pk])).text
    assert 'id="migration-phases"' in page
    for control in (*STEERING, 'id="migrate-button"'):
        assert (control in page) is shown, control
    assert 'id="vm-policy"' not in page or who == "superuser"  # settings: administrators only


def test_another_groups_operator_sees_no_steering_of_a_migration_leaving_their_group(client, groups):
    """lab-box migrates vsp-l1 -> vsp-p1: Lab's operator may cancel (operator of the source) but not steer
    (steering needs both ends)."""
    vm, vsps = groups["vms"]["lab"], groups["vsps"]
    make_migration(vm, vsps["l1"], vsps["p1"], state=Migration.State.COPY, init_percent=100, copy_percent=40)
    login(client, groups, "other")
    page = client.get(reverse("vms:vm_general", args=[vm.pk])).text
    assert 'class="migration-cancel"' in page
    assert 'id="steer-switchover"' not in page and 'id="steer-bandwidth"' not in page


def test_the_vsp_page_offers_migrate_selected_and_power_only_to_an_operator_of_its_group(client, groups):
    url = reverse("vms:vsp_detail", args=[groups["vsps"]["p1"].pk])
    login(client, groups, "viewer")
    page = client.get(url).text
    assert 'id="migrate-selected-form"' not in page and 'form="migrate-selected-form"' not in page
    assert "data-power=" not in page
    login(client, groups, "operator")
    page = client.get(url).text
    assert 'id="migrate-selected-form"' in page and 'form="migrate-selected-form"' in page
    assert 'data-power="stop"' in page


def test_power_follows_the_copys_host_group(client, groups):
    """A viewer gets 403 with the reason; another group's member 404 (the copy is not theirs to find)."""
    registration = groups["vms"]["prod"].registrations.get()
    url = reverse("vms:vm_power", args=[registration.pk, "stop"])
    login(client, groups, "viewer")
    response = client.post(url)
    assert response.status_code == 403 and "not an operator of its VSP" in response.text
    login(client, groups, "other")
    assert client.post(url).status_code == 404
    page = client.get(reverse("vms:vm_general", args=[groups["vms"]["lab"].pk])).text
    assert 'data-power="stop"' in page  # their own group's guest
    registration.refresh_from_db()
    assert registration.hardware_status == Registration.HardwareStatus.ON


def test_migrate_selected_shows_targets_that_cannot_take_guests_disabled_with_the_reason(client, groups):
    """The QA case: vsp3 (not licensed) and vsp4 (disabled) were offered, and always refused."""
    vsps = groups["vsps"]
    vsps["p2"].licensed = False
    vsps["p2"].save()
    login(client, groups, "operator")
    page = client.get(reverse("vms:vsp_detail", args=[vsps["p1"].pk])).text
    select = page[page.index('id="migrate-selected-target"') : page.index("</select>")]
    assert f'<option value="{vsps["p2"].pk}" disabled>vsp-p2 (host not licensed)</option>' in select
    assert "No VSP you may use can take guests from vsp-p1 now." in page
    vsps["p2"].licensed = True
    vsps["p2"].save()
    page = client.get(reverse("vms:vsp_detail", args=[vsps["p1"].pk])).text
    assert f'<option value="{vsps["p2"].pk}">vsp-p2</option>' in page
    assert "No VSP you may use" not in page


def test_the_evacuation_plan_follows_host_groups(client, groups):
    """Another group's member could read Production's plan (guests and every VSP's name) by its id and, with
    the global permission, start it; the plan offered targets in every group."""
    vsps = groups["vsps"]
    url = reverse("evacuations:evacuate", args=[vsps["p1"].pk])
    login(client, groups, "other")
    assert client.get(url).status_code == 404
    assert client.post(url, {f"target_{groups['vms']['prod'].pk}": vsps["l1"].pk}).status_code == 404
    login(client, groups, "viewer")
    page = client.get(url).text
    assert "prod-web" in page and "vsp-l1" not in page and "vsp-x" not in page
    assert client.post(url, {f"target_{groups['vms']['prod'].pk}": vsps["p2"].pk}).status_code == 403
    vsp_page = reverse("vms:vsp_detail", args=[vsps["p1"].pk])
    assert 'id="evacuate-link"' not in client.get(vsp_page).text  # the viewer may not start one
    login(client, groups, "operator")
    page = client.get(url).text
    assert 'data-vsp="vsp-p2"' in page and "vsp-l1" not in page
    assert 'id="evacuate-link"' in client.get(vsp_page).text


def test_the_history_filters_offer_only_people_and_vsps_the_user_can_see(client, groups):
    vsps, users = groups["vsps"], groups["users"]
    make_migration(groups["vms"]["prod"], vsps["p1"], vsps["p2"], requested_by=users["operator"])
    make_migration(groups["vms"]["lab"], vsps["l1"], vsps["l1"], requested_by=users["other"])
    login(client, groups, "viewer")
    page = client.get(reverse("migration_history:list")).text
    assert 'value="prod-operator"' in page
    assert "lab-operator" not in page and "vsp-l1" not in page


def test_the_list_pages_stay_at_a_fixed_query_count_for_a_group_member(client, groups):
    login(client, groups, "operator")
    urls = [reverse("vms:vsp_list"), reverse("vms:vm_list"), f"{reverse('vms:vm_list')}?hardware_status=on"]

    def counts() -> list[int]:
        result = []
        for url in urls:
            with CaptureQueriesContext(connection) as queries:
                assert client.get(url).status_code == 200
            result.append(len(queries))
        return result

    before = counts()
    for number in range(8):  # more hosts and guests in the user's group and in another
        for group, home in ((groups["prod"], "p2"), (groups["lab"], "l1")):
            vsp = make_vsp(f"more-{group.name}-{number}", group=group)
            make_not_runnable_copy(make_vm(f"g-{group.name}-{number}", vsp), groups["vsps"][home])
    after = counts()
    assert after == before
    assert "g-Prod-7" in client.get(reverse("vms:vm_list")).text
    assert "g-Lab-7" not in client.get(reverse("vms:vm_list")).text


# --- the migrate dialog and its POST --------------------------------------------------------------


def offered_targets(html: str) -> set[str]:
    return {part.split('"', 1)[0] for part in html.split('data-vsp="')[1:]}


@pytest.mark.parametrize(
    ("who", "offered"),
    [
        ("operator", {"vsp-p1", "vsp-p2"}),
        ("administrator", {"vsp-p1", "vsp-p2"}),
        ("superuser", {"vsp-p1", "vsp-p2", "vsp-l1", "vsp-x"}),
    ],
)
def test_the_dialog_offers_only_targets_in_the_users_operator_groups(client, groups, who, offered):
    login(client, groups, who)
    response = client.get(dialog_url(groups["vms"]["prod"]))
    assert response.status_code == 200
    assert offered_targets(response.text) == offered
    if who != "superuser":
        assert "vsp-l1" not in response.text and "vsp-x" not in response.text


def refused_only() -> list[tuple[str, str]]:
    """(state, kind) of every migration row: a refused attempt is kept (issue 18 item 5), nothing else."""
    return list(Migration.objects.values_list("state", "failure_kind"))


def test_a_target_the_user_only_views_is_not_offered_either(client, groups):
    user = groups["users"]["operator"]
    grant_role(user, groups["lab"], Role.VIEWER)
    client.force_login(user)
    assert "vsp-l1" not in offered_targets(client.get(dialog_url(groups["vms"]["prod"])).text)
    response = client.post(dialog_url(groups["vms"]["prod"]), {"target": groups["vsps"]["l1"].pk})
    assert response.status_code == 403
    assert (
        "You may not migrate prod-web to vsp-l1: you are not an operator of its host group" in response.text
    )
    assert refused_only() == [("refused", "permission")]  # nothing started; the attempt is kept


@pytest.mark.parametrize("htmx", [False, True])
@pytest.mark.parametrize("target", ["l1", "x"])
def test_a_forged_post_to_a_target_outside_the_users_groups_is_refused_and_changes_nothing(
    client, groups, htmx, target
):
    login(client, groups, "operator")
    before = (snapshot(), AuditEvent.objects.count())
    headers = {"HX-Request": "true"} if htmx else {}
    response = client.post(
        dialog_url(groups["vms"]["prod"]), {"target": groups["vsps"][target].pk}, headers=headers
    )
    assert response.status_code == 403
    assert (
        "You may not migrate prod-web to that VSP: it is not in a host group where you are an operator."
        in response.text
    )
    assert groups["vsps"][target].name not in response.text  # a target the user cannot see is not named
    assert refused_only() == [("refused", "permission")]  # nothing started; the attempt is kept
    assert (snapshot(), AuditEvent.objects.count()) == before


def test_an_operator_of_both_groups_may_migrate_across_them(client, groups):
    user = groups["users"]["operator"]
    grant_role(user, groups["lab"], Role.OPERATOR)
    client.force_login(user)
    response = client.post(dialog_url(groups["vms"]["prod"]), {"target": groups["vsps"]["l1"].pk})
    assert response.status_code == 302
    migration = Migration.objects.get()
    assert (migration.source.name, migration.target.name) == ("vsp-p1", "vsp-l1")


@pytest.mark.parametrize("who", ["operator", "administrator", "superuser"])
def test_an_operator_or_more_migrates_within_the_group(client, groups, who):
    login(client, groups, who)
    response = client.post(dialog_url(groups["vms"]["prod"]), {"target": groups["vsps"]["p2"].pk})
    assert response.status_code == 302
    assert Migration.objects.get().target == groups["vsps"]["p2"]


def test_a_viewer_can_neither_open_the_dialog_nor_migrate_nor_cancel(client, groups):
    login(client, groups, "viewer")
    vm, vsps = groups["vms"]["prod"], groups["vsps"]
    response = client.get(dialog_url(vm))
    assert response.status_code == 403
    assert "you are not an operator of the host group of vsp-p1" in response.text
    response = client.post(dialog_url(vm), {"target": vsps["p2"].pk})
    assert response.status_code == 403 and refused_only() == [("refused", "permission")]
    Migration.objects.all().delete()
    migration = make_migration(vm, vsps["p1"], vsps["p2"])
    response = client.post(reverse("migrations_app:cancel", args=[migration.pk]))
    assert response.status_code == 403 and "You may not cancel this migration" in response.text
    assert Migration.objects.get().state == Migration.State.QUEUED
    response = client.post(
        reverse("migrations_app:migrate_selected", args=[vsps["p1"].pk]),
        {"target": vsps["p2"].pk, "vm": vm.pk},
    )
    assert Migration.objects.filter(state=Migration.State.QUEUED).count() == 1  # only the one made above


def test_a_user_of_another_group_cannot_cancel_or_even_find_the_migration(client, groups):
    vm, vsps = groups["vms"]["prod"], groups["vsps"]
    migration = make_migration(vm, vsps["p1"], vsps["p2"])
    login(client, groups, "other")
    assert client.post(reverse("migrations_app:cancel", args=[migration.pk])).status_code == 404
    assert Migration.objects.get().state == Migration.State.QUEUED
    login(client, groups, "operator")
    assert client.post(reverse("migrations_app:cancel", args=[migration.pk])).status_code == 302
    assert Migration.objects.get().state == Migration.State.CANCELLED


def test_migrate_selected_offers_only_the_users_targets_and_refuses_a_forged_one(client, groups):
    login(client, groups, "operator")
    vsps, vm = groups["vsps"], groups["vms"]["prod"]
    page = client.get(reverse("vms:vsp_detail", args=[vsps["p1"].pk])).text
    select = page[page.index('id="migrate-selected-target"') : page.index("</select>")]
    assert "vsp-p2" in select and "vsp-l1" not in select and "vsp-x" not in select
    response = client.post(
        reverse("migrations_app:migrate_selected", args=[vsps["p1"].pk]),
        {"target": vsps["l1"].pk, "vm": vm.pk},
        follow=True,
    )
    assert "it is not in a host group where you are an operator" in response.text
    assert refused_only() == [("refused", "permission")]
    Migration.objects.all().delete()
    login(client, groups, "other")
    response = client.post(
        reverse("migrations_app:migrate_selected", args=[vsps["p1"].pk]),
        {"target": vsps["l1"].pk, "vm": vm.pk},
    )
    assert response.status_code == 404 and not Migration.objects.exists()


# --- settings: administrators only -------------------------------------------------------------------


@pytest.mark.parametrize("who", ["viewer", "operator"])
def test_a_viewer_or_operator_may_not_change_settings_and_sees_no_buttons(client, groups, who):
    vm = groups["vms"]["prod"]
    stopped = make_vm("prod-stopped", groups["vsps"]["p2"], Registration.HardwareStatus.OFF)
    login(client, groups, who)
    before = snapshot()
    response = client.post(reverse("vms:vm_set_online_migration", args=[vm.pk]), {"enabled": "false"})
    assert response.status_code == 403
    assert "you are not an administrator of the host group" in response.text
    registration = stopped.registrations.get()
    response = client.post(
        reverse("vms:registration_mark_not_runnable", args=[registration.pk]), {"reason": "disk check"}
    )
    assert response.status_code == 403
    assert snapshot() == before
    page = client.get(reverse("vms:vm_general", args=[stopped.pk])).text
    assert "Disable for VM" not in page and "Mark Not Runnable" not in page


@pytest.mark.parametrize("who", ["administrator", "superuser"])
def test_an_administrator_changes_settings_of_the_groups_guests(client, groups, who):
    vm = groups["vms"]["prod"]
    stopped = make_vm("prod-stopped", groups["vsps"]["p2"], Registration.HardwareStatus.OFF)
    login(client, groups, who)
    page = client.get(reverse("vms:vm_general", args=[stopped.pk])).text
    assert "Disable for VM" in page and "Mark Not Runnable" in page
    response = client.post(reverse("vms:vm_set_online_migration", args=[vm.pk]), {"enabled": "false"})
    assert response.status_code == 302
    registration = stopped.registrations.get()
    response = client.post(
        reverse("vms:registration_mark_not_runnable", args=[registration.pk]), {"reason": "disk check"}
    )
    assert response.status_code == 302
    registration.refresh_from_db()
    vm.refresh_from_db()
    assert registration.hardware_status == "not_runnable" and vm.online_migration_enabled is False


def test_another_groups_administrator_cannot_reach_the_groups_copies(client, groups):
    stopped = make_vm("prod-stopped", groups["vsps"]["p2"], Registration.HardwareStatus.OFF)
    login(client, groups, "other")
    before = snapshot()
    registration = stopped.registrations.get()
    response = client.post(
        reverse("vms:registration_mark_not_runnable", args=[registration.pk]), {"reason": "x"}
    )
    assert response.status_code == 404
    response = client.post(reverse("vms:vm_set_online_migration", args=[stopped.pk]), {"enabled": "false"})
    assert response.status_code == 404
    assert snapshot() == before


def test_a_setting_of_a_guest_configured_in_two_groups_needs_both(client, groups):
    vm = groups["vms"]["prod"]
    make_not_runnable_copy(vm, groups["vsps"]["l1"])
    login(client, groups, "administrator")
    response = client.post(reverse("vms:vm_set_online_migration", args=[vm.pk]), {"enabled": "false"})
    assert response.status_code == 403
    vm.refresh_from_db()
    assert vm.online_migration_enabled is True


# --- the admin ---------------------------------------------------------------------------------------


def test_a_superuser_edits_groups_and_memberships_in_the_admin_and_each_change_is_audited(client, groups):
    login(client, groups, "superuser")
    user = groups["users"]["other"]
    response = client.post(
        reverse("admin:vms_hostgroup_add"),
        {
            "name": "Edge",
            "description": "branch offices",
            "memberships-TOTAL_FORMS": "1",
            "memberships-INITIAL_FORMS": "0",
            "memberships-0-user": user.pk,
            "memberships-0-role": Role.OPERATOR,
        },
    )
    assert response.status_code == 302, response.text
    edge = HostGroup.objects.get(name="Edge")
    membership = HostGroupMembership.objects.get(group=edge)
    assert (membership.user, membership.role) == (user, Role.OPERATOR)
    created = AuditEvent.objects.filter(action=AuditEvent.Action.CREATED, via_admin=True)
    assert {event.object_type for event in created} >= {"vms.hostgroup", "vms.hostgroupmembership"}
    membership_event = created.get(object_type="vms.hostgroupmembership")
    assert membership_event.after["role"] == "operator" and membership_event.actor.username == "root"

    response = client.post(
        reverse("admin:vms_hostgroupmembership_change", args=[membership.pk]),
        {"group": edge.pk, "user": user.pk, "role": Role.VIEWER},
    )
    assert response.status_code == 302, response.text
    changed = AuditEvent.objects.get(action=AuditEvent.Action.CHANGED, object_type="vms.hostgroupmembership")
    assert (changed.before, changed.after) == ({"role": "operator"}, {"role": "viewer"})

    vsp = groups["vsps"]["x"]
    response = client.post(
        reverse("admin:vms_hostgroupmembership_delete", args=[membership.pk]), {"post": "yes"}
    )
    assert response.status_code == 302
    assert AuditEvent.objects.filter(action=AuditEvent.Action.DELETED, object_id=str(membership.pk)).exists()
    assert vsp.group is None


def test_only_superusers_see_host_groups_in_the_admin(client, groups):
    staff = make_user(
        "staff", EVERY_PERMISSION + ("vms.view_hostgroup", "vms.change_hostgroup"), is_staff=True
    )
    client.force_login(staff)
    assert client.get(reverse("admin:vms_hostgroup_changelist")).status_code == 403
    assert client.get(reverse("admin:vms_hostgroupmembership_changelist")).status_code == 403
    assert "host group" not in client.get(reverse("admin:index")).text.lower()
