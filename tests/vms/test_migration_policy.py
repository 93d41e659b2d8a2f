"""A VM's default migration policy on the General tab: presets, custom values, bounds, permission, audit."""

import pytest

from migrations_app import migration_policy
from tests.factories import make_user
from tests.vms.html_fields import read_fields
from vms.models import AuditEvent, VirtualMachine

pytestmark = pytest.mark.django_db

HTMX = {"HX-Request": "true"}


def url(vm):
    return f"/vms/{vm.pk}/migration-policy/"


def test_it_shows_the_default_policy_in_words(vm_admin_client, fleet):
    fields = read_fields(vm_admin_client.get(f"/vms/{fleet['web'].pk}/general/").text)
    assert fields["migration_policy"].startswith(
        "Default: at most 300 ms frozen; no bandwidth cap; no throttling"
    )


def test_it_sets_a_preset_and_records_who_changed_what(vm_admin_client, fleet):
    response = vm_admin_client.post(url(fleet["web"]), {"preset": "guaranteed_completion"}, headers=HTMX)
    assert response.status_code == 200
    assert read_fields(response.text)["migration_policy"].startswith("Guaranteed completion: at most 300 ms")
    policy = VirtualMachine.objects.get(pk=fleet["web"].pk).migration_policy
    assert policy["auto_converge"] is True and policy["at_limit"] == "switchover"
    event = AuditEvent.objects.get(action=AuditEvent.Action.MIGRATION_POLICY_CHANGED)
    assert event.actor_name == "vm-admin"
    assert event.before["preset"] == "default" and event.after["preset"] == "guaranteed_completion"


def test_it_sets_custom_values(vm_admin_client, fleet):
    form = {
        "preset": "custom",
        "max_downtime_ms": "800",
        "bandwidth_cap_mb_s": "250",
        "throttle_max_pct": "60",
        "downtime_step_ms": "",
        "downtime_max_ms": "",
        "at_limit": "abort",
        "auto_converge": "true",
        "no_progress_s": "90",
    }
    response = vm_admin_client.post(url(fleet["web"]), form, headers=HTMX)
    assert response.status_code == 200, response.text
    policy = VirtualMachine.objects.get(pk=fleet["web"].pk).migration_policy
    assert policy == {
        "preset": "custom",
        "max_downtime_ms": 800,
        "bandwidth_cap_mb_s": 250.0,
        "auto_converge": True,
        "throttle_max_pct": 60,
        "downtime_step_ms": 0,
        "downtime_max_ms": None,
        "at_limit": "abort",
        "no_progress_s": 90,
    }
    assert "throttles the guest up to 60%" in read_fields(response.text)["migration_policy"]


@pytest.mark.parametrize(
    ("form", "words"),
    [
        ({"max_downtime_ms": "-5"}, "Maximum downtime: a whole number from 1 to 600000 ms, not -5."),
        ({"max_downtime_ms": "soon"}, "Maximum downtime: a number, not &#x27;soon&#x27;."),
        ({"bandwidth_cap_mb_s": "1e12"}, "Bandwidth cap: from 0.001 to 100000 MB/s in steps of 0.001 MB/s"),
        ({"throttle_max_pct": "150"}, "Throttle ceiling: a whole number from 1 to 99 %"),
        ({"downtime_step_ms": "100", "downtime_max_ms": ""}, "Downtime escalation needs a ceiling"),
        ({"max_downtime_ms": "500", "downtime_max_ms": "200"}, "must be at least the maximum downtime"),
        ({"at_limit": "explode"}, "At the limit: choose abort or switchover."),
        ({"preset": "fastest"}, "Unknown preset"),
    ],
)
def test_bad_values_are_refused_in_plain_words_and_change_nothing(vm_admin_client, fleet, form, words):
    response = vm_admin_client.post(url(fleet["web"]), {"preset": "custom", **form}, headers=HTMX)
    assert response.status_code == 400
    assert words in response.text
    assert VirtualMachine.objects.get(pk=fleet["web"].pk).migration_policy == {}
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.MIGRATION_POLICY_CHANGED).exists()


