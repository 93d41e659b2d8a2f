"""The compare-and-set of a migration's state (``transitions.transition``): fast, database only."""

from __future__ import annotations

import pytest

from migrations_app.models import TRANSITIONS, Migration, MigrationEvent
from migrations_app.transitions import IllegalTransition, transition
from tests.factories import make_migration, make_user, make_vm, make_vsp

pytestmark = pytest.mark.django_db

State = Migration.State


@pytest.fixture
def migration():
    source, target = make_vsp("vsp1"), make_vsp("vsp2")
    return make_migration(make_vm("web01", source), source, target)


def test_it_moves_the_state_and_records_one_event(migration):
    actor = make_user("alice")

    assert transition(migration.pk, State.QUEUED, State.INIT, message="Init begins", actor=actor)

    migration.refresh_from_db()
    assert migration.state == State.INIT
    event = migration.events.get()
    assert (event.from_state, event.to_state, event.message, event.actor) == (
        State.QUEUED,
        State.INIT,
        "Init begins",
        actor,
    )
    assert event.at == migration.state_changed_at == migration.init_started_at


def test_it_refuses_when_another_decider_moved_first_and_records_nothing(migration):
    assert transition(migration.pk, State.QUEUED, State.CANCELLED, message="cancelled while queued")

    assert not transition(migration.pk, State.QUEUED, State.INIT, message="too late")

    migration.refresh_from_db()
    assert migration.state == State.CANCELLED
    assert list(migration.events.values_list("message", flat=True)) == ["cancelled while queued"]


def test_it_honours_extra_conditions_of_the_compare(migration):
    Migration.objects.filter(pk=migration.pk).update(state=State.FROZEN, cancel_requested=True)

    won = transition(
        migration.pk, State.FROZEN, State.COMMITTING, message="commit", where={"cancel_requested": False}
    )

    assert not won
    assert Migration.objects.get(pk=migration.pk).state == State.FROZEN
    assert not MigrationEvent.objects.exists()


def test_it_stamps_the_end_of_the_phase_left_and_the_start_of_the_one_entered(migration):
    transition(migration.pk, State.QUEUED, State.INIT, message="init")
    transition(migration.pk, State.INIT, State.COPY, message="copy", copy_percent=5)

    migration.refresh_from_db()
    assert migration.init_ended_at == migration.copy_started_at == migration.state_changed_at
    assert migration.copy_ended_at is None
    assert migration.copy_percent == 5  # extra fields are written in the same update


ILLEGAL = [(old, new) for old in State for new in State if new not in TRANSITIONS[old]]


@pytest.mark.parametrize(("old", "new"), ILLEGAL, ids=[f"{old}-{new}" for old, new in ILLEGAL])
def test_it_refuses_a_change_the_table_does_not_allow(migration, old, new):
    Migration.objects.filter(pk=migration.pk).update(state=old)

    with pytest.raises(IllegalTransition):
        transition(migration.pk, old, new, message="never")

    assert Migration.objects.get(pk=migration.pk).state == old
    assert not MigrationEvent.objects.exists()


def test_it_lets_nothing_leave_an_ended_migration():
    assert all(not TRANSITIONS[state] for state in (State.COMPLETED, State.ABORTED, State.CANCELLED))
    # After the commit forward, or back to the source only when the target lost the guest (never cancelled).
    assert TRANSITIONS[State.COMMITTING] == {State.COMPLETED, State.ABORTED}
