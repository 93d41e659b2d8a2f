"""Maintenance that ends well (``evacuations.returns`` and the plan page), without running migrations.

As in ``test_evacuation_plan``, the transaction is rolled back, so the migrations requested here are never
handed to a worker: they stay QUEUED. The real round trip (agents, worker, browser) is in
``test_return_browser``.
"""

from __future__ import annotations

import pytest

from evacuations.actions import (
    EvacuationRefused,
    do_cancel_evacuation,
    do_leave_maintenance,
    do_start_evacuation,
)
from evacuations.models import Evacuation, EvacuationStep
from evacuations.plan import build_plan
from evacuations.returns import build_return_plan, do_start_return, returnable_count
from evacuations.summary import summarize
from migrations_app.models import Migration
from tests.api.conftest import ApiClient
from tests.factories import (
    MIGRATION_ADMIN_PERMISSIONS,
    make_migration,
    make_not_runnable_copy,
    make_user,
    make_vm,
    make_vsp,
)
from tests.migrations_app.test_evacuation_plan import close_and_hopeless_rates, measured  # noqa: F401
from vms.models import VSP, AuditEvent, Registration

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin():
    return make_user("admin", MIGRATION_ADMIN_PERMISSIONS + ("migrations_app.view_migration",))


def moved(vm, source, target, evacuation, position):
    """``vm`` moved from ``source`` to ``target`` by ``evacuation``'s step ``position``, as a completed
    migration leaves it: runnable On on the target, Not Runnable (set by Migrate) on the source."""
    Registration.objects.filter(vm=vm, vsp=source).delete()
    make_not_runnable_copy(vm, source, reason=f"guest migrated to VSP {target.name}")
    Registration.objects.create(vm=vm, vsp=target, hardware_status="on")
    migration = make_migration(vm, source, target, state=Migration.State.COMPLETED)
    EvacuationStep.objects.create(
        evacuation=evacuation, position=position, vm=vm, vm_name=vm.name, target=target, migration=migration
    )


@pytest.fixture
def evacuated():
    """home was evacuated: web (512 MiB) went to left, db (1024 MiB) to right; cold stayed (off). home
    is still in maintenance; api moved on from left to right afterwards."""
    home = make_vsp("home", memory_mib=4096, maintenance=True)
    left, right = make_vsp("left", memory_mib=4096), make_vsp("right", memory_mib=4096)
    evacuation = Evacuation.objects.create(vsp=home, state=Evacuation.State.FINISHED, requested_by_name="ann")
    web, db, api = (
        make_vm(name, vsp=home, memory_mib=mib) for name, mib in (("web", 512), ("db", 1024), ("api", 256))
    )
    make_vm("cold", vsp=home, hardware_status="off")
    moved(web, home, left, evacuation, 1)
    moved(db, home, right, evacuation, 2)
    moved(api, home, left, evacuation, 3)
    Registration.objects.filter(vm=api, vsp=left).update(
        hardware_status="not_runnable", not_runnable_set_by="migrate", not_runnable_reason="moved on"
    )
    Registration.objects.create(vm=api, vsp=right, hardware_status="on")
    return {
        "home": home,
        "left": left,
        "right": right,
        "web": web,
        "db": db,
        "api": api,
        "evacuation": evacuation,
    }


def test_the_return_plan_brings_back_what_the_evacuation_moved_once_out_of_maintenance(evacuated, admin):
    home = evacuated["home"]
    in_maintenance = build_return_plan(home, user=admin)
    assert sorted(step.vm.name for step in in_maintenance.steps) == ["db", "web"]
    assert in_maintenance.problems == ["home cannot take guests now: host in maintenance."]
    assert {stay.vm_name: stay.reason for stay in in_maintenance.staying} == {
        "api": "moved on since the evacuation: runnable right"
    }

    do_leave_maintenance(home, admin)
    home.refresh_from_db()
    plan = build_return_plan(home, user=admin)
    assert plan.ok and {step.vm.name: step.target for step in plan.steps} == {"web": home, "db": home}
    assert returnable_count(home) == 2

    returning = do_start_return(home, admin)
    assert returning.kind == "return" and returning.is_running
    requested = Migration.objects.filter(state="queued").order_by("pk")
    assert [(m.vm.name, m.source.name, m.target.name) for m in requested] == [
        ("web", "left", "home"),
        ("db", "right", "home"),
    ]
    assert AuditEvent.objects.filter(action="evacuation_started", message__startswith="Return of 2").exists()
    with pytest.raises(EvacuationRefused):
        do_start_return(home, admin)  # one at a time
    do_cancel_evacuation(returning, admin)
    returning.refresh_from_db()
    assert summarize(returning).sentence().endswith("still runnable where they were: web, db")


