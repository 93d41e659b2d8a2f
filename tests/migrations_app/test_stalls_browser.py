"""In real Chromium: an open General tab tells the truth after the source is lost in Committing (issue 18
item 3): it leaves "Switching over" for the completion with the pending release, pushed, no reload.

Real host agents of the test's own (the source killed with SIGKILL), a real console server; the roll
forward is recovery's (its worker gone too), run here as the beat would run it.
"""

from __future__ import annotations

import pytest

from migrations_app.tasks import recover_migrations
from tests.conftest import log_in, run_in_thread
from tests.factories import PASSWORD, make_user
from tests.migrations_app.conftest import MIGRATOR, vsps_for
from tests.migrations_app.test_stalls import committed_then_worker_gone, own_agents  # noqa: F401  (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.faults, pytest.mark.django_db(transaction=True)]


def test_the_open_tab_shows_the_completion_with_its_pending_release(
    own_agents,  # noqa: F811
    console_server,
    browser_page,
):
    _, agents = own_agents

    def committing():
        fleet = vsps_for(agents)
        admin = make_user("watcher", MIGRATOR + ("migrations_app.view_migration",))
        return committed_then_worker_gone(agents, fleet, admin)

    migration, vm = run_in_thread(committing)
    page = browser_page
    log_in(page, console_server, "watcher", PASSWORD)
    page.goto(f"{console_server}/vms/{vm.pk}/general/")
    summary = page.locator("[data-field=migration_summary]")
    assert "Switching over to VSP hostb" in summary.inner_text()
    page.wait_for_timeout(500)  # the socket's snapshot has arrived

    agents["hosta"].kill()
    assert run_in_thread(recover_migrations, stale_after_s=5) == [migration.pk]

    page.wait_for_selector("[data-field=last_migration]", timeout=10_000)
    assert "completed to VSP hostb" in page.locator("[data-field=last_migration]").inner_text()
    alert = page.locator("#migration-alerts [data-field=alert]").inner_text()
    assert "the source host hosta did not answer after the commit" in alert
    assert "release of its old copy on hosta is pending" in alert
    assert "Switching over" not in page.locator("body").inner_text()
