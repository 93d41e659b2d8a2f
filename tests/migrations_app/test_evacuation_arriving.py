"""Issue 18.1: an evacuation that starts while a guest migrates *to* its host.

Real host agents, a real Celery worker, real Redis. The arriving guest's Copy lasts a few seconds
(32 MiB filled, the test worker's data plane capped at 5 MB/s), so the evacuation starts while it copies.
Seen by the testers: the guest landed on the evacuated host, kept running there, and the summary said
"4 stayed", listing it as "Stays: Not Runnable copy here".
"""

from __future__ import annotations

import pytest

from evacuations.actions import do_start_evacuation
from evacuations.models import Evacuation
from evacuations.plan import build_plan
from evacuations.summary import summarize
from migrations_app.actions import do_cancel_migration, do_request_migration
from tests.factories import make_vm
from tests.migrations_app.guests import place_vm, runs_on, wait_for_state
from vms.models import Registration

pytestmark = pytest.mark.django_db(transaction=True)


def arriving_guest(host_agents, fleet, admin, wait_for):
    """A guest on hostb migrating to hosta, in Copy, with a Not Runnable copy left on hosta from an
    earlier visit (what made the old summary say "Stays: Not Runnable copy here")."""
    guest = place_vm(host_agents, fleet, on="hostb", memory_mib=32, fill_percent=100)
    Registration.objects.create(
        vm=guest,
        vsp=fleet["hosta"],
        hardware_status="not_runnable",
        not_runnable_set_by="migrate",
        not_runnable_reason="guest migrated to VSP hostb",
    )
    incoming = do_request_migration(guest, fleet["hosta"], admin)
    wait_for_state(wait_for, incoming, "copy")
    return guest, incoming


def start_evacuation(fleet, admin):
    plan = build_plan(fleet["hosta"])
    targets = {step.vm.pk: step.target.pk for step in plan.steps}
    return plan, do_start_evacuation(fleet["hosta"], targets, None, admin)


def wait_until_ended(wait_for, evacuation):
    def ended() -> bool:
        evacuation.refresh_from_db()
        return not evacuation.is_running

    assert wait_for(ended, timeout=120), f"evacuation still running: {summarize(evacuation).counts()}"


def test_it_waits_for_a_guest_arriving_at_the_host_then_moves_it_on(
    host_agents, fleet, admin, migration_worker, wait_for
):
    resident = place_vm(host_agents, fleet)
    guest, incoming = arriving_guest(host_agents, fleet, admin, wait_for)

    plan, evacuation = start_evacuation(fleet, admin)
    assert [step.vm.name for step in plan.steps] == [resident.name]
    assert [stay.vm_name for stay in plan.staying] == []  # never "stays" for the arriving guest
    (arriving,) = plan.arriving
    assert arriving.vm == guest and arriving.target is not None
    assert arriving.words.startswith("migrating here from hostb (Copy): the evacuation waits for it")
    assert f"then moves it on to {arriving.target.name}" in arriving.words
    statuses = {step.vm_name: status for step, status in summarize(evacuation).rows}
    assert statuses[guest.name] in ("arriving", "landed", "waiting", "running", "done")

    wait_until_ended(wait_for, evacuation)

    incoming.refresh_from_db()
    assert incoming.state == "completed"  # it did land on hosta first
    guest.refresh_from_db()
    assert guest.current_vsp == arriving.target
    assert runs_on(host_agents[arriving.target.name], guest.name)
    assert not runs_on(host_agents["hosta"], guest.name)
    summary = summarize(evacuation)
    assert {step.vm_name: status for step, status in summary.rows} == {
        resident.name: "done",
        guest.name: "done",
    }
    assert summary.sentence() == "2 moved; 0 failed; 0 stayed"
    step = evacuation.steps.get(vm_name=guest.name)
    assert step.arriving == incoming and step.migration.source == fleet["hosta"]


def test_a_guest_whose_arrival_is_cancelled_is_said_to_run_on_its_source(
    host_agents, fleet, admin, migration_worker, wait_for
):
    resident = place_vm(host_agents, fleet)
    guest, incoming = arriving_guest(host_agents, fleet, admin, wait_for)
    _, evacuation = start_evacuation(fleet, admin)

    do_cancel_migration(incoming, admin)
    wait_until_ended(wait_for, evacuation)

    summary = summarize(evacuation)
    assert dict((step.vm_name, status) for step, status in summary.rows)[guest.name] == "did not arrive"
    words = {step.vm_name: text for step, _, text in summary.lines}
    assert words[guest.name] == (
        "Did not arrive: its migration from hostb ended without it, so it runs on hostb"
    )
    assert summary.sentence() == "1 moved; 0 failed; 1 did not arrive (still on their source); 0 stayed"
    assert runs_on(host_agents["hostb"], guest.name) and not runs_on(host_agents["hosta"], guest.name)
    assert resident.pk != guest.pk


