"""Builders for test data: plain functions with sensible defaults, every field overridable.

The one factories module of the suite: rows are saved at once (committed in ``transaction=True`` tests,
so other processes see them). Add a builder here rather than in a test module.
"""

from __future__ import annotations

from itertools import count
from typing import Any

from django.contrib.auth.models import Group, Permission, User
from django.test import Client
from django.utils import timezone

from migrations_app.models import Migration
from vms.models import (
    VSP,
    HostGroup,
    HostGroupMembership,
    Network,
    NetworkCard,
    Registration,
    Role,
    StoragePool,
    VirtualDisk,
    VirtualMachine,
)

_sequence = count(1)

VIEW_PERMISSIONS = ("vms.view_vsp", "vms.view_virtualmachine", "vms.view_registration")
CHANGE_PERMISSIONS = ("vms.change_virtualmachine", "vms.change_registration")
# What an administrator of migrations needs on the migration pages and sockets.
MIGRATION_ADMIN_PERMISSIONS = (
    "vms.view_virtualmachine",
    "vms.view_vsp",
    "migrations_app.add_migration",
    "migrations_app.change_migration",
    "migrations_app.view_migration",
)
PASSWORD = "correct-horse-battery"  # noqa: S105 - test users only
DEFAULT_GROUP = "Default"  # where make_vsp puts VSPs and make_user gives its users a role
AUTO = "auto"


def make_host_group(name: str = DEFAULT_GROUP, **fields: Any) -> HostGroup:
    group, _ = HostGroup.objects.get_or_create(name=name, defaults=fields)
    return group


def grant_role(user: User, group: HostGroup | str, role: str) -> HostGroupMembership:
    """Give ``user`` ``role`` (viewer, operator, administrator) in ``group`` (replacing any role there)."""
    group = make_host_group(group) if isinstance(group, str) else group
    membership, _ = HostGroupMembership.objects.update_or_create(
        group=group, user=user, defaults={"role": role}
    )
    return membership


def role_for_permissions(permissions: tuple[str, ...]) -> str | None:
    """The host-group role matching global permissions, as the upgrade's data migration gives it."""
    if any(p in permissions for p in CHANGE_PERMISSIONS):
        return Role.ADMINISTRATOR
    if any(p in permissions for p in ("migrations_app.add_migration", "migrations_app.change_migration")):
        return Role.OPERATOR
    if any(p.startswith("vms.view_") for p in permissions):
        return Role.VIEWER
    return None


def make_vsp(name: str | None = None, **fields: Any) -> VSP:
    number = next(_sequence)
    defaults: dict[str, Any] = {
        "agent_url": f"http://127.0.0.1:{9000 + number}",
        "agent_secret": f"agent-secret-{number}",
        "processor_family": "Intel Xeon",
        "processor_model": "Gold 6338",
        "memory_mib": 16384,
        "cpus": 8,
    }
    if "group" not in fields:
        defaults["group"] = make_host_group()
    return VSP.objects.create(name=name or f"vsp-{number}", **{**defaults, **fields})


def make_vm(
    name: str | None = None,
    vsp: VSP | None = None,
    hardware_status: str = Registration.HardwareStatus.ON,
    **fields: Any,
) -> VirtualMachine:
    """A VM (or vPar, with ``kind="vpar"``) registered on ``vsp`` (a new VSP when not given)."""
    defaults: dict[str, Any] = {
        "os_type": "Debian 12",
        "os_status": VirtualMachine.OSStatus.UP,
        "boot_attribute": VirtualMachine.BootAttribute.AUTO,
        "memory_mib": 512,
        "vcpus": 1,
    }
    vm = VirtualMachine.objects.create(name=name or f"vm-{next(_sequence)}", **{**defaults, **fields})
    make_registration(vm, vsp or make_vsp(), hardware_status)
    return vm


def make_registration(
    vm: VirtualMachine,
    vsp: VSP,
    hardware_status: str = Registration.HardwareStatus.OFF,
    set_by: str = "",
    reason: str = "",
) -> Registration:
    return Registration.objects.create(
        vm=vm,
        vsp=vsp,
        hardware_status=hardware_status,
        not_runnable_set_by=set_by,
        not_runnable_reason=reason,
    )


