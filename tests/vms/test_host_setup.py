"""Setting up hosts and rights in the console (``vms.host_setup``, its pages and API) against real agents.

Each agent here is a real ``python -m hostagent`` process with a TLS certificate from the test CA.
"""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from api.tokens import do_create_token
from tests.api.conftest import ApiClient
from tests.factories import grant_role, make_admin, make_host_group, make_user, make_vm, make_vsp
from tests.hostagent.conftest import AgentFactory, RunningAgent, define_running_guest
from vms import host_setup
from vms.models import VSP, AuditEvent, HostGroupMembership, Registration, Role

pytestmark = pytest.mark.django_db

SETUP_PERMISSIONS = (
    "vms.view_vsp",
    "vms.add_vsp",
    "vms.change_vsp",
    "vms.delete_vsp",
    "vms.change_hostgroup",
)


@pytest.fixture(scope="module")
def agent(tmp_path_factory) -> RunningAgent:
    factory = AgentFactory(tmp_path_factory.mktemp("setup-agents"))
    running = factory("newhost", "--driver-option", "capacity_mib=24576")
    define_running_guest(running, "setup-guest-1", memory_mib=64)
    yield running
    factory.stop_all()


def test_it_shows_the_agents_fingerprint_without_sending_it_anything(agent):
    contact = host_setup.first_contact(agent.url.removeprefix("https://"))
    assert contact.url == agent.url
    assert contact.fingerprint == agent.fingerprint
    # ... the very fingerprint the agent printed when it started, for the admin to compare
    assert f"certificate SHA-256 fingerprint: {agent.fingerprint}" in agent.log()


def test_it_reports_driver_memory_and_guests_over_the_pinned_connection(agent):
    report = host_setup.check_agent(agent.url, agent.secret, agent.fingerprint)
    assert (report.driver, report.memory_mib) == ("simulated", 24576)
    assert [guest.name for guest in report.guests] == ["setup-guest-1"]


def test_it_refuses_a_certificate_other_than_the_confirmed_one(agent):
    other = "AA:" * 31 + "AA"
    with pytest.raises(host_setup.SetupRefused, match="not the registered") as refused:
        host_setup.check_agent(agent.url, agent.secret, other)
    assert "Nothing was sent" in str(refused.value.message)


def test_it_adds_a_vsp_from_the_pages_in_three_steps(client, agent):
    admin = make_admin()
    group = make_host_group("Staging")
    client.force_login(admin)
    url = reverse("vms:setup_add_vsp")
    page = client.post(url, {"step": "contact", "agent_url": agent.url})
    assert agent.fingerprint in page.content.decode()
    unconfirmed = client.post(url, {"step": "connect", "agent_secret": agent.secret})
    assert unconfirmed.status_code == 400 and "tick to confirm" in unconfirmed.content.decode()
    report = client.post(url, {"step": "connect", "agent_secret": agent.secret, "confirm": "on"})
    body = report.content.decode()
    assert "simulated" in body and "setup-guest-1" in body and agent.secret not in body
    added = client.post(
        url,
        {
            "step": "add",
            "name": "newhost",
            "group": group.pk,
            "memory_mib": 24576,
            "cpus": 4,
            "migration_enabled": "on",
            "licensed": "on",
            "max_concurrent_migrations": 2,
        },
    )
    assert added.status_code == 302, added.content.decode()
    vsp = VSP.objects.get(name="newhost")
    assert (vsp.agent_certificate, vsp.agent_secret, vsp.group) == (agent.fingerprint, agent.secret, group)
    assert vsp.max_concurrent_migrations == 2 and vsp.agent_driver == "simulated"
    event = AuditEvent.objects.filter(object_type="vms.vsp", object_id=str(vsp.pk), action="created").get()
    assert event.actor == admin and agent.secret not in str(event.after) + event.message


