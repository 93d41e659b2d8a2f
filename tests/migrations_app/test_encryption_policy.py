"""The data-plane encryption policy per VSP pair, and the agent certificate each VSP registers.

Real agents (TLS, the session's test CA), a real Celery worker, real Redis.
"""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from migrations_app.actions import do_request_migration
from tests.factories import make_admin, make_user
from tests.migrations_app.guests import place_vm, runs_on, wait_for_state
from tests.migrations_app.test_inventory import refresh_page
from vms.models import VSP, AuditEvent, PairEncryption

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_migrates_over_the_plain_data_plane_when_the_pair_policy_is_off(
    host_agents, fleet, admin, migration_worker, wait_for
):
    PairEncryption.objects.create(vsp_a=fleet["hostc"], vsp_b=fleet["hosta"], encryption="off")
    assert PairEncryption.policy_between(fleet["hosta"], fleet["hostc"]) == "off"
    vm = place_vm(host_agents, fleet)
    migration = do_request_migration(vm, fleet["hostc"], admin)
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled")
    assert migration.state == "completed", migration.alert
    assert runs_on(host_agents["hostc"], vm.name)


def test_the_migrate_dialog_shows_each_targets_data_plane_policy(host_agents, fleet):
    PairEncryption.objects.create(vsp_a=fleet["hosta"], vsp_b=fleet["hostb"], encryption="off")
    vm = place_vm(host_agents, fleet)
    client = Client()
    client.force_login(make_admin("root"))
    html = client.get(reverse("migrations_app:migrate", args=[vm.pk])).content.decode()

    def row(name: str) -> str:
        start = html.index(f'data-vsp="{name}"')
        return html[start : html.index("</tr>", start)]

    assert "Not encrypted" in row("hostb") and 'data-encryption="off"' in row("hostb")
    assert "Encrypted (mutual TLS)" in row("hostc") and 'data-encryption="required"' in row("hostc")


def test_only_superusers_change_a_pair_policy_and_each_change_is_audited(fleet):
    staff = make_user(
        "staff", is_staff=True, permissions=("vms.change_pairencryption", "vms.add_pairencryption")
    )
    client = Client()
    client.force_login(staff)
    add = reverse("admin:vms_pairencryption_add")
    form = {"vsp_a": fleet["hostb"].pk, "vsp_b": fleet["hosta"].pk, "encryption": "off", "reason": "lab"}
    assert client.post(add, form).status_code == 403
    assert not PairEncryption.objects.exists()

    client.force_login(make_admin("root"))
    response = client.post(add, form)
    assert response.status_code == 302, response.content.decode()[:2000]
    policy = PairEncryption.objects.get()
    assert (policy.vsp_a, policy.vsp_b, policy.encryption) == (fleet["hosta"], fleet["hostb"], "off")
    event = AuditEvent.objects.get(object_type="vms.pairencryption")
    assert event.after["encryption"] == "off"
    again = client.post(add, {**form, "vsp_a": fleet["hosta"].pk, "vsp_b": fleet["hostb"].pk})
    assert "already has a policy" in again.content.decode()
    assert PairEncryption.objects.count() == 1


def test_refresh_data_names_the_host_whose_agent_certificate_is_not_the_registered_one(host_agents, fleet):
    vm = place_vm(host_agents, fleet)
    VSP.objects.filter(pk=fleet["hosta"].pk).update(agent_certificate="AB:" * 31 + "AB")
    html = refresh_page(vm)
    assert "Host hosta presented a TLS certificate the console does not trust" in html
    assert not VSP.objects.get(pk=fleet["hosta"].pk).agent_reachable


def test_a_registered_fingerprint_is_checked_and_normalised_in_the_admin(fleet):
    client = Client()
    client.force_login(make_admin("root"))
    vsp = fleet["hostb"]
    change = reverse("admin:vms_vsp_change", args=[vsp.pk])
    page = client.get(change).content.decode()
    assert 'name="agent_certificate"' in page
    base = {
        "name": vsp.name,
        "agent_url": vsp.agent_url,
        "agent_secret": "",
        "migration_enabled": "on",
        "licensed": "on",
        "memory_mib": vsp.memory_mib,
        "cpus": vsp.cpus,
        "agent_reachable": "on",
    }
    refused = client.post(change, {**base, "agent_certificate": "not a fingerprint"})
    assert "SHA-256 fingerprint" in refused.content.decode()
    accepted = client.post(change, {**base, "agent_certificate": "ab" * 32})
    assert accepted.status_code == 302
    assert VSP.objects.get(pk=vsp.pk).agent_certificate == ":".join(["AB"] * 32)
