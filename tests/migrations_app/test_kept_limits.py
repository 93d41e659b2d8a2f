"""Issue 18.7: a migration keeps the phase limits and the policy in force when it ran.

QA: a migration that aborted at an Init limit of 2 s showed "Init 2.1 s | 10 s" once the VM's limit was
raised back. The first tests run real migrations (real worker, Redis, simulated host agents) and change
the VM's limits afterwards (raised for Init, removed for Copy, while it ran); the report page and the API
show the limits it ran under. A row recorded before limits were kept says its limit is today's; the
upgrade keeps the limits of the migrations still running.
"""

from __future__ import annotations

import re

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.urls import reverse
from django.utils import timezone

from migrations_app.actions import do_request_migration
from migrations_app.models import Migration
from tests.api.conftest import ApiClient
from tests.api.test_steering_api import HOT
from tests.factories import make_migration, make_vm, make_vsp
from tests.migrations_app.guests import place_vm, wait_for_state
from tests.migrations_app.test_faults import paused

LIVE = pytest.mark.django_db(transaction=True)


def limit_cell(html: str, phase: str) -> str:
    row = re.search(rf'<tr data-phase="{phase}"[^>]*>(.*?)</tr>', html, re.S)
    assert row, html
    cell = re.search(r'data-field="limit">(.*?)</td>', row.group(1), re.S)
    assert cell
    return re.sub(r"<[^>]+>", "", cell.group(1)).strip()


@pytest.fixture
def api():
    from api.tokens import do_create_token
    from tests.factories import make_admin

    return ApiClient(do_create_token(make_admin("api-admin"), "t")[1])


@LIVE
@pytest.mark.faults
def test_an_init_aborted_at_2_s_still_reads_2_s_after_the_vm_limit_is_raised(
    host_agents, fleet, admin, migration_worker, wait_for, admin_client, api
):
    vm = place_vm(host_agents, fleet, vm_fields={"init_limit_s": 2})
    with paused(host_agents["hostb"]):  # the target does not prepare: Init runs over its 2 s
        migration = do_request_migration(vm, fleet["hostb"], admin)
        wait_for_state(wait_for, migration, "aborted", "cancelled", "completed", timeout=30)
    assert (migration.failed_phase, migration.failure_kind) == ("init", "time_limit")

    vm.init_limit_s = 10
    vm.save(update_fields=["init_limit_s"])

    html = admin_client.get(reverse("migration_history:report", args=[migration.pk])).content.decode()
    assert limit_cell(html, "Init") == "2 s"
    assert re.search(r'<tr data-phase="Init" class="over-limit">', html)
    assert "the one in force then was not recorded" not in html
    phases = {phase["phase"]: phase for phase in api.get(f"/migrations/{migration.pk}").json()["phases"]}
    assert (phases["init"]["limit_s"], phases["init"]["limit_recorded"]) == (2, True)
    assert api.get(f"/vms/{vm.name}").json()["phase_time_limits_s"]["init"] == 10  # the VM's own: today's


@LIVE
@pytest.mark.faults
def test_a_copy_limit_removed_while_it_runs_changes_neither_its_run_nor_its_report(
    host_agents, fleet, admin, migration_worker, wait_for, admin_client, api
):
    """The guest never converges: it stops at the 4 s Copy limit it was requested with, although the
    VM's Copy limit was removed (unlimited) and its policy default changed meanwhile."""
    vm = place_vm(host_agents, fleet, vm_fields={"copy_limit_s": 4}, **HOT)
    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_for, migration, "copy")
    vm.copy_limit_s = None
    vm.migration_policy = {"preset": "minimal_downtime", "max_downtime_ms": 100}
    vm.save(update_fields=["copy_limit_s", "migration_policy"])

    wait_for_state(wait_for, migration, "aborted", "cancelled", "completed", timeout=60)
    assert (migration.failed_phase, migration.failure_kind) == ("copy", "time_limit"), migration.alert
    assert "time limit of 4 s" in migration.alert

    html = admin_client.get(reverse("migration_history:report", args=[migration.pk])).content.decode()
    assert limit_cell(html, "Copy") == "4 s"
    assert "(allowed 300 ms)" in html and "at most 300 ms frozen" in html  # its policy, not the VM's new one
    phases = {phase["phase"]: phase for phase in api.get(f"/migrations/{migration.pk}").json()["phases"]}
    assert phases["copy"]["limit_s"] == 4


@pytest.mark.django_db
def test_a_migration_from_before_kept_limits_says_its_limit_is_the_vms_of_today(admin_client, api):
    hosta, hostb = make_vsp("hosta"), make_vsp("hostb")
    vm = make_vm("old01", hosta, init_limit_s=10)
    start = timezone.now()
    old = make_migration(
        vm, hosta, hostb, state="aborted", failed_phase="init", init_started_at=start, init_ended_at=start
    )
    assert old.phase_limits == {}

    html = admin_client.get(reverse("migration_history:report", args=[old.pk])).content.decode()

    assert limit_cell(html, "Init") == ("10 s (the VM's limit today: the one in force then was not recorded)")
    phases = {phase["phase"]: phase for phase in api.get(f"/migrations/{old.pk}").json()["phases"]}
    assert (phases["init"]["limit_s"], phases["init"]["limit_recorded"]) == (10, False)


BEFORE = [("migrations_app", "0013_policy_help_text_names_its_module")]


def test_the_upgrade_keeps_the_limits_of_migrations_still_running(latest_schema):
    """An upgrade while a migration runs: it keeps the limits it runs under (the VM's then); an ended one
    keeps none (they were not recorded), so its report says so rather than claim today's."""
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    old_apps = executor.loader.project_state(BEFORE).apps
    OldMigration = old_apps.get_model("migrations_app", "Migration")  # noqa: N806 - a model class
    hosta, hostb = make_vsp("hosta"), make_vsp("hostb")
    vm = make_vm("web01", hosta, init_limit_s=7, copy_limit_s=None, quiesce_limit_s=20, frozen_limit_s=30)
    running = OldMigration.objects.create(vm_id=vm.pk, source_id=hosta.pk, target_id=hostb.pk, state="copy")
    ended = OldMigration.objects.create(vm_id=vm.pk, source_id=hosta.pk, target_id=hostb.pk, state="aborted")

    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())

    assert Migration.objects.get(pk=running.pk).phase_limits == {
        "init": 7,
        "copy": None,
        "io_quiesce": 20,
        "frozen": 30,
    }
    assert Migration.objects.get(pk=ended.pk).phase_limits == {}
