"""Several migrations leaving one VSP at once (``VSP.max_concurrent_migrations``): real agents and worker.

With N = 1 a second migration from the same source waits queued until the first ends; with N = 2 both run
at the same time (seen in one read of both rows), in the normal queue and in an evacuation, and each ends
with the target's memory digest equal to the source's.
"""

from __future__ import annotations

import pytest

from evacuations.actions import do_start_evacuation
from evacuations.plan import build_plan, time_left_s
from evacuations.summary import summarize
from migrations_app.actions import do_request_migrations
from migrations_app.models import Migration
from tests.factories import make_admin, make_vsp
from tests.migrations_app.guests import place_vm, runs_on, wait_for_state
from vms.models import VSP, AuditEvent

pytestmark = pytest.mark.django_db(transaction=True)

ENDED = ("completed", "aborted", "cancelled")
BUSY = {"memory_mib": 32, "fill_percent": 100}  # several seconds of Copy at the tests' link rate


def states_in_one_read(migrations: list[Migration]) -> list[str]:
    by_pk = dict(Migration.objects.filter(pk__in=[m.pk for m in migrations]).values_list("pk", "state"))
    return [by_pk[migration.pk] for migration in migrations]


def leaving(state: str) -> bool:
    return state in Migration.ACTIVE_STATES and state != Migration.State.QUEUED


def assert_completed_intact(migration: Migration) -> None:
    migration.refresh_from_db()
    assert migration.state == "completed", migration.alert
    assert migration.source_digest and migration.source_digest == migration.target_digest


def test_with_two_at_once_two_migrations_leave_one_source_together(
    host_agents, fleet, admin, migration_worker, wait_for
):
    VSP.objects.filter(pk=fleet["hosta"].pk).update(max_concurrent_migrations=2)
    first, second = place_vm(host_agents, fleet, **BUSY), place_vm(host_agents, fleet, **BUSY)

    migrations = [
        result.migration for result in do_request_migrations([first, second], fleet["hostc"], admin)
    ]

    assert wait_for(lambda: all(leaving(state) for state in states_in_one_read(migrations)), timeout=60), (
        states_in_one_read(migrations)
    )
    for migration in migrations:
        wait_for_state(wait_for, migration, *ENDED)
        assert_completed_intact(migration)
    assert first.current_vsp == second.current_vsp == fleet["hostc"]
    assert runs_on(host_agents["hostc"], first.name) and runs_on(host_agents["hostc"], second.name)


def test_with_one_at_once_the_second_migration_waits_for_the_first(
    host_agents, fleet, admin, migration_worker, wait_for
):
    assert fleet["hosta"].max_concurrent_migrations == 1  # the default
    first, second = place_vm(host_agents, fleet, **BUSY), place_vm(host_agents, fleet, **BUSY)

    migrations = [
        result.migration for result in do_request_migrations([first, second], fleet["hostc"], admin)
    ]
    wait_for_state(wait_for, migrations[0], "copy")

    assert states_in_one_read(migrations) == ["copy", "queued"]
    for migration in migrations:
        wait_for_state(wait_for, migration, *ENDED)
        assert_completed_intact(migration)
    assert migrations[1].init_started_at >= migrations[0].events.get(to_state="completed").at


def test_raising_the_number_at_once_in_the_admin_starts_a_waiting_migration_at_once(
    host_agents, fleet, admin, migration_worker, wait_for, client
):
    first = place_vm(host_agents, fleet, memory_mib=64, fill_percent=100)  # ~13 s of Copy
    second = place_vm(host_agents, fleet, **BUSY)
    migrations = [
        result.migration for result in do_request_migrations([first, second], fleet["hostc"], admin)
    ]
    wait_for_state(wait_for, migrations[0], "copy")
    assert states_in_one_read(migrations) == ["copy", "queued"]

    client.force_login(make_admin("root"))
    response = client.post(f"/admin/vms/vsp/{fleet['hosta'].pk}/change/", admin_form(fleet["hosta"], "2"))
    assert response.status_code == 302

    assert wait_for(lambda: all(leaving(state) for state in states_in_one_read(migrations)), timeout=60), (
        states_in_one_read(migrations)
    )
    for migration in migrations:
        wait_for_state(wait_for, migration, *ENDED)
        assert_completed_intact(migration)