def test_a_staying_guest_that_runs_on_the_host_now_is_never_called_staying(fleet, admin):
    """The summary's safety net: whatever the plan said, a guest running on the host is no "stays"."""
    sleeper = make_vm("sleeper", vsp=fleet["hosta"], hardware_status="on")
    evacuation = Evacuation.objects.create(
        vsp=fleet["hosta"],
        requested_by=admin,
        state="finished",
        staying=[{"vm": "sleeper", "reason": "powered off: online migration moves running guests only"}],
    )
    summary = summarize(evacuation)
    (row,) = summary.staying_rows
    assert row.runs_here and row.words.startswith("Runs here now: not moved by this evacuation")
    assert summary.sentence() == "0 moved; 0 failed; 0 stayed; still runnable on hosta: sleeper"
    Registration.objects.filter(vm=sleeper).update(hardware_status="off")
    assert summarize(evacuation).sentence() == "0 moved; 0 failed; 1 stayed"
    # A guest that stays for what it is (a vPar) runs there and is rightly said to stay.
    make_vm("vpar-db", vsp=fleet["hosta"], kind="vpar", hardware_status="on")
    evacuation.staying = [{"vm": "vpar-db", "reason": "vPars do not migrate"}]
    assert summarize(evacuation).staying_rows[0].words == "Stays: vPars do not migrate"


def landed_guest(fleet):
    """A guest that has just landed on hosta from hostb (its migration completed), runnable there."""
    from tests.factories import make_migration, make_registration

    vm = make_vm("late", vsp=fleet["hosta"], memory_mib=16)
    make_registration(vm, fleet["hostb"], "not_runnable", "migrate", "guest migrated to VSP hosta")
    return vm, make_migration(vm, fleet["hostb"], fleet["hosta"], state="completed")


def test_a_guest_that_lands_unplanned_on_an_evacuated_vsp_is_adopted_and_moved_on(fleet, admin, settings):
    """Its Init began just before the evacuation put the VSP in maintenance: no step waited for it."""
    from django.utils import timezone

    from evacuations.actions import follow_outcome
    from migrations_app.outcomes import Outcome

    settings.MIGRATION_QUEUE = f"nowhere-{timezone.now().timestamp()}"  # no worker runs the onward one
    vm, landed = landed_guest(fleet)
    evacuation = Evacuation.objects.create(vsp=fleet["hosta"], requested_by=admin)
    type(fleet["hosta"]).objects.filter(pk=fleet["hosta"].pk).update(maintenance=True)

    outcome = Outcome(landed.pk, "completed", timezone.now(), vm.pk, fleet["hostb"].pk, fleet["hosta"].pk)
    follow_outcome(outcome)
    follow_outcome(outcome)  # delivered twice: still one step, one onward migration

    step = evacuation.steps.get()
    assert step.arriving == landed and step.migration is not None
    assert (step.migration.source, step.migration.state) == (fleet["hosta"], "queued")
    assert step.target != fleet["hosta"]
    assert dict((s.vm_name, status) for s, status in summarize(evacuation).rows) == {"late": "waiting"}


def test_a_guest_landing_after_the_evacuation_was_cancelled_is_named_still_runnable_there(fleet, admin):
    from evacuations.actions import settle
    from evacuations.models import EvacuationStep

    vm, landed = landed_guest(fleet)
    evacuation = Evacuation.objects.create(vsp=fleet["hosta"], requested_by=admin, cancel_requested=True)
    EvacuationStep.objects.create(
        evacuation=evacuation, position=1, vm=vm, vm_name=vm.name, target=fleet["hostc"], arriving=landed
    )

    assert settle(evacuation)

    summary = summarize(evacuation)
    assert [status for _, status, _ in summary.lines] == ["not moved"]
    assert summary.lines[0][2] == (
        "Not moved: landed on hosta but was not moved on: the evacuation was cancelled before it "
        "landed; it runs on hosta"
    )
    assert summary.sentence() == "0 moved; 0 failed; 0 stayed; still runnable on hosta: late"
