"""Migrations over the API without a worker: creating (queued), refusals in the page's words, bad input,
permissions, the Idempotency-Key, listing and filtering, cancelling a queued one.

No worker runs here: in these (non-transactional) tests the queued job is never sent, so each migration
stays Queued; ``test_live.py`` drives real ones.
"""

from __future__ import annotations

from datetime import UTC
from unittest.mock import ANY

import pytest

from migrations_app.history import record_refusal
from migrations_app.migration_policy import PolicyError, check_policy
from migrations_app.models import Migration
from tests.api.test_inventory_api import assert_problem
from tests.factories import make_migration, make_vm, make_vsp

pytestmark = pytest.mark.django_db


@pytest.fixture
def hosts():
    return make_vsp("hosta"), make_vsp("hostb")


def test_it_queues_a_migration_by_names(api, hosts):
    make_vm("web01", vsp=hosts[0])

    response = api.post("/migrations", {"vm": "web01", "target": "hostb"})

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["vm"], body["source"], body["target"], body["state"]["value"]) == (
        "web01",
        "hosta",
        "hostb",
        "queued",
    )
    assert [p["label"] for p in body["phases"]] == ["Init", "Copy", "I/O Quiesce", "Frozen"]
    assert body["requested_by"] == "alice"
    assert Migration.objects.get().target == hosts[1]


def test_it_accepts_ids_too(api, hosts):
    vm = make_vm("web01", vsp=hosts[0])

    response = api.post("/migrations", {"vm": str(vm.pk), "target": str(hosts[1].pk)})

    assert response.status_code == 201, response.content


@pytest.mark.parametrize(
    ("vm_fields", "target", "detail"),
    [
        ({"kind": "vpar"}, "hostb", "web01 cannot migrate to hostb: vPars do not migrate."),
        (
            {"online_migration_enabled": False},
            "hostb",
            "web01 cannot migrate to hostb: VM not enabled for online migration.",
        ),
        ({}, "hosta", "web01 cannot migrate to hosta: same host."),
        (
            {"memory_mib": 999_999},
            "hostb",
            "web01 cannot migrate to hostb: not enough free memory (needs 999999 MiB, 16384 MiB free).",
        ),
    ],
)
def test_it_refuses_with_the_dialogs_words_and_changes_nothing(api, hosts, vm_fields, target, detail):
    make_vm("web01", vsp=hosts[0], **vm_fields)

    response = api.post("/migrations", {"vm": "web01", "target": target})

    assert_problem(response, 409, detail)
    # Nothing starts; the refused attempt is kept in the history, as the dialog's refusals are.
    assert list(Migration.objects.values_list("state", "alert")) == [("refused", detail)]


def test_it_refuses_a_vm_already_migrating(api, hosts):
    make_vm("web01", vsp=hosts[0])
    make_vsp("hostc")
    assert api.post("/migrations", {"vm": "web01", "target": "hostb"}).status_code == 201

    won = Migration.objects.get()
    response = api.post("/migrations", {"vm": "web01", "target": "hostc"})

    at = won.requested_at.astimezone(UTC).strftime("%H:%M")
    assert_problem(response, 409, f"web01 is already migrating to hostb, started by alice at {at} UTC.")
    assert sorted(Migration.objects.values_list("state", "failure_kind")) == [
        ("queued", ""),
        ("refused", "already_migrating"),
    ]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"vm": "nosuchvm", "target": "hostb"}, 404),
        ({"vm": "web01", "target": "nosuchvsp"}, 404),
        ({"vm": "web01"}, 422),
        ({"vm": ["web01"], "target": "hostb"}, 422),
        ({"vm": "", "target": "hostb"}, 422),
        ({"vm": "99999999999999999999999", "target": "hostb"}, 404),
    ],
)
def test_it_refuses_bad_input_and_changes_nothing(api, hosts, body, status):
    make_vm("web01", vsp=hosts[0])

    assert_problem(api.post("/migrations", body), status)
    assert not Migration.objects.exists()


def test_it_says_which_name_is_unknown(api, hosts):
    make_vm("web01", vsp=hosts[0])

    assert_problem(
        api.post("/migrations", {"vm": "web02", "target": "hostb"}), 404, "No VM with the id or name 'web02'."
    )


def test_it_answers_403_to_a_read_only_user_and_401_to_anonymous(read_only_api, anonymous_api, hosts):
    make_vm("web01", vsp=hosts[0])

    assert_problem(
        read_only_api.post("/migrations", {"vm": "web01", "target": "hostb"}),
        403,
        "You may look but not change: your account lacks the permission to do this.",
    )
    assert_problem(anonymous_api.post("/migrations", {"vm": "web01", "target": "hostb"}), 401)
    # The read-only user's attempt is kept (who, what, why); the anonymous one is no one's attempt.
    refused = Migration.objects.get()
    assert (refused.state, refused.failure_kind, refused.requested_by.username) == (
        "refused",
        "permission",
        "olga",
    )


