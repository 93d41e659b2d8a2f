"""In real Chromium: leaving maintenance after an evacuation offers the return plan; the guests come back.

Everything is real: the console (uvicorn), Redis, a Celery worker (bandwidth-capped, see conftest) and
three host agents (simulated guests). The screenshot goes to ``docs/``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evacuations.actions import do_start_evacuation
from evacuations.models import Evacuation
from evacuations.plan import build_plan
from tests.conftest import log_in, run_in_thread, wait_until
from tests.factories import PASSWORD, make_user
from tests.migrations_app.conftest import MIGRATOR
from tests.migrations_app.guests import place_vm, runs_on

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DOCS = Path(__file__).resolve().parents[2] / "docs"


def evacuate(host_agents, fleet):
    """hosta's two guests evacuated for real; returns them and where each went, once it has finished."""
    maria = make_user("maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    movers = [place_vm(host_agents, fleet, memory_mib=24, fill_percent=50) for _ in range(2)]
    plan = build_plan(fleet["hosta"])
    targets = {step.vm.pk: step.target.pk for step in plan.steps}
    evacuation = do_start_evacuation(fleet["hosta"], targets, None, maria)

    def ended() -> bool:
        evacuation.refresh_from_db()
        return not evacuation.is_running

    assert wait_until(ended, timeout=120)
    where = {}
    for vm in movers:
        vm.refresh_from_db()
        where[vm.name] = vm.current_vsp.name
    return movers, where


def test_leaving_maintenance_offers_the_return_and_the_guests_come_back(
    host_agents, fleet, migrating_console, browser
):
    movers, where = run_in_thread(evacuate, host_agents, fleet)
    assert set(where.values()) <= {"hostb", "hostc"}
    hosta = fleet["hosta"]
    page = browser.new_context(viewport={"width": 1366, "height": 1000}).new_page()
    page.set_default_timeout(30_000)
    log_in(page, migrating_console, "maria", PASSWORD)

    page.goto(f"{migrating_console}/vsps/{hosta.pk}/")
    page.click("#leave-maintenance")
    page.wait_for_selector("#return-intro")
    assert "/return/" in page.url
    for vm in movers:
        row = page.locator(f'#plan-steps tr[data-vm="{vm.name}"]')
        assert row.locator("[data-field=from]").inner_text() == where[vm.name]
    assert page.locator("#start-evacuation").inner_text() == "Bring them back"
    assert page.locator("#start-evacuation").is_enabled()
    page.screenshot(path=str(DOCS / "return-plan.png"), full_page=True)

    page.click("#start-evacuation")
    page.wait_for_selector("#evacuation-progress [data-field=kind]")
    assert page.locator("#evacuation-progress [data-field=kind]").inner_text() == "Return of guests"
    page.wait_for_selector("#evacuation-progress[data-state=finished]", timeout=120_000)
    assert "2 moved; 0 failed" in page.locator("#evacuation-summary").inner_text()

    def back() -> tuple[list[str], str]:
        names = []
        for vm in movers:
            vm.refresh_from_db()
            names.append(vm.current_vsp.name)
        return names, Evacuation.objects.first().kind

    assert run_in_thread(back) == (["hosta", "hosta"], "return")
    for vm in movers:
        assert runs_on(host_agents["hosta"], vm.name)
        assert not runs_on(host_agents[where[vm.name]], vm.name)


def busy_fleet(host_agents, fleet):
    """hosta holds reports01, which writes about 20 MB/s under a 10 MB/s cap (it will not converge), and
    the idle db01; earlier migrations measured hosta's links."""
    from tests.factories import make_migration, make_vm

    make_user("maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    capped = {"preset": "custom", "bandwidth_cap_mb_s": 10}
    busy = place_vm(
        host_agents,
        fleet,
        memory_mib=64,
        fill_percent=50,
        dirty_pages_per_s=5000,
        vm_fields={"name": "reports01", "migration_policy": capped},
    )
    place_vm(host_agents, fleet, memory_mib=48, fill_percent=5, vm_fields={"name": "db01"})
    earlier = make_vm("earlier", vsp=fleet["hostb"], memory_mib=16, hardware_status="off")
    for target in (fleet["hostb"], fleet["hostc"]):
        make_migration(earlier, fleet["hosta"], target, state="completed", throughput_bytes_s=50_000_000)
    return busy


def test_start_it_anyway_enables_start_without_update_plan(host_agents, fleet, migrating_console, browser):
    """QA: ticking "start it anyway" left Start disabled until Update plan; now the tick enables it, and
    the evacuation starts with that guest confirmed. The total leaves the guest that will not converge out."""
    busy = run_in_thread(busy_fleet, host_agents, fleet)
    hosta = fleet["hosta"]
    page = browser.new_context(viewport={"width": 1366, "height": 1000}).new_page()
    page.set_default_timeout(30_000)
    log_in(page, migrating_console, "maria", PASSWORD)
    page.goto(f"{migrating_console}/migrations/vsps/{hosta.pk}/evacuate/")
    page.wait_for_selector('tr[data-warning-for="reports01"]')
    start = page.locator("#start-evacuation")
    assert start.is_disabled()
    assert "not counting 1 guest forecast not to converge" in page.locator("#plan-total").inner_text()
    page.check(f'input[name="confirm_{busy.pk}"]')
    assert start.is_enabled()
    page.uncheck(f'input[name="confirm_{busy.pk}"]')
    assert start.is_disabled()
    page.check(f'input[name="confirm_{busy.pk}"]')
    start.click()
    page.wait_for_selector("#evacuation-progress[data-state=running]")
    page.click("#cancel-evacuation")  # reports01 would run until its limit: not this test's subject
    page.wait_for_selector("#evacuation-progress[data-state=cancelled]", timeout=120_000)

    def confirmed() -> list[str]:
        from vms.models import AuditEvent

        return AuditEvent.objects.get(action="evacuation_started").after["confirmed"]

    assert run_in_thread(confirmed) == ["reports01: will_not_converge"]
