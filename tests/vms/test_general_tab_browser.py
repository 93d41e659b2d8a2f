"""In real Chromium: log in, read the General tab, and Refresh Data without a full page load."""

from pathlib import Path

import pytest

from tests.conftest import log_in, run_in_thread
from tests.factories import PASSWORD, make_admin
from vms.demo import create_demo_fleet
from vms.models import VirtualMachine

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "general-tab.png"

# Demo guests, one per row of the status table, and a vPar.
EXPECTED_STATUS = {
    "web01": "VM enabled",
    "batch01": "VM disabled",
    "ldap01": "Host not licensed",
    "monitor01": "Host disabled",
    "vpar-erp": "vPar does not support migration",
}
FIELDS = [
    "vsp",
    "os_type",
    "os_status",
    "hardware_status",
    "boot_attribute",
    "graceful_stop_timeout",
    "online_migration",
    "not_runnable_set_by",
    "not_runnable_reason",
]


def set_up(secrets_dir: Path) -> dict[str, int]:
    create_demo_fleet(agents_base_port=7101, secrets_dir=secrets_dir)
    make_admin()
    return dict(VirtualMachine.objects.values_list("name", "pk"))


def read_field(page, name: str) -> str:
    return page.locator(f'#general-tab [data-field="{name}"]').first.inner_text().strip()


def test_it_shows_every_field_and_refreshes_in_place(console_server, browser_page, tmp_path):
    page = browser_page
    vm_ids = run_in_thread(set_up, tmp_path)
    log_in(page, console_server, "admin", PASSWORD)

    for name, shows in EXPECTED_STATUS.items():
        page.goto(f"{console_server}/vms/{vm_ids[name]}/general/")
        assert read_field(page, "online_migration") == shows, name
    # Issue 21.5: Migrate… is offered only when it can work; else disabled, the reason beside it.
    for name, why in (
        ("vpar-erp", "vpar-erp is a vPar: vPars never migrate."),
        ("batch01", "Online migration is disabled for batch01: enable it (Online Migration Enabled, above) "
         "to migrate."),
    ):  # fmt: skip
        page.goto(f"{console_server}/vms/{vm_ids[name]}/general/")
        assert page.locator("#migrate-button").is_disabled(), name
        assert page.locator("#migrate-why").inner_text() == why
    page.goto(f"{console_server}/vms/{vm_ids['web01']}/general/")
    assert page.locator("#migrate-button").is_enabled() and page.locator("#migrate-why").count() == 0

    page.goto(f"{console_server}/vms/{vm_ids['mail01']}/general/")
    fields = {name: read_field(page, name) for name in FIELDS}
    assert fields == {
        "vsp": "vsp2",
        "os_type": "Debian 12",
        "os_status": "Up",
        "hardware_status": "On",
        "boot_attribute": "Auto start",
        "graceful_stop_timeout": "30 seconds",
        "online_migration": "VM enabled",
        "not_runnable_set_by": "—",
        "not_runnable_reason": "—",
    }
    copy = page.locator('#other-registrations tr[data-vsp="vsp1"]')
    assert copy.locator('[data-field="hardware_status"]').inner_text() == "Not Runnable"
    assert copy.locator('[data-field="not_runnable_set_by"]').inner_text() == "Migrate"
    assert copy.locator('[data-field="not_runnable_reason"]').inner_text() == "guest migrated to VSP vsp2"
    assert page.locator("#migration-phases").is_hidden()
    assert page.locator("#migration-alerts").is_hidden()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    page.evaluate("window.__marker = 1")
    run_in_thread(
        lambda: VirtualMachine.objects.filter(pk=vm_ids["mail01"]).update(
            os_type="Debian 13", os_status=VirtualMachine.OSStatus.IN_EFI, graceful_stop_timeout_s=90
        )
    )
    assert read_field(page, "os_type") == "Debian 12"
    page.click("#refresh-data")
    page.wait_for_function(
        # A function, not a bare expression: Playwright evals the latter, which the page's CSP forbids.
        "() => document.querySelector('#general-tab [data-field=\"os_type\"]')"
        ".innerText.trim() === 'Debian 13'"
    )
    assert read_field(page, "os_status") == "In EFI"
    assert read_field(page, "graceful_stop_timeout") == "90 seconds"
    assert page.evaluate("window.__marker") == 1, "Refresh Data reloaded the whole page"
    assert page.url.endswith(f"/vms/{vm_ids['mail01']}/general/")

    # Issue 21.5: offered while the other copy runs, it was always refused; now disabled, saying why.
    copy = page.locator('#other-registrations tr[data-vsp="vsp1"]')
    assert copy.locator("button", has_text="Mark Runnable on vsp1").is_disabled()
    assert copy.locator("[data-field=runnable_why]").inner_text() == (
        "mail01 is runnable on vsp2 and runs there: a VM is runnable on one VSP at a time. Mark that copy "
        "Not Runnable first (stop it, or migrate the guest here)."
    )
    assert copy.locator('[data-field="hardware_status"]').inner_text() == "Not Runnable"
    assert page.evaluate("window.__marker") == 1, "the page was reloaded"
