"""In real Chromium against the real `make run` stack: the demo admin evacuates vsp1 (issue 13 acceptance).

`scripts/run_console.py` starts what a new user gets (four simulated host agents with the demo fleet,
uvicorn, Celery worker and beat) on this test's own ports and var/ directory; the admin logs in with the
password it generated, reviews the plan, starts it and watches it to the end; then the history lists
the migrations under the admin's name and one report shows its timeline and convergence chart.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import log_in
from tests.test_make_run import MakeRun

pytestmark = [pytest.mark.browser, pytest.mark.faults]

# The demo's vsp1 (vms/demo.py): what leaves, and what stays with the reason the plan gives.
LEAVING = {"web01", "web02", "db01"}
STAYING = {
    "build01": "powered off: online migration moves running guests only",
    "vpar-erp": "vPars do not migrate",
    "mail01": "Not Runnable copy here: guest migrated to VSP vsp2; nothing runs to move",
}


@pytest.fixture
def demo_console(tmp_path, redis_url):
    run = MakeRun(tmp_path / "var", redis_url)
    run.start()
    yield run
    run.signal_group(signal.SIGTERM)
    try:
        run.process.wait(timeout=60)
    finally:
        for pid in run.started():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_demo_admin_evacuates_vsp1_from_make_run(demo_console, browser):
    base_url = f"http://127.0.0.1:{demo_console.port}"
    password = (demo_console.var_dir / "admin-password").read_text().strip()
    page = browser.new_context(viewport={"width": 1366, "height": 1000}).new_page()
    page.set_default_timeout(30_000)
    log_in(page, base_url, "admin", password)

    page.goto(f"{base_url}/vsps/")
    page.click("text=vsp1")
    page.click("#evacuate-link")
    page.wait_for_selector("#evacuation-plan")
    guest_rows = page.locator("#plan-steps tbody tr[data-vm]")  # (a warning row follows a warned step)
    planned = set(guest_rows.evaluate_all("rows => rows.map(r => r.dataset.vm)"))
    assert planned == LEAVING
    for name in LEAVING:
        row = page.locator(f'#plan-steps tr[data-vm="{name}"]')
        assert row.locator("select[data-field=target] option:checked").inner_text() in ("vsp2", "vsp3")
        assert row.locator("[data-field=predicted]").inner_text()
    staying = page.locator("#plan-staying tr[data-vm]").evaluate_all(
        "rows => Object.fromEntries(rows.map(r => "
        "[r.dataset.vm, r.querySelector('[data-field=reason]').innerText]))"
    )
    assert set(staying) == set(STAYING), staying
    assert staying == STAYING
    assert "Predicted total" in page.locator("#plan-total").inner_text()

    page.click("#start-evacuation")
    page.wait_for_selector("#evacuation-progress[data-state=running]")
    assert page.locator("#maintenance-badge").inner_text() == "In maintenance"
    page.wait_for_selector("#evacuation-progress[data-state=finished]", timeout=300_000)
    summary = page.locator("#evacuation-summary").inner_text()
    assert summary == f"Summary: {len(LEAVING)} moved; 0 failed; {len(STAYING)} stayed.", summary
    assert page.locator("#leave-maintenance").is_visible()

    page.goto(f"{base_url}/vsps/")
    page.click("text=vsp1")
    running_here = page.locator('tr[data-vm] [data-field="hardware_status"]').evaluate_all(
        "cells => cells.map(c => [c.closest('tr').dataset.vm, c.innerText.trim()])"
    )
    assert not [name for name, status in running_here if name in LEAVING and status == "On"], running_here
    assert page.locator("#maintenance-badge").is_visible()

    page.goto(f"{base_url}/migrations/history/")
    rows = page.locator("#history-table tbody tr")
    seen = rows.evaluate_all("rows => rows.map(r => r.innerText)")
    for name in LEAVING:
        assert any(name in row and "admin" in row and "Completed" in row for row in seen), seen
    rows.filter(has_text="db01").first.locator("a", has_text="Report").click()
    timeline = page.locator("#timeline").inner_text()
    assert "requested" in timeline.lower() and "Completed" in timeline, timeline
    page.wait_for_selector("#convergence-chart canvas")
    assert int(page.locator("#convergence-chart").get_attribute("data-rounds")) >= 1
