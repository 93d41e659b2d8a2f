"""In real Chromium: the dialog forecasts per target, the page warns before the limit, a click rescues it.

Everything is real: the console (uvicorn), Redis, the bandwidth-capped Celery worker (5 MB/s, conftest)
and the simulated host agents. A first, idle migration hosta -> hostb gives the console that link's rate;
the hot guest then writes 12 MB/s into all of its 8 MiB, which that link cannot carry under the default
policy (it would stop at its round limit with the guest left on hosta).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from migrations_app.models import Migration, MigrationEvent
from tests.conftest import log_in, run_in_thread
from tests.factories import PASSWORD, make_user
from tests.migrations_app.conftest import MIGRATOR
from tests.migrations_app.guests import place_vm, runs_on
from tests.migrations_app.test_policies import HOT, complete_one_migration

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

READ_ONLY = ("vms.view_virtualmachine", "vms.view_vsp", "migrations_app.view_migration")
DOCS = Path(__file__).resolve().parents[2] / "docs"


def open_general_tab(browser, base_url: str, username: str, vm_id: int):
    page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
    page.set_default_timeout(30_000)
    log_in(page, base_url, username, PASSWORD)
    page.goto(f"{base_url}/vms/{vm_id}/general/")
    page.evaluate("window.__marker = 'no reload'")
    return page


def test_the_dialog_flags_a_hot_guest_and_a_rescue_click_completes_it_in_two_browsers(
    host_agents, fleet, migrating_console, browser, wait_for
):
    maria = run_in_thread(make_user, "maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    run_in_thread(make_user, "omar", permissions=(*MIGRATOR, "vms.view_vsp"))
    # Read-only (a viewer): watches the same pushes, and is shown no control it cannot use (QA: it was
    # shown Switch over now, Throttle, downtime, bandwidth cap and Cancel, each click a 403).
    run_in_thread(make_user, "rita", permissions=READ_ONLY)
    run_in_thread(complete_one_migration, host_agents, fleet, maria, wait_for)
    hot = run_in_thread(place_vm, host_agents, fleet, **HOT)
    admin = open_general_tab(browser, migrating_console, "maria", hot.pk)
    colleague = open_general_tab(browser, migrating_console, "omar", hot.pk)
    reader = open_general_tab(browser, migrating_console, "rita", hot.pk)

    admin.click("#migrate-button")
    dialog = admin.locator("#migrate-dialog")
    verdict = dialog.locator(f"#forecast-{fleet['hostb'].pk} [data-field=verdict]")
    verdict.wait_for()
    assert verdict.inner_text() == "Will not converge under this policy"
    assert "the guest writes faster" in dialog.locator(f"#forecast-{fleet['hostb'].pk}").inner_text()
    DOCS.mkdir(exist_ok=True)
    admin.screenshot(path=str(DOCS / "migrate-dialog-forecast.png"), full_page=True)
    dialog.locator('tr[data-vsp="hostb"] input').check()
    dialog.locator("#migrate-submit").click()  # asks first: nothing starts unconfirmed
    why = admin.locator("#migrate-confirm [data-field=why]")
    why.wait_for()
    assert why.inner_text().startswith(f"{hot.name} will not converge to hostb under this policy: "), why
    assert "Because the guest writes faster" in why.inner_text()
    assert not run_in_thread(lambda: Migration.objects.filter(vm=hot).exists())
    admin.locator("#migrate-anyway").click()  # started anyway
    admin.wait_for_selector("#migrate-dialog", state="detached")

    for page in (admin, colleague):
        warning = page.locator("#migration-warning [data-field=warning]")
        warning.wait_for(timeout=60_000)
        assert warning.inner_text().startswith("This migration will stop at ")
        assert page.locator("#migration-warning [data-field=rescue]").count() >= 1
    reader.locator("#migration-warning [data-field=warning]").wait_for(timeout=60_000)
    reader_rounds = int(reader.locator("#migration-phases [data-field=round]").inner_text())
    reader.wait_for_function(
        "() => parseInt(document.querySelector('#migration-phases [data-field=round]').textContent) > "
        f"{reader_rounds}"
    )  # pushed fragments arrived since the first render
    for control in (
        "#steer-switchover",
        "#steer-downtime",
        "#steer-bandwidth",
        ".migration-cancel",
        "#migrate-button",
    ):
        assert reader.locator(control).count() == 0, control
    assert colleague.locator("#steer-switchover").count() == 1
    admin.screenshot(path=str(DOCS / "general-tab-warning.png"), full_page=True)
    migration = run_in_thread(lambda: Migration.objects.get(vm=hot))
    assert migration.state == "copy", migration.alert  # warned before it stopped

    # The panel is redrawn on every push; what the admin is typing must survive it.
    downtime = colleague.locator(".migration-steer input[name=downtime_ms]")
    downtime.fill("4321")
    rounds = int(colleague.locator("#migration-phases [data-field=round]").inner_text())
    round_now = "parseInt(document.querySelector('#migration-phases [data-field=round]').textContent)"
    colleague.wait_for_function(f"() => {round_now} > {rounds}")
    assert downtime.input_value() == "4321", "a progress push wiped what the admin was typing"

    admin.click("#steer-switchover")  # the rescue: switch over now, accepting the longer freeze
    for page in (admin, colleague):
        page.wait_for_selector('#migration-phases[data-state="completed"]', timeout=120_000)
        assert page.evaluate("window.__marker") == "no reload"
        downtime = page.locator('#migration-phases [data-field="downtime"]').text_content()
        assert re.fullmatch(r"\d+ ms", downtime), downtime
    admin.screenshot(path=str(DOCS / "general-tab-rescued.png"), full_page=True)
    migration = run_in_thread(lambda: Migration.objects.get(pk=migration.pk))
    assert migration.state == "completed", migration.alert
    assert migration.source_digest and migration.source_digest == migration.target_digest
    assert runs_on(host_agents["hostb"], hot.name)
    changed = run_in_thread(
        lambda: (
            MigrationEvent.objects.filter(migration=migration, actor__username="maria")
            .filter(message__icontains="switch")
            .exists()
        )
    )
    assert changed, "the rescue is not recorded with who made it"


def test_a_rescue_is_one_click_with_the_value_it_shows_and_a_refusal_is_said_beside_the_form(
    host_agents, fleet, migrating_console, browser, wait_for
):
    """QA on reports01: "Raise the allowed downtime to 53.7 s" was plain text, the Allowed downtime box was
    empty, its button answered 400 at the top of the page, and the box later held another value than the
    suggestion. Here: the rescue is a button that submits what it says, the manual form shows the values
    in force, and a refusal is said beside the buttons, surviving the pushes that redraw the panel."""
    from migrations_app.actions import do_request_migration

    maria = run_in_thread(make_user, "maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    hot = run_in_thread(place_vm, host_agents, fleet, **HOT)
    admin = open_general_tab(browser, migrating_console, "maria", hot.pk)
    migration = run_in_thread(do_request_migration, hot, fleet["hostb"], maria)

    raise_button = admin.locator('#migration-warning [data-action="raise_downtime"] button')
    raise_button.wait_for(timeout=60_000)
    steer = admin.locator(".migration-steer")
    assert steer.locator("input[name=downtime_ms]").input_value() == "300"  # the policy in force
    assert steer.locator("input[name=bandwidth_cap_mb_s]").input_value() == ""  # no cap of its own

    # The field takes what the server takes (issue 21: it had no maximum)...
    cap = steer.locator("input[name=bandwidth_cap_mb_s]")
    cap.fill("1e15")
    assert cap.evaluate("input => input.checkValidity()") is False
    # ... and a value the server refuses all the same (a page of an older console lets it through) is
    # said beside the buttons, kept across pushes.
    cap.evaluate("input => input.removeAttribute('max')")
    admin.click("#steer-bandwidth")
    error = admin.locator(f"#migration-steer-error-{migration.pk} [data-field=steer_error]")
    error.wait_for()
    assert "Bandwidth cap: from 0.001 to 100000 MB/s in steps of 0.001 MB/s" in error.inner_text()
    assert admin.locator("#migration-notice .notice").count() == 0  # not at the top of the page
    rounds = int(admin.locator("#migration-phases [data-field=round]").inner_text())
    round_now = "parseInt(document.querySelector('#migration-phases [data-field=round]').textContent)"
    admin.wait_for_function(f"() => {round_now} > {rounds}")
    assert error.is_visible(), "a progress push wiped the refusal"

    label = raise_button.inner_text()
    match = re.fullmatch(r"Raise the allowed downtime to (\d+(?:\.\d)?) (s|ms)", label)
    assert match, label
    expected_ms = round(float(match.group(1)) * (1000 if match.group(2) == "s" else 1))
    cost = admin.locator('#migration-warning [data-action="raise_downtime"] [data-field=rescue_cost]')
    assert cost.inner_text().startswith("frozen about ")
    raise_button.click()  # one click, nothing typed
    admin.wait_for_selector('#migration-phases[data-state="completed"]', timeout=120_000)
    assert admin.evaluate("window.__marker") == "no reload"
    done = run_in_thread(lambda: Migration.objects.get(pk=migration.pk))
    assert done.state == "completed", done.alert
    assert done.policy["max_downtime_ms"] == expected_ms, (label, done.policy)
    assert run_in_thread(
        lambda: MigrationEvent.objects.filter(
            migration=done,
            actor__username="maria",
            message__contains=f"raised the allowed downtime to {match.group(1)}",
        ).exists()
    )
