"""Issue 18.14: a Lab-only user who sees a guest only through its Not Runnable copy on a Lab host sees
nothing of the Production side: not the host it runs on, not other copies, not a migration between two
Production hosts (source, target, requester, phases) - on the General tab, its history, the socket's
first message and pushes, the API's VM detail and list - and no refusal names a Production host.

Real Redis channel layer and the project's ASGI stack for the sockets (as ``test_host_group_sockets``).
"""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async
from django.test import Client
from django.urls import reverse

from api.tokens import do_create_token
from migrations_app.models import Migration
from migrations_app.progress import publish_progress
from tests.api.conftest import ApiClient
from tests.factories import (
    MIGRATION_ADMIN_PERMISSIONS,
    VIEW_PERMISSIONS,
    give_disk,
    give_nic,
    grant_role,
    make_host_group,
    make_migration,
    make_not_runnable_copy,
    make_pool,
    make_user,
    make_vm,
    make_vsp,
    permission_named,
    session_cookie,
)
from tests.migrations_app.test_host_group_sockets import connect
from vms.models import Role

PERMISSIONS = tuple(
    sorted(set(VIEW_PERMISSIONS + MIGRATION_ADMIN_PERMISSIONS + ("migrations_app.view_migration",)))
)
PRODUCTION_WORDS = ("vsp-p1", "vsp-p2", "prod-boss")  # the hosts and who asked


def world() -> dict:
    """web01 runs on vsp-p1 (Prod) with a Not Runnable copy on vsp-l1 (Lab); prod-boss migrates it
    vsp-p1 -> vsp-p2 (Copy at 42%); an earlier migration p2 -> p1 completed. lab-op: Lab operator only."""
    prod, lab = make_host_group("Prod"), make_host_group("Lab")
    p1, p2, l1 = make_vsp("vsp-p1", group=prod), make_vsp("vsp-p2", group=prod), make_vsp("vsp-l1", group=lab)
    web = make_vm("web01", p1)
    make_not_runnable_copy(web, l1)
    boss = make_user("prod-boss", PERMISSIONS, role=Role.OPERATOR, group=prod)
    make_migration(web, p2, p1, state=Migration.State.COMPLETED, requested_by=boss, init_percent=100)
    running = make_migration(
        web, p1, p2, state=Migration.State.COPY, requested_by=boss, init_percent=100, copy_percent=42
    )
    lab_op = make_user("lab-op", PERMISSIONS, role=Role.OPERATOR, group=lab)
    return {"web": web, "running": running, "lab_op": lab_op, "boss": boss, "l1": l1}


def assert_no_production(text: str) -> None:
    for word in PRODUCTION_WORDS:
        assert word not in text, word


