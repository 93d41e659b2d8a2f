"""VSPs, VMs (the General tab's fields) and registrations over the API: success, refusals, permissions."""

from __future__ import annotations

import pytest

from tests.factories import make_not_runnable_copy, make_vm, make_vsp
from vms.models import Registration

pytestmark = pytest.mark.django_db

PROBLEM = "application/problem+json"


def assert_problem(response, status: int, detail: str | None = None) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"]
    if detail is not None:
        assert body["detail"] == detail
    return body


def test_it_lists_vsps_with_pagination(api):
    for name in ("vsp-a", "vsp-b", "vsp-c"):
        make_vsp(name)

    first = api.get("/vsps", limit=2).json()
    second = api.get("/vsps", limit=2, offset=2).json()

    assert [v["name"] for v in first["items"]] == ["vsp-a", "vsp-b"]
    assert [v["name"] for v in second["items"]] == ["vsp-c"]
    assert first["count"] == second["count"] == 3
    assert "agent_secret" not in first["items"][0]


def test_it_finds_a_vsp_by_id_or_name(api):
    vsp = make_vsp("hosta")

    assert api.get(f"/vsps/{vsp.pk}").json()["name"] == "hosta"
    assert api.get("/vsps/hosta").json()["id"] == vsp.pk
    assert_problem(api.get("/vsps/nowhere"), 404, "No VSP with the id or name 'nowhere'.")


def test_it_says_since_when_a_vsp_is_unreachable(api):
    from datetime import UTC, datetime

    since = datetime(2026, 11, 29, 20, 41, 7, tzinfo=UTC)
    make_vsp("hosta", agent_reachable=False, unreachable_since=since, agent_failures=3)
    make_vsp("hostb")
    items = api.get("/vsps").json()["items"]

    shown = {v["name"]: (v["agent_reachable"], v["unreachable_since"]) for v in items}

    assert shown == {"hosta": (False, "2026-11-29T20:41:07Z"), "hostb": (True, None)}


def test_it_shows_every_general_tab_field_of_a_vm(api):
    hosta, hostb = make_vsp("hosta", migration_enabled=False), make_vsp("hostb")
    vm = make_vm("web01", vsp=hosta, os_type="HP-UX 11i v3", graceful_stop_timeout_s=45, copy_limit_s=None)
    make_not_runnable_copy(vm, hostb, reason="guest migrated to VSP hosta")

    body = api.get("/vms/web01").json()

    assert body["vsp"] == "hosta"
    assert body["operating_system"] == "HP-UX 11i v3"
    assert body["os_status"] == {"value": "up", "label": "Up"}
    assert body["hardware_status"] == {"value": "on", "label": "On"}
    assert body["boot_attribute"]["label"] == "Auto start"
    assert body["graceful_stop_timeout_s"] == 45
    assert body["online_migration"] == {"value": "host_disabled", "label": "Host disabled"}
    assert body["not_runnable_set_by"]["value"] == "" and body["not_runnable_reason"] == ""
    assert body["phase_time_limits_s"]["copy"] is None
    copies = {r["vsp"]: r for r in body["registrations"]}
    assert copies["hostb"]["not_runnable_set_by"]["label"] == "Migrate"
    assert copies["hostb"]["not_runnable_reason"] == "guest migrated to VSP hosta"
    assert body["migration"] is None and body["alert"] is None


def test_it_filters_vms_by_vsp(api):
    hosta, hostb = make_vsp("hosta"), make_vsp("hostb")
    make_vm("on-a", vsp=hosta)
    make_vm("on-b", vsp=hostb)

    body = api.get("/vms", vsp="hostb").json()

    assert [vm["name"] for vm in body["items"]] == ["on-b"]
    assert_problem(api.get("/vms", vsp="nowhere"), 404)


def test_it_marks_a_copy_not_runnable_and_runnable_again(api):
    hosta, hostb = make_vsp("hosta"), make_vsp("hostb")
    vm = make_vm("db01", vsp=hosta, hardware_status=Registration.HardwareStatus.OFF)
    make_not_runnable_copy(vm, hostb)

    response = api.post("/vms/db01/registrations/hosta/not-runnable", {"reason": "disk replaced"})

    assert response.status_code == 200, response.content
    copy = Registration.objects.get(vm=vm, vsp=hosta)
    assert (copy.hardware_status, copy.not_runnable_set_by, copy.not_runnable_reason) == (
        "not_runnable",
        "admin",
        "disk replaced",
    )
    assert api.post(f"/vms/{vm.pk}/registrations/{hostb.pk}/runnable").status_code == 200
    assert Registration.objects.get(vm=vm, vsp=hostb).hardware_status == "off"


def test_it_refuses_a_second_runnable_copy_with_the_pages_words(api):
    hosta, hostb = make_vsp("hosta"), make_vsp("hostb")
    vm = make_vm("db01", vsp=hosta)
    make_not_runnable_copy(vm, hostb)

    response = api.post("/vms/db01/registrations/hostb/runnable")

    assert_problem(
        response,
        409,
        "Refused: db01 is runnable on VSP hosta. A VM may be runnable on only one VSP; "
        "mark that copy Not Runnable first.",
    )
    assert Registration.objects.get(vm=vm, vsp=hostb).hardware_status == "not_runnable"