def test_a_group_administrator_adds_only_into_their_group_and_the_api_pins_the_fingerprint(agent):
    mine, other = make_host_group("Mine"), make_host_group("Theirs")
    user = make_user("gadmin", SETUP_PERMISSIONS, role=Role.ADMINISTRATOR, group=mine)
    api = ApiClient(do_create_token(user, "tests")[1])
    body = {"agent_url": agent.url, "agent_secret": agent.secret, "confirmed_fingerprint": agent.fingerprint}
    refused = api.post("/vsps", {**body, "group": other.name})
    assert refused.status_code == 403 and "not an administrator" in refused.json()["detail"]
    seen = api.post("/setup/agent-fingerprint", {"agent_url": agent.url}).json()
    assert seen["fingerprint"] == agent.fingerprint
    added = api.post("/vsps", {**body, "group": mine.name, "name": "api-host"})
    assert added.status_code == 201, added.content
    assert added.json()["report"]["guests"][0]["name"] == "setup-guest-1"
    assert added.json()["vsp"]["memory_mib"] == 24576  # as the agent reported it
    assert VSP.objects.get(name="api-host").agent_certificate == agent.fingerprint
    assert not VSP.objects.filter(group=other).exists()


def test_retiring_is_refused_with_why_while_a_guest_can_run_there():
    admin = make_admin()
    vsp = make_vsp("busy-host")
    make_vm("still-here", vsp, hardware_status=Registration.HardwareStatus.OFF)
    with pytest.raises(host_setup.SetupRefused, match="still-here"):
        host_setup.do_retire_vsp(admin, vsp)
    vsp.refresh_from_db()
    assert vsp.retired_at is None and vsp.agent_secret


def test_retiring_erases_the_secret_and_keeps_it_out_of_the_lists(client):
    admin = make_admin()
    vsp = make_vsp("old-host")
    client.force_login(admin)
    response = client.post(reverse("vms:setup_retire_vsp", args=[vsp.pk]))
    assert response.status_code == 302
    vsp.refresh_from_db()
    assert vsp.retired_at is not None and vsp.agent_secret == "" and not vsp.migration_enabled
    client.get(reverse("vms:setup"))  # the success message is shown (and used up) here
    assert 'data-vsp="old-host"' not in client.get(reverse("vms:vsp_list")).content.decode()
    assert AuditEvent.objects.filter(object_id=str(vsp.pk), message__contains="retired").exists()


def test_roles_are_given_and_taken_from_the_group_page_and_audited(client):
    admin = make_admin()
    group = make_host_group("Lab")
    bob = make_user("bob", role=None)
    client.force_login(admin)
    page = reverse("vms:setup_group", args=[group.pk])
    client.post(page, {"action": "set_role", "username": "bob", "role": "operator"})
    assert HostGroupMembership.objects.get(group=group, user=bob).role == "operator"
    missing = client.post(page, {"action": "set_role", "username": "nobody<b>", "role": "viewer"})
    assert missing.status_code == 400 and "nobody&lt;b&gt;" in missing.content.decode()
    client.post(page, {"action": "remove", "username": "bob"})
    assert not HostGroupMembership.objects.filter(group=group, user=bob).exists()
    actions = list(
        AuditEvent.objects.filter(object_type="vms.hostgroupmembership")
        .order_by("pk")
        .values_list("action", flat=True)
    )
    assert actions == ["created", "deleted"]


