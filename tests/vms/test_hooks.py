"""What the inventory's pages show and count of migrations arrives only through the hooks the migrations
app registers (``vms.hooks``, ``vms.general_tab``): with them the pages show a migration in flight; with
none registered the inventory works alone and says nothing of migrations."""

from __future__ import annotations

import pytest

from migrations_app.models import Migration
from tests.factories import make_admin, make_vm, make_vsp
from vms import general_tab, hooks
from vms.capacity import free_memory_mib
from vms.models import Registration

pytestmark = pytest.mark.django_db


@pytest.fixture
def migrating(client):
    """web01 (2 GiB) queued to leave hosta for hostb (8 GiB); an admin logged in."""
    hosta, hostb = make_vsp("hosta"), make_vsp("hostb", memory_mib=8192)
    web = make_vm("web01", vsp=hosta, memory_mib=2048, hardware_status=Registration.HardwareStatus.ON)
    Migration.objects.create(vm=web, source=hosta, target=hostb)
    client.force_login(make_admin())
    return {"hosta": hosta, "hostb": hostb, "web": web, "client": client}


@pytest.fixture
def inventory_alone(monkeypatch):
    """Every hook as if no other app had registered one."""
    for name, empty in (
        ("_slots", {}),
        ("_vsp_page_providers", []),
        ("_busy_checks", []),
        ("_reservations", []),
        ("_audit_subjects", {}),
    ):
        monkeypatch.setattr(hooks, name, empty)
    monkeypatch.setattr(general_tab, "_context_providers", [])


def pages(migrating) -> tuple[str, str]:
    client = migrating["client"]
    vsp_page = client.get(f"/vsps/{migrating['hosta'].pk}/")
    general = client.get(f"/vms/{migrating['web'].pk}/general/")
    assert vsp_page.status_code == general.status_code == 200
    return vsp_page.text, general.text


def test_the_migrations_app_fills_the_inventory_pages_through_its_hooks(migrating):
    vsp_page, general = pages(migrating)

    assert '<th class="migration-col" scope="col">Migration</th>' in vsp_page
    assert "Waiting to migrate to hostb" in vsp_page and 'id="migrate-selected-form"' in vsp_page
    assert 'id="evacuation-panel"' in vsp_page  # the evacuations app's slot
    assert 'id="migration-phases"' in general and 'data-field="migration_policy"' in general
    assert 'id="vm-migration-history"' in general and 'ws-connect="/ws/vms/' in general
    assert "web01 is migrating: wait for the migration to end or cancel it." in general  # power: busy
    assert free_memory_mib(migrating["hostb"]) == 8192 - 2048  # the queued guest's memory is reserved


def test_without_hooks_the_inventory_works_alone_and_says_nothing_of_migrations(migrating, inventory_alone):
    vsp_page, general = pages(migrating)

    for html in (vsp_page, general):
        assert "migration-col" not in html and "ws-connect" not in html and "evacuation" not in html
        assert "/migrations/vms/" not in html and "/migrations/vsps/" not in html  # no form of the app
    assert '<tr data-vm="web01">' in vsp_page
    assert 'id="migration-phases"' not in general and "Migration policy" not in general
    assert "is migrating" not in general and 'data-power="stop"' in general
    assert free_memory_mib(migrating["hostb"]) == 8192


def test_a_slot_the_inventory_pages_do_not_have_is_refused():
    with pytest.raises(ValueError, match="no slot 'vm_general.sidebar'"):
        hooks.register_slot("vm_general.sidebar", "somewhere.html")