def test_an_evacuation_sends_two_guests_at_once_when_the_vsp_allows_two(
    host_agents, fleet, admin, migration_worker, wait_for
):
    VSP.objects.filter(pk=fleet["hosta"].pk).update(max_concurrent_migrations=2)
    guests = [place_vm(host_agents, fleet, **BUSY) for _ in range(3)]
    vsp = VSP.objects.get(pk=fleet["hosta"].pk)
    plan = build_plan(vsp)
    evacuation = do_start_evacuation(vsp, {step.vm.pk: step.target.pk for step in plan.steps}, None, admin)

    assert wait_for(lambda: summarize(evacuation).count("running") == 2, timeout=60)

    def ended() -> bool:
        evacuation.refresh_from_db()
        return not evacuation.is_running

    assert wait_for(ended, timeout=120), summarize(evacuation).counts()
    summary = summarize(evacuation)
    assert evacuation.state == "finished" and summary.count_done == 3, summary.counts()
    for step, _ in summary.rows:
        assert step.migration is not None
        assert_completed_intact(step.migration)
    for vm in guests:
        vm.refresh_from_db()
        assert vm.current_vsp != fleet["hosta"]


@pytest.mark.parametrize(
    ("left", "at_once", "expected"),
    [([], 2, 0.0), ([10.0, 10.0, 10.0], 1, 30.0), ([10.0, 10.0, 10.0], 2, 20.0), ([4.0, 10.0, 3.0], 2, 10.0)],
)
def test_the_time_left_counts_the_migrations_that_run_together(left, at_once, expected):
    assert time_left_s(left, at_once) == expected


@pytest.mark.parametrize(
    ("value", "error"), [("0", "greater than or equal to 1"), ("9", "less than or equal to 8")]
)
def test_the_admin_refuses_a_number_at_once_outside_1_to_8_and_changes_nothing(client, value, error):
    vsp = make_vsp("h")
    client.force_login(make_admin())
    response = client.post(f"/admin/vms/vsp/{vsp.pk}/change/", admin_form(vsp, value))
    assert response.status_code == 200 and error in response.text
    vsp.refresh_from_db()
    assert vsp.max_concurrent_migrations == 1 and not AuditEvent.objects.exists()


def test_the_admin_sets_the_number_at_once_with_an_audit_event_and_the_page_shows_it(client):
    vsp = make_vsp("h")
    admin = make_admin()
    client.force_login(admin)

    assert client.post(f"/admin/vms/vsp/{vsp.pk}/change/", admin_form(vsp, "3")).status_code == 302

    vsp.refresh_from_db()
    assert vsp.max_concurrent_migrations == 3
    event = AuditEvent.objects.get(object_type="vms.vsp")
    assert (event.action, event.actor, event.via_admin) == ("changed", admin, True)
    assert (event.before, event.after) == ({"max_concurrent_migrations": 1}, {"max_concurrent_migrations": 3})
    page = client.get(f"/vsps/{vsp.pk}/").text
    assert 'data-field="max_concurrent_migrations">3 may leave h at the same time' in page


def admin_form(vsp: VSP, at_once: str) -> dict[str, str]:
    """The admin's VSP change form as a browser posts it, every field as it is but the number at once."""
    return {
        "name": vsp.name,
        "group": str(vsp.group_id or ""),
        "processor_family": vsp.processor_family,
        "processor_model": vsp.processor_model,
        "agent_url": vsp.agent_url,
        "agent_secret": "",
        "agent_certificate": vsp.agent_certificate,
        "migration_enabled": "on",
        "max_concurrent_migrations": at_once,
        "licensed": "on",
        "memory_mib": str(vsp.memory_mib),
        "cpus": str(vsp.cpus),
        "agent_reachable": "on",
    }