def test_a_read_only_user_cannot_change_the_policy(client, fleet):
    client.force_login(make_user("operator", ("vms.view_virtualmachine", "vms.view_vsp")))
    response = client.post(url(fleet["web"]), {"preset": "minimal_downtime"}, headers=HTMX)
    assert response.status_code == 403
    assert VirtualMachine.objects.get(pk=fleet["web"].pk).migration_policy == {}
    assert "Change policy" not in client.get(f"/vms/{fleet['web'].pk}/general/").text


def test_a_vpar_has_no_migration_policy_to_set(vm_admin_client, fleet):
    response = vm_admin_client.post(url(fleet["vpar"]), {"preset": "minimal_downtime"}, headers=HTMX)
    assert response.status_code == 400
    assert "a vPar does not support migration" in response.text


def test_the_agent_params_carry_every_setting():
    policy = migration_policy.check_policy(
        {"preset": "custom", "max_downtime_ms": 700, "bandwidth_cap_mb_s": 100, "auto_converge": True,
         "throttle_max_pct": 80, "downtime_step_ms": 100, "downtime_max_ms": 1500, "at_limit": "switchover"}
    )  # fmt: skip
    params = migration_policy.agent_params(policy, max_rounds=12, site_cap_mbps=400)
    assert params.model_dump(exclude_unset=True) == {
        "downtime_ms": 700,
        "bandwidth_mbps": 400,  # the site's 50 MB/s is lower than the policy's 100 MB/s
        "max_rounds": 12,
        "auto_converge": True,
        "throttle_initial_pct": 20,
        "throttle_increment_pct": 10,
        "throttle_max_pct": 80,
        "downtime_step_ms": 100,
        "downtime_max_ms": 1500,
        "at_limit": "switchover",
    }


def test_a_bandwidth_cap_of_zero_means_no_cap_in_the_form_as_in_the_api(vm_admin_client, fleet):
    """QA: the API and CLI took 0 as "no cap" while the pages refused it ("from 1 to 100000, not 0")."""
    form = {"preset": "custom", "bandwidth_cap_mb_s": "0", "max_downtime_ms": "400"}
    response = vm_admin_client.post(url(fleet["web"]), form, headers=HTMX)
    assert response.status_code == 200, response.text
    stored = VirtualMachine.objects.get(pk=fleet["web"].pk).migration_policy
    assert stored["bandwidth_cap_mb_s"] is None and stored["max_downtime_ms"] == 400


def test_every_bad_field_is_told_at_once():
    """Issue 21.4: a validation error showed one field's error; the others were found one submit later."""
    from migrations_app.migration_policy import policy_errors

    raw = {"preset": "custom", "max_downtime_ms": "0", "bandwidth_cap_mb_s": "-2", "throttle_max_pct": "120"}
    errors = policy_errors(raw)
    assert set(errors) == {"max_downtime_ms", "bandwidth_cap_mb_s", "throttle_max_pct"}
    assert errors["throttle_max_pct"].startswith("Throttle ceiling: a whole number from 1 to 99")
    assert policy_errors({"preset": "custom", "max_downtime_ms": "500"}) == {}
    ceiling = policy_errors({"preset": "custom", "max_downtime_ms": "500", "downtime_max_ms": "400"})
    assert list(ceiling) == ["downtime_max_ms"]


@pytest.mark.parametrize(
    ("typed", "taken"),
    [("0", None), ("", None), ("0.5", 0.5), ("0.001", 0.001), ("100000", 100000), ("12.345", 12.345)],
)
def test_the_server_takes_every_bandwidth_cap_the_dialog_field_takes(typed, taken):
    """The field is <input type=number min=0 max=100000 step=0.001>: the server takes the same values."""
    from migrations_app.migration_policy import check_value

    assert check_value("bandwidth_cap_mb_s", typed) == taken


@pytest.mark.parametrize("typed", ["-1", "0.0005", "100000.001", "12.3456"])
def test_the_server_refuses_every_bandwidth_cap_the_dialog_field_refuses(typed):
    from migrations_app.migration_policy import PolicyError, check_value

    with pytest.raises(PolicyError, match="Bandwidth cap: from 0.001 to 100000 MB/s in steps of 0.001 MB/s"):
        check_value("bandwidth_cap_mb_s", typed)
