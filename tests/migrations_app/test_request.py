"""Requesting and cancelling migrations through the actions, with a real Celery worker on real Redis.

These need no agents: a migration already leaving the source keeps the new ones QUEUED (the hourglass),
so the worker's claim declines them and nothing reaches a host.
"""

import threading
from datetime import UTC

import pytest
from django.db import connection
from django.utils import timezone

from migrations_app.actions import MigrationRefused, do_cancel_migration, do_request_migration
from migrations_app.models import Migration
from tests.factories import make_user, make_vm, make_vsp
from vms.models import AuditEvent

pytestmark = pytest.mark.django_db(transaction=True)

MIGRATOR = ("migrations_app.add_migration", "migrations_app.change_migration", "vms.view_virtualmachine")


@pytest.fixture
def busy_source():
    """A source VSP with a migration of another VM in its Copy phase, its worker alive."""
    source, target = make_vsp("src", memory_mib=65536), make_vsp("dst", memory_mib=65536)
    other = make_vm("other", vsp=source)
    Migration.objects.create(
        vm=other, source=source, target=target, state=Migration.State.COPY, heartbeat_at=timezone.now()
    )
    return source, target


def request_at_once(vm, target, users) -> list[object]:
    """Every user asks for the same migration at the same moment, each on its own thread and connection."""
    barrier = threading.Barrier(len(users))
    outcomes: list[object] = [None] * len(users)

    def ask(index: int) -> None:
        try:
            barrier.wait()
            outcomes[index] = do_request_migration(vm, target, users[index])
        except MigrationRefused as refusal:
            outcomes[index] = refusal
        finally:
            connection.close()

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(users))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


@pytest.mark.postgres  # runs again on PostgreSQL, where the row lock does the serializing
def test_it_starts_exactly_one_of_several_admins_migrating_the_same_vm_at_once(busy_source, celery_worker):
    source, target = busy_source
    vm = make_vm("contested", vsp=source)
    admins = [make_user(f"admin{index}", permissions=MIGRATOR) for index in range(6)]

    outcomes = request_at_once(vm, target, admins)

    started = [outcome for outcome in outcomes if isinstance(outcome, Migration)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, MigrationRefused)]
    assert len(started) == 1 and len(refused) == 5
    # Each loser is told who won, to where and when (issue 21.4).
    won = started[0]
    at = won.requested_at.astimezone(UTC).strftime("%H:%M")
    said = f"contested is already migrating to dst, started by {won.requested_by.username} at {at} UTC."
    assert all(refusal.message == said for refusal in refused), [r.message for r in refused]
    assert Migration.objects.filter(vm=vm).exclude(state=Migration.State.REFUSED).count() == 1
    # Nothing is forgotten: each refused admin's attempt is in the history, with who and why.
    refusals = Migration.objects.filter(vm=vm, state=Migration.State.REFUSED)
    starter = started[0].requested_by
    assert sorted(refusal.requested_by.username for refusal in refusals) == sorted(
        admin.username for admin in admins if admin != starter
    )
    assert {refusal.alert for refusal in refusals} == {said}
    assert vm.current_vsp == source


def test_it_keeps_a_second_migration_from_a_busy_source_queued(busy_source, celery_worker):
    source, target = busy_source
    migration = do_request_migration(make_vm("waiting", vsp=source), target, make_user(permissions=MIGRATOR))

    migration.refresh_from_db()
    assert migration.state == Migration.State.QUEUED
    assert list(migration.events.values_list("to_state", flat=True)) == ["queued"]


def test_it_cancels_a_queued_migration_at_once(busy_source):
    source, target = busy_source
    vm = make_vm("waiting", vsp=source)
    user = make_user("alice", permissions=MIGRATOR)
    migration = do_request_migration(vm, target, user)

    do_cancel_migration(migration, user)

    migration.refresh_from_db()
    assert migration.state == Migration.State.CANCELLED
    assert "Cancelled by alice" in migration.alert
    assert vm.current_vsp == source
    with pytest.raises(MigrationRefused, match="Nothing to cancel"):
        do_cancel_migration(migration, user)


def test_it_refuses_to_cancel_once_committing(busy_source):
    source, target = busy_source
    migration = Migration.objects.get(vm__name="other")
    Migration.objects.filter(pk=migration.pk).update(state=Migration.State.COMMITTING)

    with pytest.raises(MigrationRefused, match="Too late to cancel"):
        do_cancel_migration(migration, make_user(permissions=MIGRATOR))
    assert not Migration.objects.get(pk=migration.pk).cancel_requested


def test_it_records_who_requested_and_who_cancelled_in_the_audit_trail(busy_source, celery_worker):
    source, target = busy_source
    vm = make_vm("web01", vsp=source)
    requester, canceller = make_user("ann", permissions=MIGRATOR), make_user("bob", permissions=MIGRATOR)

    migration = do_request_migration(vm, target, requester)
    do_cancel_migration(migration, canceller)

    events = list(AuditEvent.objects.order_by("pk").values_list("action", "actor_name", "object_name"))
    name = f"migration {migration.pk} of web01: src -> dst"
    assert events == [
        (AuditEvent.Action.MIGRATION_REQUESTED, "ann", name),
        (AuditEvent.Action.MIGRATION_CANCELLED, "bob", name),
    ]
    migration.refresh_from_db()
    assert (migration.state, migration.cancel_requested_by) == (Migration.State.CANCELLED, canceller)