def test_it_returns_the_first_migration_for_a_retried_idempotency_key(api, hosts):
    make_vm("web01", vsp=hosts[0])
    key = {"Idempotency-Key": "f1b6c0de-retry"}

    first = api.post("/migrations", {"vm": "web01", "target": "hostb"}, headers=key)
    second = api.post("/migrations", {"vm": "web01", "target": "hostb"}, headers=key)

    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    assert second["Idempotent-Replayed"] == "true"
    assert Migration.objects.count() == 1


def test_it_refuses_a_reused_idempotency_key_for_another_migration(api, hosts):
    make_vm("web01", vsp=hosts[0])
    make_vm("web02", vsp=hosts[0])
    key = {"Idempotency-Key": "same-key"}
    api.post("/migrations", {"vm": "web01", "target": "hostb"}, headers=key)

    response = api.post("/migrations", {"vm": "web02", "target": "hostb"}, headers=key)

    assert_problem(
        response, 409, "This Idempotency-Key was already used for a different migration; use a new key."
    )
    assert Migration.objects.count() == 1


def test_it_lists_and_filters_migrations(api, hosts):
    make_vm("web01", vsp=hosts[0])
    make_vm("web02", vsp=hosts[1])
    api.post("/migrations", {"vm": "web01", "target": "hostb"})
    api.post("/migrations", {"vm": "web02", "target": "hosta"})

    assert api.get("/migrations").json()["count"] == 2
    assert [m["vm"] for m in api.get("/migrations", vm="web02").json()["items"]] == ["web02"]
    assert api.get("/migrations", state="completed").json()["count"] == 0
    assert api.get("/migrations", active="true").json()["count"] == 2
    assert api.get("/migrations", vsp="hostb").json()["count"] == 2
    assert_problem(api.get("/migrations", state="exploded"), 422)


def test_it_lists_a_refused_attempt_and_a_deleted_vms_migration(api, hosts):
    """History rows may lack a VM (deleted since) or a source (refused: runnable nowhere)."""
    gone = make_vm("gone01", vsp=hosts[0])
    make_migration(gone, hosts[0], hosts[1], state="completed")
    gone.delete()
    nowhere = make_vm("nowhere01", vsp=hosts[0], hardware_status="not_runnable")
    record_refusal(
        nowhere, hosts[1], None, "nowhere01 cannot migrate to hostb: VM is not runnable on any VSP."
    )

    response = api.get("/migrations")

    assert response.status_code == 200, response.content
    rows = {(m["vm"], m["vm_id"] is None, m["source"], m["state"]["value"]) for m in response.json()["items"]}
    assert rows == {("gone01", True, "hosta", "completed"), ("nowhere01", False, None, "refused")}


def test_it_shows_one_migration_with_its_events(api, read_only_api, hosts):
    make_vm("web01", vsp=hosts[0])
    created = api.post("/migrations", {"vm": "web01", "target": "hostb"}).json()

    body = read_only_api.get(f"/migrations/{created['id']}").json()

    assert body["statistics"]["bytes_sent"] == 0
    assert body["events"][0]["to_state"] == "queued" and body["events"][0]["actor"] == "alice"
    assert_problem(api.get("/migrations/424242"), 404, "No migration with the id 424242.")
    assert_problem(api.get("/migrations/abc"), 422)


def test_it_cancels_a_queued_migration_and_refuses_a_second_cancel(api, read_only_api, hosts):
    make_vm("web01", vsp=hosts[0])
    created = api.post("/migrations", {"vm": "web01", "target": "hostb"}).json()

    assert_problem(read_only_api.post(f"/migrations/{created['id']}/cancel"), 403)
    response = api.post(f"/migrations/{created['id']}/cancel")

    assert response.status_code == 202
    assert response.json()["state"]["value"] == "cancelled"
    assert_problem(
        api.post(f"/migrations/{created['id']}/cancel"),
        409,
        "Nothing to cancel: the migration has already ended (Cancelled).",
    )


def test_it_answers_400_to_a_body_that_is_not_json(api, hosts):
    make_vm("web01", vsp=hosts[0])

    response = api.client.post(
        "/api/v1/migrations", "vm=web01", content_type="application/json", headers=api.headers
    )

    assert_problem(response, 400)
    assert not Migration.objects.exists()


