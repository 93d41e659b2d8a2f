"""In real Chromium: an admin sets up a host group and adds a VSP from the console, not the Django admin.

The VSP's agent is a real ``python -m hostagent`` started by the test (TLS, the test CA's certificate);
the console is a real uvicorn on the test database. Screenshots go to ``docs/``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import log_in, run_in_thread
from tests.factories import PASSWORD, make_admin, make_user
from tests.hostagent.conftest import AgentFactory, define_running_guest
from vms.models import VSP, AuditEvent, HostGroupMembership

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_admin_adds_a_host_group_and_a_vsp_from_the_console(console_server, browser, tmp_path):
    factory = AgentFactory(tmp_path)
    agent = factory("rack7", "--driver-option", "capacity_mib=32768")
    try:
        define_running_guest(agent, "rack7-web", memory_mib=128)
        run_in_thread(make_admin, "root")
        run_in_thread(make_user, "dora", (), role=None)
        page = browser.new_context(viewport={"width": 1366, "height": 1000}).new_page()
        page.set_default_timeout(30_000)
        log_in(page, console_server, "root", PASSWORD)

        page.click("#nav-setup")
        page.fill("#group-name", "Staging")
        page.fill("#group-description", "Racks 7-9, <b>new</b>")
        page.click("#create-group-button")
        page.wait_for_selector("#group-members")
        assert page.locator("#group-name").inner_text() == "Staging"
        page.fill("#role-username", "dora")
        page.select_option("#role-role", "operator")
        page.click("#set-role-button")
        page.wait_for_selector('#group-members tr[data-member="dora"]')
        assert page.locator('tr[data-member="dora"] [data-field=role]').inner_text().startswith("Operator")

        page.click("text=Hosts and rights")
        assert page.locator('#setup-groups tr[data-group="Staging"]').inner_text().count("<b>") == 1  # text
        page.click("#add-vsp")
        page.fill("#agent-url", agent.url.removeprefix("https://"))  # https is assumed
        page.click("#test-connection")
        page.wait_for_selector("#agent-fingerprint")
        assert page.locator("#agent-fingerprint").inner_text() == agent.fingerprint
        page.screenshot(path=str(DOCS / "setup-fingerprint.png"), full_page=True)
        page.check("#confirm-fingerprint")
        page.fill("#agent-secret", agent.secret)
        page.click("#connect")
        page.wait_for_selector("#agent-report")
        assert page.locator("[data-field=driver]").inner_text() == "simulated"
        assert page.locator("[data-field=memory]").inner_text() == "32 GiB"
        assert page.locator('#agent-guests tr[data-guest="rack7-web"]').is_visible()
        assert page.locator("#id_name").input_value() == "rack7"
        assert agent.secret not in page.content()
        page.select_option("#id_group", label="Staging")
        page.screenshot(path=str(DOCS / "setup-add-vsp.png"), full_page=True)
        page.click("#add-vsp-submit")
        page.wait_for_selector("#setup-vsp-name")
        assert "VSP rack7 added" in page.locator(".messages").inner_text()

        def stored() -> tuple:
            vsp = VSP.objects.select_related("group").get(name="rack7")
            events = set(AuditEvent.objects.values_list("object_type", "action"))
            role = HostGroupMembership.objects.get(user__username="dora").role
            return (vsp.group.name, vsp.agent_certificate, vsp.memory_mib, vsp.agent_driver, role, events)

        group, pin, memory, driver, role, events = run_in_thread(stored)
        assert (group, pin, memory, driver, role) == (
            "Staging",
            agent.fingerprint,
            32768,
            "simulated",
            "operator",
        )
        assert {
            ("vms.vsp", "created"),
            ("vms.hostgroup", "created"),
            ("vms.hostgroupmembership", "created"),
        } <= events
    finally:
        factory.stop_all()
