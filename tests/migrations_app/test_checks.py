"""The migrate dialog's pre-checks: every VSP gets a verdict in plain words, and refusals change nothing."""

import pytest

from migrations_app.actions import MigrationRefused, do_request_migration
from migrations_app.checks import check_targets
from migrations_app.models import Migration
from tests.factories import make_user, make_vm, make_vsp
from vms.models import Registration

pytestmark = pytest.mark.django_db

MIGRATOR = ("migrations_app.add_migration", "migrations_app.change_migration", "vms.view_virtualmachine")


@pytest.fixture
def fleet():
    source = make_vsp("src", memory_mib=8192)
    vm = make_vm("web1", vsp=source, memory_mib=2048)
    return source, vm


def verdicts(vm) -> dict[str, str]:
    return {check.vsp.name: check.reason for check in check_targets(vm)}


def test_it_accepts_a_good_target_and_refuses_the_source_as_same_host(fleet):
    source, vm = fleet
    make_vsp("good", memory_mib=8192)
    assert verdicts(vm) == {"good": "ok", "src": "same host"}


@pytest.mark.parametrize(
    ("target_fields", "reason"),
    [
        ({"migration_enabled": False}, "host disabled"),
        ({"licensed": False}, "host not licensed"),
        ({"agent_reachable": False}, "agent unreachable"),
        ({"memory_mib": 1024}, "not enough free memory (needs 2048 MiB, 1024 MiB free)"),
    ],
)
def test_it_refuses_a_bad_target_with_its_reason_and_changes_nothing(fleet, target_fields, reason):
    source, vm = fleet
    target = make_vsp("bad", **target_fields)
    assert verdicts(vm)["bad"] == reason
    with pytest.raises(MigrationRefused, match=reason.replace("(", r"\(").replace(")", r"\)")):
        do_request_migration(vm, target, make_user(permissions=MIGRATOR))
    assert not Migration.objects.exclude(state=Migration.State.REFUSED).exists()
    assert vm.current_vsp == source


def test_it_counts_guests_already_on_and_incoming_against_free_memory(fleet):
    source, vm = fleet
    target = make_vsp("busy", memory_mib=4096)
    make_vm("resident", vsp=target, memory_mib=1024)
    other = make_vm("incoming", vsp=source, memory_mib=1024)
    Migration.objects.create(vm=other, source=source, target=target)
    assert verdicts(vm)["busy"] == "ok"  # 4096 - 1024 on - 1024 incoming = 2048: just fits
    target.memory_mib = 4000
    target.save()
    assert verdicts(vm)["busy"] == "not enough free memory (needs 2048 MiB, 1952 MiB free)"


@pytest.mark.parametrize(
    ("vm_fields", "reason"),
    [
        ({"kind": "vpar"}, "vPars do not migrate"),
        ({"online_migration_enabled": False}, "VM not enabled for online migration"),
    ],
)
def test_it_refuses_every_target_for_a_vm_that_cannot_migrate(vm_fields, reason):
    source = make_vsp("src")
    vm = make_vm("guest", vsp=source, **vm_fields)
    target = make_vsp("dst")
    assert set(verdicts(vm).values()) == {reason}
    with pytest.raises(MigrationRefused, match=reason):
        do_request_migration(vm, target, make_user(permissions=MIGRATOR))
    assert not Migration.objects.exclude(state=Migration.State.REFUSED).exists()


def test_it_refuses_a_vm_that_is_already_migrating(fleet):
    source, vm = fleet
    target = make_vsp("dst")
    Migration.objects.create(vm=vm, source=source, target=target)
    assert verdicts(vm)["dst"] == "VM is already migrating"


def test_it_refuses_a_vm_not_runnable_anywhere():
    vm = make_vm("ghost", vsp=make_vsp("src"), hardware_status=Registration.HardwareStatus.NOT_RUNNABLE)
    Registration.objects.filter(vm=vm).update(not_runnable_set_by="admin", not_runnable_reason="broken")
    make_vsp("dst")
    assert set(verdicts(vm).values()) == {"VM is not runnable on any VSP"}


def test_it_refuses_a_user_without_the_permission(fleet):
    from django.core.exceptions import PermissionDenied

    _, vm = fleet
    with pytest.raises(PermissionDenied):
        do_request_migration(vm, make_vsp("dst"), make_user(permissions=("vms.view_virtualmachine",)))
    assert not Migration.objects.exclude(state=Migration.State.REFUSED).exists()


OFF_REASON = "VM is not running (Off): online migration moves running guests only"


def test_it_refuses_every_target_for_a_powered_off_vm_and_changes_nothing(fleet):
    source, _ = fleet
    build01 = make_vm("build01", vsp=source, hardware_status=Registration.HardwareStatus.OFF)
    target = make_vsp("dst", memory_mib=8192)
    assert set(verdicts(build01).values()) == {OFF_REASON}
    with pytest.raises(MigrationRefused, match=r"build01 cannot migrate to dst: VM is not running \(Off\)"):
        do_request_migration(build01, target, make_user(permissions=MIGRATOR))
    assert not Migration.objects.exclude(state=Migration.State.REFUSED).exists()


def vsp_list_free_memory(client, vsp_name: str) -> str:
    from django.urls import reverse

    html = client.get(reverse("vms:vsp_list")).content.decode()
    row = html[html.index(f'data-vsp="{vsp_name}"') :]
    row = row[: row.index("</tr>")]
    cell = row[row.index('data-field="free_memory">') + len('data-field="free_memory">') :]
    return cell[: cell.index("</td>")]


def test_the_vsp_list_counts_memory_reserved_by_incoming_migrations_like_the_pre_check(
    fleet, client, django_assert_max_num_queries
):
    from migrations_app.checks import free_memory_mib as pre_check_free
    from vms.capacity import free_memory_by_vsp, free_memory_mib

    source, vm = fleet  # web1: 2048 MiB
    target = make_vsp("dst", memory_mib=8192)
    make_vm("resident", vsp=target, memory_mib=1024)
    client.force_login(make_user(permissions=("vms.view_vsp",)))
    assert vsp_list_free_memory(client, "dst") == "7 GiB"

    migration = Migration.objects.create(vm=vm, source=source, target=target)  # queued: 2048 reserved
    assert free_memory_mib(target) == pre_check_free(target) == 8192 - 1024 - 2048
    assert free_memory_by_vsp([target.pk, source.pk])[target.pk] == 5120
    assert vsp_list_free_memory(client, "dst") == "5 GiB"

    Migration.objects.filter(pk=migration.pk).update(state="aborted")  # an ended attempt reserves nothing
    assert free_memory_mib(target) == pre_check_free(target) == 7168

    for number in range(6):  # more hosts, each with an incoming migration: still the same few queries
        host = make_vsp(f"more{number}")
        Migration.objects.create(vm=make_vm(f"mover{number}", vsp=source), source=source, target=host)
    # the page, its free-memory join, the split-brain and lost lookups; the user's roles (the permissions
    # they carry: a permission the account lacks is looked up there once)
    with django_assert_max_num_queries(8):
        vsp_list_free_memory(client, "dst")
