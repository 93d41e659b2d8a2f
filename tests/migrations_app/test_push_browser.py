"""In real Chromium: what live progress shows each watcher, and that a page is true again after its
socket comes back.

Everything is real: the console (uvicorn), Redis, a Celery worker (bandwidth-capped, see conftest) and
host agents (simulated guests).

1. Issue 17/18.14: a Lab-only viewer of a guest that has a Not Runnable copy on a Lab host, watching its
   General tab, gets no phases of a migration between two Production hosts (while a Production operator
   watching the same tab sees them rise) and never sees a Production host named.
2. Issue 18.6: a VSP page whose socket dropped (the web server stopped) from Copy until after the
   migration completed shows the truth once the socket is back: the guest is Not Runnable on the source
   and listed on the target.
"""

from __future__ import annotations

import pytest

from devtools import processes
from migrations_app.actions import do_request_migration
from migrations_app.models import Migration
from tests.conftest import log_in, log_path, run_in_thread, subprocess_env
from tests.factories import PASSWORD, VIEW_PERMISSIONS, make_host_group, make_not_runnable_copy, make_user
from tests.migrations_app.conftest import MIGRATOR
from tests.migrations_app.guests import place_vm
from vms.models import VSP, Role

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Counts the frames the socket brought and notes every phases panel shown.
RECORD = """
() => {
  window.__frames = 0;
  window.__phases = [];
  document.body.addEventListener('htmx:wsAfterMessage', () => { window.__frames += 1; });
  new MutationObserver(() => {
    const section = document.getElementById('migration-phases');
    if (section && !section.hidden && section.dataset.state) window.__phases.push(section.dataset.state);
  }).observe(document.body, {childList: true, subtree: true, attributes: true});
}
"""


def open_page(browser, base_url: str, username: str, path: str):
    page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
    page.set_default_timeout(30_000)
    log_in(page, base_url, username, PASSWORD)
    page.goto(f"{base_url}{path}")
    page.evaluate(RECORD)
    page.wait_for_function("() => document.querySelector('[ws-connect]') !== null")
    return page


def split_groups(fleet) -> None:
    """hosta and hostb in Production, hostc in Lab; a Production operator and a Lab-only viewer."""
    prod, lab = make_host_group("Production"), make_host_group("Lab")
    VSP.objects.filter(pk__in=[fleet["hosta"].pk, fleet["hostb"].pk]).update(group=prod)
    VSP.objects.filter(pk=fleet["hostc"].pk).update(group=lab)
    make_user("boss", (*MIGRATOR, "vms.view_vsp"), role=Role.OPERATOR, group=prod)
    make_user("labby", (*VIEW_PERMISSIONS, "migrations_app.view_migration"), role=Role.VIEWER, group=lab)


def request(vm, target_name: str, username: str) -> Migration:
    from django.contrib.auth.models import User

    target = VSP.objects.get(name=target_name)
    return do_request_migration(vm, target, User.objects.get(username=username))


def test_a_lab_only_watcher_gets_no_phases_of_a_production_migration(
    host_agents, fleet, migrating_console, browser
):
    run_in_thread(split_groups, fleet)
    vm = run_in_thread(place_vm, host_agents, fleet, memory_mib=32, fill_percent=100)
    run_in_thread(make_not_runnable_copy, vm, fleet["hostc"])
    general = f"/vms/{vm.pk}/general/"
    boss = open_page(browser, migrating_console, "boss", general)
    lab = open_page(browser, migrating_console, "labby", general)
    assert "hostc" in lab.locator("#general-tab").inner_text()  # he sees the guest through his copy

    migration = run_in_thread(request, vm, "hostb", "boss")
    boss.wait_for_selector('#migration-phases[data-state="copy"]')
    boss.wait_for_selector('#migration-phases[data-state="completed"]', timeout=90_000)
    assert run_in_thread(lambda: Migration.objects.get(pk=migration.pk).state) == "completed"
    lab.wait_for_function("() => window.__frames >= 3")  # the pushes reached his socket too...
    assert lab.evaluate("window.__phases") == []  # ...and never drew a phase of it
    assert lab.locator("#migration-phases").is_hidden()
    text = lab.content()
    for production in ("hosta", "hostb", "boss"):
        assert production not in text, production
    assert "copy" in boss.evaluate("window.__phases")


