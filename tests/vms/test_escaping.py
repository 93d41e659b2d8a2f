"""User-supplied names are shown as text everywhere, never interpreted as HTML."""

import pytest

from tests.factories import make_admin, make_registration, make_vm, make_vsp
from vms.models import Registration

pytestmark = pytest.mark.django_db

EVIL_VM = '<script>alert("vm")</script>'
EVIL_VSP = "<img src=x onerror=alert(1)>"
EVIL_REASON = "<b>bold</b> & co"


def test_html_in_names_and_reasons_is_escaped_on_every_page(client):
    vsp = make_vsp(EVIL_VSP)
    vm = make_vm(EVIL_VM, vsp=vsp, os_type="<i>os</i>")
    other = make_vsp("other")
    Registration.objects.filter(vm=vm).update(
        hardware_status="not_runnable", not_runnable_set_by="admin", not_runnable_reason=EVIL_REASON
    )
    make_registration(vm, other, "off")
    client.force_login(make_admin())
    pages = ["/", "/vsps/", f"/vsps/{vsp.pk}/", f"/vms/{vm.pk}/general/?vsp={vsp.pk}", f"/?q={EVIL_VM}"]
    for url in pages:
        html = client.get(url).text
        assert EVIL_VM not in html, url
        assert EVIL_VSP not in html, url
        assert "<i>os</i>" not in html, url
        assert "<b>bold</b>" not in html, url
    general = client.get(f"/vms/{vm.pk}/general/?vsp={vsp.pk}").text
    assert "&lt;script&gt;alert(&quot;vm&quot;)&lt;/script&gt;" in general
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in general


def test_html_in_a_name_is_escaped_in_messages(client):
    vsp = make_vsp(EVIL_VSP)
    vm = make_vm(EVIL_VM, vsp=vsp, hardware_status="off")
    client.force_login(make_admin())
    response = client.post(f"/vms/{vm.pk}/online-migration/", {"enabled": "false"}, follow=True)
    assert "Online migration disabled for &lt;script&gt;" in response.text
    assert EVIL_VM not in response.text
    registration = vm.registrations.get()
    response = client.post(
        f"/registrations/{registration.pk}/not-runnable/",
        {"reason": EVIL_REASON},
        headers={"HX-Request": "true"},
    )
    assert EVIL_VSP not in response.text
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in response.text
