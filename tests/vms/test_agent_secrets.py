# ruff: noqa: S105, S106 - fake agent secrets are the point of these tests
"""Agent secrets: never sent to a changed address, changed only by superusers, encrypted at rest.

The "listener" is a real TCP server on loopback that records every Authorization header it is
sent, standing in for whoever an admin (or an attacker who fooled one) points a VSP at.
"""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest
from django.contrib.auth.models import Permission
from django.db import connection

from tests.factories import make_admin, make_user, make_vm, make_vsp
from vms.fields import decrypt_secret
from vms.inventory import collect_all_inventory
from vms.models import VSP

pytestmark = pytest.mark.django_db


class Listener:
    """Accepts connections on 127.0.0.1, records request headers, answers 503."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    self.requests.append(data)
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    def authorizations(self) -> list[str]:
        found = []
        for request in self.requests:
            for line in request.split(b"\r\n"):
                if line.lower().startswith(b"authorization:"):
                    found.append(line.decode(errors="replace"))
        return found

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


def change_form(vsp: VSP, **changes: str) -> dict[str, str]:
    form = {
        "name": vsp.name,
        "agent_url": vsp.agent_url,
        "agent_secret": "",
        "migration_enabled": "on",
        "licensed": "on",
        "memory_mib": str(vsp.memory_mib),
        "cpus": str(vsp.cpus),
        "agent_reachable": "on",
    }
    form.update(changes)
    return form


def test_an_agent_address_change_without_the_secret_is_refused_and_no_listener_hears_a_secret(
    client, listener
):
    vsp = make_vsp("vsp1", agent_secret="old-secret-of-vsp1")
    vm = make_vm("web01", vsp)
    old_url = vsp.agent_url
    client.force_login(make_admin())

    response = client.post(f"/admin/vms/vsp/{vsp.pk}/change/", change_form(vsp, agent_url=listener.url))

    assert response.status_code == 200
    assert "enter the agent&#x27;s secret again" in response.text
    vsp.refresh_from_db()
    assert vsp.agent_url == old_url and vsp.agent_secret == "old-secret-of-vsp1"
    collect_all_inventory()  # what the periodic inventory task runs
    client.get(f"/vms/{vm.pk}/general/refresh/", headers={"HX-Request": "true"})  # Refresh Data
    assert listener.authorizations() == []


def test_an_agent_address_change_with_a_new_secret_sends_only_the_new_one(client, listener):
    vsp = make_vsp("vsp1", agent_secret="old-secret-of-vsp1")
    vm = make_vm("web01", vsp)
    client.force_login(make_admin())

    response = client.post(
        f"/admin/vms/vsp/{vsp.pk}/change/",
        change_form(vsp, agent_url=listener.url, agent_secret="new-secret-for-listener"),
    )

    assert response.status_code == 302
    collect_all_inventory()
    client.get(f"/vms/{vm.pk}/general/refresh/", headers={"HX-Request": "true"})
    heard = listener.authorizations()
    assert heard and all("new-secret-for-listener" in line for line in heard)
    assert not any("old-secret-of-vsp1" in line for line in heard)


def test_the_admin_form_says_the_secret_is_needed_again_when_the_address_changes(client):
    vsp = make_vsp("vsp1")
    client.force_login(make_admin())
    assert (
        "required again whenever the agent URL changes" in client.get(f"/admin/vms/vsp/{vsp.pk}/change/").text
    )


def test_only_superusers_change_agent_addresses_or_secrets(client, listener):
    vsp = make_vsp("vsp1", agent_secret="old-secret-of-vsp1")
    old_url = vsp.agent_url
    staff = make_user("staff-admin", ("vms.view_vsp", "vms.change_vsp", "vms.add_vsp"))
    staff.is_staff = True
    staff.save()
    assert Permission.objects.filter(user=staff).count() == 3
    client.force_login(staff)

    page = client.get(f"/admin/vms/vsp/{vsp.pk}/change/").text
    assert 'name="agent_url"' not in page and 'name="agent_secret"' not in page
    response = client.post(
        f"/admin/vms/vsp/{vsp.pk}/change/",
        change_form(vsp, agent_url=listener.url, agent_secret="sneaked-in", migration_enabled=""),
    )
    assert response.status_code == 302  # the other fields may change...
    vsp.refresh_from_db()
    assert not vsp.migration_enabled
    assert vsp.agent_url == old_url and vsp.agent_secret == "old-secret-of-vsp1"  # ...these may not
    assert client.get("/admin/vms/vsp/add/").status_code == 403


def stored_secret(vsp: VSP) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT agent_secret FROM vms_vsp WHERE id = %s", [vsp.pk])
        return cursor.fetchone()[0]


def test_agent_secrets_are_stored_encrypted_and_read_back_plain():
    vsp = make_vsp("vsp1", agent_secret="plain-agent-secret")
    stored = stored_secret(vsp)
    assert "plain-agent-secret" not in stored and stored.startswith("gAAAAA")
    assert decrypt_secret(stored) == "plain-agent-secret"
    assert VSP.objects.get(pk=vsp.pk).agent_secret == "plain-agent-secret"
    assert "plain-agent-secret" not in repr(vsp)


def test_the_data_migration_encrypts_existing_plain_secrets_once(django_db_blocker):
    from importlib import import_module

    migration = import_module("vms.migrations.0004_encrypt_agent_secret")
    vsp = make_vsp("vsp1", agent_secret="x")
    with connection.cursor() as cursor:
        cursor.execute("UPDATE vms_vsp SET agent_secret = %s WHERE id = %s", ["legacy-plain-secret", vsp.pk])
    editor = SimpleNamespace(connection=connection)

    migration.encrypt_existing(None, editor)
    once = stored_secret(vsp)
    migration.encrypt_existing(None, editor)

    assert once.startswith("gAAAAA") and "legacy-plain-secret" not in once
    assert stored_secret(vsp) == once  # already encrypted: left alone
    assert VSP.objects.get(pk=vsp.pk).agent_secret == "legacy-plain-secret"
