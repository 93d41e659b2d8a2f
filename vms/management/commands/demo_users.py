import os
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand

DEFAULT_PASSWORD = "matrixoe-demo"  # noqa: S105 - demo only, printed so the admin can log in
READ_ONLY_APPS = ("vms", "migrations_app")


class Command(BaseCommand):
    help = (
        "Create (idempotently) the demo users: 'admin' (superuser) and 'operator' (read-only, group "
        "Operators). Passwords from DEMO_ADMIN_PASSWORD and DEMO_OPERATOR_PASSWORD (default: the admin's)."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        admin_password = os.environ.get("DEMO_ADMIN_PASSWORD") or DEFAULT_PASSWORD
        operator_password = os.environ.get("DEMO_OPERATOR_PASSWORD") or admin_password
        users = get_user_model()
        admin, _ = users.objects.get_or_create(username="admin", defaults={"email": "admin@example.com"})
        admin.is_staff = admin.is_superuser = True
        admin.set_password(admin_password)
        admin.save()
        operator, _ = users.objects.get_or_create(username="operator")
        operator.set_password(operator_password)
        operator.save()
        operator.groups.add(operators_group())
        self.stdout.write(f"admin / {admin_password}   (superuser)")
        self.stdout.write(f"operator / {operator_password}   (read-only, group Operators)")


def operators_group() -> Group:
    """The read-only group: every view permission of the console's apps, nothing else."""
    group, _ = Group.objects.get_or_create(name="Operators")
    view_permissions = Permission.objects.filter(
        content_type__app_label__in=READ_ONLY_APPS, codename__startswith="view_"
    )
    group.permissions.set(view_permissions)
    return group
