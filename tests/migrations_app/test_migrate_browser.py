"""In real Chromium: migrate a VM from its General tab and watch the phases fill live, in two browsers.

Everything is real: the console (uvicorn), Redis, a Celery worker and two host agents (simulated
guests). The console here is started like the shared ``console_server`` but sends ``run_migration``
to the migration worker's queue, whose data plane is capped (see conftest) so Copy lasts seconds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from migrations_app.models import Migration
from tests.conftest import log_in, run_in_thread
from tests.factories import PASSWORD, make_user
from tests.migrations_app.conftest import MIGRATOR
from tests.migrations_app.guests import place_vm

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DOCS = Path(__file__).resolve().parents[2] / "docs"
PHASES = ["Init", "Copy", "I/O Quiesce", "Frozen"]

# Records every version of the phases section the page shows, and what Refresh Data swapped in.
RECORD_PHASES = """
() => {
  const read = () => {
    const section = document.getElementById('migration-phases');
    if (!section || section.hidden) return null;
    const percents = {};
    section.querySelectorAll('tr[data-phase]').forEach(row => {
      percents[row.dataset.phase] = parseInt(row.querySelector('[data-field=phase_percent]').textContent);
    });
    const text = name => (section.querySelector(`[data-field=${name}]`) || {}).textContent;
    return {state: section.dataset.state, percents, sent: text('bytes_sent'), round: text('round')};
  };
  window.__seen = [];
  window.__marker = 'no reload';
  new MutationObserver(() => {
    const now = read();
    const last = window.__seen[window.__seen.length - 1];
    if (now && JSON.stringify(now) !== JSON.stringify(last)) window.__seen.push(now);
  }).observe(document.body, {childList: true, subtree: true});
  document.body.addEventListener('htmx:afterSwap', event => {
    if (event.detail.pathInfo.requestPath.includes('/refresh/')) window.__refreshed = read();
  });
}
"""


def open_watcher(browser, base_url: str, vm_id: int):
    page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
    page.set_default_timeout(20_000)
    log_in(page, base_url, "maria", PASSWORD)
    page.goto(f"{base_url}/vms/{vm_id}/general/")
    page.evaluate(RECORD_PHASES)
    return page


def field(page, name: str) -> str:
    return page.locator(f'#general-tab [data-field="{name}"]').first.inner_text().strip()


def test_it_migrates_from_the_browser_with_live_phases_in_two_browsers(
    host_agents, fleet, migrating_console, browser
):
    run_in_thread(make_user, "maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    vm = run_in_thread(place_vm, host_agents, fleet, memory_mib=48, fill_percent=100, dirty_pages_per_s=300)
    admin = open_watcher(browser, migrating_console, vm.pk)
    colleague = open_watcher(browser, migrating_console, vm.pk)
    assert admin.locator("#migration-phases").is_hidden()

    admin.click("#migrate-button")
    dialog = admin.locator("#migrate-dialog")
    assert "Same host" in dialog.locator('tr[data-vsp="hosta"]').inner_text()
    assert dialog.locator('tr[data-vsp="hosta"] input').is_disabled()
    dialog.locator('tr[data-vsp="hostb"] input').check()
    dialog.locator("#migrate-submit").click()
    admin.wait_for_selector("#migrate-dialog", state="detached")  # the dialog closes, nothing reloads

    copy_percent = "document.querySelector('#migration-phases tr[data-phase=Copy] .phase-percent')"
    admin.wait_for_function(
        f"() => {copy_percent} && parseInt({copy_percent}.textContent) >= 15", timeout=30_000
    )
    DOCS.mkdir(exist_ok=True)
    admin.screenshot(path=str(DOCS / "general-tab-migrating.png"), full_page=True)
    admin.click("#refresh-data")
    admin.wait_for_function("() => window.__refreshed !== undefined")
    refreshed = admin.evaluate("window.__refreshed")

    for page in (admin, colleague):
        page.wait_for_selector('#migration-phases[data-state="completed"]', timeout=60_000)
    admin.wait_for_function(
        "() => document.querySelector('#general-tab [data-field=vsp]').innerText === 'hostb'"
    )
    # The end-of-migration re-fetch moves the breadcrumb too, and folds the phases into one line.
    assert admin.locator("#vm-breadcrumb [data-field=breadcrumb_vsp]").inner_text() == "hostb"
    assert (
        admin.locator("#migration-phases [data-field=last_migration]")
        .inner_text()
        .startswith("Last migration: completed to VSP hostb at ")
    )
    admin.screenshot(path=str(DOCS / "general-tab-after.png"), full_page=True)

    migration = run_in_thread(lambda: Migration.objects.get(vm=vm))
    assert migration.state == "completed", migration.alert
    for page in (admin, colleague):
        assert page.evaluate("window.__marker") == "no reload"
        seen = page.evaluate("window.__seen")
        for phase in PHASES:
            percents = [snapshot["percents"][phase] for snapshot in seen]
            assert min(percents) < 100 and percents[-1] == 100, (phase, percents)
            assert percents == sorted(percents), f"{phase} went backwards: {percents}"
        copy_steps = {snapshot["percents"]["Copy"] for snapshot in seen} - {0, 100}
        assert len(copy_steps) >= 2, f"Copy did not rise live: {sorted(copy_steps)}"
        # Folded into "Phase details" once over; the visible line says the downtime too.
        assert page.locator('#migration-phases [data-field="downtime"]').text_content().endswith(" ms")
        assert re.search(
            r", downtime \d+ ms\.$",
            page.locator('#migration-phases [data-field="last_migration"]').inner_text(),
        )
    assert refreshed in colleague.evaluate("window.__seen"), "Refresh Data showed numbers never pushed"

    assert field(admin, "vsp") == "hostb" and field(admin, "hardware_status") == "On"
    source_copy = admin.locator('#other-registrations tr[data-vsp="hosta"]')
    assert source_copy.locator('[data-field="hardware_status"]').inner_text() == "Not Runnable"
    assert source_copy.locator('[data-field="not_runnable_set_by"]').inner_text() == "Migrate"
    assert (
        source_copy.locator('[data-field="not_runnable_reason"]').inner_text()
        == "guest migrated to VSP hostb"
    )

    admin.goto(f"{migrating_console}/vsps/{fleet['hosta'].pk}/")
    row = admin.locator(f'tr[data-vm="{vm.name}"]')
    assert row.locator('[data-field="hardware_status"]').inner_text() == "Not Runnable"
    assert "Migrated to hostb" in row.inner_text()
    admin.goto(f"{migrating_console}/vms/{vm.pk}/general/?vsp={fleet['hosta'].pk}")
    assert (field(admin, "hardware_status"), field(admin, "not_runnable_set_by")) == (
        "Not Runnable",
        "Migrate",
    )
    assert field(admin, "not_runnable_reason") == "guest migrated to VSP hostb"


# Records, per VM row of a VSP's Virtual Machines tab, every migration text and icon it shows.
RECORD_ROWS = """
() => {
  window.__rows = {};
  window.__marker = 'no reload';
  const read = () => document.querySelectorAll('.migration-row-status').forEach(cell => {
    const icon = cell.querySelector('.migration-icon');
    const now = (icon ? icon.getAttribute('aria-label') + ' | ' : '') + cell.textContent.trim();
    const seen = window.__rows[cell.id] = window.__rows[cell.id] || [];
    if (now && seen[seen.length - 1] !== now) seen.push(now);
  });
  new MutationObserver(read).observe(document.body, {childList: true, subtree: true});
}
"""


def test_selected_vms_leave_one_at_a_time_with_live_icons_on_the_vsp_tab(
    host_agents, fleet, migrating_console, browser, artifact_dir
):
    run_in_thread(make_user, "maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    vms = [run_in_thread(place_vm, host_agents, fleet, memory_mib=24, fill_percent=100) for _ in range(2)]
    page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
    page.set_default_timeout(20_000)
    log_in(page, migrating_console, "maria", PASSWORD)
    page.goto(f"{migrating_console}/vsps/{fleet['hosta'].pk}/")
    for vm in vms:
        page.locator(f'tr[data-vm="{vm.name}"] input[name="vm"]').check()
    page.select_option("#migrate-selected-target", label="hostb")
    page.click("#migrate-selected-button")
    page.wait_for_load_state("networkidle")
    page.evaluate(RECORD_ROWS)
    page.screenshot(path=str(artifact_dir / "vsp-tab-migrate-selected.png"), full_page=True)

    for vm in vms:
        cell = f"document.getElementById('vm-{vm.pk}-migration')"
        page.wait_for_function(f"() => {cell}.textContent.includes('Migrated to hostb')", timeout=60_000)

    assert page.evaluate("window.__marker") == "no reload"
    rows = page.evaluate("window.__rows")
    first, second = (rows[f"vm-{vm.pk}-migration"] for vm in vms)
    assert any(text.startswith("Migrating to VSP hostb | ") for text in first), first
    assert any(text.startswith("Waiting to migrate to VSP hostb | ") for text in second), second
    assert any(text.startswith("Migrating to VSP hostb | ") for text in second), second
    migrations = run_in_thread(lambda: list(Migration.objects.filter(vm__in=vms).order_by("pk")))
    assert [migration.state for migration in migrations] == ["completed", "completed"]
    for vm in vms:  # the ended migrations made the tab re-fetch itself: the rows' hardware status too
        badge = f"document.querySelector('tr[data-vm=\"{vm.name}\"] [data-field=hardware_status]')"
        page.wait_for_function(f"() => {badge}.textContent === 'Not Runnable'")
    assert migrations[1].init_started_at >= migrations[0].state_changed_at  # one at a time
    page.screenshot(path=str(artifact_dir / "vsp-tab-after-migrate-selected.png"), full_page=True)


def test_the_dialog_forecasts_again_as_the_policy_is_changed_in_it(
    host_agents, fleet, console_server, browser
):
    """The QA's reports01 case in Chromium: the saved policy caps a hot guest below what it writes (will
    not converge); ticking Auto-converge in the dialog picks Custom and forecasts every target again, the
    summary line follows; a bad value says why beside its field and leaves the cells alone."""
    run_in_thread(make_user, "maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    vm = run_in_thread(place_vm, host_agents, fleet, memory_mib=8, fill_percent=100, dirty_pages_per_s=3000)
    vm.migration_policy = {"preset": "custom", "bandwidth_cap_mb_s": 5}
    run_in_thread(vm.save, update_fields=["migration_policy"])
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    # The progress socket's first message (the current state) replaces the Migrate button and the
    # dialog's slot: a click before it lands loses the dialog, so the test clicks after it.
    context.add_init_script(
        "document.addEventListener('htmx:wsAfterMessage', () => { window.__socketSpoke = true; });"
    )
    page = context.new_page()
    page.set_default_timeout(20_000)
    log_in(page, console_server, "maria", PASSWORD)
    page.goto(f"{console_server}/vms/{vm.pk}/general/")
    page.wait_for_function("() => window.__socketSpoke === true", timeout=30_000)
    page.click("#migrate-button")
    cell = page.locator("#migrate-dialog tr[data-vsp=hostc] [data-field=forecast]")
    page.wait_for_function(
        "() => document.querySelector('#migrate-dialog tr[data-vsp=hostc] [data-field=verdict]')",
        timeout=30_000,
    )
    assert cell.inner_text().startswith("Will not converge"), cell.inner_text()
    words = page.locator("#migrate-policy-words")
    assert "no throttling" in words.inner_text()

    page.locator("#migrate-policy summary").click()
    page.locator('#migrate-policy input[name="auto_converge"]').check()
    page.wait_for_function(
        "() => document.querySelector('#migrate-policy-words').innerText.includes('throttles the guest')",
        timeout=30_000,
    )
    assert page.locator('#migrate-policy input[name="preset"][value="custom"]').is_checked()
    page.wait_for_function(
        "() => !document.querySelector('#migrate-dialog tr[data-vsp=hostc] [data-field=forecast]')"
        ".innerText.startsWith('Will not converge')",
        timeout=30_000,
    )
    throttled = cell.inner_text()
    assert "throttl" in throttled.lower(), throttled

    page.locator('#migrate-policy input[name="downtime_step_ms"]').fill("100")
    page.locator('#migrate-policy input[name="downtime_step_ms"]').dispatch_event("change")
    error = page.locator("#migrate-policy-error-downtime_max_ms")
    page.wait_for_function(
        "() => document.querySelector('#migrate-policy-error-downtime_max_ms').innerText.length > 0",
        timeout=30_000,
    )
    assert "Downtime escalation needs a ceiling" in error.inner_text()
    assert cell.inner_text() == throttled  # the cells keep the last good forecast
    assert "throttles the guest" in words.inner_text()