def test_it_refuses_marking_a_running_copy_not_runnable(api):
    vm = make_vm("db01", vsp=make_vsp("hosta"))

    response = api.post("/vms/db01/registrations/hosta/not-runnable", {"reason": "x"})

    assert_problem(response, 409, "db01 on hosta is On: stop the VM before marking it Not Runnable.")
    assert Registration.objects.get(vm=vm).hardware_status == "on"


def test_it_refuses_an_empty_reason_and_a_missing_copy(api):
    hosta = make_vsp("hosta")
    make_vsp("hostb")
    make_vm("db01", vsp=hosta, hardware_status=Registration.HardwareStatus.OFF)

    assert_problem(
        api.post("/vms/db01/registrations/hosta/not-runnable", {"reason": "  "}),
        409,
        "Give a reason for marking the VM Not Runnable.",
    )
    assert_problem(
        api.post("/vms/db01/registrations/hostb/runnable"), 404, "db01 has no configuration on VSP hostb."
    )
    assert_problem(api.post("/vms/db01/registrations/hosta/not-runnable", {"reason": 5}), 422)
    assert Registration.objects.get(vsp=hosta).hardware_status == "off"


def test_it_enables_online_migration_and_refuses_it_for_a_vpar(api):
    vm = make_vm("web01", vsp=make_vsp("hosta"), online_migration_enabled=False)
    make_vm("vpar1", vsp=make_vsp("hostb"), kind="vpar")

    body = api.put("/vms/web01/online-migration", {"enabled": True}).json()

    assert body["online_migration"]["label"] == "VM enabled"
    vm.refresh_from_db()
    assert vm.online_migration_enabled
    assert_problem(
        api.put("/vms/vpar1/online-migration", {"enabled": True}),
        409,
        "vpar1 is a vPar: a vPar does not support migration.",
    )
    assert_problem(api.put("/vms/web01/online-migration", {"enabled": "maybe"}), 422)
    assert_problem(api.put("/vms/web01/online-migration", {"enabled": 0}), 422)


def test_it_answers_401_to_anonymous_requests_never_the_login_page(anonymous_api, client):
    make_vm("web01", vsp=make_vsp("hosta"))

    for response in (
        anonymous_api.get("/vms"),
        anonymous_api.get("/vms/web01"),
        anonymous_api.post("/migrations", {"vm": "web01", "target": "hosta"}),
        anonymous_api.put("/vms/web01/online-migration", {"enabled": False}),
        ApiClientWithBadToken().get("/vsps"),
    ):
        body = assert_problem(response, 401)
        assert "Bearer" in body["detail"]


class ApiClientWithBadToken:
    def get(self, path):
        from django.test import Client

        return Client().get(f"/api/v1{path}", headers={"Authorization": "Bearer moe_not-a-token"})


def test_it_answers_403_to_read_only_writes_and_changes_nothing(read_only_api):
    hosta, hostb = make_vsp("hosta"), make_vsp("hostb")
    vm = make_vm("web01", vsp=hosta, hardware_status=Registration.HardwareStatus.OFF)
    make_not_runnable_copy(vm, hostb)

    assert read_only_api.get("/vms/web01").status_code == 200
    assert_problem(read_only_api.put("/vms/web01/online-migration", {"enabled": False}), 403)
    assert_problem(read_only_api.post("/vms/web01/registrations/hosta/not-runnable", {"reason": "x"}), 403)
    assert_problem(read_only_api.post("/vms/web01/registrations/hostb/runnable"), 403)
    vm.refresh_from_db()
    assert vm.online_migration_enabled
    assert Registration.objects.get(vm=vm, vsp=hosta).hardware_status == "off"


def test_it_answers_403_to_a_user_without_view_permission(writer):
    from api.tokens import do_create_token
    from tests.api.conftest import ApiClient
    from tests.factories import make_user

    nobody = ApiClient(do_create_token(make_user("nobody"), "t")[1])

    assert_problem(nobody.get("/vms"), 403, "Your account lacks the permission to see this.")


def test_it_accepts_the_session_and_requires_csrf_for_its_writes(writer):
    from django.test import Client

    make_vm("web01", vsp=make_vsp("hosta"), online_migration_enabled=False)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(writer)

    assert browser.get("/api/v1/vms/web01").status_code == 200
    refused = browser.put(
        "/api/v1/vms/web01/online-migration", {"enabled": True}, content_type="application/json"
    )
    assert_problem(refused, 403)
    assert "CSRF" in refused.json()["detail"]
    browser.get("/account/tokens/")  # sets the CSRF cookie, as any page does
    token = browser.cookies["csrftoken"].value
    accepted = browser.put(
        "/api/v1/vms/web01/online-migration",
        {"enabled": True},
        content_type="application/json",
        headers={"X-CSRFToken": token},
    )
    assert accepted.status_code == 200, accepted.content


def test_it_serves_the_schema_and_docs_without_a_cdn(client):
    schema = client.get("/api/v1/openapi.json").json()
    docs = client.get("/api/v1/docs")

    assert "/api/v1/migrations" in schema["paths"]
    create = schema["paths"]["/api/v1/migrations"]["post"]["responses"]
    assert "application/problem+json" in create["409"]["content"]
    html = docs.content.decode()
    assert docs.status_code == 200
    assert "cdn" not in html.lower() and "/static/ninja/swagger-ui-bundle.js" in html
    assert 'data-api-csrf="true"' in html  # Swagger UI sends X-CSRFToken with the session
    assert client.get("/static/ninja/swagger-ui-bundle.js").status_code == 200