@pytest.mark.django_db
def test_the_api_the_general_tab_and_a_refusal_name_nothing_of_production():
    fleet = world()
    web = fleet["web"]
    api = ApiClient(do_create_token(fleet["lab_op"], "lab")[1])
    detail = api.get(f"/vms/{web.pk}")
    assert detail.status_code == 200, detail.content
    body = detail.json()
    assert_no_production(json.dumps(body))
    assert body["migration"] is None and body["alert"] is None
    assert [copy["vsp"] for copy in body["registrations"]] == ["vsp-l1"]
    listed = api.get("/vms", name="web01").json()["items"]
    assert len(listed) == 1 and listed[0]["migration"] is None
    assert_no_production(json.dumps(listed))

    page = Client()
    page.force_login(fleet["lab_op"])
    html = page.get(reverse("vms:vm_general", args=[web.pk])).content.decode()
    assert "web01" in html and "vsp-l1" in html
    assert_no_production(html)
    assert "Online Migration Phases" not in html and "completed to VSP" not in html
    refused = page.get(reverse("migrations_app:migrate", args=[web.pk]))
    assert refused.status_code == 403
    assert "You may not migrate web01" in refused.content.decode()
    assert_no_production(refused.content.decode())

    boss = Client()  # the Production operator still sees all of it
    boss.force_login(fleet["boss"])
    html = boss.get(reverse("vms:vm_general", args=[web.pk])).content.decode()
    assert "Online Migration Phases" in html and "vsp-p2" in html
    boss_api = ApiClient(do_create_token(fleet["boss"], "prod")[1])
    assert boss_api.get(f"/vms/{web.pk}").json()["migration"]["target"] == "vsp-p2"


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("redis_url")
async def test_a_lab_only_watcher_gets_no_phases_of_a_production_migration_over_the_socket():
    fleet = await database_sync_to_async(world)()
    web, running = fleet["web"], fleet["running"]
    lab_cookie = await database_sync_to_async(session_cookie)(fleet["lab_op"])
    boss_cookie = await database_sync_to_async(session_cookie)(fleet["boss"])
    lab, connected = await connect(f"/ws/vms/{web.pk}/", lab_cookie)
    assert connected  # he may watch the guest: it has a copy in his group
    boss, connected = await connect(f"/ws/vms/{web.pk}/", boss_cookie)
    assert connected
    first = {"lab": await lab.receive_from(timeout=10), "boss": await boss.receive_from(timeout=10)}
    await database_sync_to_async(publish_progress)(running.pk)
    pushed = {"lab": await lab.receive_from(timeout=10), "boss": await boss.receive_from(timeout=10)}
    for html in (first["lab"], pushed["lab"]):
        assert_no_production(html)
        assert "42%" not in html and "Online Migration Phases" not in html
        assert f"<!--push:{running.pk}:" not in html
        assert 'id="steer-switchover"' not in html and "migration-cancel" not in html
    for html in (first["boss"], pushed["boss"]):  # the same push, rendered for its other class
        assert "42%" in html and "vsp-p2" in html and 'id="steer-switchover"' in html
    await lab.disconnect()
    await boss.disconnect()


@pytest.mark.django_db
def test_a_migration_from_his_group_to_another_names_only_his_end():
    fleet = world()
    lab_vm = make_vm("lab01", fleet["l1"])
    prod_target = Migration.objects.filter(target__name="vsp-p2").first().target
    outgoing = make_migration(
        lab_vm, fleet["l1"], prod_target, state=Migration.State.COPY, requested_by=fleet["boss"]
    )
    api = ApiClient(do_create_token(fleet["lab_op"], "lab")[1])
    detail = api.get(f"/migrations/{outgoing.pk}").json()
    assert detail["source"] == "vsp-l1"
    assert_no_production(json.dumps({key: value for key, value in detail.items() if key != "events"}))
    listed = api.get("/migrations").json()["items"]
    assert [item["id"] for item in listed] == [outgoing.pk]  # the Production-only ones are not his
    assert_no_production(json.dumps(listed))
    page = Client()
    page.force_login(fleet["lab_op"])
    html = page.get(reverse("vms:vm_general", args=[lab_vm.pk])).content.decode()
    assert "Online Migration Phases" in html and "a VSP of another host group" in html
    assert_no_production(html)


def cross_group_migration(fleet: dict) -> Migration:
    """lab01 completed vsp-l1 (Lab) -> vsp-p2 (Prod), asked and steered by prod-boss, with the timeline
    and audit events the console writes (words naming both ends and who acted)."""
    from migrations_app.transitions import record_created
    from vms.models import AuditEvent

    lab_vm = make_vm("lab01", fleet["l1"])
    target = Migration.objects.filter(target__name="vsp-p2").first().target
    boss = fleet["boss"]
    migration = make_migration(
        lab_vm, fleet["l1"], target, state=Migration.State.COMPLETED, requested_by=boss,
        cancel_requested_by=boss, alert="vsp-p2 may not be running lab01: ask prod-boss",
        guest_devices={"disks": [], "nics": [{"network": "lab-net", "mac": "52:54:00:00:00:01"}]},
    )  # fmt: skip
    message = "Migration of lab01 from vsp-l1 to vsp-p2 requested"
    record_created(migration, actor=boss, message=message)
    for words in (
        "Init: vsp-l1 and the target host connect",
        "prod-boss asked to switch over now",
        "Cancel requested by prod-boss",
        f"Migration {migration.pk} committed: the guest runs on VSP vsp-p2",
    ):
        migration.events.create(from_state="copy", to_state="copy", message=words, actor=boss)
    AuditEvent.record(
        AuditEvent.Action.MIGRATION_REQUESTED, migration, actor=boss, message=message,
        object_name=f"migration {migration.pk} of lab01",
    )  # fmt: skip
    return migration


