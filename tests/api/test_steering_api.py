"""Changing a running migration over the API (``PATCH /migrations/{id}/policy``, ``POST .../switchover``):
the phases panel's own action (``steering.do_change_migration``), its words and its checks.

The first tests run real migrations: a real worker (its data plane capped at 5 MB/s), real Redis, real
host agents (simulated driver). The hot guest writes 12 MB/s into all of its 8 MiB, so under the default
policy it would stop at its round limit; only a change the agent took lets it complete. The refusals
after them need no agent: a migration row that is queued or already over is refused before any call.
"""

from __future__ import annotations

import pytest

from agentprotocol import ParamsChange
from api.tokens import do_create_token
from migrations_app import steering
from migrations_app.models import Migration, MigrationEvent
from tests.api.conftest import WRITER, ApiClient
from tests.api.test_inventory_api import assert_problem
from tests.factories import make_migration, make_user, make_vm, make_vsp
from tests.migrations_app.conftest import BANDWIDTH_MBPS
from tests.migrations_app.guests import place_vm, runs_on, wait_for_state
from vms.models import AuditEvent, Role

HOT = {"memory_mib": 8, "dirty_pages_per_s": 3000, "fill_percent": 100}
LIVE = pytest.mark.django_db(transaction=True)
OUT_OF_BOUNDS = "Maximum downtime: a whole number from 1 to 600000 ms, not -3."


def start(api, vm, wait_for, rounds: int = 2, **policy) -> Migration:
    """Migrate ``vm`` to hostb over the API and wait until its Copy is in ``rounds`` with measured rates."""
    body = {
        "vm": vm.name,
        "target": "hostb",
        **({"policy": {"preset": "custom", **policy}} if policy else {}),
    }
    response = api.post("/migrations", body)
    assert response.status_code == 201, response.content
    migration = Migration.objects.get(pk=response.json()["id"])

    def copying() -> bool:
        migration.refresh_from_db()
        return migration.state == "copy" and migration.rounds >= rounds and migration.throughput_bytes_s > 0

    assert wait_for(copying, timeout=60), (migration.state, migration.alert)
    return migration


def assert_completed_intact(host_agents, migration, wait_for) -> None:
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled", timeout=120)
    assert migration.state == "completed", migration.alert
    assert migration.source_digest and migration.source_digest == migration.target_digest
    assert runs_on(host_agents["hostb"], migration.vm.name)


@LIVE
def test_raising_a_tiny_bandwidth_cap_lets_it_finish_within_the_site_cap(
    host_agents, fleet, api, migration_worker, settings, wait_for
):
    # The console runs with its worker's settings: the site-wide cap of 5 MB/s holds over any change.
    settings.MIGRATION_AGENT_PARAMS = {**settings.MIGRATION_AGENT_PARAMS, "bandwidth_mbps": BANDWIDTH_MBPS}
    # It writes 1 MB/s all over its 32 MiB: at a 1 MB/s cap each round lasts 33 s and re-dirties it all,
    # so it never converges; at 5 MB/s it does in a few rounds. Most of its bytes go after the change.
    vm = place_vm(host_agents, fleet, memory_mib=32, dirty_pages_per_s=250, fill_percent=100)
    migration = start(api, vm, wait_for, rounds=1, bandwidth_cap_mb_s=1)

    response = api.patch(f"/migrations/{migration.pk}/policy", {"bandwidth_cap_mb_s": 100})

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["done"] == "Set the bandwidth cap to 100 MB/s."
    assert body["policy"]["bandwidth_cap_mb_s"] == 100 and body["state"]["value"] == "copy"
    assert_completed_intact(host_agents, migration, wait_for)
    assert migration.throughput_bytes_s <= 1.1 * BANDWIDTH_MBPS * 125_000  # the site cap held (bytes/s)
    event = MigrationEvent.objects.get(migration=migration, message__contains="bandwidth cap")
    assert event.actor.username == "alice" and event.message == "alice set the bandwidth cap to 100 MB/s"


