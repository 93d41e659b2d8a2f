# ruff: noqa: S105, S106 - fake agent secrets are the point of these tests
"""The Django admin (agent secret write-only) and the demo fleet / demo users commands."""

import stat
from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command

from tests.factories import make_admin, make_vsp
from vms.models import VSP, Registration, VirtualMachine
from vms.status import online_migration_status

pytestmark = pytest.mark.django_db


def test_the_admin_never_shows_the_agent_secret(client):
    vsp = make_vsp("h", agent_secret="very-secret-value")
    client.force_login(make_admin())
    assert "very-secret-value" not in client.get("/admin/vms/vsp/").text
    assert "very-secret-value" not in client.get(f"/admin/vms/vsp/{vsp.pk}/change/").text


def test_the_admin_keeps_the_secret_when_left_empty_and_replaces_it_when_given(client):
    vsp = make_vsp("h", agent_secret="old-secret")
    client.force_login(make_admin())
    form = {
        "name": "h",
        "agent_url": vsp.agent_url,
        "agent_secret": "",
        "migration_enabled": "on",
        "licensed": "on",
        "memory_mib": "1024",
        "cpus": "2",
        "agent_reachable": "on",
    }
    assert client.post(f"/admin/vms/vsp/{vsp.pk}/change/", form).status_code == 302
    vsp.refresh_from_db()
    assert vsp.agent_secret == "old-secret"
    client.post(f"/admin/vms/vsp/{vsp.pk}/change/", {**form, "agent_secret": "new-secret"})
    vsp.refresh_from_db()
    assert vsp.agent_secret == "new-secret"


def run(command: str, *args: str) -> str:
    out = StringIO()
    call_command(command, *args, stdout=out)
    return out.getvalue()


def test_the_demo_fleet_shows_every_status_row_a_vpar_and_a_not_runnable_copy(tmp_path):
    run("demo_fleet", "--secrets-dir", str(tmp_path))
    shown = {
        online_migration_status(vm, vm.current_vsp).label
        for vm in VirtualMachine.objects.prefetch_related("registrations__vsp")
    }
    assert {"Host disabled", "Host not licensed", "VM enabled", "VM disabled"} <= shown
    assert "vPar does not support migration" in shown
    assert VirtualMachine.objects.filter(kind="vpar").count() == 2
    copy = Registration.objects.get(hardware_status="not_runnable")
    assert (copy.not_runnable_set_by, copy.not_runnable_reason) == ("migrate", "guest migrated to VSP vsp2")
    sizes = VirtualMachine.objects.values_list("memory_mib", flat=True)
    assert 128 <= min(sizes) and max(sizes) <= 4096


def test_the_demo_fleet_is_idempotent_and_shares_secrets_through_files(tmp_path):
    (tmp_path / "vsp1.secret").write_text("given-secret\n")
    run("demo_fleet", "--secrets-dir", str(tmp_path), "--agents-base-port", "8100")
    counts = (VSP.objects.count(), VirtualMachine.objects.count(), Registration.objects.count())
    run("demo_fleet", "--secrets-dir", str(tmp_path), "--agents-base-port", "8100")
    assert (VSP.objects.count(), VirtualMachine.objects.count(), Registration.objects.count()) == counts
    assert VSP.objects.get(name="vsp1").agent_secret == "given-secret"
    assert VSP.objects.get(name="vsp2").agent_url == "http://127.0.0.1:8101"
    written = tmp_path / "vsp2.secret"
    assert written.read_text().strip() == VSP.objects.get(name="vsp2").agent_secret
    assert stat.S_IMODE(written.stat().st_mode) == 0o600


def test_demo_users_are_an_admin_and_a_read_only_viewer(monkeypatch, tmp_path):
    monkeypatch.setenv("DEMO_ADMIN_PASSWORD", "pw-for-admin")
    output = run("demo_users", "--secrets-dir", str(tmp_path))
    run("demo_users", "--secrets-dir", str(tmp_path))
    assert "admin / pw-for-admin" in output
    admin, viewer = User.objects.get(username="admin"), User.objects.get(username="viewer")
    assert admin.is_superuser and admin.check_password("pw-for-admin")
    assert viewer.groups.filter(name="Viewers").exists()
    assert viewer.has_perm("vms.view_virtualmachine")
    assert not viewer.has_perm("vms.change_virtualmachine")
    assert not viewer.has_perm("vms.change_registration")
    assert not User.objects.filter(username="operator").exists()  # the role's name, not a login's


def test_an_older_consoles_read_only_operator_login_becomes_viewer_with_its_password(monkeypatch, tmp_path):
    """Issue 21.7: the read-only login was 'operator', the name of the role that may migrate."""
    from django.contrib.auth.models import Group

    old = User.objects.create_user("operator", password="kept-password")
    old.groups.add(Group.objects.create(name="Operators"))
    (tmp_path / "operator-password").write_text("kept-password\n")
    output = run("demo_users", "--secrets-dir", str(tmp_path))
    assert "operator: renamed viewer" in output
    viewer = User.objects.get(username="viewer")
    assert viewer.pk == old.pk and viewer.check_password("kept-password")
    assert viewer.groups.filter(name="Viewers").exists() and viewer.has_perm("vms.view_virtualmachine")
    assert (tmp_path / "viewer-password").read_text().strip() == "kept-password"
    assert not User.objects.filter(username="operator").exists()


def test_the_first_run_generates_a_random_admin_password_kept_private_and_printed(monkeypatch, tmp_path):
    monkeypatch.delenv("DEMO_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("DEMO_VIEWER_PASSWORD", raising=False)
    output = run("demo_users", "--secrets-dir", str(tmp_path))
    kept = tmp_path / "admin-password"
    password = kept.read_text().strip()
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert len(password) >= 16 and password != "matrixoe-demo"
    assert f"admin / {password}" in output
    assert User.objects.get(username="admin").check_password(password)
    other_dir = tmp_path / "another-machine"
    User.objects.all().delete()
    run("demo_users", "--secrets-dir", str(other_dir))
    assert (other_dir / "admin-password").read_text().strip() != password  # random, not fixed


def test_a_password_the_admin_changed_is_never_reset(monkeypatch, tmp_path):
    monkeypatch.setenv("DEMO_ADMIN_PASSWORD", "first-run-password")
    run("demo_users", "--secrets-dir", str(tmp_path))
    admin = User.objects.get(username="admin")
    admin.set_password("changed-by-the-admin")
    admin.save()

    output = run("demo_users", "--secrets-dir", str(tmp_path))
    monkeypatch.delenv("DEMO_ADMIN_PASSWORD")
    run("demo_users", "--secrets-dir", str(tmp_path))

    admin.refresh_from_db()
    assert admin.check_password("changed-by-the-admin")
    assert "password unchanged" in output and "first-run-password" not in output
