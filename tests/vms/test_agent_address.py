# ruff: noqa: S105, S106 - fake agent secrets are the point of these tests
"""A secret never goes to an agent in clear (issue 18 item 19).

QA: an ``http://`` agent URL was accepted while a certificate pin was registered; the pin was then not
applied and a newly entered secret went to the listener in clear. Tried on every path that sets an
address (the admin's add and change forms, model validation: no API or command sets one) and on the
one that uses it (the agent client: inventory, Refresh Data), with a real TCP listener recording what
it is sent (``test_agent_secrets.Listener``). In production (``DEBUG`` off) plain http is refused
outright unless ``AGENT_PLAIN_HTTP_ALLOWED``; the test settings allow it for other tests' stand-ins.
"""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from tests.factories import make_admin, make_vm, make_vsp
from tests.vms.test_agent_secrets import Listener, change_form
from vms.inventory import collect_all_inventory
from vms.models import VSP

pytestmark = pytest.mark.django_db

PIN = "AB:" * 31 + "CD"  # a SHA-256 fingerprint, as `openssl x509 -fingerprint -sha256` prints it
WITH_CERTIFICATE = "the agent address is plain http:// while an agent certificate is registered"
IN_PRODUCTION = "plain http:// agent addresses are refused here"


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def production(settings):
    settings.AGENT_PLAIN_HTTP_ALLOWED = False


def hears_nothing_after_using_the_vsp(client, vsp, listener) -> bool:
    vm = make_vm(f"on-{vsp.name}", vsp)
    collect_all_inventory()  # what the periodic inventory task runs
    refresh = client.get(f"/vms/{vm.pk}/general/refresh/", headers={"HX-Request": "true"})  # Refresh Data
    return refresh.status_code == 200 and listener.requests == []


def test_a_plain_http_address_beside_a_pinned_certificate_is_refused_and_the_new_secret_stays_home(
    client,
    listener,
):
    vsp = make_vsp("vsp1", agent_url="https://127.0.0.1:7101", agent_certificate=PIN, agent_secret="old")
    client.force_login(make_admin())
    form = change_form(vsp, agent_url=listener.url, agent_secret="new-secret", agent_certificate=PIN)

    response = client.post(f"/admin/vms/vsp/{vsp.pk}/change/", form)

    assert response.status_code == 200 and WITH_CERTIFICATE in response.text
    vsp.refresh_from_db()
    assert (vsp.agent_url, vsp.agent_secret) == ("https://127.0.0.1:7101", "old")
    assert hears_nothing_after_using_the_vsp(client, vsp, listener)


def test_a_new_vsp_with_a_certificate_needs_an_https_address(client, listener):
    client.force_login(make_admin())
    form = change_form(VSP(name="vsp9", memory_mib=1024, cpus=2), agent_url=listener.url, agent_secret="s")

    added = client.post("/admin/vms/vsp/add/", {**form, "agent_certificate": PIN})

    assert added.status_code == 200 and WITH_CERTIFICATE in added.text
    assert not VSP.objects.filter(name="vsp9").exists()
    assert listener.requests == []


def test_production_refuses_plain_http_outright_and_a_setting_allows_it(
    client, listener, production, settings
):
    vsp = make_vsp("vsp1", agent_url="https://127.0.0.1:7101", agent_secret="old")
    client.force_login(make_admin())
    form = change_form(vsp, agent_url=listener.url, agent_secret="new-secret")

    refused = client.post(f"/admin/vms/vsp/{vsp.pk}/change/", form)

    assert refused.status_code == 200 and IN_PRODUCTION in refused.text
    assert "AGENT_PLAIN_HTTP_ALLOWED" in refused.text
    vsp.refresh_from_db()
    assert vsp.agent_url == "https://127.0.0.1:7101"
    settings.AGENT_PLAIN_HTTP_ALLOWED = True  # a trusted, isolated agent network
    assert client.post(f"/admin/vms/vsp/{vsp.pk}/change/", form).status_code == 302


@pytest.mark.parametrize("certificate", [PIN, ""])
def test_an_address_stored_by_any_other_path_gets_no_secret_in_clear(
    client,
    listener,
    production,
    certificate,
):
    """A row written past the forms (an older release, the shell, a script): the client refuses to
    connect, and Refresh Data names why."""
    vsp = make_vsp("vsp1", agent_certificate=certificate, agent_secret="stored-secret")
    VSP.objects.filter(pk=vsp.pk).update(agent_url=listener.url)
    client.force_login(make_admin())

    assert hears_nothing_after_using_the_vsp(client, VSP.objects.get(pk=vsp.pk), listener)
    vm = VSP.objects.get(pk=vsp.pk).registrations.get().vm
    refresh = client.get(f"/vms/{vm.pk}/general/refresh/", headers={"HX-Request": "true"}).text
    assert (WITH_CERTIFICATE if certificate else IN_PRODUCTION).split(":")[0] in refresh.replace(
        "&#x27;", "'"
    )


def test_model_validation_refuses_the_same(production):
    with pytest.raises(ValidationError, match="certificate is registered"):
        VSP(name="a", agent_url="http://10.0.0.11:7101", agent_certificate=PIN, memory_mib=1, cpus=1).clean()
    with pytest.raises(ValidationError, match="refused here"):
        VSP(name="b", agent_url="http://10.0.0.11:7101", memory_mib=1, cpus=1).clean()
    VSP(name="c", agent_url="https://10.0.0.11:7101", agent_certificate=PIN, memory_mib=1, cpus=1).clean()
