"""Evacuations driven end to end: real host agents, a real Celery worker, real Redis.

The failure midway is a real one: the guest's I/O takes 20 s to drain while its I/O Quiesce limit is
1 s, so the agent gives up and the migration aborts (as in ``test_engine``'s phase time-out tests).
"""

from __future__ import annotations

import pytest

from migrations_app.evacuation import build_plan, do_cancel_evacuation, do_start_evacuation, summarize
from migrations_app.evacuation_models import Evacuation
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
