"""``manage.py demo_users``: the demo logins of ``make run``, created once and never reset.

A command of this app (not of ``vms``) because the read-only viewer may view migrations too.

On the first run 'admin' (superuser) and 'viewer' (read-only, group Viewers, a viewer of the demo
host groups Production and Lab) are created with DEMO_ADMIN_PASSWORD / DEMO_VIEWER_PASSWORD when set,
else with a random password that is printed and kept in ``<secrets-dir>/admin-password`` /
``viewer-password`` (mode 0600). On later runs an existing user's password is left alone, so a
password the admin changed stays changed.

The read-only login was called 'operator' before, while *operator* is the host-group role that may
migrate (issue 21.7): a console made then has its 'operator' login renamed 'viewer' (password kept,
its password file too) and its group Operators renamed Viewers, once, when no 'viewer' exists yet.
"""

import os
import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand, CommandParser

from vms.demo import demo_host_groups
from vms.models import HostGroupMembership, Role

READ_ONLY_APPS = ("vms", "migrations_app", "evacuations")


def first_password(variable: str, path: Path) -> str:
    """``$variable`` when set, else the password kept in ``path`` (generated there once, mode 0600)."""
    given = os.environ.get(variable)
    if given:
        return given
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text().strip():
        path.chmod(0o600)
        return path.read_text().strip()
    password = secrets.token_urlsafe(12)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(password + "\n")
    path.chmod(0o600)
    return password


class Command(BaseCommand):
    help = (
        "Create the demo users once: 'admin' (superuser) and 'viewer' (read-only, group Viewers), "
        "with DEMO_ADMIN_PASSWORD / DEMO_VIEWER_PASSWORD or a random password kept in the secrets "
        "directory (0600). Existing users' passwords are never reset."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--secrets-dir",
            type=Path,
            default=Path(settings.BASE_DIR) / "var",
            help="Where first-run passwords are kept (default: var/).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        secrets_dir: Path = options["secrets_dir"]
        users = get_user_model()
        renamed = rename_old_read_only_login(secrets_dir)
        if renamed:
            self.stdout.write(renamed)
        for username, variable, superuser, label in (
            ("admin", "DEMO_ADMIN_PASSWORD", True, "superuser"),
            ("viewer", "DEMO_VIEWER_PASSWORD", False, "read-only: viewer of Production and Lab"),
        ):
            user = users.objects.filter(username=username).first()
            if user is None:
                password_file = secrets_dir / f"{username}-password"
                password = first_password(variable, password_file)
                user = users(username=username, email=f"{username}@example.com")
                user.is_staff = user.is_superuser = superuser
                user.set_password(password)
                user.save()
                kept = "" if os.environ.get(variable) else f"; kept in {password_file}"
                self.stdout.write(f"{username} / {password}   ({label}; created now{kept})")
            else:
                self.stdout.write(f"{username}: exists, password unchanged   ({label})")
            if not superuser:
                user.groups.add(viewers_group())
                for group in demo_host_groups().values():  # a role an admin changed is kept
                    HostGroupMembership.objects.get_or_create(
                        group=group, user=user, defaults={"role": Role.VIEWER}
                    )


def rename_old_read_only_login(secrets_dir: Path) -> str:
    """Rename the read-only demo login 'operator' (and its group Operators) of an older console to
    'viewer' (Viewers), keeping its password and its password file; "" when there is nothing to rename
    (no such user, a 'viewer' already, or an 'operator' that is not the demo's read-only login: a
    superuser or outside group Operators). Returns what was done, in words."""
    users = get_user_model()
    if not Group.objects.filter(name="Viewers").exists():
        Group.objects.filter(name="Operators").update(name="Viewers")
    old = users.objects.filter(username="operator", is_superuser=False, groups__name="Viewers").first()
    if old is None or users.objects.filter(username="viewer").exists():
        return ""
    old.username = "viewer"
    old.save(update_fields=["username"])
    old_file, new_file = secrets_dir / "operator-password", secrets_dir / "viewer-password"
    if old_file.exists() and not new_file.exists():
        old_file.rename(new_file)
    return "operator: renamed viewer (the read-only login; password unchanged)"


def viewers_group() -> Group:
    """The read-only group: every view permission of the console's apps, nothing else."""
    group, _ = Group.objects.get_or_create(name="Viewers")
    view_permissions = Permission.objects.filter(
        content_type__app_label__in=READ_ONLY_APPS, codename__startswith="view_"
    )
    group.permissions.set(view_permissions)
    return group
