"""Evacuations through the API: the plan, start, progress, refusals and cancel, on the page's own functions.

The test database transaction is rolled back, so the migrations an evacuation requests are never handed
to a worker (``transaction.on_commit`` does not fire): they stay QUEUED, as while waiting their turn.
"""

from __future__ import annotations

import pytest

from evacuations.models import Evacuation
from migrations_app.models import Migration
from tests.api.test_inventory_api import assert_problem
from tests.factories import make_migration, make_vm, make_vsp
from vms.models import VSP, AuditEvent, VirtualMachine

pytestmark = pytest.mark.django_db


@pytest.fixture
def crowded():
    """src holds two guests that fit elsewhere, one too big for any target, and a vPar."""
    src = make_vsp("src", memory_mib=16384)
    make_vsp("big", memory_mib=1000)
    make_vsp("small", memory_mib=600)
    for name, mib in (("g700", 700), ("g500", 500), ("g2000", 2000)):
        make_vm(name, vsp=src, memory_mib=mib)
    make_vm("vpar1", vsp=src, kind="vpar", memory_mib=64)
    return src


def test_it_shows_the_plan_with_targets_forecasts_and_who_stays(api, crowded):
    response = api.get("/vsps/src/evacuation-plan")

    assert response.status_code == 200
    plan = response.json()
    assert {(step["vm"], step["target"]) for step in plan["steps"]} == {("g700", "big"), ("g500", "small")}
    assert all(step["predicted_s"] is None for step in plan["steps"])  # no past migration between the pairs
    reasons = {stay["vm"]: stay["reason"] for stay in plan["staying"]}
    assert reasons["vpar1"] == "vPars do not migrate"
    assert reasons["g2000"].startswith("no target with room: needs 2000 MiB")
    assert plan["can_start"] is True


def test_the_plan_says_when_a_guest_may_not_converge_and_the_schema_lists_the_verdicts(api, client, crowded):
    """A close call (the measured rates converge, but not with the model's margin) is its own verdict: the
    plan's step says "may not converge", never "will not converge" nor a promise."""
    from django.core.cache import cache
    from django.utils import timezone

    from migrations_app import estimates, forecast

    g700 = VirtualMachine.objects.get(name="g700")
    big = VSP.objects.get(name="big")
    make_migration(g700, crowded, big, state="completed", throughput_bytes_s=50_000_000)
    memory = g700.memory_mib * 1024 * 1024
    link = estimates.model_link(crowded, 50_000_000)
    policy = estimates.forecast_policy(g700.migration_policy, g700)

    def measured(rate: float) -> estimates.DirtyRate:
        return estimates.DirtyRate(rate, memory, memory, memory, timezone.now())

    # The model's own boundary: the first rate, in 0.1 MB/s steps, that is too close to promise.
    close = next(
        rate
        for rate in (step * 100_000.0 for step in range(1, 500))
        if forecast.forecast(measured(rate).guest(), link, policy).verdict.value == "may_not_converge"
    )
    verdicts = {}
    for rate in (close / 4, close):
        cache.set(estimates._cache_key(g700), measured(rate), 60)
        try:
            steps = api.get("/vsps/src/evacuation-plan").json()["steps"]
        finally:
            cache.delete(estimates._cache_key(g700))
        verdicts[rate] = next(step for step in steps if step["vm"] == "g700")

    assert verdicts[close / 4]["verdict"] == "converges"
    step = verdicts[close]
    assert step["verdict"] == "may_not_converge"
    assert step["verdict_label"] == "may not converge under this policy: too close to promise"
    assert step["predicted_s"] > 0  # the time if the measured rates hold
    schema = client.get("/api/v1/openapi.json").json()
    listed = schema["components"]["schemas"]["PlanStepOut"]["properties"]["verdict"]
    values = {value for option in listed.get("anyOf", [listed]) for value in option.get("enum", [])}
    assert values == {verdict.value for verdict in forecast.Verdict}
    assert "may_not_converge" in listed["description"]


