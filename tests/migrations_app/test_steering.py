"""Changing a running migration from its page: real worker, real Redis, real agents (simulated driver).

The worker caps the data plane at 5 MB/s (conftest); the hot guest writes 12 MB/s into all of its 8 MiB,
so under the default policy (300 ms, no throttling, 30 rounds) it would stop at its round limit.
"""

from __future__ import annotations

import pytest
from django.test import Client

from migrations_app.actions import do_request_migration
from migrations_app.models import Migration, MigrationEvent
from tests.factories import make_user
from tests.migrations_app.guests import place_vm, runs_on, wait_for_state
from vms.models import AuditEvent

pytestmark = pytest.mark.django_db(transaction=True)

HOT = {"memory_mib": 8, "dirty_pages_per_s": 3000, "fill_percent": 100}
HTMX = {"HX-Request": "true"}


def start_hot(host_agents, fleet, admin, wait_for, policy=None):
    vm = place_vm(host_agents, fleet, **HOT)
    migration = do_request_migration(vm, fleet["hostb"], admin, policy=policy)

    def copying_with_rates() -> bool:
        migration.refresh_from_db()
        return migration.state == "copy" and migration.rounds >= 3 and migration.throughput_bytes_s > 0

    assert wait_for(copying_with_rates, timeout=60), (migration.state, migration.alert)
    return vm, migration


def page(client, vm) -> str:
    return client.get(f"/vms/{vm.pk}/general/").text


def change(client, migration, **fields):
    return client.post(f"/migrations/{migration.pk}/change/", fields, headers=HTMX)


def assert_completed_intact(host_agents, migration, wait_for):
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled", timeout=120)
    assert migration.state == "completed", migration.alert
    assert migration.source_digest and migration.source_digest == migration.target_digest
    assert runs_on(host_agents["hostb"], migration.vm.name)


def test_raising_the_allowed_downtime_while_it_runs_makes_it_complete(
    host_agents, fleet, admin, migration_admin_client, migration_worker, wait_for
):
    _, migration = start_hot(host_agents, fleet, admin, wait_for)
    response = change(migration_admin_client, migration, action="raise_downtime", downtime_ms="5000")
    assert response.status_code == 200, response.text
    assert "Raised the allowed downtime to 5.0 s." in response.text
    assert_completed_intact(host_agents, migration, wait_for)
    assert migration.policy["max_downtime_ms"] == 5000
    event = MigrationEvent.objects.get(migration=migration, message__contains="raised the allowed downtime")
    assert event.actor.username == "admin"
    audit = AuditEvent.objects.get(action=AuditEvent.Action.MIGRATION_CHANGED)
    assert audit.actor_name == "admin" and audit.after["downtime_ms"] == 5000


def test_turning_throttling_on_while_it_runs_makes_it_complete(
    host_agents, fleet, admin, migration_admin_client, migration_worker, wait_for
):
    _, migration = start_hot(host_agents, fleet, admin, wait_for)
    response = change(migration_admin_client, migration, action="auto_converge")
    assert "Turned throttling (auto-converge) on." in response.text
    assert_completed_intact(host_agents, migration, wait_for)


def test_the_offered_throttle_rescue_completes_it(
    host_agents, fleet, admin, migration_admin_client, migration_worker, wait_for
):
    """The browser run that did not rescue: the throttle offered with the warning must complete it."""
    from migrations_app.steering import outlook

    _, migration = start_hot(host_agents, fleet, admin, wait_for)
    offered: list[str] = []

    def warned_with_a_throttle() -> bool:
        migration.refresh_from_db()
        seen = outlook(migration)
        offered[:] = [rescue.words for rescue in seen.rescues] if seen else []
        return seen is not None and seen.warning != "" and any("throttle" in words for words in offered)

    assert wait_for(warned_with_a_throttle, timeout=60), (migration.state, migration.rounds, offered)
    response = change(migration_admin_client, migration, action="auto_converge")
    assert "Turned throttling (auto-converge) on." in response.text
    assert_completed_intact(host_agents, migration, wait_for)