@pytest.mark.django_db
def test_a_migration_to_another_group_names_neither_its_host_nor_who_acted_anywhere():
    """QA (issue 18.14 follow-up): the API's migration detail gave a one-end viewer the timeline as
    written ("Migration of lab01 from vsp-l1 to vsp-p2 requested", "prod-boss asked to switch over now",
    each event's actor); the report page, the history list and its CSV and the audit trail did too."""
    fleet = world()
    migration = cross_group_migration(fleet)
    devices = {  # recorded on its source, a Production host
        "disks": [
            {"device": "vda", "pool": "prod-san", "volume": "web01.qcow2", "virtual_size_bytes": 1 << 30}
        ],
        "nics": [{"network": "prod-net", "mac": "52:54:00:00:00:02"}],
    }
    incoming = make_migration(
        fleet["web"], Migration.objects.filter(source__name="vsp-p1").first().source, fleet["l1"],
        state=Migration.State.ABORTED, guest_devices=devices,
    )  # fmt: skip
    lab_op = fleet["lab_op"]
    lab_op.user_permissions.add(permission_named("vms.view_auditevent"))
    api = ApiClient(do_create_token(lab_op, "lab")[1])
    page = Client()
    page.force_login(lab_op)

    detail = api.get(f"/migrations/{migration.pk}").json()
    listed = api.get("/migrations").json()["items"]
    report = page.get(reverse("migration_history:report", args=[migration.pk])).content.decode()
    incoming_report = page.get(reverse("migration_history:report", args=[incoming.pk])).content.decode()
    history = page.get(reverse("migration_history:list")).content.decode()
    csv = b"".join(page.get(reverse("migration_history:csv")).streaming_content).decode()
    by_boss = page.get(reverse("migration_history:list"), {"user": "prod-boss"})
    audit = page.get("/audit/").content.decode()

    assert [event["actor"] for event in detail["events"]] == [None] * 5
    # QA: the other end's name was hidden but its id was not (an id names a VSP as surely)
    assert (detail["target"], detail["target_id"]) == ("a VSP of another host group", None)
    assert [(item["target"], item["target_id"]) for item in listed if item["id"] == migration.pk] == [
        ("a VSP of another host group", None)
    ]
    assert [event["message"] for event in detail["events"]] == [
        "Migration of lab01 from vsp-l1 to a VSP of another host group requested",
        "Init: vsp-l1 and the target host connect",
        "someone asked to switch over now",
        "Cancel requested by someone",
        f"Migration {migration.pk} committed: the guest runs on VSP a VSP of another host group",
    ]
    for text in (json.dumps(detail), json.dumps(listed), report, incoming_report, history, csv, audit):
        assert_no_production(text)
        assert "prod-net" not in text and "prod-san" not in text
    assert "lab01" in report and "vsp-l1" in report and "a VSP of another host group" in report
    assert "nic 0: lab-net" in report  # its source's, his group's
    assert "vda: a pool of another host group/web01.qcow2" in incoming_report
    assert f"migration {migration.pk} of lab01" not in audit
    assert by_boss.status_code == 400  # not a requester he may be told of

    both = make_user("both-groups", PERMISSIONS, role=Role.OPERATOR, group="Prod")
    grant_role(both, "Lab", Role.OPERATOR)
    both_api = ApiClient(do_create_token(both, "both")[1])  # both ends his: all of it
    events = both_api.get(f"/migrations/{migration.pk}").json()["events"]
    assert events[2] == {**events[2], "message": "prod-boss asked to switch over now", "actor": "prod-boss"}


