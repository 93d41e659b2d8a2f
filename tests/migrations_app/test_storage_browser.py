"""In real Chromium: the migrate dialog greys out a target without the guest's pool or network and says
which disk or card, and the VM's Storage and Network tabs (screenshots in docs/).

Real console (uvicorn), Redis and host agents; the guest's disks and cards are the inventory's (the
agent side that reports them is another branch's: here they are given to the console directly).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import log_in, run_in_thread
from tests.factories import PASSWORD, give_disk, give_nic, make_network, make_pool, make_user
from tests.migrations_app.conftest import MIGRATOR
from tests.migrations_app.guests import place_vm

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DOCS = Path(__file__).resolve().parents[2] / "docs"


def storage_fleet(host_agents, fleet):
    """db01 on hosta: disk vda on shared pool san-a, vdb too, a card on prod-net. hostb mounts other
    storage under the name san-a; hostc mounts san-a (as "lun7") but has no prod-net."""
    vm = place_vm(host_agents, fleet, vm_fields={"name": "db01"})
    san = make_pool(fleet["hosta"], "san-a", identity="san-a-lun7", free_bytes=61 * (1 << 30))
    make_pool(fleet["hostb"], "san-a", identity="hostb-directory")
    make_pool(fleet["hostc"], "lun7", identity="san-a-lun7")
    make_network(fleet["hosta"], "prod-net")
    make_network(fleet["hostb"], "prod-net")
    make_network(fleet["hostc"], "backup-net")
    give_disk(vm, san, "vda", 20 << 30)
    give_disk(vm, san, "vdb", 100 << 30)
    give_nic(vm, "prod-net", mac="52:54:00:3c:1a:07")
    scratch = make_pool(fleet["hosta"], "scratch", kind="local", identity="local-hosta-1")
    make_pool(fleet["hostb"], "fast", kind="local", identity="local-hostb-1", free_bytes=5 << 30)
    local = place_vm(host_agents, fleet, vm_fields={"name": "cache02"})
    give_disk(local, scratch)
    make_user("maria", permissions=(*MIGRATOR, "vms.view_vsp"))
    return vm, local


def test_the_dialog_greys_targets_without_the_pool_or_network_and_the_tabs_list_them(
    host_agents, fleet, console_server, browser_page
):
    vm, local = run_in_thread(storage_fleet, host_agents, fleet)
    page = browser_page
    log_in(page, console_server, "maria", PASSWORD)

    page.goto(f"{console_server}/vms/{vm.pk}/general/")
    assert page.locator('[data-field="disks"]').inner_text().startswith("2 disks, 120 GiB in all")
    assert page.locator('[data-field="networks"]').inner_text().startswith("prod-net")
    page.click("#migrate-button")
    dialog = page.locator("#migrate-dialog")
    hostb, hostc = dialog.locator('tr[data-vsp="hostb"]'), dialog.locator('tr[data-vsp="hostc"]')
    assert "hostb does not mount pool san-a: db01's disk vda" in hostb.inner_text()
    assert "hostc has no network prod-net: db01's nic 0" in hostc.inner_text()
    assert hostb.locator("input").is_disabled() and hostc.locator("input").is_disabled()
    dialog.screenshot(path=str(DOCS / "migrate-dialog-storage-refusal.png"))

    page.goto(f"{console_server}/vms/{vm.pk}/general/")
    page.click("#tab-storage")
    rows = page.locator("#disks tbody tr")
    assert rows.count() == 2
    assert rows.nth(1).inner_text().split("\t")[:5] == ["vdb", "san-a", "Shared", "db01-vdb.qcow2", "100 GiB"]
    page.screenshot(path=str(DOCS / "vm-storage-tab.png"), full_page=True)
    page.click("#tab-network")
    card = page.locator('#nics tr[data-nic="0"]')
    assert card.inner_text().split("\t")[:3] == ["nic 0", "prod-net", "bridge (br0)"]
    assert "52:54:00:3c:1a:07" in card.inner_text()
    page.screenshot(path=str(DOCS / "vm-network-tab.png"), full_page=True)

    # cache02: a 10 GiB disk (1 GiB of it written) on hosta's local pool, mirrored to a local pool of the
    # target, which needs room for its virtual size: hostb's has 5 GiB, hostc has no local pool
    page.goto(f"{console_server}/vms/{local.pk}/general/")
    page.click("#migrate-button")
    dialog = page.locator("#migrate-dialog")
    hostb, hostc = dialog.locator('tr[data-vsp="hostb"]'), dialog.locator('tr[data-vsp="hostc"]')
    assert "hostb has no local pool with 10 GiB free for cache02's disk vda (pool fast: 5 GiB free)" in (
        hostb.inner_text()
    )
    assert "hostc has no local pool for cache02's disk vda" in hostc.inner_text()
    assert page.locator("#migrate-dialog input[name=target]:enabled").count() == 0
