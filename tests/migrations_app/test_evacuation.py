"""Evacuations driven end to end: real host agents, a real Celery worker, real Redis.

The failure midway is a real one: the guest's I/O takes 20 s to drain while its I/O Quiesce limit is
1 s, so the agent gives up and the migration aborts (as in ``test_engine``'s phase time-out tests).
"""

from __future__ import annotations

import pytest

from evacuations.actions import do_cancel_evacuation, do_start_evacuation
from evacuations.models import Evacuation
from evacuations.plan import build_plan
from evacuations.summary import summarize
from tests.migrations_app.guests import guest_on, place_vm, runs_on
from vms.models import VSP, AuditEvent, Registration

pytestmark = pytest.mark.django_db(transaction=True)


def start(fleet, admin, order_names=None):
    plan = build_plan(fleet["hosta"])
    targets = {step.vm.pk: step.target.pk for step in plan.steps}
    order = None
    if order_names:
        by_name = {step.vm.name: step.vm.pk for step in plan.steps}
        order = [by_name[name] for name in order_names]
    return plan, do_start_evacuation(fleet["hosta"], targets, order, admin)


def wait_until_ended(wait_for, evacuation, timeout=120):
    def ended() -> bool:
        evacuation.refresh_from_db()
        return not evacuation.is_running

    assert wait_for(ended, timeout=timeout), f"evacuation still running: {summarize(evacuation).counts()}"


def test_it_evacuates_a_host_and_goes_on_past_a_failed_guest(
    host_agents, fleet, admin, migration_worker, wait_for
):
    first = place_vm(host_agents, fleet)
    doomed = place_vm(host_agents, fleet, io_latency_ms=20_000, vm_fields={"quiesce_limit_s": 1})
    last = place_vm(host_agents, fleet)
    sleeper = place_vm(host_agents, fleet, running=False)
    Registration.objects.filter(vm=sleeper).update(hardware_status="off")

    plan, evacuation = start(fleet, admin, [first.name, doomed.name, last.name])
    assert {stay.vm_name: stay.reason for stay in plan.staying} == {
        sleeper.name: "powered off: online migration moves running guests only"
    }
    wait_until_ended(wait_for, evacuation)

    summary = summarize(evacuation)
    assert evacuation.state == "finished"
    assert {step.vm_name: status for step, status in summary.rows} == {
        first.name: "done",
        doomed.name: "failed",
        last.name: "done",
    }
    assert summary.sentence() == f"2 moved; 1 failed; 1 stayed; still runnable on hosta: {doomed.name}"
    for moved in (first, last):
        target = next(step.target for step in plan.steps if step.vm.pk == moved.pk)
        assert moved.current_vsp == target
        assert runs_on(host_agents[target.name], moved.name)
    # The failed guest stays runnable on its source only, and runs there.
    doomed.refresh_from_db()
    assert doomed.current_vsp == fleet["hosta"]
    assert runs_on(host_agents["hosta"], doomed.name)
    assert not any(guest_on(host_agents[name], doomed.name) for name in ("hostb", "hostc"))
    assert VSP.objects.get(name="hosta").maintenance
    actions = list(AuditEvent.objects.order_by("pk").values_list("action", flat=True))
    assert actions[0] == "maintenance_entered"
    assert actions.count("migration_requested") == 3
    assert "evacuation_started" in actions and actions[-1] == "evacuation_finished"
    finished = AuditEvent.objects.get(action="evacuation_finished")
    assert finished.after["done"] == 2 and finished.after["failed"] == 1


def test_it_cancels_an_evacuation_the_running_guest_stops_and_the_waiting_ones_never_start(
    host_agents, fleet, admin, migration_worker, wait_for
):
    # The first guest is slow to copy (64 MiB filled at a few MB/s), so the cancel lands while it runs.
    slow = place_vm(host_agents, fleet, memory_mib=64, fill_percent=100)
    waiting = [place_vm(host_agents, fleet) for _ in range(2)]
    _, evacuation = start(fleet, admin, [slow.name, *(vm.name for vm in waiting)])

    def copying() -> bool:
        return summarize(evacuation).count("running") == 1

    assert wait_for(copying, timeout=60)
    do_cancel_evacuation(evacuation, admin)
    wait_until_ended(wait_for, evacuation)

    statuses = {step.vm_name: status for step, status in summarize(evacuation).rows}
    assert evacuation.state == "cancelled"
    never_started = {vm.name: "not started" for vm in waiting}
    assert statuses == {slow.name: "cancelled", **never_started}
    for vm in (slow, *waiting):
        vm.refresh_from_db()
        assert vm.current_vsp == fleet["hosta"]
        assert runs_on(host_agents["hosta"], vm.name)
    assert Evacuation.objects.get().cancel_requested_by == admin
    assert AuditEvent.objects.filter(action="evacuation_cancelled", actor=admin).count() == 1


