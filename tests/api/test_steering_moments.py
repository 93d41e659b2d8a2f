"""Issue 18.9: steering at the wrong moment answers in the console's words, with 409 when the control no
longer applies (or does not apply yet), the same on the page, over the API and in the CLI.

QA saw a second switch-over after Copy ended accepted (202 twice; the README says 409) and a switch-over
during Init answered with the agent's own "no migration m46-... on this host". Real worker (its data
plane capped at 5 MB/s), real Redis, real simulated host agents; the CLI runs as a subprocess against a
live console. The hot guest writes 12 MB/s all over its 8 MiB: its Copy never converges by itself, so it
stays in Copy until someone switches it over.
"""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse

from migrations_app.models import Migration, MigrationEvent
from tests.api.conftest import live_console  # noqa: F401  (fixture)
from tests.api.test_inventory_api import assert_problem
from tests.cli.test_matrixoe_command import matrixoe
from tests.factories import MIGRATION_ADMIN_PERMISSIONS, make_migration, make_user, make_vm, make_vsp
from tests.migrations_app.guests import place_vm, runs_on, wait_for_state
from tests.migrations_app.test_faults import paused
from vms.models import AuditEvent

HOT = {"memory_mib": 8, "dirty_pages_per_s": 3000, "fill_percent": 100}
LIVE = pytest.mark.django_db(transaction=True)
AGENT_WORDS = re.compile(r"no migration m\d+-|on this host|HTTP \d{3}")


def cli_login(tmp_path, base_url: str, api) -> None:
    token = api.headers["Authorization"].removeprefix("Bearer ")
    result = matrixoe(tmp_path, "login", base_url, "--token", token)
    assert result.returncode == 0, result.stderr


def page_client() -> Client:
    client = Client()
    client.force_login(make_user("pat", MIGRATION_ADMIN_PERMISSIONS))
    return client


def page_change(client: Client, migration: Migration, **fields: str):
    """The phases panel's buttons: an htmx POST to the change view (a refusal is said beside them)."""
    url = reverse("migrations_app:change", args=[migration.pk])
    return client.post(url, fields, headers={"HX-Request": "true"})


@LIVE
@pytest.mark.faults  # the target agent is paused (SIGSTOP)
def test_during_init_a_switch_over_or_a_change_is_refused_in_the_consoles_words(
    host_agents,
    fleet,
    api,
    migration_worker,
    wait_for,
    tmp_path,
    live_console,  # noqa: F811
):
    """The target agent is paused (a slow prepare) so the migration sits in Init: the source agent does
    not know the migration yet, and nothing of its words reaches the user."""
    cli_login(tmp_path, live_console, api)
    vm = place_vm(host_agents, fleet, vm_fields={"init_limit_s": 60}, **HOT)
    with paused(host_agents["hostb"]):
        response = api.post("/migrations", {"vm": vm.name, "target": "hostb"})
        assert response.status_code == 201, response.content
        migration = Migration.objects.get(pk=response.json()["id"])
        wait_for_state(wait_for, migration, "init")
        path = f"/migrations/{migration.pk}"

        switched = assert_problem(api.post(f"{path}/switchover"), 409)["detail"]
        changed = assert_problem(api.patch(f"{path}/policy", {"max_downtime_ms": 900}), 409)["detail"]
        page = page_change(page_client(), migration, action="raise_downtime", downtime_ms="900")
        cli = matrixoe(tmp_path, "switchover", vm.name)
        api.post(f"{path}/cancel")  # end it: the target stays paused until the end of the block
        wait_for_state(wait_for, migration, "cancelled", "aborted", "completed")

    assert switched == (
        f"Migration {migration.pk} is still in its Init phase: there is nothing to switch over yet. "
        "Switching over is possible once Copy has begun. Nothing was changed."
    )
    assert changed == (
        f"Migration {migration.pk} is still in its Init phase: the source host hosta has not begun "
        "sending yet. Try again once Copy has begun. Nothing was changed."
    )
    assert page.status_code == 400 and changed in page.content.decode()
    assert cli.returncode == 1 and switched in cli.stderr.replace("\n", " "), cli.stderr
    for words in (switched, changed, page.content.decode(), cli.stderr):
        assert not AGENT_WORDS.search(words), words
    migration.refresh_from_db()
    assert migration.switchover_requested_at is None and migration.policy["max_downtime_ms"] == 300
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.MIGRATION_CHANGED).exists()
    assert wait_for(lambda: runs_on(host_agents["hosta"], vm.name), timeout=30)


