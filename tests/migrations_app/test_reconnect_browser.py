"""In real Chromium: a page whose progress socket drops says so, reconnects within seconds of the
server's return, and shows the current state at once (issue 10, "a page whose socket dropped").

The network cut is the console's web server going away (its process stopped) and coming back on the
same port; what changed meanwhile is written to the database, as a worker would.
"""

from __future__ import annotations

import pytest

from devtools import processes
from migrations_app.models import Migration
from tests.conftest import free_port, log_in, log_path, run_in_thread, subprocess_env
from tests.factories import (
    MIGRATION_ADMIN_PERMISSIONS,
    PASSWORD,
    make_migration,
    make_user,
    make_vm,
    make_vsp,
)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

NOTICE = "#connection-status"


def copying_vm():
    vsp1, vsp2 = make_vsp("vsp1"), make_vsp("vsp2")
    vm = make_vm("web01", vsp1)
    migration = make_migration(
        vm, vsp1, vsp2, state=Migration.State.COPY, init_percent=100, copy_percent=6, rounds=1
    )
    make_user("watcher", MIGRATION_ADMIN_PERMISSIONS)
    return vm, migration


def start_server(port: int) -> processes.ManagedProcess:
    return processes.start_console_server(
        port, log_path("uvicorn-reconnect"), "--log-level", "warning", env=subprocess_env()
    )


def test_a_dropped_socket_shows_a_notice_then_reconnects_with_the_current_state(
    django_db_setup, redis_url, browser_page
):
    vm, migration = run_in_thread(copying_vm)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = start_server(port)
    try:
        page = browser_page
        log_in(page, base_url, "watcher", PASSWORD)
        page.goto(f"{base_url}/vms/{vm.pk}/general/")
        page.wait_for_function("() => document.querySelector('#migration-phases') !== null")
        page.wait_for_timeout(500)  # the socket's snapshot has arrived
        assert page.locator(NOTICE).is_hidden()

        server.stop()
        page.wait_for_selector(f"{NOTICE}:not([hidden])", timeout=10_000)
        assert "Connection lost, reconnecting" in page.locator(NOTICE).inner_text()

        run_in_thread(lambda: Migration.objects.filter(pk=migration.pk).update(copy_percent=77, rounds=4))
        server = start_server(port)
        page.wait_for_selector(f"{NOTICE}[hidden]", state="attached", timeout=8_000)
        page.wait_for_function(
            "() => document.querySelector('#migration-phases tr[data-phase=Copy] [data-field=phase_percent]')"
            ".textContent.includes('77')",
            timeout=5_000,
        )
    finally:
        server.stop()
