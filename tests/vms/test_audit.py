"""Every change to the inventory leaves an audit event, and the Django admin keeps the pages' rules.

Issue 10's fault: the admin let an administrator mark Not Runnable the copy the guest runs on and make
runnable a copy where it does not run; the General tab then showed it Off while it ran elsewhere.
"""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User

from tests.factories import make_admin, make_registration, make_vm, make_vsp
from tests.vms.conftest import snapshot
from vms.actions import do_mark_not_runnable, do_mark_runnable, do_set_online_migration
from vms.models import AuditEvent, Registration

pytestmark = pytest.mark.django_db

HW = Registration.HardwareStatus
Action = AuditEvent.Action
OFF_DETAILS = {"hardware_status": "off", "not_runnable_set_by": "", "not_runnable_reason": ""}


def registration_form(registration: Registration, **changes: str) -> dict[str, str]:
    form = {
        "vm": str(registration.vm_id),
        "vsp": str(registration.vsp_id),
        "hardware_status": registration.hardware_status,
        "not_runnable_set_by": registration.not_runnable_set_by,
        "not_runnable_reason": registration.not_runnable_reason,
    }
    return {**form, **changes}


def change_url(registration: Registration) -> str:
    return f"/admin/vms/registration/{registration.pk}/change/"


def test_it_records_who_marked_a_copy_not_runnable_and_why(fleet):
    admin = make_admin("carol")
    stopped = fleet["stopped_registration"]

    do_mark_not_runnable(stopped, "disk replaced", admin)

    event = AuditEvent.objects.get()
    assert (event.action, event.actor, event.actor_name, event.via_admin) == (
        Action.MARKED_NOT_RUNNABLE,
        admin,
        "carol",
        False,
    )
    assert (event.object_type, event.object_id, event.object_name) == (
        "vms.registration",
        str(stopped.pk),
        "stopped on vsp-a",
    )
    assert event.before == OFF_DETAILS
    assert event.after == {
        "hardware_status": "not_runnable",
        "not_runnable_set_by": "admin",
        "not_runnable_reason": "disk replaced",
    }
    assert event.message == "disk replaced"


def test_it_records_a_copy_marked_runnable_and_online_migration_changes(fleet):
    admin = make_admin("carol")
    do_mark_not_runnable(fleet["stopped_registration"], "maintenance", admin)

    do_mark_runnable(fleet["stopped_registration"], admin)
    do_set_online_migration(fleet["web"], False, admin)

    actions = list(AuditEvent.objects.order_by("pk").values_list("action", "after"))
    assert actions[1:] == [
        (
            Action.MARKED_RUNNABLE,
            {"hardware_status": "off", "not_runnable_set_by": "", "not_runnable_reason": ""},
        ),
        (Action.ONLINE_MIGRATION_DISABLED, {"online_migration_enabled": False}),
    ]


def test_the_trail_keeps_the_actor_and_object_names_after_they_are_deleted(fleet):
    admin = make_admin("carol")
    do_mark_not_runnable(fleet["stopped_registration"], "retired", admin)

    User.objects.filter(pk=admin.pk).delete()
    fleet["stopped"].delete()

    event = AuditEvent.objects.get()
    assert (event.actor, event.actor_name, event.object_name) == (None, "carol", "stopped on vsp-a")


def test_the_admin_refuses_to_mark_the_running_copy_not_runnable(admin_client, fleet):
    running = fleet["web_running"]
    before = snapshot()

    response = admin_client.post(
        change_url(running),
        registration_form(running, hardware_status=HW.NOT_RUNNABLE, not_runnable_reason="x"),
    )

    assert response.status_code == 200
    assert "web on vsp-b is On: stop the VM before marking it Not Runnable." in response.text
    assert snapshot() == before and not AuditEvent.objects.exists()


def test_the_admin_refuses_a_second_runnable_copy(admin_client, fleet):
    copy = fleet["web_copy"]
    before = snapshot()

    response = admin_client.post(change_url(copy), registration_form(copy, hardware_status=HW.OFF))

    assert response.status_code == 200
    assert "Refused: web is runnable on VSP vsp-b." in response.text
    assert snapshot() == before and not AuditEvent.objects.exists()


def test_the_admin_marks_through_the_same_action_and_audit_event(admin_client, fleet):
    stopped = fleet["stopped_registration"]

    response = admin_client.post(
        change_url(stopped),
        registration_form(stopped, hardware_status=HW.NOT_RUNNABLE, not_runnable_reason="  host retired "),
    )

    assert response.status_code == 302
    stopped.refresh_from_db()
    assert (stopped.hardware_status, stopped.not_runnable_set_by, stopped.not_runnable_reason) == (
        HW.NOT_RUNNABLE,
        Registration.SetBy.ADMIN,
        "host retired",
    )
    event = AuditEvent.objects.get()
    assert (event.action, event.actor_name, event.via_admin) == (Action.MARKED_NOT_RUNNABLE, "admin", True)


def test_the_admin_records_other_changes_creations_and_deletions(admin_client):
    vsp = make_vsp("vsp-z", memory_mib=8192)
    vm = make_vm("db01", vsp=make_vsp("vsp-y"), hardware_status=HW.OFF)

    added = admin_client.post(
        "/admin/vms/registration/add/",
        {"vm": vm.pk, "vsp": vsp.pk, "hardware_status": HW.NOT_RUNNABLE, "not_runnable_reason": "spare"},
    )
    assert added.status_code == 302
    copy = Registration.objects.get(vm=vm, vsp=vsp)
    changed = admin_client.post(change_url(copy), registration_form(copy, not_runnable_reason="cold spare"))
    assert changed.status_code == 302
    deleted = admin_client.post(f"/admin/vms/registration/{copy.pk}/delete/", {"post": "yes"})
    assert deleted.status_code == 302

    events = list(AuditEvent.objects.order_by("pk"))
    assert [(event.action, event.via_admin, event.object_name) for event in events] == [
        (Action.CREATED, True, "db01 on vsp-z"),
        (Action.CHANGED, True, "db01 on vsp-z"),
        (Action.DELETED, True, "db01 on vsp-z"),
    ]
    assert (events[1].before, events[1].after) == (
        {"not_runnable_reason": "spare"},
        {"not_runnable_reason": "cold spare"},
    )


def test_the_admin_refuses_a_runnable_copy_beside_a_runnable_one(admin_client):
    vm = make_vm("db01", vsp=make_vsp("vsp-y"), hardware_status=HW.ON)
    other = make_vsp("vsp-z")

    response = admin_client.post(
        "/admin/vms/registration/add/", {"vm": vm.pk, "vsp": other.pk, "hardware_status": HW.OFF}
    )

    assert response.status_code == 200
    assert "Refused: db01 is runnable on VSP vsp-y." in response.text
    assert not Registration.objects.filter(vsp=other).exists() and not AuditEvent.objects.exists()


def test_the_admin_never_records_the_agent_secret(admin_client):
    make_registration(make_vm("db01"), make_vsp("vsp-q"), HW.NOT_RUNNABLE, "admin", "spare")
    form = {"name": "vsp-new", "agent_url": "http://127.0.0.1:7999", "agent_secret": "top-secret-value"}
    form |= {"memory_mib": "4096", "cpus": "4", "migration_enabled": "on", "licensed": "on"}

    assert admin_client.post("/admin/vms/vsp/add/", form).status_code == 302

    event = AuditEvent.objects.get(action=Action.CREATED, object_type="vms.vsp")
    assert "agent_secret" not in event.after and "top-secret-value" not in str(event.after)
