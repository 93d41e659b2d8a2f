"""The safety rule: a VM is runnable on at most one VSP, enforced by the database itself.

Written once, database-agnostic; the ``postgres`` mark makes ``make test`` run it again on PostgreSQL.
"""

import pytest
from django.db import IntegrityError, transaction

from tests.factories import make_not_runnable_copy, make_registration, make_vm, make_vsp
from vms.models import Registration

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

HW = Registration.HardwareStatus


def test_it_refuses_a_second_runnable_registration():
    vm = make_vm(hardware_status=HW.ON)
    with pytest.raises(IntegrityError), transaction.atomic():
        make_registration(vm, make_vsp(), HW.OFF)
    assert vm.registrations.count() == 1


def test_it_refuses_turning_a_not_runnable_copy_runnable_by_an_update():
    vm = make_vm(hardware_status=HW.OFF)
    copy = make_not_runnable_copy(vm, make_vsp())
    with pytest.raises(IntegrityError), transaction.atomic():
        Registration.objects.filter(pk=copy.pk).update(
            hardware_status=HW.ON, not_runnable_set_by="", not_runnable_reason=""
        )
    copy.refresh_from_db()
    assert copy.hardware_status == HW.NOT_RUNNABLE


def test_it_allows_many_not_runnable_copies_beside_one_runnable():
    vm = make_vm(hardware_status=HW.ON)
    make_not_runnable_copy(vm, make_vsp())
    make_not_runnable_copy(vm, make_vsp())
    assert vm.registrations.filter(hardware_status=HW.NOT_RUNNABLE).count() == 2
    assert vm.runnable_registration.hardware_status == HW.ON


def test_it_allows_a_vm_runnable_nowhere():
    vm = make_vm(hardware_status=HW.OFF)
    Registration.objects.filter(vm=vm).update(hardware_status=HW.NOT_RUNNABLE, not_runnable_set_by="admin")
    make_not_runnable_copy(vm, make_vsp())
    assert vm.runnable_registration is None


def test_it_refuses_two_registrations_of_one_vm_on_one_vsp():
    vsp = make_vsp()
    vm = make_vm(vsp=vsp, hardware_status=HW.ON)
    with pytest.raises(IntegrityError), transaction.atomic():
        make_not_runnable_copy(vm, vsp)


def test_it_refuses_not_runnable_details_on_a_runnable_copy():
    vm = make_vm(hardware_status=HW.ON)
    with pytest.raises(IntegrityError), transaction.atomic():
        Registration.objects.filter(vm=vm).update(not_runnable_reason="left over")


def test_the_switch_of_a_migration_commit_is_allowed_in_one_transaction():
    source, target = make_vsp(), make_vsp()
    vm = make_vm(vsp=source, hardware_status=HW.ON)
    make_not_runnable_copy(vm, target, reason="prepared")
    with transaction.atomic():
        Registration.objects.filter(vm=vm, vsp=source).update(
            hardware_status=HW.NOT_RUNNABLE, not_runnable_set_by="migrate", not_runnable_reason="to target"
        )
        Registration.objects.filter(vm=vm, vsp=target).update(
            hardware_status=HW.ON, not_runnable_set_by="", not_runnable_reason=""
        )
    assert vm.runnable_registration.vsp == target