@LIVE
def test_raising_the_downtime_and_throttling_at_once_makes_it_complete(
    host_agents, fleet, api, migration_worker, wait_for
):
    migration = start(api, place_vm(host_agents, fleet, **HOT), wait_for)

    response = api.patch(
        f"/migrations/{migration.pk}/policy", {"max_downtime_ms": 5000, "auto_converge": True}
    )

    assert response.status_code == 200, response.content
    assert response.json()["done"] == (
        "Raised the allowed downtime to 5.0 s and turned throttling (auto-converge) on."
    )
    assert_completed_intact(host_agents, migration, wait_for)
    assert (migration.policy["max_downtime_ms"], migration.policy["auto_converge"]) == (5000, True)
    audit = AuditEvent.objects.get(action=AuditEvent.Action.MIGRATION_CHANGED)
    assert audit.actor_name == "alice"
    assert (audit.after["downtime_ms"], audit.after["auto_converge"]) == (5000, True)


@LIVE
def test_switch_over_now_completes_with_the_longer_downtime(
    host_agents, fleet, api, migration_worker, wait_for
):
    migration = start(api, place_vm(host_agents, fleet, **HOT), wait_for)

    response = api.post(f"/migrations/{migration.pk}/switchover")

    assert response.status_code == 202, response.content
    assert response.json()["done"] == "Asked to switch over now."
    assert_completed_intact(host_agents, migration, wait_for)
    assert migration.downtime_ms > 300
    assert MigrationEvent.objects.filter(
        migration=migration, message="alice asked to switch over now"
    ).exists()


@LIVE
def test_bad_input_and_users_who_may_not_are_refused_on_a_running_one_and_change_nothing(
    host_agents, fleet, api, read_only_api, anonymous_api, migration_worker, wait_for
):
    # Switch over at the limit: it ends completed however long the refusals take on a loaded machine.
    migration = start(api, place_vm(host_agents, fleet, **HOT), wait_for, at_limit="switchover")
    path = f"/migrations/{migration.pk}"

    assert_problem(api.patch(f"{path}/policy", {"max_downtime_ms": -3}), 422)
    assert_problem(read_only_api.patch(f"{path}/policy", {"max_downtime_ms": 5000}), 403)
    assert_problem(read_only_api.post(f"{path}/switchover"), 403)
    assert_problem(anonymous_api.post(f"{path}/switchover"), 401)
    migration.refresh_from_db()
    assert migration.state == "copy"
    assert migration.policy["max_downtime_ms"] == 300 and not migration.policy["auto_converge"]
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.MIGRATION_CHANGED).exists()
    assert MigrationEvent.objects.filter(migration=migration, actor__isnull=False).count() == 1  # its request

    assert api.post(f"{path}/switchover").status_code == 202
    assert_completed_intact(host_agents, migration, wait_for)
    body = assert_problem(api.patch(f"{path}/policy", {"max_downtime_ms": 900}), 409)
    assert body["detail"] == (
        f"Migration {migration.pk} is completed: only a migration in its Init or Copy phase can be "
        "changed. Nothing was changed."
    )
    assert Migration.objects.get(pk=migration.pk).policy["max_downtime_ms"] == 300


# --- refusals that need no agent ---------------------------------------------------------------------------


