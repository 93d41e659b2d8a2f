"""Reports of real migrations: real host agents (simulated guests), a real Celery worker, real Redis;
the browser test adds the console (uvicorn) and Chromium, and watches the convergence chart grow live.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from migrations_app.actions import do_request_migration
from migrations_app.models import Migration
from tests.conftest import log_in, run_in_thread
from tests.factories import PASSWORD, make_user
from tests.migrations_app.conftest import MIGRATOR
from tests.migrations_app.guests import place_vm, wait_for_state

DOCS = Path(__file__).resolve().parents[2] / "docs"
REPORTER = (*MIGRATOR, "migrations_app.view_migration", "vms.view_vsp")


@pytest.mark.django_db(transaction=True)
def test_a_completed_real_migration_has_a_full_report_and_one_sample_per_round(
    host_agents, fleet, migration_worker, wait_for
):
    alice = make_user("alice", permissions=REPORTER)
    vm = place_vm(host_agents, fleet, memory_mib=16, fill_percent=100, dirty_pages_per_s=300)
    migration = do_request_migration(vm, fleet["hostb"], alice)
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled", timeout=90)
    assert migration.state == "completed", migration.alert

    client = Client()
    client.force_login(alice)
    html = client.get(reverse("migration_history:report", args=[migration.pk])).content.decode()
    assert f"Migration of {vm.name} from hosta to hostb requested" in html and "by alice" in html
    for phase in ("Copy", "I/O Quiesce", "Frozen"):
        assert f"{phase} phase started" in html
    assert 'data-kind="commit"' in html and 'data-kind="complete"' in html
    assert f"{migration.downtime_ms} ms" in html and "(allowed 300 ms)" in html

    data = client.get(reverse("migration_history:report_data", args=[migration.pk])).json()
    rounds = data["series"]["round"]
    assert rounds and rounds == sorted(set(rounds)), f"not one sample per round: {rounds}"
    assert rounds[-1] == migration.rounds
    assert data["series"]["bytes_sent"] == sorted(data["series"]["bytes_sent"])
    assert data["series"]["t_s"][0] >= 0 and data["series"]["t_s"] == sorted(data["series"]["t_s"])
    assert data["series"]["bytes_sent"][-1] == migration.bytes_sent
    listed = client.get(reverse("migration_history:list"), {"vm": vm.name}).content.decode()
    assert f'data-migration="{migration.pk}" data-outcome="completed"' in listed


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_a_report_opened_while_the_migration_runs_draws_its_chart_live(
    host_agents, fleet, migrating_console, browser
):
    alice = run_in_thread(make_user, "alice", permissions=REPORTER)
    vm = run_in_thread(place_vm, host_agents, fleet, memory_mib=48, fill_percent=100, dirty_pages_per_s=300)
    migration = run_in_thread(do_request_migration, vm, fleet["hostb"], alice)

    page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
    page.set_default_timeout(30_000)
    log_in(page, migrating_console, "alice", PASSWORD)
    page.goto(f"{migrating_console}/vms/{vm.pk}/general/")
    running = page.locator('#migrate-control [data-field="running_migration"]')
    running.wait_for()
    assert running.inner_text().startswith("Migration to VSP hostb running: started by alice at ")
    assert page.locator("#migrate-button").is_disabled()

    page.goto(f"{migrating_console}/migrations/history/{migration.pk}/report/")
    assert page.locator("#migration-report").get_attribute("data-active") == "true"
    # Pushed progress makes the page re-read its samples: the chart's updates count rises while it runs.
    page.wait_for_function(
        "() => parseInt(document.getElementById('convergence-chart').dataset.updates || '0') >= 2",
        timeout=60_000,
    )
    page.wait_for_selector("#convergence-chart canvas")
    first_rounds = int(page.locator("#convergence-chart").get_attribute("data-rounds"))
    page.wait_for_function(
        f"() => parseInt(document.getElementById('convergence-chart').dataset.rounds) > {first_rounds}",
        timeout=60_000,
    )
    # At the end the page reloads once with the final report, the chart kept from the stored samples.
    page.wait_for_selector('#migration-report[data-active="false"]', timeout=90_000)
    page.wait_for_selector("#convergence-chart canvas")
    final = run_in_thread(lambda: Migration.objects.get(pk=migration.pk))
    assert final.state == "completed", final.alert
    assert int(page.locator("#convergence-chart").get_attribute("data-rounds")) == len(final.round_samples)
    assert "Completed" in page.locator('[data-field="outcome"]').inner_text()
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "migration-report.png"), full_page=True)