def test_the_plan_forecasts_as_the_dialog_and_a_guest_that_will_not_converge_waits_for_the_admin(
    host_agents, fleet, admin, migration_worker, wait_for, client
):
    """QA's vsp1 (real agents measure the dirty rates): the busy guest writes 20 MB/s under a 10 MB/s
    policy cap, so the migrate dialog says it will not converge, while the plan said "1 min 0 s" and
    started it; the idle one was planned at 48 s (another guest's dirty rate) and moved in 3 s.

    Now the plan page shows each guest's forecast as the dialog's (same function, same measurement),
    says why the busy one will not converge, refuses to start it unconfirmed, and the running evacuation
    counts down from the very times the page showed."""
    import re

    from migrations_app import estimates
    from migrations_app.templatetags.migration_tags import seconds
    from tests.factories import MIGRATION_ADMIN_PERMISSIONS, make_migration, make_user, make_vm

    hosta, hostb, hostc = fleet["hosta"], fleet["hostb"], fleet["hostc"]
    capped = {"preset": "custom", "bandwidth_cap_mb_s": 10}
    busy = place_vm(
        host_agents,
        fleet,
        memory_mib=64,
        fill_percent=50,
        dirty_pages_per_s=5000,
        vm_fields={"name": "reports01", "migration_policy": capped},
    )
    idle = place_vm(host_agents, fleet, memory_mib=48, fill_percent=5, vm_fields={"name": "db01"})
    # Earlier migrations from hosta measured each pair's link (and a busy guest's high dirty rate).
    earlier = make_vm("earlier", vsp=hostb, memory_mib=16, hardware_status="off")
    for target in (hostb, hostc):
        make_migration(
            earlier,
            hosta,
            target,
            state="completed",
            throughput_bytes_s=50_000_000,
            dirty_rate_bytes_s=30_000_000,
        )
    client.force_login(make_user("evacuator", MIGRATION_ADMIN_PERMISSIONS))
    html = client.get(f"/migrations/vsps/{hosta.pk}/evacuate/").content.decode()

    def row(name: str, attribute: str = "data-vm") -> str:
        found = re.search(rf'<tr {attribute}="{name}".*?</tr>', html, re.S)
        assert found, name
        return " ".join(re.sub(r"<[^>]+>", " ", found.group(0)).split())

    plan = build_plan(hosta)  # the measurements the page just took, from the cache
    shown = {step.vm.name: step for step in plan.steps}
    for vm in (busy, idle):
        step = shown[vm.name]
        dialog = estimates.forecast_to(vm, step.target, vm.migration_policy, estimates.cached_dirty_rate(vm))
        assert dialog.total_s is not None and (step.predicted_s, step.verdict) == (
            dialog.total_s,
            dialog.verdict,
        )
        assert seconds(step.predicted_s) in row(vm.name)
    assert shown["reports01"].verdict.value == "will_not_converge"
    assert "Will not converge under this policy" in row("reports01")
    assert "is not started unless you choose" in row("reports01", "data-warning-for")
    assert not shown["db01"].warns
    assert shown["db01"].predicted_s < 10  # the idle guest's own rate, not the earlier busy one's

    chosen = {f"target_{step.vm.pk}": step.target.pk for step in plan.steps}
    chosen |= {f"position_{step.vm.pk}": position for position, step in enumerate(plan.steps, start=1)}
    refused = client.post(f"/migrations/vsps/{hosta.pk}/evacuate/", chosen)
    assert refused.status_code == 400
    assert (
        "reports01 will not converge under this policy: change its migration policy"
        in refused.content.decode()
    )
    assert not Evacuation.objects.exists()

    started = client.post(f"/migrations/vsps/{hosta.pk}/evacuate/", {**chosen, f"confirm_{busy.pk}": "on"})
    assert started.status_code == 302
    evacuation = Evacuation.objects.get()
    stored = dict(evacuation.steps.values_list("vm_name", "predicted_s"))
    assert stored == {name: step.predicted_s for name, step in shown.items()}
    do_cancel_evacuation(evacuation, admin)
    wait_until_ended(wait_for, evacuation)
    assert runs_on(host_agents["hosta"], "reports01")
