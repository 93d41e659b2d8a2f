"""In real Chromium: the Migrate dialog recommends, keeps what was typed, and tells the loser who won.

Issue 21.4 and 21.8. Everything is real: the console (uvicorn), Redis, the bandwidth-capped Celery
worker (conftest) and three simulated host agents; the links are measured by the background sweep (its
task's function run here, as the worker runs it) before anyone opens the dialog. hostb has more memory
free than hostc, so with both converging hostb is the recommended target.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from migrations_app.models import LinkProbe, Migration
from migrations_app.tasks import probe_link, probe_unmeasured_links
from tests.conftest import log_in, run_in_thread
from tests.factories import PASSWORD, make_user, make_vm
from tests.migrations_app.conftest import MIGRATOR
from tests.migrations_app.guests import place_vm
from vms.models import VSP

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DOCS = Path(__file__).resolve().parents[2] / "docs"


def measure_links(fleet) -> None:
    """The background sweep and the probes it queues, as the worker runs them."""
    probe_unmeasured_links()
    for source, target in LinkProbe.objects.values_list("source__name", "target__name"):
        probe_link(fleet[source].pk, fleet[target].pk)


def open_dialog(browser, base_url: str, username: str, vm_id: int):
    page = browser.new_context(viewport={"width": 1366, "height": 1000}).new_page()
    page.set_default_timeout(30_000)
    log_in(page, base_url, username, PASSWORD)
    page.goto(f"{base_url}/vms/{vm_id}/general/")
    page.click("#migrate-button")
    dialog = page.locator("#migrate-dialog")
    dialog.locator("[data-field=recommended]").wait_for()
    return page, dialog


def field_error(dialog, key: str) -> str:
    return dialog.locator(f"#migrate-policy-error-{key}").inner_text().strip()


def test_the_dialog_recommends_keeps_what_was_typed_and_tells_the_loser_who_won(
    host_agents, fleet, migrating_console, browser
):
    run_in_thread(make_user, "maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    run_in_thread(make_user, "omar", permissions=(*MIGRATOR, "vms.view_vsp"))
    run_in_thread(lambda: VSP.objects.filter(name="hostc").update(memory_mib=1024))
    vm = run_in_thread(place_vm, host_agents, fleet, memory_mib=16, fill_percent=50, dirty_pages_per_s=0)
    run_in_thread(measure_links, fleet)
    maria, dialog = open_dialog(browser, migrating_console, "maria", vm.pk)

    # Each eligible target: its free memory and what is left after the move; the best one preselected.
    for name, free, left in (
        ("hostb", "4 GiB free", "4.0 GiB left after"),
        ("hostc", "1 GiB free", "1008 MiB"),
    ):
        row = dialog.locator(f'tr[data-vsp="{name}"]')
        row.locator("[data-field=verdict]").wait_for()
        assert row.locator("[data-field=free]").inner_text() == free
        assert row.locator("[data-field=left_after]").inner_text().startswith(left)
    hostb = dialog.locator('tr[data-vsp="hostb"]')
    assert hostb.locator("[data-field=recommended]").inner_text() == "Recommended"
    assert dialog.locator('tr[data-vsp="hostc"] [data-field=recommended]').count() == 0
    assert hostb.locator("input[type=radio]").is_checked()
    reason = dialog.locator("#migrate-recommendation").inner_text()
    assert reason.startswith("Recommended: hostb: it fits, its forecast converges"), reason
    assert "leaves the most memory free (4.0 GiB after the move)" in reason, reason
    assert "not known yet" not in dialog.inner_text()  # the links were measured before anyone asked
    maria.screenshot(path=str(DOCS / "migrate-dialog-recommended.png"), full_page=True)

    # The admin prefers hostc; two bad values at once are both said, and the forecast says it is the
    # last valid policy's.
    dialog.locator('tr[data-vsp="hostc"] input[type=radio]').check()
    dialog.locator("#migrate-policy summary").click()
    dialog.locator('input[name=preset][value="custom"]').check()
    dialog.locator("input[name=max_downtime_ms]").fill("0")
    dialog.locator("input[name=throttle_max_pct]").fill("120")
    dialog.locator("input[name=throttle_max_pct]").press("Tab")
    maria.wait_for_function(
        "() => document.querySelector('#migrate-policy-error-throttle_max_pct').textContent.trim() !== ''"
        " && document.querySelector('#migrate-policy-error-max_downtime_ms').textContent.trim() !== ''"
    )
    assert field_error(dialog, "max_downtime_ms").startswith("Maximum downtime: a whole number from 1")
    assert field_error(dialog, "throttle_max_pct").startswith("Throttle ceiling: a whole number from 1 to 99")
    note = dialog.locator("#forecast-note").inner_text()
    assert (
        note
        == "While 2 values below are not valid, the forecast shows the last valid policy (summarized below)."
    )
    dialog.locator("input[name=max_downtime_ms]").fill("300")
    dialog.locator("input[name=throttle_max_pct]").fill("99")
    dialog.locator("input[name=throttle_max_pct]").press("Tab")
    maria.wait_for_function("() => document.querySelector('#forecast-note').textContent.trim() === ''")
    assert field_error(dialog, "max_downtime_ms") == field_error(dialog, "throttle_max_pct") == ""

    # The bandwidth field takes in the browser exactly what the server takes.
    cap = dialog.locator("input[name=bandwidth_cap_mb_s]")
    for typed, valid in (("0.5", True), ("0", True), ("100000", True), ("0.0005", False), ("-1", False)):
        cap.fill(typed)
        assert cap.evaluate("input => input.checkValidity()") is valid, typed
    cap.fill("0.5")

    # A refusal the browser cannot see (a downtime ceiling under the allowed downtime): the dialog comes
    # back with hostc still chosen, every typed value kept and the error beside its field.
    dialog.locator("input[name=downtime_step_ms]").fill("100")
    dialog.locator("input[name=downtime_max_ms]").fill("200")
    dialog.locator("#migrate-submit").click()
    maria.locator("#migrate-dialog-error").wait_for()
    dialog = maria.locator("#migrate-dialog")
    assert dialog.locator('tr[data-vsp="hostc"] input[type=radio]').is_checked()
    assert dialog.locator("input[name=bandwidth_cap_mb_s]").input_value() == "0.5"
    assert dialog.locator("input[name=downtime_max_ms]").input_value() == "200"
    assert dialog.locator("input[name=downtime_step_ms]").input_value() == "100"
    assert field_error(dialog, "downtime_max_ms").startswith("The downtime ceiling (200 ms) must be at least")
    assert not run_in_thread(lambda: Migration.objects.exclude(state="refused").exists())

    # Two admins at once: omar's dialog is open when maria's migration starts; he is told who won.
    omar, omars_dialog = open_dialog(browser, migrating_console, "omar", vm.pk)
    dialog.locator("input[name=downtime_max_ms]").fill("2000")
    dialog.locator("#migrate-submit").click()
    maria.wait_for_selector("#migrate-dialog", state="detached")
    omars_dialog.locator("#migrate-submit").click()
    refusal = omar.locator("#migrate-dialog-blocked, #migrate-dialog-error").first
    refusal.wait_for()
    started = run_in_thread(lambda: Migration.objects.exclude(state="refused").get())
    at = started.requested_at.strftime("%H:%M")
    said = f"{vm.name} is already migrating to hostc, started by maria at {at} UTC."
    assert refusal.inner_text() == said
    assert omar.locator("#migrate-dialog").inner_text().count("is already migrating to hostc") == 1
    checks = omar.locator("#migrate-dialog [data-field=check] [aria-hidden=true]").all_inner_texts()
    assert set(checks) == {"Refused (see above)"}, checks  # the rows point at the one message

    # 21.8: the backdrop covers the window however far the page is scrolled, and the dialog's own
    # buttons can be reached in a window shorter than the dialog.
    omar.set_viewport_size({"width": 1366, "height": 420})
    omar.locator("#migrate-policy summary").click()
    omar.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    box = omar.evaluate(
        "() => { const r = document.querySelector('.dialog-backdrop').getBoundingClientRect();"
        " return [r.top, r.bottom, window.innerHeight]; }"
    )
    assert box[0] <= 0 and box[1] >= box[2], box
    omar.evaluate(
        "() => { const b = document.querySelector('.dialog-backdrop'); b.scrollTop = b.scrollHeight; }"
    )
    button = omar.evaluate(
        "() => document.querySelector('#migrate-dialog .dialog-actions').getBoundingClientRect().bottom"
    )
    assert button <= 420, button


def test_the_vm_list_sorts_as_people_read_and_the_evacuation_page_breathes(
    host_agents, fleet, migrating_console, browser
):
    """21.8: "Zeta" sorted before "alpha"; on the evacuation page headings and buttons touched the tables."""
    run_in_thread(make_user, "maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    for name in ("Zeta-db", "alpha-web", "Beta-app"):
        run_in_thread(make_vm, name, vsp=fleet["hostb"], memory_mib=64)
    page = browser.new_context(viewport={"width": 1366, "height": 1000}).new_page()
    log_in(page, migrating_console, "maria", PASSWORD)
    page.goto(f"{migrating_console}/")
    names = [name.strip() for name in page.locator("table tbody tr td:first-child").all_inner_texts()]
    ours = [name for name in names if name in ("Zeta-db", "alpha-web", "Beta-app")]
    assert ours == ["alpha-web", "Beta-app", "Zeta-db"], names

    page.goto(f"{migrating_console}/migrations/vsps/{fleet['hostb'].pk}/evacuate/")
    gaps = page.evaluate(
        """() => [...document.querySelectorAll('#evacuation-plan .panel')].map(panel => {
             const next = panel.nextElementSibling;
             return next ? next.getBoundingClientRect().top - panel.getBoundingClientRect().bottom : null;
           }).filter(gap => gap !== null)"""
    )
    assert gaps and min(gaps) >= 12, gaps


# Notes the event that made each forecast request of the dialog: "load" (its poll) or "linkprobed" (the
# pushed end of a link probe, static/js/console.js).
WATCH_FORECASTS = """
() => {
  window.__forecasts = [];
  document.body.addEventListener('htmx:beforeRequest', (event) => {
    const path = event.detail.requestConfig.path || '';
    if (path.includes('/forecast/')) {
      const trigger = event.detail.requestConfig.triggeringEvent;
      window.__forecasts.push(trigger ? trigger.type : null);
    }
  });
}
"""


def test_an_open_dialog_forecasts_with_a_link_probe_as_soon_as_it_ends(
    host_agents, fleet, migrating_console, browser
):
    """QA: the dialog showed a probe's result only at its next 3 s poll. The probe's end is pushed to the
    General tab; the dialog fetches its forecasts then (the poll stays the fallback)."""
    run_in_thread(make_user, "maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    vm = run_in_thread(place_vm, host_agents, fleet, memory_mib=16, fill_percent=50, dirty_pages_per_s=0)
    page = browser.new_context(viewport={"width": 1366, "height": 1000}).new_page()
    page.set_default_timeout(30_000)
    log_in(page, migrating_console, "maria", PASSWORD)
    page.goto(f"{migrating_console}/vms/{vm.pk}/general/")
    page.evaluate(WATCH_FORECASTS)
    page.click("#migrate-button")
    cell = page.locator(f"#forecast-{fleet['hostb'].pk}")
    cell.locator("text=not known yet").wait_for()  # the link: no migration nor probe between them

    run_in_thread(probe_link, fleet["hosta"].pk, fleet["hostb"].pk)
    # Measured, or refused by an agent busy with another test's migration: either way said at once.
    shown = f"document.querySelector('#forecast-{fleet['hostb'].pk}').textContent"
    page.wait_for_function(f"() => /in a probe|The last link probe failed/.test({shown})")
    assert "linkprobed" in page.evaluate("window.__forecasts"), page.evaluate("window.__forecasts")
