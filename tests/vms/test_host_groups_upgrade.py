"""The upgrade to host groups keeps everyone's access, and the demo shows the feature."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from tests.factories import grant_role, make_user, permission_named
from vms.access import visible_vms, visible_vsps
from vms.models import VSP, HostGroup, HostGroupMembership, Role

BEFORE = ("vms", "0006_vsp_maintenance_power_audit")
AFTER = ("vms", "0008_default_host_group")


@pytest.mark.django_db(transaction=True)
def test_the_upgrade_puts_existing_vsps_in_default_and_gives_each_user_the_role_they_had(latest_schema):
    executor = MigrationExecutor(connection)
    executor.migrate([BEFORE])
    old_vsp = executor.loader.project_state([BEFORE]).apps.get_model("vms", "VSP")
    for name in ("old1", "old2"):
        old_vsp.objects.create(
            name=name,
            agent_url="http://127.0.0.1:7101",
            agent_secret="s",  # noqa: S106 - no agent is contacted
            memory_mib=1,
            cpus=1,
        )
    viewers = Group.objects.create(name="Viewers")
    viewers.permissions.add(permission_named("vms.view_vsp"))
    users = {
        "viewer": User.objects.create_user("v"),
        "migrator": User.objects.create_user("m"),
        "changer": User.objects.create_user("c"),
        "nobody": User.objects.create_user("n"),
        "root": User.objects.create_superuser("r"),
    }
    users["viewer"].groups.add(viewers)  # through an auth group counts too
    users["migrator"].user_permissions.add(
        permission_named("vms.view_vsp"), permission_named("migrations_app.add_migration")
    )
    users["changer"].user_permissions.add(
        permission_named("vms.view_vsp"), permission_named("vms.change_registration")
    )

    executor = MigrationExecutor(connection)
    executor.migrate([AFTER])

    default = HostGroup.objects.get(name="Default")
    assert set(VSP.objects.values_list("name", "group")) == {("old1", default.pk), ("old2", default.pk)}
    roles = dict(HostGroupMembership.objects.values_list("user__username", "role"))
    assert roles == {"v": Role.VIEWER, "m": Role.OPERATOR, "c": Role.ADMINISTRATOR}
    for who in ("viewer", "migrator", "changer", "root"):
        user = User.objects.get(pk=users[who].pk)
        assert set(visible_vsps(user).values_list("name", flat=True)) == {"old1", "old2"}, who
    assert not visible_vsps(User.objects.get(pk=users["nobody"].pk)).exists()


def run(command: str, *args: str) -> str:
    out = StringIO()
    call_command(command, *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_the_demo_puts_its_vsps_in_two_groups_and_the_viewer_views_both(tmp_path):
    run("demo_users", "--secrets-dir", str(tmp_path))
    run("demo_fleet", "--secrets-dir", str(tmp_path))
    groups = {vsp.name: vsp.group.name for vsp in VSP.objects.select_related("group")}
    assert groups == {"vsp1": "Production", "vsp2": "Production", "vsp3": "Lab", "vsp4": "Lab"}
    viewer = User.objects.get(username="viewer")
    assert set(viewer.host_roles.values_list("group__name", "role")) == {
        ("Production", Role.VIEWER),
        ("Lab", Role.VIEWER),
    }
    assert visible_vsps(viewer).count() == 4

    lab_user = make_user("lab-only", ("vms.view_vsp", "vms.view_virtualmachine"), role=None)
    grant_role(lab_user, HostGroup.objects.get(name="Lab"), Role.OPERATOR)
    assert set(visible_vsps(lab_user).values_list("name", flat=True)) == {"vsp3", "vsp4"}
    assert "web01" not in set(visible_vms(lab_user).values_list("name", flat=True))
    assert "ldap01" in set(visible_vms(lab_user).values_list("name", flat=True))

    HostGroupMembership.objects.filter(user=viewer, group__name="Lab").update(role=Role.OPERATOR)
    run("demo_users", "--secrets-dir", str(tmp_path))  # a later run keeps a role the admin changed
    assert viewer.host_roles.get(group__name="Lab").role == Role.OPERATOR