def test_it_starts_the_plan_and_reports_its_progress_and_maintenance(api, crowded):
    response = api.post("/vsps/src/evacuations", {})

    assert response.status_code == 201, response.content
    evacuation = response.json()
    assert (evacuation["vsp"], evacuation["state"]) == ("src", "running")
    assert [step["status"] for step in evacuation["steps"]] == ["waiting", "waiting"]
    assert {stay["vm"] for stay in evacuation["staying"]} == {"g2000", "vpar1"}
    assert VSP.objects.get(name="src").maintenance
    assert Migration.objects.filter(source__name="src", state="queued").count() == 2
    assert api.get(f"/evacuations/{evacuation['id']}").json()["counts"]["waiting"] == 2
    assert api.get("/vsps/src").json()["maintenance"] is True


def test_it_takes_the_admins_target_by_name(api, crowded):
    response = api.post("/vsps/src/evacuations", {"targets": {"g500": "big", "g700": "small"}})

    assert response.status_code == 409
    assert "g700 cannot go to small: not enough free memory" in response.json()["detail"]
    assert not Evacuation.objects.exists()
    assert not VSP.objects.get(name="src").maintenance


def test_it_refuses_a_second_evacuation_and_a_migration_to_the_host_in_maintenance(api, crowded):
    assert api.post("/vsps/src/evacuations", {}).status_code == 201

    second = api.post("/vsps/src/evacuations", {})
    into = api.post("/migrations", {"vm": make_vm("late", vsp=make_vsp("other")).name, "target": "src"})

    assert second.status_code == 409
    assert "src is already being evacuated" in second.json()["detail"]
    assert into.status_code == 409
    assert "maintenance" in into.json()["detail"]
    assert Evacuation.objects.count() == 1


def test_it_cancels_the_evacuation_and_then_leaves_maintenance(api, crowded):
    evacuation = api.post("/vsps/src/evacuations", {}).json()

    cancelled = api.post(f"/evacuations/{evacuation['id']}/cancel")
    left = api.post("/vsps/src/leave-maintenance")

    assert cancelled.status_code == 202
    assert cancelled.json()["cancel_requested"] is True
    assert not Migration.objects.filter(source__name="src", state="queued").exists()
    assert left.status_code == 200, left.content
    assert left.json()["maintenance"] is False
    assert AuditEvent.objects.filter(action=AuditEvent.Action.MAINTENANCE_LEFT).count() == 1


def test_a_read_only_user_sees_the_plan_but_cannot_start_it(read_only_api, crowded):
    assert read_only_api.get("/vsps/src/evacuation-plan").status_code == 200

    response = read_only_api.post("/vsps/src/evacuations", {})

    assert response.status_code == 403
    assert response["Content-Type"] == "application/problem+json"
    assert not Evacuation.objects.exists()


def test_it_answers_unknown_hosts_and_evacuations_with_404(api, crowded):
    assert api.get("/vsps/nowhere/evacuation-plan").status_code == 404
    assert api.get("/evacuations/999").status_code == 404
    assert api.post("/vsps/src/evacuations", {"targets": {"ghost": "big"}}).status_code == 404
    assert not Evacuation.objects.exists()


def test_it_refuses_a_misspelt_field_instead_of_running_the_plans_order(api, crowded):
    response = api.post("/vsps/src/evacuations", {"ordr": ["g700", "g500"]})

    assert_problem(
        response, 422, "Bad input: ordr: not a field here: check its spelling and where it is nested"
    )
    assert not Evacuation.objects.exists()


def test_the_plans_query_lists_are_bounded_so_the_url_stays_short(api, crowded):
    """schemathesis sent the documented 10,000 exclusions in a GET: the URL outgrew what uvicorn takes
    (16 KiB) and it answered a bare 400 before the console saw it. The query lists now stop at 100."""
    at_most = "&".join(["exclude=web1"] * 100)
    too_many = "&".join(["exclude=web1"] * 101)

    assert api.get(f"/vsps/src/evacuation-plan?{at_most}").status_code != 422
    body = assert_problem(api.get(f"/vsps/src/evacuation-plan?{too_many}"), 422)
    assert "exclude" in body["detail"], body
