"""Exactly one decider per migration (issue 10, "Two deciders at once"; ``migrations_app.lease``).

A worker stalled past the heartbeat limit loses its lease to recovery, which decides; once resumed, the
worker stands down (an event says so) without a second decision. Real host agents (simulated driver):
a real Celery worker stopped with SIGSTOP mid-Copy, and the engine driven in this process, frozen
after its commit.
"""

from __future__ import annotations

import signal
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import F
from django.utils import timezone

from migrations_app import engine
from migrations_app.actions import do_request_migration
from migrations_app.lease import Lease
from migrations_app.models import Migration
from migrations_app.tasks import recover_migrations
from tests.conftest import wait_until
from tests.migrations_app.guests import guest_on, place_vm, runs_on, wait_for_state
from vms.agent_client import AgentClient
from vms.models import Registration

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.faults]

DECISIONS = ("committing", "completed", "aborted", "cancelled")


def silent_for(migration: Migration, seconds: float) -> bool:
    migration.refresh_from_db()
    return migration.heartbeat_at is not None and migration.heartbeat_at < timezone.now() - timedelta(
        seconds=seconds
    )


def stood_down(migration: Migration) -> bool:
    return migration.events.filter(message__contains="stood down").exists()


def decisions(migration: Migration) -> list[str]:
    """The state changes into a decision (a note keeps its state: from == to, left out)."""
    changes = migration.events.exclude(from_state=F("to_state"))
    return [to for to in changes.values_list("to_state", flat=True) if to in DECISIONS]


def runnable_on(vm) -> list[str]:
    copies = Registration.objects.filter(vm=vm).exclude(hardware_status="not_runnable")
    return [copy.vsp.name for copy in copies.select_related("vsp")]


def test_a_worker_stopped_past_the_heartbeat_limit_stands_down_once_recovery_decided(
    host_agents, fleet, admin, killable_migration_worker, wait_for
):
    vm = place_vm(host_agents, fleet, memory_mib=64, fill_percent=100)
    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_for, migration, "copy")
    worker_lease = migration.lease_owner
    assert worker_lease.startswith("worker:")

    killable_migration_worker._signal_group(signal.SIGSTOP)  # alive, holding its lease, silent
    try:
        assert wait_for(lambda: silent_for(migration, 1.5), timeout=15)
        assert recover_migrations(stale_after_s=1) == [migration.pk]
        migration.refresh_from_db()
        assert migration.state == "aborted"
        assert migration.lease_owner.startswith("recovery:")
    finally:
        killable_migration_worker._signal_group(signal.SIGCONT)

    assert wait_for(lambda: stood_down(migration), timeout=30), killable_migration_worker.log_tail()
    migration.refresh_from_db()
    assert migration.state == "aborted"
    assert migration.alert == (
        "Copy phase failed: the control-plane worker driving it stopped answering. "
        "The VM keeps running on hosta."
    )
    assert decisions(migration) == ["aborted"]  # one outcome, decided once
    note = migration.events.get(message__contains="stood down")
    assert worker_lease in note.message and note.from_state == note.to_state == "aborted"
    assert runnable_on(vm) == ["hosta"]
    assert runs_on(host_agents["hosta"], vm.name)
    assert guest_on(host_agents["hostb"], vm.name) is None
    assert recover_migrations(stale_after_s=1) == []


class FrozenLease(Lease):
    """The worker's lease while its process is "frozen": renewals wait until the test lets go, as every
    thread of a SIGSTOPped worker would (the heartbeat stops, then resumes with the rest)."""

    frozen = threading.Event()
    thawed = threading.Event()

    def renew(self) -> bool:
        if self.frozen.is_set():
            self.thawed.wait(120)
        return super().renew()


def test_a_worker_frozen_after_its_commit_does_not_roll_forward_again(host_agents, fleet, admin, monkeypatch):
    """Recovery rolls forward; the resumed worker sends no resume or release and records no completion."""
    agents, vsps = host_agents, fleet
    vm = place_vm(agents, vsps)
    migration = Migration.objects.create(
        vm=vm, source=vsps["hosta"], target=vsps["hostb"], requested_by=admin
    )
    roll_forward = engine.roll_forward
    at_roll_forward = threading.Event()
    agent_commands_after_thaw: list[str] = []

    def freeze_then_roll_forward(migration_row, lease):
        FrozenLease.frozen.set()
        at_roll_forward.set()
        FrozenLease.thawed.wait(120)
        return roll_forward(migration_row, lease)

    def drive():
        try:
            engine.drive_migration(migration.pk)
        finally:
            connection.close()

    for command in ("resume", "release", "discard", "cancel"):
        original = getattr(AgentClient, command)

        def spy(self, *args, _command=command, _original=original, **kwargs):
            if FrozenLease.thawed.is_set() and threading.current_thread().name == "frozen-worker":
                agent_commands_after_thaw.append(_command)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(AgentClient, command, spy)
    monkeypatch.setattr(engine, "Lease", FrozenLease)
    monkeypatch.setattr(engine, "roll_forward", freeze_then_roll_forward)
    FrozenLease.frozen.clear()
    FrozenLease.thawed.clear()
    worker = threading.Thread(target=drive, name="frozen-worker")
    worker.start()
    try:
        assert at_roll_forward.wait(60)
        migration.refresh_from_db()
        assert migration.state == "committing"
        assert wait_until(lambda: silent_for(migration, 1.5), timeout=15)
        assert recover_migrations(stale_after_s=1) == [migration.pk]
        migration.refresh_from_db()
        assert migration.state == "completed"
    finally:
        FrozenLease.thawed.set()
        worker.join(120)

    migration.refresh_from_db()
    assert stood_down(migration)
    assert agent_commands_after_thaw == []
    assert decisions(migration) == ["committing", "completed"]
    assert runnable_on(vm) == ["hostb"]
    assert runs_on(agents["hostb"], vm.name)
    assert guest_on(agents["hosta"], vm.name)["hardware_status"] == "not_runnable"


def test_recovery_ends_the_evacuation_whose_last_migration_it_decided(host_agents, fleet, admin):
    """The worker that would have ended the evacuation is gone (or stood down): its decider does it."""
    from evacuations.models import Evacuation, EvacuationStep

    vm = place_vm(host_agents, fleet)
    a_minute_ago = timezone.now() - timedelta(minutes=1)
    migration = Migration.objects.create(
        vm=vm,
        source=fleet["hosta"],
        target=fleet["hostb"],
        requested_by=admin,
        state=Migration.State.COPY,
        heartbeat_at=a_minute_ago,
        state_changed_at=a_minute_ago,
        lease_owner="worker:gone",
    )
    evacuation = Evacuation.objects.create(vsp=fleet["hosta"], requested_by=admin)
    EvacuationStep.objects.create(
        evacuation=evacuation, position=0, vm=vm, vm_name=vm.name, target=fleet["hostb"], migration=migration
    )

    assert recover_migrations(stale_after_s=5) == [migration.pk]

    evacuation.refresh_from_db()
    assert evacuation.state == Evacuation.State.FINISHED
    assert runs_on(host_agents["hosta"], vm.name)