def test_a_return_that_does_not_fit_keeps_the_rest_where_it_is(evacuated, admin):
    home = evacuated["home"]
    VSP.objects.filter(pk=home.pk).update(maintenance=False, memory_mib=700)
    home.refresh_from_db()
    plan = build_return_plan(home, user=admin)
    assert [step.vm.name for step in plan.steps] == ["web"]
    assert ("db", "no room on home: needs 1024 MiB, 700 MiB left") in [
        (s.vm_name, s.reason) for s in plan.staying
    ]


def test_a_user_without_the_migration_right_on_a_source_sees_why(evacuated):
    home = evacuated["home"]
    VSP.objects.filter(pk=home.pk).update(maintenance=False)
    home.refresh_from_db()
    viewer = make_user("olga", ("vms.view_vsp", "vms.view_virtualmachine"))
    with pytest.raises(Exception, match="permission"):
        do_start_return(home, viewer)
    assert not Migration.objects.filter(state="queued").exists()


def test_leaving_maintenance_on_the_page_offers_the_return_plan(client, evacuated, admin):
    home = evacuated["home"]
    client.force_login(admin)
    left = client.post(f"/migrations/vsps/{home.pk}/leave-maintenance/")
    assert left.status_code == 302 and left["Location"] == f"/migrations/vsps/{home.pk}/return/"
    page = client.get(left["Location"]).content.decode()
    assert "Bring guests back to" in page and 'data-vm="web"' in page and 'data-vm="db"' in page
    assert "Bring them back" in page and 'data-field="from">left' in page
    started = client.post(f"/migrations/vsps/{home.pk}/return/", {})
    assert started.status_code == 302
    vsp_page = client.get(f"/vsps/{home.pk}/").content.decode()
    assert "Return of guests" in vsp_page
    # QA: a running return's button said "Cancel evacuation" (no worker here: it stays running)
    assert ">Cancel the return</button>" in vsp_page and "Cancel evacuation" not in vsp_page


def test_the_api_lists_a_hosts_evacuations_and_starts_the_return(evacuated, admin):
    from api.tokens import do_create_token

    home = evacuated["home"]
    api = ApiClient(do_create_token(admin, "tests")[1])
    listed = api.get(f"/vsps/{home.name}/evacuations")
    assert listed.status_code == 200, listed.content
    assert [(e["kind"], e["state"]) for e in listed.json()] == [("evacuation", "finished")]
    refused = api.post(f"/vsps/{home.name}/returns", {})
    assert refused.status_code == 409 and "host in maintenance" in refused.json()["detail"]
    api.post(f"/vsps/{home.name}/leave-maintenance")
    plan = api.get(f"/vsps/{home.name}/return-plan").json()
    assert sorted(step["vm"] for step in plan["steps"]) == ["db", "web"] and plan["can_start"]
    started = api.post(f"/vsps/{home.name}/returns", {"exclude": ["db"]})
    assert started.status_code == 201, started.content
    assert started.json()["kind"] == "return" and [s["vm"] for s in started.json()["steps"]] == ["web"]
    assert [e["kind"] for e in api.get(f"/vsps/{home.name}/evacuations").json()] == ["return", "evacuation"]


