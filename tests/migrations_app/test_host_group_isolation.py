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
    make_host_group,
    make_migration,
    make_not_runnable_copy,
    make_user,
    make_vm,
    make_vsp,
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
