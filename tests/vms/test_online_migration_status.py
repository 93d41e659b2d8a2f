"""Online Migration Enabled: the status table of docs/domain.md, plus "vPar does not support migration"."""

import pytest

from tests.factories import make_admin, make_vm, make_vsp
from tests.vms.html_fields import read_fields
from vms.models import VSP, VirtualMachine
from vms.status import OnlineMigrationStatus, online_migration_status

pytestmark = pytest.mark.django_db

TABLE = [
    # (host enabled, host licensed, VM enabled, what the tab shows)
    (False, True, True, "Host disabled"),
    (False, True, False, "Host disabled"),
    (True, False, True, "Host not licensed"),
    (True, False, False, "Host not licensed"),
    (True, True, True, "VM enabled"),
    (True, True, False, "VM disabled"),
]


@pytest.mark.parametrize(("host_enabled", "host_licensed", "vm_enabled", "shows"), TABLE)
def test_it_follows_the_status_table(host_enabled, host_licensed, vm_enabled, shows):
    vsp = VSP(name="h", migration_enabled=host_enabled, licensed=host_licensed)
    vm = VirtualMachine(name="g", online_migration_enabled=vm_enabled)
    assert online_migration_status(vm, vsp).label == shows


@pytest.mark.parametrize(("host_enabled", "host_licensed"), [(True, True), (False, False), (True, False)])
def test_it_says_a_vpar_does_not_support_migration(host_enabled, host_licensed):
    vsp = VSP(name="h", migration_enabled=host_enabled, licensed=host_licensed)
    vpar = VirtualMachine(name="p", kind=VirtualMachine.Kind.VPAR, online_migration_enabled=True)
    assert online_migration_status(vpar, vsp) == OnlineMigrationStatus.NOT_SUPPORTED
    assert online_migration_status(vpar, vsp).label == "vPar does not support migration"


def test_it_shows_the_vm_setting_when_no_host_runs_it():
    assert (
        online_migration_status(VirtualMachine(online_migration_enabled=False), None).label == "VM disabled"
    )


@pytest.mark.parametrize(("host_enabled", "host_licensed", "vm_enabled", "shows"), TABLE)
def test_the_general_tab_shows_the_right_words(client, host_enabled, host_licensed, vm_enabled, shows):
    vsp = make_vsp(migration_enabled=host_enabled, licensed=host_licensed)
    vm = make_vm(vsp=vsp, online_migration_enabled=vm_enabled)
    client.force_login(make_admin())
    response = client.get(f"/vms/{vm.pk}/general/")
    assert read_fields(response.text)["online_migration"] == shows


def test_the_general_tab_shows_a_vpar_does_not_support_migration(client):
    vpar = make_vm(kind=VirtualMachine.Kind.VPAR)
    client.force_login(make_admin())
    response = client.get(f"/vms/{vpar.pk}/general/")
    assert read_fields(response.text)["online_migration"] == "vPar does not support migration"
    assert "Disable for VM" not in response.text