def make_not_runnable_copy(vm: VirtualMachine, vsp: VSP, reason: str = "guest migrated") -> Registration:
    return make_registration(
        vm, vsp, Registration.HardwareStatus.NOT_RUNNABLE, Registration.SetBy.MIGRATE, reason
    )


def make_migration(vm: VirtualMachine, source: VSP, target: VSP, **fields: Any) -> Migration:
    """A migration row as it stands (QUEUED unless ``state`` is given); no worker is asked to run it."""
    return Migration.objects.create(vm=vm, source=source, target=target, **fields)


def make_user(
    username: str | None = None,
    permissions: tuple[str, ...] = (),
    *,
    role: str | None = AUTO,
    group: HostGroup | str = DEFAULT_GROUP,
    **fields: Any,
) -> User:
    """A user with global ``permissions`` and ``role`` in ``group`` (``AUTO``: the role those
    permissions had before host groups, as the upgrade gives it; None: no role anywhere)."""
    user = User.objects.create_user(username or f"user-{next(_sequence)}", password=PASSWORD, **fields)
    user.user_permissions.add(*[permission_named(dotted) for dotted in permissions])
    if role == AUTO:
        role = role_for_permissions(permissions)
    if role is not None:
        grant_role(user, group, role)
    return user


def make_admin(username: str = "admin") -> User:
    return User.objects.create_superuser(username, password=PASSWORD)


def make_vm_admin(username: str = "vm-admin") -> User:
    """Not a superuser: only the model permissions the console's pages and changes need."""
    return make_user(username, VIEW_PERMISSIONS + CHANGE_PERMISSIONS)


def make_viewer(username: str = "viewer") -> User:
    """A read-only viewer, as the demo's: in group Viewers, which only has view permissions."""
    user = make_user(username, role=Role.VIEWER)
    group, _ = Group.objects.get_or_create(name="Viewers")
    group.permissions.add(*[permission_named(dotted) for dotted in VIEW_PERMISSIONS])
    user.groups.add(group)
    return user


def permission_named(dotted: str) -> Permission:
    app_label, codename = dotted.split(".")
    return Permission.objects.get(content_type__app_label=app_label, codename=codename)


def session_cookie(user: User) -> str:
    """A logged-in session id for ``user``, for a websocket or browser that does not log in itself."""
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


GIB = 1 << 30


def make_pool(
    vsp: VSP, name: str = "san-a", kind: str = "shared", identity: str | None = None, **fields: Any
) -> StoragePool:
    """A pool ``vsp``'s agent reported (``identity`` defaults to the name's: the same storage everywhere);
    the VSP's pools and networks are known from then on."""
    VSP.objects.filter(pk=vsp.pk).update(resources_collected_at=timezone.now())
    vsp.resources_collected_at = timezone.now()
    defaults = {"capacity_bytes": 100 * GIB, "free_bytes": 50 * GIB, "location": f"/pools/{name}"}
    return StoragePool.objects.create(
        vsp=vsp, name=name, kind=kind, identity=identity or f"id-{name}", **{**defaults, **fields}
    )


def make_network(vsp: VSP, name: str = "prod-net", kind: str = "bridge", bridge: str = "br0") -> Network:
    VSP.objects.filter(pk=vsp.pk).update(resources_collected_at=timezone.now())
    vsp.resources_collected_at = timezone.now()
    return Network.objects.create(vsp=vsp, name=name, kind=kind, bridge=bridge)


def give_disk(
    vm: VirtualMachine, pool: StoragePool, device: str = "vda", size: int = 10 * GIB
) -> VirtualDisk:
    return VirtualDisk.objects.create(
        vm=vm,
        device=device,
        pool=pool.name,
        pool_identity=pool.identity,
        volume=f"{vm.name}-{device}.qcow2",
        virtual_size_bytes=size,
        allocated_bytes=size // 10,
    )


def give_nic(vm: VirtualMachine, network: str = "prod-net", mac: str | None = None) -> NetworkCard:
    index = vm.nics.count()
    mac = mac or f"52:54:00:00:{vm.pk % 256:02x}:{index:02x}"
    return NetworkCard.objects.create(vm=vm, index=index, network=network, mac=mac)