@pytest.fixture
def ended():
    hosta, hostb = make_vsp("hosta"), make_vsp("hostb")
    return make_migration(make_vm("web01", vsp=hosta), hosta, hostb, state="completed")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"max_downtime_ms": -3}, OUT_OF_BOUNDS),
        ({"max_downtime_ms": 10**400}, "Maximum downtime: a number, not"),
        ({"max_downtime_ms": "a lot"}, "Maximum downtime: a number, not 'a lot'."),
        ({"max_downtime_ms": "900"}, "send a number, not the text '900'."),
        ({"max_downtime_ms": None}, "Maximum downtime: give a whole number from 1 to 600000 ms."),
        (
            {"bandwidth_cap_mb_s": 1e15},
            "Bandwidth cap: from 0.001 to 100000 MB/s in steps of 0.001 MB/s (0 or empty: no cap), "
            "not 1000000000000000.0.",
        ),
        (
            {"bandwidth_cap_mb_s": 0.0005},
            "Bandwidth cap: from 0.001 to 100000 MB/s in steps of 0.001 MB/s (0 or empty: no cap), "
            "not 0.0005.",
        ),
        ({"auto_converge": "maybe"}, "Auto-converge: on or off, not 'maybe'."),
        ({"max_downtime": 900}, "max_downtime: not a field here: check its spelling and where it is nested"),
        ({}, "Nothing to change: give one of max_downtime_ms, bandwidth_cap_mb_s, auto_converge."),
    ],
)
def test_bad_values_are_refused_in_the_dialogs_words(api, ended, body, detail):
    response = api.patch(f"/migrations/{ended.pk}/policy", body)

    assert detail in assert_problem(response, 422)["detail"]
    assert Migration.objects.get(pk=ended.pk).policy == {}


@pytest.mark.django_db
def test_a_queued_or_ended_migration_cannot_be_changed(api, ended):
    queued = make_migration(ended.vm, ended.source, ended.target)

    for migration, state in ((ended, "completed"), (queued, "queued")):
        words = (
            f"Migration {migration.pk} is {state}: only a migration in its Init or Copy phase can be "
            "changed. Nothing was changed."
        )
        assert_problem(api.patch(f"/migrations/{migration.pk}/policy", {"auto_converge": True}), 409, words)
        assert_problem(api.post(f"/migrations/{migration.pk}/switchover"), 409, words)
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.MIGRATION_CHANGED).exists()


@pytest.mark.django_db
def test_unknown_ids_anonymous_and_read_only_users(api, read_only_api, anonymous_api, ended):
    for path in ("/migrations/999999/policy", "/migrations/999999/switchover"):
        call = api.patch if path.endswith("policy") else api.post
        assert_problem(call(path, {"auto_converge": True}), 404, "No migration with the id 999999.")
    change = {"max_downtime_ms": 900}
    assert_problem(anonymous_api.patch(f"/migrations/{ended.pk}/policy", change), 401)
    assert_problem(
        read_only_api.patch(f"/migrations/{ended.pk}/policy", change),
        403,
        "Your account lacks the permission to change migrations.",
    )
    assert_problem(read_only_api.post(f"/migrations/{ended.pk}/switchover"), 403)
    assert Migration.objects.get(pk=ended.pk).policy == {}


def test_a_new_bandwidth_cap_never_lifts_the_site_wide_cap(settings):
    settings.MIGRATION_AGENT_PARAMS = {**settings.MIGRATION_AGENT_PARAMS, "bandwidth_mbps": 40}

    def capped(change: dict) -> dict:
        return steering.within_site_cap(ParamsChange.model_validate(change)).model_dump(exclude_unset=True)

    assert capped({"bandwidth_mbps": 800}) == {"bandwidth_mbps": 40}
    assert capped({"bandwidth_mbps": 0}) == {"bandwidth_mbps": 40}  # "no cap": the site's
    assert capped({"bandwidth_mbps": 16}) == {"bandwidth_mbps": 16}
    assert capped({"downtime_ms": 900}) == {"downtime_ms": 900}


@pytest.mark.django_db
def test_only_an_operator_of_its_host_groups_may_change_it(ended):
    viewer = make_user("vera", permissions=WRITER, role=Role.VIEWER)  # may migrate elsewhere, views here
    as_viewer = ApiClient(do_create_token(viewer, "tests")[1])

    for response in (
        as_viewer.patch(f"/migrations/{ended.pk}/policy", {"max_downtime_ms": 900}),
        as_viewer.post(f"/migrations/{ended.pk}/switchover"),
    ):
        assert_problem(
            response, 403, "You may not migrate web01: you are not an operator of the host group of hosta."
        )