def test_a_role_given_on_the_group_page_is_enough_on_its_own(client):
    """No Django group or model permission beside it: the role alone lets its holder see and act, in
    that group only; the administrator role says what it does not give (setting up hosts and roles)."""
    admin = make_admin()
    lab = make_host_group("Lab")
    lab_host = make_vsp("lab-host", group=lab)
    guest = make_vm("lab-guest", lab_host)
    make_vm("prod-guest", make_vsp("prod-host", group=make_host_group("Production")))
    newbie = make_user("newbie", role=None)  # a fresh account: no permission, no Django group
    client.force_login(admin)
    page = reverse("vms:setup_group", args=[lab.pk])
    newbie_client = Client()
    newbie_client.force_login(newbie)

    client.post(page, {"action": "set_role", "username": "newbie", "role": "viewer"})
    vsps = newbie_client.get(reverse("vms:vsp_list"))
    assert vsps.status_code == 200 and "lab-host" in vsps.text and "prod-host" not in vsps.text
    assert newbie_client.get(reverse("vms:vm_general", args=[guest.pk])).status_code == 200
    assert newbie_client.get(reverse("migration_history:list")).status_code == 200
    assert newbie_client.get(reverse("migrations_app:migrate", args=[guest.pk])).status_code == 403

    client.post(page, {"action": "set_role", "username": "newbie", "role": "operator"})
    assert newbie_client.get(reverse("migrations_app:migrate", args=[guest.pk])).status_code == 200

    given = client.post(
        page, {"action": "set_role", "username": "newbie", "role": "administrator"}, follow=True
    )
    assert "may not add VSPs, change VSPs, retire VSPs, give roles in Lab" in given.text
    assert "add_vsp, change_vsp, delete_vsp, change_hostgroup" in given.text
    changed = newbie_client.post(
        reverse("vms:vm_set_online_migration", args=[guest.pk]), {"enabled": "false"}
    )
    assert changed.status_code == 302
    guest.refresh_from_db()
    assert guest.online_migration_enabled is False


def test_someone_without_the_administrator_role_gets_no_setup_page(client):
    viewer = make_user("viewer1", SETUP_PERMISSIONS, role=Role.OPERATOR, group="Ops")
    client.force_login(viewer)
    assert client.get(reverse("vms:setup")).status_code == 403
    vsp = make_vsp("ops-host", group=make_host_group("Ops"))
    assert client.get(reverse("vms:setup_vsp", args=[vsp.pk])).status_code == 404
    grant_role(viewer, "Ops", Role.ADMINISTRATOR)
    assert client.get(reverse("vms:setup_vsp", args=[vsp.pk])).status_code == 200


def test_a_group_holding_vsps_is_not_deleted():
    admin = make_admin()
    group = make_host_group("Full")
    make_vsp("in-full", group=group)
    with pytest.raises(host_setup.SetupRefused, match="in-full"):
        host_setup.do_delete_group(admin, group)


def test_a_vsp_with_a_migration_under_way_is_not_retired_and_the_api_says_why():
    from tests.factories import make_migration

    admin = make_admin()
    source, target = make_vsp("from-here"), make_vsp("to-there")
    vm = make_vm("mover", source)
    Registration.objects.filter(vm=vm).update(hardware_status="not_runnable", not_runnable_set_by="admin")
    make_migration(vm, source, target)  # queued
    api = ApiClient(do_create_token(admin, "tests")[1])
    refused = api.post(f"/vsps/{source.name}/retire")
    assert refused.status_code == 409
    assert "1 migration from or to it not ended yet (mover)" in refused.json()["detail"]
    source.refresh_from_db()
    assert source.retired_at is None


def test_the_api_changes_a_vsp_and_moving_it_needs_the_administrator_role_in_both_groups():
    mine, other = make_host_group("Mine"), make_host_group("Other")
    user = make_user("gadmin", SETUP_PERMISSIONS, role=Role.ADMINISTRATOR, group=mine)
    vsp = make_vsp("movable", group=mine)
    api = ApiClient(do_create_token(user, "tests")[1])
    changed = api.patch(f"/vsps/{vsp.name}", {"memory_mib": 8192, "licensed": False})
    assert changed.status_code == 200, changed.content
    assert (changed.json()["memory_mib"], changed.json()["licensed"]) == (8192, False)
    event = AuditEvent.objects.filter(object_type="vms.vsp", action="changed").get()
    assert event.before == {"memory_mib": 16384, "licensed": True}
    assert event.after == {"memory_mib": 8192, "licensed": False}
    moved = api.patch(f"/vsps/{vsp.name}", {"group": other.name})
    assert moved.status_code == 403 and "Other" in moved.json()["detail"]
    assert api.patch("/vsps/movable", {"name": "bad\u0000name"}).status_code == 409
    assert VSP.objects.get(pk=vsp.pk).group == mine


