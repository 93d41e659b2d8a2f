"""In real Chromium: the admin evacuates a VSP from its page, reviews the plan, watches it run live.

Everything is real: the console (uvicorn), Redis, a Celery worker (bandwidth-capped, see conftest) and
three host agents (simulated guests). Screenshots go to ``docs/`` for the README.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evacuations.models import Evacuation
from tests.conftest import log_in, run_in_thread
from tests.factories import PASSWORD, make_user, make_vm
from tests.migrations_app.conftest import MIGRATOR
from tests.migrations_app.guests import place_vm, runs_on
from vms.models import VSP, Registration

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DOCS = Path(__file__).resolve().parents[2] / "docs"

# Notes every "done" count the panel shows, to prove the page changed by itself (no reload).
RECORD_DONE = """
() => {
  window.__marker = 'no reload';
  window.__done = [];
  new MutationObserver(() => {
    const done = document.querySelector('[data-count=done]');
    const value = done && done.textContent;
    if (value !== null && window.__done[window.__done.length - 1] !== value) window.__done.push(value);
  }).observe(document.body, {childList: true, subtree: true});
}
"""


def build_fleet(host_agents, fleet):
    movers = [place_vm(host_agents, fleet, memory_mib=24, fill_percent=100) for _ in range(3)]
    hosta = fleet["hosta"]
    stayers = {
        "vpar-db": make_vm("vpar-db", vsp=hosta, kind="vpar", memory_mib=256),
        "cold-spare": make_vm("cold-spare", vsp=hosta, hardware_status="off", memory_mib=128),
        "pinned-app": make_vm("pinned-app", vsp=hosta, online_migration_enabled=False, memory_mib=128),
    }
    return movers, stayers


def test_the_admin_evacuates_a_vsp_and_watches_it_live(host_agents, fleet, migrating_console, browser):
    run_in_thread(make_user, "maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    movers, stayers = run_in_thread(build_fleet, host_agents, fleet)
    hosta = fleet["hosta"]
    page = browser.new_context(viewport={"width": 1366, "height": 1000}).new_page()
    page.set_default_timeout(30_000)
    log_in(page, migrating_console, "maria", PASSWORD)

    page.goto(f"{migrating_console}/vsps/{hosta.pk}/")
    page.click("#evacuate-link")
    page.wait_for_selector("#evacuation-plan")
    steps = page.locator("#plan-steps tbody tr")
    assert sorted(steps.evaluate_all("rows => rows.map(row => row.dataset.vm)")) == sorted(
        vm.name for vm in movers
    )
    for vm in movers:
        row = page.locator(f'#plan-steps tr[data-vm="{vm.name}"]')
        target = row.locator("select[data-field=target] option:checked").inner_text()
        assert target in ("hostb", "hostc")
        assert row.locator("[data-field=predicted]").inner_text() == "not known yet"
    reasons = {
        name: page.locator(f'#plan-staying tr[data-vm="{name}"] [data-field=reason]').inner_text()
        for name in stayers
    }
    assert reasons == {
        "vpar-db": "vPars do not migrate",
        "cold-spare": "powered off: online migration moves running guests only",
        "pinned-app": "online migration is disabled for this VM",
    }
    assert "Predicted total" in page.locator("#plan-total").inner_text()
    page.screenshot(path=str(DOCS / "evacuation-plan.png"), full_page=True)

    page.click("#start-evacuation")
    page.wait_for_selector("#evacuation-progress[data-state=running]")
    assert page.locator("#maintenance-badge").inner_text() == "In maintenance"
    page.evaluate(RECORD_DONE)
    page.wait_for_selector('#evacuation-steps tr[data-status="running"]')
    page.screenshot(path=str(DOCS / "evacuation.png"), full_page=True)
    page.wait_for_selector("#evacuation-progress[data-state=finished]", timeout=120_000)

    assert page.evaluate("() => window.__marker") == "no reload"
    assert page.evaluate("() => window.__done")[-1] == "3"
    assert len(page.evaluate("() => window.__done")) >= 2  # it counted up while the page was open
    summary = page.locator("#evacuation-summary").inner_text()
    assert summary == "Summary: 3 moved; 0 failed; 3 stayed."
    statuses = page.locator("#evacuation-steps tr").evaluate_all(
        "rows => Object.fromEntries(rows.filter(r => r.dataset.vm)"
        ".map(r => [r.dataset.vm, r.dataset.status]))"
    )
    assert statuses == {
        **{vm.name: "done" for vm in movers},
        **{name: "stays" for name in stayers},
    }
    assert page.locator("#maintenance-badge").is_visible()
    assert page.locator("#leave-maintenance").is_visible()

    def after() -> tuple[list[str], bool, str]:
        running_here = Registration.objects.filter(vsp=hosta, hardware_status="on", vm__kind="vm")
        movable = [r.vm.name for r in running_here if r.vm.online_migration_enabled]
        return movable, VSP.objects.get(pk=hosta.pk).maintenance, Evacuation.objects.get().state

    assert run_in_thread(after) == ([], True, "finished")
    for vm in movers:
        assert not runs_on(host_agents["hosta"], vm.name)


# An init script (run as is on every page of the context): notes when the page's websocket opens.
SOCKET_OPEN = """
window.__socketOpen = false;
document.addEventListener('htmx:wsOpen', () => { window.__socketOpen = true; });
"""


def test_a_page_opened_before_the_evacuation_shows_it_start_cancel_and_leave_maintenance_live(
    host_agents, fleet, migrating_console, browser
):
    """QA: browser B had /vsps/1/ open when browser A started the evacuation of vsp1: B's rows moved but it
    kept "Maintenance: No" and "Evacuate…" and never showed the panel, even after the cancel. Now the VSP's
    push group tells B's page to re-fetch its overview when the evacuation starts, is cancelled or ends,
    and when the VSP leaves maintenance; B never reloads."""
    run_in_thread(make_user, "maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    run_in_thread(make_user, "bob", permissions=(*MIGRATOR, "vms.view_vsp"))
    # Large enough that the three take a while at the worker's capped bandwidth: the cancel finds work.
    run_in_thread(lambda: [place_vm(host_agents, fleet, memory_mib=64, fill_percent=100) for _ in range(3)])
    hosta = fleet["hosta"]
    vsp_page = f"{migrating_console}/vsps/{hosta.pk}/"

    watcher_context = browser.new_context(viewport={"width": 1366, "height": 1000})
    watcher_context.add_init_script(SOCKET_OPEN)
    watcher = watcher_context.new_page()
    watcher.set_default_timeout(30_000)
    log_in(watcher, migrating_console, "bob", PASSWORD)
    watcher.goto(vsp_page)
    watcher.wait_for_function("() => window.__socketOpen === true")
    watcher.evaluate("() => { window.__marker = 'no reload'; }")
    maintenance = watcher.locator("[data-field=maintenance]")
    assert maintenance.inner_text() == "No"
    assert watcher.locator("#evacuate-link").is_visible()
    assert watcher.locator("#evacuation-progress").count() == 0

    admin = browser.new_context(viewport={"width": 1366, "height": 1000}).new_page()
    admin.set_default_timeout(30_000)
    log_in(admin, migrating_console, "maria", PASSWORD)
    admin.goto(f"{migrating_console}/migrations/vsps/{hosta.pk}/evacuate/")
    admin.click("#start-evacuation")
    admin.wait_for_selector("#evacuation-progress[data-state=running]")

    watcher.wait_for_selector("#evacuation-progress[data-state=running]", timeout=60_000)
    assert maintenance.inner_text().startswith("In maintenance since")
    assert watcher.locator("#maintenance-badge").is_visible()
    assert watcher.locator("#evacuate-link").count() == 0
    assert watcher.locator("#cancel-evacuation").is_visible()  # bob's own rights: he may cancel too

    admin.click("#cancel-evacuation")
    watcher.wait_for_selector("#evacuation-progress[data-state=cancelled]", timeout=120_000)
    assert "Summary:" in watcher.locator("#evacuation-summary").inner_text()
    assert watcher.locator("#evacuate-link").is_visible()
    assert watcher.locator("#leave-maintenance").is_visible()
    assert maintenance.inner_text().startswith("In maintenance since")

    admin.click("#leave-maintenance")
    watcher.wait_for_function(
        "() => document.querySelector('[data-field=maintenance]').textContent === 'No'", timeout=60_000
    )
    assert watcher.locator("#maintenance-badge").count() == 0
    assert watcher.locator("#leave-maintenance").count() == 0
    assert watcher.evaluate("() => window.__marker") == "no reload"


def arriving_fleet(host_agents, fleet, user):
    """Issue 18.1 as the testers saw it: a guest copying from hostb to hosta (96 MiB filled at 5 MB/s:
    its Copy lasts a while) with a Not Runnable copy left on hosta, and one resident guest on hosta."""
    from migrations_app.actions import do_request_migration
    from tests.conftest import wait_until

    resident = place_vm(host_agents, fleet, memory_mib=16)
    guest = place_vm(host_agents, fleet, on="hostb", memory_mib=96, fill_percent=100)
    Registration.objects.create(
        vm=guest,
        vsp=fleet["hosta"],
        hardware_status="not_runnable",
        not_runnable_set_by="migrate",
        not_runnable_reason="guest migrated to VSP hostb",
    )
    incoming = do_request_migration(guest, fleet["hosta"], user)

    def copying() -> bool:
        incoming.refresh_from_db()
        return incoming.state == "copy"

    assert wait_until(copying, 60)
    return resident, guest


def test_the_plan_and_summary_say_what_happens_to_a_guest_arriving_at_the_evacuated_vsp(
    host_agents, fleet, migrating_console, browser
):
    user = run_in_thread(make_user, "maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    resident, guest = run_in_thread(arriving_fleet, host_agents, fleet, user)
    hosta = fleet["hosta"]
    page = browser.new_context(viewport={"width": 1366, "height": 1000}).new_page()
    page.set_default_timeout(30_000)
    log_in(page, migrating_console, "maria", PASSWORD)

    page.goto(f"{migrating_console}/migrations/vsps/{hosta.pk}/evacuate/")
    words = page.locator(f'#plan-arriving tr[data-vm="{guest.name}"] [data-field=words]').inner_text()
    assert words.startswith("Arriving: migrating here from hostb (Copy): the evacuation waits for it to land")
    assert "if its migration does not complete, it stays on hostb" in words
    assert "The evacuation waits for each to land, then moves it on" in page.inner_text(
        "#plan-arriving-intro"
    )
    assert page.locator(f'#plan-staying tr[data-vm="{guest.name}"]').count() == 0
    assert page.locator(f'#plan-steps tr[data-vm="{resident.name}"]').count() == 1

    page.click("#start-evacuation")
    page.wait_for_selector("#evacuation-progress[data-state=running]")
    arriving = page.locator(f'#evacuation-steps tr[data-vm="{guest.name}"] [data-field=status]')
    assert arriving.inner_text().startswith("Arriving from hostb: moved on to host")
    page.wait_for_selector("#evacuation-progress[data-state=finished]", timeout=120_000)

    assert page.locator("#evacuation-summary").inner_text() == "Summary: 2 moved; 0 failed; 0 stayed."
    statuses = page.locator("#evacuation-steps tr").evaluate_all(
        "rows => Object.fromEntries(rows.filter(r => r.dataset.vm)"
        ".map(r => [r.dataset.vm, r.dataset.status]))"
    )
    assert statuses == {resident.name: "done", guest.name: "done"}
    assert not runs_on(host_agents["hosta"], guest.name)
    assert runs_on(host_agents["hostb"], guest.name) or runs_on(host_agents["hostc"], guest.name)
