"""Migration outcomes as events (``migrations_app.outcomes``): recorded with the outcome, delivered to
followers on commit, by the decider after its undo, or by the periodic pass when the process that
recorded it died first. Database only (no agents, no worker): the transitions are the deciders' own.

A test database transaction that never commits stands for a process that died between its commit and
its follow-up: its ``on_commit`` callbacks never run, exactly as when the process is killed there.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from migrations_app import outcomes
from migrations_app.history import record_refusal
from migrations_app.models import Migration, MigrationOutcome
from migrations_app.outcomes import deliver_outcome_of, deliver_pending
from migrations_app.tasks import recover_migrations
from migrations_app.transitions import transition
from tests.factories import make_migration, make_vm, make_vsp

pytestmark = pytest.mark.django_db

State = Migration.State
LATER = timedelta(minutes=10)  # past every grace and back-off of the periodic pass


@pytest.fixture
def followed(monkeypatch):
    """The outcomes the followers were told of, as (migration id, state); the app's own followers
    are set aside so that each test sees only its own."""
    seen: list[tuple[int, str]] = []
    monkeypatch.setattr(outcomes, "_followers", {})
    outcomes.register_follower("test", lambda outcome: seen.append((outcome.migration_id, outcome.state)))
    return seen


@pytest.fixture
def migration():
    source, target = make_vsp("vsp1"), make_vsp("vsp2")
    return make_migration(make_vm("web01", source), source, target)


def test_an_outcome_is_recorded_with_the_terminal_state_and_followed_once_it_commits(
    migration, followed, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        assert transition(migration.pk, State.QUEUED, State.CANCELLED, message="cancelled while queued")
        assert followed == []  # not before the commit

    assert followed == [(migration.pk, "cancelled")]
    event = MigrationOutcome.objects.get(migration=migration)
    assert event.outcome == "cancelled" and event.delivered_at is not None
    assert event.at == Migration.objects.get(pk=migration.pk).state_changed_at


def test_a_change_that_is_not_an_end_records_no_outcome(migration, followed):
    assert transition(migration.pk, State.QUEUED, State.INIT, message="Init begins")

    assert not MigrationOutcome.objects.exists()


def test_an_outcome_rolled_back_with_its_state_leaves_no_event(migration, followed):
    with pytest.raises(RuntimeError), transaction.atomic():
        transition(migration.pk, State.QUEUED, State.ABORTED, message="aborted")
        raise RuntimeError("the transaction fails after the transition")

    assert Migration.objects.get(pk=migration.pk).state == State.QUEUED
    assert not MigrationOutcome.objects.exists()
    assert followed == []


def test_a_refusal_is_an_outcome_too(followed, django_capture_on_commit_callbacks):
    source, target = make_vsp("vsp1"), make_vsp("vsp2")
    with django_capture_on_commit_callbacks(execute=True):
        refused = record_refusal(make_vm("web01", source), target, None, "web01 is a vPar.")

    assert followed == [(refused.pk, "refused")]


def test_an_abort_whose_undo_is_under_way_waits_for_its_decider(
    migration, followed, django_capture_on_commit_callbacks
):
    Migration.objects.filter(pk=migration.pk).update(state=State.COPY, heartbeat_at=timezone.now())
    with django_capture_on_commit_callbacks(execute=True):
        transition(migration.pk, State.COPY, State.ABORTED, message="aborted", undo_pending=True)

    assert followed == []  # the guest is not back on its source yet: the decider delivers after the undo
    assert (
        deliver_pending(timezone.now() + timedelta(seconds=outcomes.PENDING_AFTER_S)) == []
    )  # decider alive
    Migration.objects.filter(pk=migration.pk).update(undo_pending=False)

    assert deliver_outcome_of(migration.pk)
    assert followed == [(migration.pk, "aborted")]
    assert not deliver_outcome_of(migration.pk)  # delivered once
    assert followed == [(migration.pk, "aborted")]


def test_the_periodic_pass_delivers_what_a_process_that_died_after_its_commit_did_not(migration, followed):
    Migration.objects.filter(pk=migration.pk).update(state=State.COMMITTING, heartbeat_at=timezone.now())
    transition(migration.pk, State.COMMITTING, State.COMPLETED, message="Completed")  # never committed here

    assert followed == []
    assert deliver_pending() == []  # too fresh: left to the process that recorded it

    assert deliver_pending(timezone.now() + LATER) == [migration.pk]
    assert followed == [(migration.pk, "completed")]
    assert MigrationOutcome.objects.get().delivered_at is not None
    assert deliver_pending(timezone.now() + 2 * LATER) == []


def test_a_follower_that_fails_is_offered_the_outcome_again_and_the_others_still_get_it(
    migration, followed, monkeypatch
):
    calls = []

    def flaky(outcome):
        calls.append(outcome.migration_id)
        if len(calls) == 1:
            raise RuntimeError("the channel layer is down")

    outcomes.register_follower("flaky", flaky)
    transition(migration.pk, State.QUEUED, State.CANCELLED, message="cancelled while queued")

    assert deliver_outcome_of(migration.pk) is False
    assert followed == [(migration.pk, "cancelled")] and calls == [migration.pk]
    assert MigrationOutcome.objects.get().delivered_at is None
    assert deliver_pending() == []  # its claim holds until its back-off ran out

    assert deliver_pending(timezone.now() + LATER) == [migration.pk]
    assert calls == [migration.pk, migration.pk]
    assert MigrationOutcome.objects.get().delivered_at is not None


def test_recovery_beat_task_delivers_left_over_outcomes(migration, followed, monkeypatch):
    transition(migration.pk, State.QUEUED, State.CANCELLED, message="cancelled while queued")
    MigrationOutcome.objects.update(at=timezone.now() - LATER)

    recover_migrations()

    assert followed == [(migration.pk, "cancelled")]


def test_a_migration_ended_by_the_periodic_pass_ends_its_evacuation(migration):
    """The evacuation follower (registered by its app) through the robust path: the worker died between
    its commit and its follow-up, the pass delivers, the evacuation ends and says how."""
    from evacuations.models import Evacuation, EvacuationStep

    evacuation = Evacuation.objects.create(vsp=migration.source)
    EvacuationStep.objects.create(
        evacuation=evacuation,
        position=1,
        vm=migration.vm,
        vm_name="web01",
        target=migration.target,
        migration=migration,
    )
    Migration.objects.filter(pk=migration.pk).update(state=State.COMMITTING)
    transition(migration.pk, State.COMMITTING, State.COMPLETED, message="Completed")
    evacuation.refresh_from_db()
    assert evacuation.state == Evacuation.State.RUNNING  # nobody followed the outcome yet

    deliver_pending(timezone.now() + LATER)

    evacuation.refresh_from_db()
    assert evacuation.state == Evacuation.State.FINISHED and evacuation.ended_at is not None