def test_it_takes_a_policy_for_this_migration_and_shows_the_effective_one(api, hosts):
    make_vm("web01", vsp=hosts[0])

    response = api.post(
        "/migrations",
        {"vm": "web01", "target": "hostb", "policy": {"max_downtime_ms": 800, "auto_converge": True}},
    )

    assert response.status_code == 201, response.content
    policy = response.json()["policy"]
    assert (policy["max_downtime_ms"], policy["auto_converge"]) == (800, True)
    assert Migration.objects.get().policy["max_downtime_ms"] == 800


@pytest.mark.parametrize(
    "policy", [{"max_downtime_ms": -5}, {"max_downtime_ms": "soon"}, {"warp": 9}, {"at_limit": "explode"}]
)
def test_it_refuses_a_bad_policy_with_its_reason_and_changes_nothing(api, hosts, policy):
    make_vm("web01", vsp=hosts[0])

    body = assert_problem(api.post("/migrations", {"vm": "web01", "target": "hostb", "policy": policy}), 422)

    assert body["detail"]
    assert not Migration.objects.exclude(state="refused").exists()


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (
            {"vm": "web01", "target": "hostb", "max_downtime_ms": 500},
            'Bad input: max_downtime_ms: a policy setting goes inside "policy", e.g. '
            '{"vm": ..., "target": ..., "policy": {"max_downtime_ms": ...}}.',
        ),
        (
            {"vm": "web01", "target": "hostb", "priority": "high"},
            "Bad input: priority: not a field here: check its spelling and where it is nested",
        ),
        (
            {"vm": "web01", "target": "hostb", "policy": {"warp": 9}},
            "Bad input: policy.warp: not a field here: check its spelling and where it is nested",
        ),
    ],
)
def test_it_refuses_a_field_it_does_not_know_and_names_it(api, hosts, body, detail):
    """QA: ``max_downtime_ms`` beside ``vm`` was ignored and the migration queued under the VM's policy."""
    make_vm("web01", vsp=hosts[0])

    assert_problem(api.post("/migrations", body), 422, detail)
    assert not Migration.objects.exists()


@pytest.mark.parametrize(
    ("policy", "field", "words"),
    [
        (
            {"max_downtime_ms": 300.5},
            "max_downtime_ms",
            "Maximum downtime: a whole number from 1 to 600000 ms",
        ),
        ({"max_downtime_ms": 0}, "max_downtime_ms", "Maximum downtime: a whole number from 1 to 600000 ms"),
        (
            {"max_downtime_ms": 10**30},
            "max_downtime_ms",
            "Maximum downtime: a whole number from 1 to 600000 ms",
        ),
        ({"max_downtime_ms": [300]}, "max_downtime_ms", "Maximum downtime: a number, not"),
        ({"max_downtime_ms": "300"}, "max_downtime_ms", "send a number, not the text '300'."),
        ({"throttle_max_pct": 12.5}, "throttle_max_pct", "Throttle ceiling: a whole number from 1 to 99 %"),
        (
            {"bandwidth_cap_mb_s": -3},
            "bandwidth_cap_mb_s",
            "Bandwidth cap: from 0.001 to 100000 MB/s in steps of 0.001 MB/s",
        ),
        ({"auto_converge": "maybe"}, "auto_converge", "Auto-converge"),
        ({"preset": "fastest"}, "preset", "Unknown preset 'fastest'"),
    ],
)
def test_a_bad_policy_value_is_refused_in_the_dialogs_words_at_its_place(api, hosts, policy, field, words):
    """QA: 300.5 was refused with pydantic's "Input should be a valid integer" three times over."""
    make_vm("web01", vsp=hosts[0])

    body = assert_problem(api.post("/migrations", {"vm": "web01", "target": "hostb", "policy": policy}), 422)

    assert body["detail"].startswith(f"Bad input: policy.{field}: {words}"), body["detail"]
    assert "Input should" not in body["detail"] and "body." not in body["detail"]
    assert body["errors"] == [{"loc": ["policy", field], "field": f"policy.{field}", "msg": ANY}]
    assert not Migration.objects.exists()


