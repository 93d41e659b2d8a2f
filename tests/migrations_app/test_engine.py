"""Migrations driven end to end: a real Celery worker, real Redis and real host agents on loopback.

Guests are small; the worker caps the data plane at a few MB/s (see conftest) so that how much of a
guest's memory is filled sets how long its Copy phase lasts.
"""

from __future__ import annotations

import re

import pytest

from migrations_app.actions import do_cancel_migration, do_request_migration, do_request_migrations
from migrations_app.models import Migration
from tests.migrations_app.guests import assert_left_on_source, place_vm, runs_on, wait_for_state
from vms.models import Registration

pytestmark = pytest.mark.django_db(transaction=True)

ALL_PHASES = ["queued", "init", "copy", "io_quiesce", "frozen", "committing", "completed"]


def test_it_migrates_a_running_guest_and_flips_the_registrations(
    host_agents, fleet, admin, migration_worker, wait_for
):
    vm = place_vm(host_agents, fleet, dirty_pages_per_s=200)

    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled")

    assert migration.state == "completed", migration.alert
    assert migration.source_digest and migration.source_digest == migration.target_digest
    assert [row[1] for row in migration.phase_rows()] == [100, 100, 100, 100]
    assert migration.downtime_ms is not None and migration.bytes_sent > 0
    assert list(migration.events.values_list("to_state", flat=True)) == ALL_PHASES
    assert vm.current_vsp == fleet["hostb"]
    source_copy = Registration.objects.get(vm=vm, vsp=fleet["hosta"])
    assert (
        source_copy.hardware_status,
        source_copy.not_runnable_set_by,
        source_copy.not_runnable_reason,
    ) == (
        "not_runnable",
        "migrate",
        "guest migrated to VSP hostb",
    )
    assert runs_on(host_agents["hostb"], vm.name)
    assert not runs_on(host_agents["hosta"], vm.name)


PHASE_SLOWERS = {
    # what keeps the guest in that phase for many seconds
    "copy": {"memory_mib": 64, "fill_percent": 100},
    "io_quiesce": {"io_latency_ms": 20_000},
    "frozen": {"state_save_ms": 20_000},
}


@pytest.mark.parametrize("phase", list(PHASE_SLOWERS))
def test_it_cancels_in_each_phase_and_leaves_the_guest_on_its_source(
    host_agents, fleet, admin, migration_worker, wait_for, phase
):
    vm = place_vm(
        host_agents, fleet, vm_fields={"quiesce_limit_s": 60, "frozen_limit_s": 60}, **PHASE_SLOWERS[phase]
    )
    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_for, migration, phase)

    do_cancel_migration(migration, admin)
    wait_for_state(wait_for, migration, "cancelled", "aborted", "completed", timeout=20)

    label = Migration.State(phase).label
    assert migration.state == "cancelled"
    assert migration.failed_phase == phase
    assert migration.alert == f"Cancelled by alice during the {label} phase. The VM keeps running on hosta."
    assert_left_on_source(vm, host_agents, fleet, migration)


def test_it_migrates_to_the_same_target_after_a_cancelled_attempt(
    host_agents, fleet, admin, migration_worker, wait_for
):
    # Big enough that the target is still hashing what it received when the cancel lands.
    vm = place_vm(host_agents, fleet, memory_mib=512, fill_percent=100)
    first = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_for, first, "copy")
    do_cancel_migration(first, admin)
    wait_for_state(wait_for, first, "cancelled", "aborted", "completed", timeout=20)

    retry = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_for, retry, "copy", "completed", "aborted", "cancelled", timeout=30)

    assert (first.state, retry.state) == ("cancelled", "copy"), retry.alert  # the target took it again
    do_cancel_migration(retry, admin)
    wait_for_state(wait_for, retry, "cancelled", "aborted", "completed", timeout=20)
    assert_left_on_source(vm, host_agents, fleet, retry)


@pytest.mark.parametrize(
    ("phase", "vm_fields", "guest"),
    [
        ("copy", {"copy_limit_s": 1}, {"memory_mib": 64, "fill_percent": 100}),
        ("io_quiesce", {"quiesce_limit_s": 1}, {"io_latency_ms": 20_000}),
        ("frozen", {"frozen_limit_s": 1}, {"state_save_ms": 20_000}),
    ],
)
def test_it_aborts_a_phase_that_runs_over_its_time_limit(
    host_agents, fleet, admin, migration_worker, wait_for, phase, vm_fields, guest
):
    vm = place_vm(host_agents, fleet, vm_fields=vm_fields, **guest)

    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_for, migration, "aborted", "cancelled", "completed")

    label = Migration.State(phase).label
    assert migration.state == "aborted"
    assert migration.failed_phase == phase
    # the real time it ran; no host named: both answered, the phase itself was too long
    assert re.fullmatch(
        rf"{label} phase failed: it ran over its time limit of 1 s \(stopped after \d+\.\d s\)\. "
        r"The VM keeps running on hosta\.",
        migration.alert,
    ), migration.alert
    assert_left_on_source(vm, host_agents, fleet, migration)


def test_it_migrates_selected_vms_one_at_a_time(host_agents, fleet, admin, migration_worker, wait_for):
    first = place_vm(host_agents, fleet, memory_mib=32, fill_percent=100)  # several seconds of Copy
    second = place_vm(host_agents, fleet)

    results = do_request_migrations([first, second], fleet["hostc"], admin)
    migrations = [result.migration for result in results]
    wait_for_state(wait_for, migrations[0], "copy")
    states = dict(Migration.objects.filter(pk__in=[m.pk for m in migrations]).values_list("pk", "state"))
    # one read of both rows: while the first one moves, the second waits (the hourglass)
    assert (states[migrations[0].pk], states[migrations[1].pk]) == ("copy", "queued")
    for migration in migrations:
        wait_for_state(wait_for, migration, "completed", "aborted", "cancelled")

    assert [migration.state for migration in migrations] == ["completed", "completed"]
    first_done = migrations[0].events.get(to_state="completed").at
    assert migrations[1].init_started_at >= first_done
    assert first.current_vsp == second.current_vsp == fleet["hostc"]


def test_a_guest_found_powered_off_at_init_aborts_without_claiming_it_keeps_running(
    host_agents, fleet, admin, migration_worker, wait_for
):
    # The inventory still says On (it was switched off since); the source agent knows better.
    vm = place_vm(host_agents, fleet, running=False)

    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled")

    assert migration.state == "aborted"
    assert migration.alert == (
        "Init phase failed: VM is not running on hosta: online migration moves running guests only. "
        "The VM stays on hosta, where it was not running."
    )
    assert "keeps running" not in migration.alert
    assert Registration.objects.get(vm=vm, vsp=fleet["hosta"]).hardware_status == "off"
    assert not runs_on(host_agents["hostb"], vm.name)
