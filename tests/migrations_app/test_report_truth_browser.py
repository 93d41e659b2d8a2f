"""In real Chromium (issues 18.7 and 18.8): after a migration that froze its guest longer than allowed,
and a later change of the VM's limits, the Migrations list, the report and the General tab's Alerts say
what was true when it ran: the limits it ran under, and the downtime over the allowed one, by how much
and why.

Everything is real: the console (uvicorn), Redis, the bandwidth-capped Celery worker and the simulated
host agents; the guest never converges, so an administrator switches it over mid-Copy.
"""

from __future__ import annotations

import pytest

from migrations_app import steering
from migrations_app.actions import do_request_migration
from migrations_app.models import Migration
from tests.api.test_steering_api import HOT
from tests.conftest import log_in, run_in_thread
from tests.factories import PASSWORD, make_admin
from tests.migrations_app.guests import place_vm, wait_for_state

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def switched_over_and_limits_raised(host_agents, fleet, wait_for) -> Migration:
    boss = make_admin("boss")
    vm = place_vm(host_agents, fleet, vm_fields={"init_limit_s": 7, "copy_limit_s": 90}, **HOT)
    migration = do_request_migration(vm, fleet["hostb"], boss)
    assert wait_for(lambda: Migration.objects.get(pk=migration.pk).rounds >= 2, timeout=60)
    steering.do_change_migration(migration, {"action": "switchover"}, boss)
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled", timeout=120)
    assert migration.state == "completed" and migration.downtime_ms > 300, migration.alert
    vm.init_limit_s, vm.copy_limit_s = 30, None  # raised and removed after it ran
    vm.save(update_fields=["init_limit_s", "copy_limit_s"])
    return migration


def test_the_list_report_and_alerts_say_what_was_true_when_it_ran(
    host_agents, fleet, migrating_console, browser, wait_for
):
    migration = run_in_thread(switched_over_and_limits_raised, host_agents, fleet, wait_for)
    page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
    page.set_default_timeout(30_000)
    log_in(page, migrating_console, "boss", PASSWORD)

    page.goto(f"{migrating_console}/migrations/history/?vm={migration.vm_name}")
    flag = page.locator(f"#history-table tr[data-migration='{migration.pk}'] [data-field=downtime_over]")
    assert flag.inner_text().endswith("over the allowed 300 ms")
    assert flag.get_attribute("title") == migration.alert

    page.goto(f"{migrating_console}/migrations/history/{migration.pk}/report/")
    assert page.locator("tr[data-phase=Init] [data-field=limit]").inner_text() == "7 s"
    assert page.locator("tr[data-phase=Copy] [data-field=limit]").inner_text() == "90 s"
    why = page.locator("[data-field=downtime_why]").inner_text()
    assert why == migration.alert and "an administrator asked to switch over before Copy converged" in why
    assert "MB were still to send when the guest froze" in why

    page.goto(f"{migrating_console}/vms/{migration.vm_id}/general/")
    alert = page.locator("#migration-alerts [data-field=alert]")
    assert alert.is_visible() and alert.inner_text() == migration.alert