@pytest.mark.django_db
def test_a_guest_seen_through_his_copy_shows_its_disks_and_cards_not_the_other_groups_pools_networks():
    """QA (issue 18.14 follow-up): for web01, running on vsp-p1 (Prod), a Lab-only user read its disks'
    pool and its cards' network (vsp-p1's) on the Storage and Network tabs, the General tab and the API.
    He sees the devices, not where they are; whoever sees vsp-p1 sees all of it."""
    fleet = world()
    web = fleet["web"]
    p1 = web.current_vsp
    give_disk(web, make_pool(p1, "prod-san", location="/srv/prod-san"))
    give_nic(web, "prod-dmz", mac="52:54:00:00:00:42")
    page = Client()
    page.force_login(fleet["lab_op"])
    api = ApiClient(do_create_token(fleet["lab_op"], "lab")[1])

    storage = page.get(reverse("vms:vm_storage", args=[web.pk])).content.decode()
    network = page.get(reverse("vms:vm_network", args=[web.pk])).content.decode()
    general = page.get(reverse("vms:vm_general", args=[web.pk])).content.decode()
    detail = api.get(f"/vms/{web.pk}").json()
    listed = api.get("/vms", name="web01").json()["items"]

    for text in (storage, network, general, json.dumps(detail), json.dumps(listed)):
        assert "prod-san" not in text and "prod-dmz" not in text and "/srv/prod-san" not in text
        assert_no_production(text)
    assert "web01-vda.qcow2" in storage and "10 GiB" in storage  # the disk itself is his to see
    assert 'data-field="pool"><span class="muted">a pool of another host group</span>' in storage
    assert "52:54:00:00:00:42" in network and "a network of another host group" in network
    assert "a network of another host group" in general
    assert detail["disks"][0] | {"pool": None, "pool_identity": None} == detail["disks"][0]
    assert detail["disks"][0]["volume"] == "web01-vda.qcow2"
    assert detail["nics"] == [{"index": 0, "network": None, "mac": "52:54:00:00:00:42", "model": "virtio"}]

    boss = Client()  # the Production operator sees where they are
    boss.force_login(fleet["boss"])
    assert "prod-san" in boss.get(reverse("vms:vm_storage", args=[web.pk])).content.decode()
    boss_api = ApiClient(do_create_token(fleet["boss"], "prod")[1])
    boss_detail = boss_api.get(f"/vms/{web.pk}").json()
    assert boss_detail["disks"][0]["pool"] == "prod-san" and boss_detail["nics"][0]["network"] == "prod-dmz"


@pytest.mark.django_db
def test_cancelling_from_one_end_answers_without_the_other_end_or_who_cancelled_there():
    """An operator of one end may cancel a migration: the API's answer and a second cancel's refusal
    named the other group's VSP and who had cancelled, as the migration's detail no longer does."""
    fleet = world()
    target = Migration.objects.filter(target__name="vsp-p2").first().target
    migration = make_migration(
        make_vm("lab01", fleet["l1"]), fleet["l1"], target, state=Migration.State.COPY,
        requested_by=fleet["boss"],
    )  # fmt: skip
    lab = ApiClient(do_create_token(fleet["lab_op"], "lab")[1])
    boss = ApiClient(do_create_token(fleet["boss"], "prod")[1])

    cancelled = lab.post(f"/migrations/{migration.pk}/cancel")
    again = boss.post(f"/migrations/{migration.pk}/cancel")

    assert cancelled.status_code == 202, cancelled.content
    body = cancelled.json()
    assert (body["target"], body["requested_by"], body["cancel_requested"]) == (
        "a VSP of another host group", None, True,
    )  # fmt: skip
    assert_no_production(json.dumps(body))
    assert again.status_code == 409
    assert again.json()["detail"].startswith("Already cancelling: someone asked to cancel it;")
    assert "lab-op" not in again.json()["detail"] and "vsp-l1" not in again.json()["detail"]