def test_a_small_bandwidth_cap_is_taken_as_the_dialog_takes_it_and_a_tiny_one_names_the_minimum(api, hosts):
    """QA: 0.5 MB/s (the dialog takes it) was refused with "literal[0]: must be one of 0;
    constrained-float: must be at least 1.0"; the steering endpoint said the same."""
    make_vm("web01", vsp=hosts[0])

    tiny = assert_problem(
        api.post("/migrations", {"vm": "web01", "target": "hostb", "policy": {"bandwidth_cap_mb_s": 0.0005}}),
        422,
    )
    assert tiny["detail"] == (
        "Bad input: policy.bandwidth_cap_mb_s: Bandwidth cap: from 0.001 to 100000 MB/s in steps of "
        "0.001 MB/s (0 or empty: no cap), not 0.0005."
    )
    half = api.post("/migrations", {"vm": "web01", "target": "hostb", "policy": {"bandwidth_cap_mb_s": 0.5}})
    assert half.status_code == 201, half.content
    migration = Migration.objects.get(vm__name="web01")
    assert migration.policy["bandwidth_cap_mb_s"] == 0.5

    Migration.objects.filter(pk=migration.pk).update(state="completed")  # its Copy is over: refused so
    steered = api.patch(f"/migrations/{migration.pk}/policy", {"bandwidth_cap_mb_s": 0.5})
    assert steered.status_code == 409, steered.content
    assert "literal" not in steered.json()["detail"] and "constrained" not in steered.json()["detail"]


def test_the_api_and_the_dialog_say_the_same_about_a_decimal_downtime(api, hosts):
    make_vm("web01", vsp=hosts[0])
    with pytest.raises(PolicyError) as page_says:  # what the Migrate dialog shows for "300.5"
        check_policy({"max_downtime_ms": "300.5"})

    body = assert_problem(
        api.post("/migrations", {"vm": "web01", "target": "hostb", "policy": {"max_downtime_ms": 300.5}}), 422
    )

    assert body["detail"] == f"Bad input: policy.max_downtime_ms: {page_says.value}"


@pytest.mark.parametrize(
    ("call", "detail"),
    [
        (lambda api: api.post("/migrations", {"vm": "web01"}), "Bad input: target: required"),
        (
            lambda api: api.post("/migrations", {"vm": 7, "target": "hostb"}),
            "Bad input: vm: must be text, in quotes",
        ),
        (lambda api: api.get("/migrations", limit=0), "Bad input: limit: must be at least 1"),
        (lambda api: api.get("/migrations", limit="lots"), "Bad input: limit: must be a whole number"),
        (
            lambda api: api.patch("/migrations/1/policy", {"max_downtime_ms": 2.5}),
            "Bad input: max_downtime_ms: Maximum downtime: a whole number from 1 to 600000 ms, not 2.5.",
        ),
    ],
)
def test_a_bad_inputs_place_reads_as_the_field_the_admin_typed(api, hosts, call, detail):
    """QA: details began "body.body.policy..."; ninja's source and parameter name are not the admin's."""
    make_vm("web01", vsp=hosts[0])

    assert_problem(call(api), 422, detail)


def test_every_api_input_refuses_a_field_it_does_not_know(api, hosts):
    """The same for the other inputs: a field sent in the wrong place or misspelt is never ignored."""
    vm = make_vm("web01", vsp=hosts[0])

    for response in (
        api.put("/vms/web01/online-migration", {"enabled": False, "reason": "maintenance"}),
        api.post("/vms/web01/registrations/hosta/not-runnable", {"reason": "x", "set_by": "admin"}),
    ):
        body = assert_problem(response, 422)
        assert "not a field here" in body["detail"], body["detail"]
    vm.refresh_from_db()
    assert vm.online_migration_enabled and vm.registrations.get().is_runnable


def test_a_request_without_a_body_names_the_fields_it_must_hold(api, hosts):
    """Issue 21.7: a POST with no body at all answered "Bad input: required", naming nothing."""
    response = api.client.post(
        "/api/v1/migrations", data="", content_type="application/json", headers=api.headers
    )

    assert_problem(
        response, 422, "Bad input: the request has no JSON body: send an object with vm and target."
    )
    assert [error["field"] for error in response.json()["errors"]] == ["vm", "target"]
    assert not Migration.objects.exists()


def test_an_unknown_api_address_answers_a_problem_document_and_api_docs_leads_to_the_docs(api, client):
    response = api.client.get("/api/v1/no-such-thing", headers=api.headers)
    assert_problem(
        response, 404, "No API operation at /api/v1/no-such-thing: the operations are listed at /api/v1/docs."
    )
    anonymous = client.get("/api/v1/vms/1/no-such-thing")
    assert anonymous.status_code == 404 and anonymous["Content-Type"] == "application/problem+json"
    wrong_method = client.get("/api/v1/migrations/1/cancel")  # takes POST only
    assert_problem(wrong_method, 405, "This address does not take a GET request (it takes POST).")
    for address in ("/api/docs", "/api/docs/", "/api/"):
        redirect = client.get(address)
        assert (redirect.status_code, redirect["Location"]) == (302, "/api/v1/docs"), address
    assert client.get("/api/v1/docs").status_code == 200