@LIVE
def test_once_switched_over_a_second_switch_over_or_a_change_is_refused_by_page_api_and_cli(
    host_agents,
    fleet,
    api,
    migration_worker,
    wait_for,
    tmp_path,
    live_console,  # noqa: F811
):
    cli_login(tmp_path, live_console, api)
    vm = place_vm(host_agents, fleet, **HOT)
    response = api.post("/migrations", {"vm": vm.name, "target": "hostb"})
    migration = Migration.objects.get(pk=response.json()["id"])
    assert wait_for(lambda: Migration.objects.get(pk=migration.pk).rounds >= 2, timeout=60)
    path = f"/migrations/{migration.pk}"
    client = page_client()

    first = page_change(client, migration, action="switchover")
    # at once, before the worker moved on from Copy: the window where QA got a second 202
    again_api = api.post(f"{path}/switchover")
    again_page = page_change(client, migration, action="switchover")
    again_cli = matrixoe(tmp_path, "switchover", vm.name)
    change_api = api.patch(f"{path}/policy", {"bandwidth_cap_mb_s": 100})
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled", timeout=120)
    after = api.post(f"{path}/switchover")

    assert first.status_code == 200, first.content
    over = re.compile(
        rf"Migration {migration.pk}('s Copy is over \(a switch-over was already asked at \d\d:\d\d:\d\d\): "
        r"it is switching over now, and this change no longer applies| is (i/o quiesce|frozen|committing|"
        r"completed): only a migration in its Init or Copy phase can be changed)\. Nothing was changed\."
    )
    for response in (again_api, change_api):
        assert over.fullmatch(assert_problem(response, 409)["detail"]), response.json()
    assert again_page.status_code == 400 and over.search(again_page.content.decode())
    assert again_cli.returncode == 1
    assert over.search(again_cli.stderr.replace("\n", " ")) or (
        f"Nothing to change: {vm.name} has no running migration." in again_cli.stderr  # already over
    ), again_cli.stderr
    assert_problem(after, 409)
    assert migration.state == "completed", migration.alert
    asked = MigrationEvent.objects.filter(migration=migration, message__endswith="asked to switch over now")
    assert asked.count() == 1  # one switch-over recorded, not two
    assert migration.policy.get("bandwidth_cap_mb_s") is None  # the late change changed nothing


@pytest.mark.django_db
def test_a_second_cancel_says_it_is_already_cancelling_and_changes_nothing(api):
    hosta, hostb = make_vsp("hosta"), make_vsp("hostb")
    migration = make_migration(make_vm("web01", vsp=hosta), hosta, hostb, state="copy")
    assert api.post(f"/migrations/{migration.pk}/cancel").status_code == 202

    body = assert_problem(api.post(f"/migrations/{migration.pk}/cancel"), 409)

    assert body["detail"] == (
        "Already cancelling: alice asked to cancel it; it stops before its commit and the VM stays on hosta."
    )
    requested = MigrationEvent.objects.filter(migration=migration, message__startswith="Cancel requested")
    assert requested.count() == 1


@pytest.mark.django_db
def test_a_switch_over_or_change_after_copy_converged_no_longer_applies(api):
    """Copy at 100% (converged; the worker is about to quiesce): nothing is sent to the agent."""
    hosta, hostb = make_vsp("hosta"), make_vsp("hostb")
    migration = make_migration(make_vm("web01", vsp=hosta), hosta, hostb, state="copy", copy_percent=100)
    words = (
        f"Migration {migration.pk}'s Copy is over (its Copy converged): it is switching over now, and this "
        "change no longer applies. Nothing was changed."
    )

    assert_problem(api.post(f"/migrations/{migration.pk}/switchover"), 409, words)
    assert_problem(api.patch(f"/migrations/{migration.pk}/policy", {"auto_converge": True}), 409, words)
    assert Migration.objects.get(pk=migration.pk).switchover_requested_at is None