def test_a_host_whose_guests_are_all_off_still_enters_maintenance(client, admin):
    quiet = make_vsp("quiet")
    make_vsp("spare")
    make_vm("sleeper", vsp=quiet, hardware_status="off")
    client.force_login(admin)
    page = client.get(f"/migrations/vsps/{quiet.pk}/evacuate/").content.decode()
    assert "Enter maintenance" in page and 'id="start-evacuation" disabled' not in page
    assert client.post(f"/migrations/vsps/{quiet.pk}/evacuate/", {}).status_code == 302
    quiet.refresh_from_db()
    assert quiet.maintenance
    evacuation = Evacuation.objects.get(vsp=quiet)
    assert evacuation.state == "finished" and evacuation.staying[0]["vm"] == "sleeper"
    with pytest.raises(EvacuationRefused, match="in maintenance already"):
        do_start_evacuation(quiet, {}, None, admin)


def test_update_plan_posts_and_changes_nothing(client, admin):
    host = make_vsp("host1")
    make_vsp("host2")
    vm = make_vm("app", vsp=host)
    client.force_login(admin)
    page = client.get(f"/migrations/vsps/{host.pk}/evacuate/").content.decode()
    assert 'formmethod="get"' not in page and 'name="update"' in page
    updated = client.post(f"/migrations/vsps/{host.pk}/evacuate/", {"update": "1", f"exclude_{vm.pk}": "on"})
    assert updated.status_code == 200 and "excluded from this evacuation" in updated.content.decode()
    assert not Evacuation.objects.exists() and not Migration.objects.exists()


def test_the_total_leaves_out_a_step_that_will_not_converge_and_start_waits_only_for_a_choice(
    client,
    admin,
    measured,  # noqa: F811
):
    src, big = make_vsp("src", memory_mib=8192), make_vsp("big", memory_mib=8192)
    calm, hopeless_vm = make_vm("calm", vsp=src, memory_mib=256), make_vm("wild", vsp=src, memory_mib=256)
    for vm in (calm, hopeless_vm):
        make_migration(
            make_vm(f"past-{vm.name}", vsp=big, memory_mib=16),
            src,
            big,
            state="completed",
            throughput_bytes_s=50_000_000,
        )
    measured(calm, 0)
    _, hopeless = close_and_hopeless_rates(hopeless_vm, big, measured)
    measured(hopeless_vm, hopeless)
    plan = build_plan(src)
    by_name = {step.vm.name: step for step in plan.steps}
    assert by_name["wild"].stops_at_limit and not by_name["calm"].stops_at_limit
    assert plan.not_converging_count == 1
    assert plan.known_total_s == pytest.approx(by_name["calm"].predicted_s)
    client.force_login(admin)
    page = client.get(f"/migrations/vsps/{src.pk}/evacuate/").content.decode()
    assert "not counting 1 guest forecast not to converge" in page
    assert "data-needs-choice" in page  # the browser enables Start once each warning has a choice
    started = client.post(
        f"/migrations/vsps/{src.pk}/evacuate/",
        {f"target_{calm.pk}": big.pk, f"target_{hopeless_vm.pk}": big.pk, f"confirm_{hopeless_vm.pk}": "on"},
    )
    assert started.status_code == 302
    assert Evacuation.objects.get(vsp=src).steps.count() == 2


def test_the_return_plan_does_not_name_a_vsp_outside_the_users_groups(evacuated):
    """db went to right, which is in another host group: an operator of home's group reads that it runs
    on "a VSP outside your host groups", and may not bring it back, without learning right's name."""
    from api.tokens import do_create_token
    from tests.factories import make_host_group

    home = evacuated["home"]
    VSP.objects.filter(pk=home.pk).update(maintenance=False)
    VSP.objects.filter(pk=evacuated["right"].pk).update(group=make_host_group("Elsewhere"))
    operator = make_user("op", MIGRATION_ADMIN_PERMISSIONS + ("migrations_app.view_migration",))
    api = ApiClient(do_create_token(operator, "tests")[1])
    plan = api.get(f"/vsps/{home.name}/return-plan")
    assert plan.status_code == 200, plan.content
    steps = {step["vm"]: step for step in plan.json()["steps"]}
    assert steps["web"]["source"] == "left" and steps["db"]["source"] == "a VSP outside your host groups"
    assert steps["db"]["problem"] == "You may not bring db back: it runs on a VSP outside your host groups."
    assert "right" not in plan.content.decode()
    assert not plan.json()["can_start"]