def test_a_vsp_page_is_true_again_after_its_socket_comes_back(
    host_agents, fleet, migration_worker, settings, browser
):
    port = processes.free_port()
    env = subprocess_env(MIGRATION_QUEUE=settings.MIGRATION_QUEUE)

    def serve() -> processes.ManagedProcess:
        return processes.start_console_server(
            port, log_path("uvicorn-resync"), "--log-level", "warning", env=env
        )

    server = serve()
    base_url = f"http://127.0.0.1:{port}"
    try:
        run_in_thread(make_user, "maria", permissions=(*MIGRATOR, "vms.view_vsp"))
        vm = run_in_thread(place_vm, host_agents, fleet, memory_mib=40, fill_percent=100)
        source = open_page(browser, base_url, "maria", f"/vsps/{fleet['hosta'].pk}/")
        target = open_page(browser, base_url, "maria", f"/vsps/{fleet['hostb'].pk}/")
        row = f'#virtual-machines-tab tr[data-vm="{vm.name}"]'
        assert source.locator(f"{row} [data-field=hardware_status]").get_attribute("data-value") == "on"
        assert target.locator(row).count() == 0

        migration = run_in_thread(request, vm, "hostb", "maria")
        source.wait_for_function(
            f"() => (document.querySelector('#vm-{vm.pk}-migration') || {{}}).textContent?.includes('%')"
        )
        server.stop()  # every socket drops (1006); the pages try again every 0.5-3 s
        source.wait_for_selector("#connection-status:not([hidden])")

        def completed() -> bool:
            return Migration.objects.get(pk=migration.pk).state == "completed"

        assert run_in_thread(processes.wait_until, completed, 90), "the migration did not complete"
        frames = {page: page.evaluate("window.__frames") for page in (source, target)}
        server = serve()  # the sockets come back
        for page in (source, target):
            page.wait_for_selector("#connection-status", state="hidden")
            page.wait_for_function(f"() => window.__frames > {frames[page]}")
        target.wait_for_selector(row)  # listed on the target...
        source.wait_for_selector(
            f'{row} [data-field=hardware_status][data-value="not_runnable"]'
        )  # ...not On here
        assert target.locator(f"{row} [data-field=hardware_status]").get_attribute("data-value") == "on"
    finally:
        server.stop()


def copying_vm():
    from tests.factories import MIGRATION_ADMIN_PERMISSIONS, make_migration, make_vm, make_vsp

    vsp1, vsp2 = make_vsp("gap-vsp1"), make_vsp("gap-vsp2")
    vm = make_vm("gap01", vsp1)
    migration = make_migration(vm, vsp1, vsp2, state=Migration.State.COPY, init_percent=100, copy_percent=6)
    make_user("gapwatcher", MIGRATION_ADMIN_PERMISSIONS)
    return vm, migration


def push(migration_id: int, *, dropped: bool = False) -> None:
    """Publish as the worker does; ``dropped``: the version is spent but the message never arrives (what
    channels-redis does to a full channel or across a Redis failover)."""
    from asgiref.sync import async_to_sync

    from migrations_app.progress import build_progress_messages, send_messages

    messages = build_progress_messages(migration_id)
    if not dropped:
        async_to_sync(send_messages)(messages)


def test_a_page_that_missed_a_push_notices_the_gap_and_fetches_the_state(console_server, browser_page):
    from vms.models import VirtualMachine

    vm, migration = run_in_thread(copying_vm)
    page = browser_page
    log_in(page, console_server, "gapwatcher", PASSWORD)
    page.goto(f"{console_server}/vms/{vm.pk}/general/")
    page.evaluate(RECORD)
    page.wait_for_function("() => document.querySelector('#migration-phases[data-state=copy]') !== null")
    page.wait_for_timeout(500)  # the socket's first frame (the baseline) has arrived
    os_status = "#general-tab [data-field=os_status]"
    assert page.locator(os_status).get_attribute("data-value") == "up"

    # Only what the General tab's own fetch shows changes (no push carries the OS status)...
    run_in_thread(lambda: VirtualMachine.objects.filter(pk=vm.pk).update(os_status="in_efi"))
    run_in_thread(push, migration.pk)  # version 1 after the baseline's 0: nothing missed
    page.wait_for_function("() => window.__frames >= 1")
    page.wait_for_timeout(1000)
    assert page.locator(os_status).get_attribute("data-value") == "up"  # no re-fetch without a gap

    run_in_thread(push, migration.pk, dropped=True)  # version 2 lost on the way
    run_in_thread(push, migration.pk)  # version 3 arrives: the page knows it missed one
    page.wait_for_selector(f'{os_status}[data-value="in_efi"]')  # ...and fetched the whole tab