def test_switch_over_now_completes_with_the_longer_downtime_shown(
    host_agents, fleet, admin, migration_admin_client, migration_worker, wait_for
):
    vm, migration = start_hot(host_agents, fleet, admin, wait_for)
    change(migration_admin_client, migration, action="switchover")
    assert_completed_intact(host_agents, migration, wait_for)
    assert migration.downtime_ms > 300
    assert f"{migration.downtime_ms} ms" in page(migration_admin_client, vm)


def test_bad_changes_are_refused_and_change_nothing(
    host_agents, fleet, admin, migration_admin_client, migration_worker, wait_for
):
    # Switch over at the limit: it ends completed however long the refusals below take on a loaded machine.
    _, migration = start_hot(
        host_agents, fleet, admin, wait_for, policy={"preset": "custom", "at_limit": "switchover"}
    )
    for fields, words in [
        (
            {"action": "raise_downtime", "downtime_ms": "-3"},
            "Maximum downtime: a whole number from 1 to 600000",
        ),
        ({"action": "raise_downtime", "downtime_ms": "a lot"}, "Maximum downtime: a number"),
        ({"action": "bandwidth", "bandwidth_cap_mb_s": "1e15"}, "Bandwidth cap: from 1 to 100000 MB/s"),
        ({"action": "explode"}, "Unknown change"),
    ]:
        response = change(migration_admin_client, migration, **fields)
        assert response.status_code == 400 and words in response.text, response.text
    reader = Client()  # its own session: migration_admin_client is pytest-django's ``client`` too
    reader.force_login(make_user("reader", ("vms.view_virtualmachine", "vms.view_vsp")))
    assert change(reader, migration, action="switchover").status_code == 403
    migration.refresh_from_db()
    assert migration.policy["max_downtime_ms"] == 300 and not migration.policy["auto_converge"]
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.MIGRATION_CHANGED).exists()
    change(migration_admin_client, migration, action="switchover")
    assert_completed_intact(host_agents, migration, wait_for)
    response = change(migration_admin_client, migration, action="raise_downtime", downtime_ms="900")
    assert response.status_code == 400
    assert "only a migration in its Init or Copy phase can be changed. Nothing was changed." in response.text
    assert Migration.objects.get(pk=migration.pk).policy["max_downtime_ms"] == 300


def test_the_phases_panel_warns_before_the_round_limit_with_the_rescues_and_their_cost(fleet):
    """The panel as rendered from the numbers an agent reported (rates stored on the row, no agent here)."""
    from django.utils import timezone

    from migrations_app.progress import get_migration_display, render_vm_fragments
    from tests.factories import make_vm

    vm = make_vm("hot", vsp=fleet["hosta"], memory_mib=8)
    Migration.objects.create(
        vm=vm, source=fleet["hosta"], target=fleet["hostb"], state="copy", rounds=4,
        bytes_remaining=8_000_000, dirty_rate_bytes_s=10_000_000, throughput_bytes_s=5_000_000,
        copy_started_at=timezone.now(),
    )  # fmt: skip
    html = render_vm_fragments(get_migration_display(vm), oob=False)
    assert (
        "This migration will stop at the round limit (30 rounds) and the guest will stay on its source"
        in html
    )
    # 8 MB left of 8 MiB after a 0.8 s round (10 MB/s distinct): the guest writes about 32 MB/s.
    assert "Slow because the guest writes faster (32 MB/s) than the link carries (5.0 MB/s)." in html
    assert "Raise the allowed downtime to 1.7 s" in html
    assert "Throttle the guest (up to 90% of its vCPU time" in html
    assert "Switch over now: about 1.6 s frozen" in html
    assert 'value="switchover"' in html and 'value="auto_converge"' in html
