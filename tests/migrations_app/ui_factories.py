"""Small builders for the migration UI tests (plain functions, committed rows)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Permission, User
from django.test import Client

from migrations_app.models import Migration
from vms.models import VSP, Registration, VirtualMachine


def make_vsp(name: str, **fields: Any) -> VSP:
    defaults = {"agent_url": "http://127.0.0.1:9", "agent_secret": "s3cret", "memory_mib": 16384, "cpus": 8}
    return VSP.objects.create(name=name, **{**defaults, **fields})


def make_vm(name: str, vsp: VSP, **fields: Any) -> VirtualMachine:
    vm = VirtualMachine.objects.create(
        name=name, **{"memory_mib": 512, "os_type": "Linux", "os_status": "up", **fields}
    )
    Registration.objects.create(vm=vm, vsp=vsp, hardware_status=Registration.HardwareStatus.ON)
    return vm


def make_migration(vm: VirtualMachine, source: VSP, target: VSP, **fields: Any) -> Migration:
    return Migration.objects.create(vm=vm, source=source, target=target, **fields)


def make_user(username: str, *permissions: str) -> User:
    user = User.objects.create_user(username, password="pw-" + username)
    for dotted in permissions:
        app_label, codename = dotted.split(".")
        permission = Permission.objects.get(content_type__app_label=app_label, codename=codename)
        user.user_permissions.add(permission)
    return user


def session_cookie(user: User) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


ADMIN_PERMISSIONS = (
    "vms.view_virtualmachine",
    "vms.view_vsp",
    "migrations_app.add_migration",
    "migrations_app.change_migration",
    "migrations_app.view_migration",
)
