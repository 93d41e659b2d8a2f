"""The evacuation plan form's refusals name the guest and the host in words, never a field name.

QA: a target that is the host being evacuated read "no such VSP", and "target_9: 'abc' is not a whole
number" named an internal field. Plain requests against the real views (no worker is asked).
"""

from __future__ import annotations

from html import unescape

import pytest

from evacuations.actions import EvacuationRefused, do_start_evacuation
from evacuations.models import Evacuation
from evacuations.plan import build_plan
from migrations_app.models import Migration
from tests.factories import MIGRATION_ADMIN_PERMISSIONS, make_user, make_vm, make_vsp

pytestmark = pytest.mark.django_db


@pytest.fixture
def host():
    vsp1 = make_vsp("vsp1", memory_mib=8192)
    make_vsp("vsp2", memory_mib=8192)
    return {"vsp1": vsp1, "web01": make_vm("web01", vsp=vsp1, memory_mib=256)}


def page(client, host, form, method="get"):
    from django.contrib.auth.models import User

    admin = User.objects.filter(username="admin").first() or make_user("admin", MIGRATION_ADMIN_PERMISSIONS)
    client.force_login(admin)
    url = f"/migrations/vsps/{host['vsp1'].pk}/evacuate/"
    response = getattr(client, method)(url, form)
    return response.status_code, " ".join(unescape(response.content.decode()).split())


def test_a_target_that_is_the_host_being_evacuated_says_so(client, host):
    vsp1, web01 = host["vsp1"], host["web01"]
    words = "web01 cannot go to vsp1: it is the host being evacuated; choose another target"

    plan = build_plan(vsp1, {web01.pk: vsp1.pk})
    assert plan.problems == [words]
    status, html = page(client, host, {f"target_{web01.pk}": vsp1.pk}, "post")
    assert status == 400 and words in html and "no such VSP" not in html
    with pytest.raises(EvacuationRefused, match="it is the host being evacuated"):
        do_start_evacuation(vsp1, {web01.pk: vsp1.pk}, None, make_user("other", MIGRATION_ADMIN_PERMISSIONS))
    assert not Evacuation.objects.exists() and not Migration.objects.exists()


def test_an_unknown_target_says_which_guest_and_id(host):
    plan = build_plan(host["vsp1"], {host["web01"].pk: 99_999})
    assert plan.problems == ["web01 cannot go to VSP 99999: there is no such VSP; choose another target"]


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("target", "abc", "Target for web01: 'abc' is not a VSP."),
        ("target", "-3", "Target for web01: '-3' is not a VSP."),
        ("position", "abc", "Position of web01: 'abc' is not a whole number of 1 or more."),
        ("position", "0", "Position of web01: '0' is not a whole number of 1 or more."),
    ],
)
def test_a_bad_field_names_the_guest_not_the_field(client, host, field, value, words):
    for method in ("get", "post"):
        status, html = page(client, host, {f"{field}_{host['web01'].pk}": value}, method)
        assert status == 400 and words in html, html[:2000]
        assert f"{field}_{host['web01'].pk}" not in html.split("<form")[0]  # no field name in the words
    assert not Evacuation.objects.exists()


def test_a_field_for_no_guest_says_to_reload_the_plan(client, host):
    status, html = page(client, host, {"target_x": "3"})
    assert status == 400 and "The plan has no field 'target_x': reload the plan." in html