def test_the_api_manages_roles_only_in_groups_the_user_administers():
    mine, other = make_host_group("Mine"), make_host_group("Other")
    user = make_user("gadmin", SETUP_PERMISSIONS, role=Role.ADMINISTRATOR, group=mine)
    make_user("carol", role=None)
    api = ApiClient(do_create_token(user, "tests")[1])
    assert [group["name"] for group in api.get("/host-groups").json()] == ["Mine"]
    given = api.put("/host-groups/Mine/members/carol", {"role": "viewer"})
    assert given.status_code == 200 and {"user": "carol", "role": "viewer"} in given.json()["members"]
    assert api.put("/host-groups/Other/members/carol", {"role": "viewer"}).status_code == 404
    assert api.post("/host-groups", {"name": "Mine2"}).status_code == 403  # superusers create groups
    assert not HostGroupMembership.objects.filter(group=other).exists()


def test_a_vsp_is_pointed_at_a_new_agent_after_confirming_its_fingerprint(client, agent, tmp_path):
    """A reinstalled host: a new address, a new certificate, a new secret; the old pin refuses it, so the
    admin confirms the new fingerprint and the VSP is pinned to it (audited, the secret never)."""
    factory = AgentFactory(tmp_path)
    try:
        new = factory("reinstalled")
        vsp = make_vsp(
            "moved-host", agent_url=agent.url, agent_secret=agent.secret, agent_certificate=agent.fingerprint
        )
        client.force_login(make_admin())
        url = reverse("vms:setup_vsp_agent", args=[vsp.pk])
        assert new.fingerprint in client.post(url, {"step": "contact", "agent_url": new.url}).content.decode()
        saved = client.post(url, {"step": "connect", "agent_secret": new.secret, "confirm": "on"})
        assert saved.status_code == 302, saved.content.decode()
        vsp.refresh_from_db()
        assert (vsp.agent_url, vsp.agent_secret, vsp.agent_certificate) == (
            new.url,
            new.secret,
            new.fingerprint,
        )
        event = AuditEvent.objects.filter(object_id=str(vsp.pk), action="changed").get()
        assert event.before["agent_certificate"] == agent.fingerprint
        assert event.after["agent_certificate"] == new.fingerprint
        assert new.secret not in str(event.after) + event.message
    finally:
        factory.stop_all()


def test_a_guests_only_configuration_is_never_removed_by_retiring_its_vsp():
    admin = make_admin()
    vsp = make_vsp("last-home")
    orphan = make_vm("orphan", vsp)
    Registration.objects.filter(vm=orphan).update(hardware_status="not_runnable", not_runnable_set_by="admin")
    with pytest.raises(host_setup.SetupRefused, match="orphan has its only configuration here"):
        host_setup.do_retire_vsp(admin, vsp)
    assert Registration.objects.filter(vm=orphan, vsp=vsp).exists()


def test_a_retired_vsp_is_offered_as_a_target_nowhere():
    from evacuations.plan import build_plan
    from migrations_app.access import migration_targets
    from migrations_app.checks import check_targets

    admin = make_admin()
    home, old = make_vsp("home-host"), make_vsp("old-target")
    vm = make_vm("web-x", home)
    host_setup.do_retire_vsp(admin, old)
    assert "old-target" not in [check.vsp.name for check in check_targets(vm)]
    assert not migration_targets(admin).filter(pk=old.pk).exists()
    assert "old-target" not in [target.name for target, _, _ in build_plan(home).targets]


def test_setup_changes_need_the_pages_csrf_token():
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(make_admin())
    refused = browser.post(reverse("vms:setup_create_group"), {"name": "Forged"})
    assert refused.status_code == 403
    page = browser.get(reverse("vms:setup")).content.decode()
    token = page.split('name="csrfmiddlewaretoken" value="', 1)[1].split('"', 1)[0]
    created = browser.post(reverse("vms:setup_create_group"), {"name": "Real", "csrfmiddlewaretoken": token})
    assert created.status_code == 302
    from vms.models import HostGroup

    assert set(HostGroup.objects.values_list("name", flat=True)) == {"Real"}  # not "Forged"
