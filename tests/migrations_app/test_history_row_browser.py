"""In real Chromium: the General tab's history row follows the end of a migration live, a cancel too.

Everything is real: the console (uvicorn), Redis, the bandwidth-capped Celery worker (conftest) and
the simulated host agents. QA found the row still saying "Running" after a cancel until a reload.
"""

from __future__ import annotations

import re

import pytest

from migrations_app.actions import do_request_migration
from migrations_app.models import Migration
from tests.conftest import log_in, run_in_thread
from tests.factories import PASSWORD, make_user
from tests.migrations_app.conftest import MIGRATOR
from tests.migrations_app.guests import place_vm, wait_for_state

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

ROW = "#vm-migration-history tr[data-migration='{pk}']"


def test_a_cancel_turns_the_history_row_to_cancelled_without_a_reload(
    host_agents, fleet, migrating_console, browser, wait_for
):
    maria = run_in_thread(make_user, "maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    # 128 MiB at 5 MB/s and written faster than the link carries: Copy lasts long past the click.
    vm = run_in_thread(place_vm, host_agents, fleet, memory_mib=128, fill_percent=100, dirty_pages_per_s=3000)
    migration = run_in_thread(do_request_migration, vm, fleet["hostb"], maria)
    run_in_thread(wait_for_state, wait_for, migration, "copy")

    page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
    page.set_default_timeout(30_000)
    log_in(page, migrating_console, "maria", PASSWORD)
    page.goto(f"{migrating_console}/vms/{vm.pk}/general/")
    page.evaluate("window.__marker = 'no reload'")
    outcome = page.locator(ROW.format(pk=migration.pk) + " [data-field=outcome]")
    assert outcome.inner_text().startswith("Running")
    # QA: a frozen "Total time 22.0 s" while it ran; the phases panel counts, the row says it runs.
    total = page.locator(ROW.format(pk=migration.pk) + " [data-field=total]")
    assert total.inner_text() == "running"

    page.once("dialog", lambda dialog: dialog.accept())  # "Cancel the migration of ...?"
    page.click(".migration-cancel button")
    page.wait_for_selector(ROW.format(pk=migration.pk) + "[data-outcome=cancelled]", timeout=60_000)
    assert outcome.inner_text().startswith("Cancelled")
    assert re.fullmatch(r"\d+\.\d s", total.inner_text()), total.inner_text()
    assert page.evaluate("window.__marker") == "no reload"
    assert run_in_thread(lambda: Migration.objects.get(pk=migration.pk).state) == "cancelled"
    assert page.locator("#migration-phases").is_hidden()


def test_the_migrations_list_follows_a_running_row_to_its_end_and_then_stops_asking(
    host_agents, fleet, migrating_console, browser, wait_for
):
    """QA: after a cancel the Migrations page still said "Running (Copy)" until reloaded. The list (with
    its filter kept) redraws itself while a row on it runs, and stops once none does."""
    from migrations_app.actions import do_cancel_migration

    maria = run_in_thread(
        make_user, "maria", permissions=(*MIGRATOR, "vms.view_vsp", "migrations_app.view_migration")
    )
    vm = run_in_thread(place_vm, host_agents, fleet, memory_mib=128, fill_percent=100, dirty_pages_per_s=3000)
    migration = run_in_thread(do_request_migration, vm, fleet["hostb"], maria)
    run_in_thread(wait_for_state, wait_for, migration, "copy")

    page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
    page.set_default_timeout(30_000)
    log_in(page, migrating_console, "maria", PASSWORD)
    page.goto(f"{migrating_console}/migrations/history/?vm={vm.name}")
    page.evaluate("window.__marker = 'no reload'")
    row = f"#history-table tr[data-migration='{migration.pk}']"
    assert page.locator(f"{row} [data-field=outcome]").inner_text() == "Running (Copy)"
    assert page.locator(f"{row} [data-field=total]").inner_text().startswith("running, ")
    assert page.locator("#history-live[data-live=true]").count() == 1

    run_in_thread(do_cancel_migration, migration, maria)
    page.wait_for_selector(f"{row}[data-outcome=cancelled]", timeout=60_000)
    assert page.locator(f"{row} [data-field=outcome]").inner_text() == "Cancelled"
    assert page.evaluate("window.__marker") == "no reload"
    assert (
        page.locator("#history-live").count() == 1 and page.locator("#history-live[data-live]").count() == 0
    )
    assert page.locator("#history-table tbody tr").count() == 1  # the filter held across the redraws
    assert page.input_value("#history-filters [name=vm]") == vm.name
