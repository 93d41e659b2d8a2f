"""Nobody loses access on upgrade: existing VSPs join the host group "Default", and each user who
held global model permissions gets the role there that lets them do what they could do before
(change permissions: administrator; add or change migrations: operator; view: viewer)."""

from django.conf import settings
from django.db import migrations
from django.db.models import Q

DEFAULT_GROUP = "Default"
ADMINISTRATOR_PERMISSIONS = Q(content_type__app_label="vms", codename__in=["change_virtualmachine", "change_registration"])
OPERATOR_PERMISSIONS = Q(content_type__app_label="migrations_app", codename__in=["add_migration", "change_migration"])
VIEWER_PERMISSIONS = Q(content_type__app_label="vms", codename__startswith="view_")


def held(user, permissions, condition) -> bool:
    """Whether ``user`` holds any permission matching ``condition``, directly or through an auth group."""
    matching = permissions.filter(condition)
    return matching.filter(Q(user=user) | Q(group__user=user)).exists()


def forwards(apps, schema_editor):
    vsp_model = apps.get_model("vms", "VSP")
    if not vsp_model.objects.exists():
        return  # a new installation: groups are made by the admin (or the demo)
    group_model = apps.get_model("vms", "HostGroup")
    membership_model = apps.get_model("vms", "HostGroupMembership")
    permission_model = apps.get_model("auth", "Permission")
    user_model = apps.get_model(*settings.AUTH_USER_MODEL.split("."))
    group, _ = group_model.objects.get_or_create(
        name=DEFAULT_GROUP, defaults={"description": "Every VSP that existed before host groups."}
    )
    vsp_model.objects.filter(group__isnull=True).update(group=group)
    for user in user_model.objects.filter(is_superuser=False, is_active=True):
        if held(user, permission_model.objects, ADMINISTRATOR_PERMISSIONS):
            role = "administrator"
        elif held(user, permission_model.objects, OPERATOR_PERMISSIONS):
            role = "operator"
        elif held(user, permission_model.objects, VIEWER_PERMISSIONS):
            role = "viewer"
        else:
            continue
        membership_model.objects.get_or_create(group=group, user=user, defaults={"role": role})


class Migration(migrations.Migration):
    dependencies = [
        ("vms", "0007_host_groups"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
