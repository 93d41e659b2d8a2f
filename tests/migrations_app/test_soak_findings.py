"""What the seeded fault soak found (issue 10, ``docs/migrations.md`` "Fault soak"), one test per bug.

Each test reproduces its soak run's fault deterministically with real host agents (simulated driver)
over real sockets: an agent killed with SIGKILL and started again empty (what a simulated host's
restart is: its guests die with its agent), or paused with SIGSTOP. The decisions are the control
plane's own (``recover_migrations``, the task recovery runs), called in the test's process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from agentprotocol import GuestSpec, IncomingRequest, MigrationParams, OutgoingRequest
from devtools import processes
from migrations_app.actions import do_request_migration
from migrations_app.agents import agent_migration_id
from migrations_app.models import Migration
from migrations_app.records import flip_registrations
from migrations_app.tasks import recover_migrations
from tests.conftest import free_port, log_path, subprocess_env, wait_until
from tests.hostagent.conftest import AgentFactory, RunningAgent, session_pki_dir
from tests.migrations_app.conftest import vsps_for
from tests.migrations_app.guests import guest_on, place_vm, runs_on, wait_for_state
from tests.migrations_app.test_faults import bring_agents_to_ready
from vms.agent_client import AgentClient
from vms.models import VSP, Registration

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.faults]


class Agents(dict[str, RunningAgent]):
    """This test's own agents by VSP name (a test kills and restarts them): hosta, hostb."""

    def __init__(self, factory: AgentFactory) -> None:
        super().__init__({name: factory(name) for name in ("hosta", "hostb")})
        self.factory = factory

    def restart_empty(self, name: str) -> RunningAgent:
        """SIGKILL the agent and start it again on its port, as a service manager would: it comes back
        knowing no guest and no migration (a simulated host's guests die with its agent)."""
        old = self[name]
        old.kill()
        port = int(old.url.rsplit(":", 1)[1])
        secret_file = self.factory.secret_dir / f"{name}-again.secret"
        secret_file.write_text(old.secret)
        started = processes.start_agent(
            name,
            port,
            secret_file,
            log_path=log_path(f"agent-{name}-again"),
            env=subprocess_env(),
            pki_dir=session_pki_dir() if old.trust else None,
        )
        client = AgentClient(started.url, started.secret, trust=old.trust)
        self[name] = agent = RunningAgent(
            name, started.url, started.secret, started.process, client, old.trust, started.fingerprint
        )
        self.factory.started.append(agent)
        return agent


@pytest.fixture
def agents(tmp_path) -> Iterator[Agents]:
    factory = AgentFactory(tmp_path)
    yield Agents(factory)
    factory.stop_all()


@pytest.fixture
def vsps(agents):
    return vsps_for(agents)


def stale_migration(vm, vsps, admin, state: str) -> Migration:
    """A migration in ``state`` whose worker fell silent a minute ago (recovery decides it)."""
    a_minute_ago = timezone.now() - timedelta(minutes=1)
    return Migration.objects.create(
        vm=vm,
        source=vsps["hosta"],
        target=vsps["hostb"],
        requested_by=admin,
        state=state,
        heartbeat_at=a_minute_ago,
        state_changed_at=a_minute_ago,
    )


def runnable_copies(vm) -> list[str]:
    copies = Registration.objects.filter(vm=vm).exclude(hardware_status="not_runnable")
    return [f"{copy.vsp.name}:{copy.hardware_status}" for copy in copies.select_related("vsp")]


def test_it_keeps_the_guest_on_the_source_when_the_target_restarted_empty_after_the_commit(
    agents, vsps, admin
):
    """Soak bug 1 (seeds 5090, 5198, 5330): kill-target while committing ended COMPLETED, guest nowhere."""
    vm = place_vm(agents, vsps, dirty_pages_per_s=200)
    migration = stale_migration(vm, vsps, admin, Migration.State.COMMITTING)
    bring_agents_to_ready(agents, vm, agent_migration_id(migration))
    with transaction.atomic():
        flip_registrations(migration)  # what the worker committed before the target's host restarted
    agents.restart_empty("hostb")

    assert recover_migrations(stale_after_s=5) == [migration.pk]

    migration.refresh_from_db()
    assert migration.state == "aborted"
    assert migration.failed_phase == "committing"
    assert migration.alert == (
        "Committing phase failed: hostb lost the guest before running it (its host agent restarted). "
        "The VM keeps running on hosta."
    )
    assert runs_on(agents["hosta"], vm.name)  # resumed, never released
    assert guest_on(agents["hostb"], vm.name) is None
    assert runnable_copies(vm) == ["hosta:on"]  # the flip turned back: runnable where the guest runs
    assert recover_migrations(stale_after_s=5) == []


def test_the_targets_leftover_copy_says_the_source_lost_the_guest_too_when_its_agent_was_killed(
    agents, vsps, admin
):
    """QA: after the commit, the target restarted empty and the source's agent was killed and started
    again (its guests died with it); the migration aborted saying the VM is not running, but the target's
    leftover Not Runnable copy said "VSP hostb lost the guest after the commit; it stays on VSP hosta"."""
    vm = place_vm(agents, vsps, dirty_pages_per_s=200)
    migration = stale_migration(vm, vsps, admin, Migration.State.COMMITTING)
    bring_agents_to_ready(agents, vm, agent_migration_id(migration))
    with transaction.atomic():
        flip_registrations(migration)
    agents.restart_empty("hostb")
    agents.restart_empty("hosta")

    assert recover_migrations(stale_after_s=5) == [migration.pk]

    migration.refresh_from_db()
    assert migration.state == "aborted"
    assert "The VM is not running: hosta no longer has it" in migration.alert
    leftover = Registration.objects.get(vm=vm, vsp=vsps["hostb"])
    assert (leftover.hardware_status, leftover.not_runnable_set_by) == ("not_runnable", "migrate")
    assert leftover.not_runnable_reason == (
        "After the commit, hostb lost the guest before running it (its host agent restarted); VSP hosta "
        "no longer has it either (the VM is not running): start it again on hosta"
    )
    assert "stays on" not in leftover.not_runnable_reason
    assert runnable_copies(vm) == ["hosta:off"]  # runnable where its record is, not running anywhere


def test_it_completes_with_an_alert_when_the_target_loses_the_guest_it_took_over(
    agents, vsps, admin, monkeypatch
):
    """Soak bug 1, roll forward: the target confirmed it runs the guest, then its host restarted.

    The source copy is released by then (it must be: the target ran the guest); the migration ends
    COMPLETED, but never without an alert saying the VM may be down on the target.
    """
    vm = place_vm(agents, vsps)
    migration = stale_migration(vm, vsps, admin, Migration.State.COMMITTING)
    bring_agents_to_ready(agents, vm, agent_migration_id(migration))
    with transaction.atomic():
        flip_registrations(migration)
    release = AgentClient.release

    def release_then_target_host_restarts(client, agent_id, *timeout_s):
        answer = release(client, agent_id, *timeout_s)
        agents.restart_empty("hostb")  # between the release and the last look at the target
        monkeypatch.setattr(AgentClient, "release", release)
        return answer

    monkeypatch.setattr(AgentClient, "release", release_then_target_host_restarts)

    assert recover_migrations(stale_after_s=5) == [migration.pk]

    migration.refresh_from_db()
    assert migration.state == "completed"
    assert migration.alert.startswith(f"{vm.name} may not be running on hostb: its host agent restarted")
    assert "keeps running" not in migration.alert
    assert runnable_copies(vm) == ["hostb:on"]


def test_it_never_releases_the_source_for_a_target_that_does_not_run_the_guest(agents, vsps, admin):
    """A target that refuses ``resume`` (its copy was discarded) never gets the VM; the source keeps it."""
    vm = place_vm(agents, vsps)
    migration = stale_migration(vm, vsps, admin, Migration.State.COMMITTING)
    agent_id = agent_migration_id(migration)
    bring_agents_to_ready(agents, vm, agent_id)
    with transaction.atomic():
        flip_registrations(migration)
    agents["hostb"].client.discard(agent_id)

    assert recover_migrations(stale_after_s=5) == [migration.pk]

    migration.refresh_from_db()
    assert migration.state == "aborted"
    assert migration.alert.startswith("Committing phase failed: hostb did not run the guest (")
    assert migration.alert.endswith("The VM keeps running on hosta.")
    assert runs_on(agents["hosta"], vm.name)
    assert runnable_copies(vm) == ["hosta:on"]


def test_it_does_not_say_the_vm_keeps_running_on_a_source_host_that_restarted_without_it(agents, vsps, admin):
    """Soak bug 2 (seeds 5005, 5029, 5053, 5113, 5125): kill-source before the commit.

    The database still said On, so the alert said "keeps running"; the source is asked now, and a
    simulated host's guests die with its agent: the alert says so, and the copy is stored Off.
    """
    vm = place_vm(agents, vsps, fill_percent=100)
    migration = stale_migration(vm, vsps, admin, Migration.State.COPY)
    agent_id = agent_migration_id(migration)
    guest = GuestSpec(guest_id=str(vm.guest_id), name=vm.name, memory_mib=vm.memory_mib, vcpus=1)
    prepared = agents["hostb"].client.prepare_incoming(IncomingRequest(migration_id=agent_id, guest=guest))
    params = MigrationParams(bandwidth_mbps=8)
    agents["hosta"].client.start_outgoing(
        OutgoingRequest(
            migration_id=agent_id, guest=guest.guest_id, target=prepared.endpoint(), params=params
        )
    )
    agents.restart_empty("hosta")  # the worker died with it too: recovery decides

    assert recover_migrations(stale_after_s=5) == [migration.pk]

    migration.refresh_from_db()
    assert migration.state == "aborted"
    assert migration.alert == (
        "Copy phase failed: the control-plane worker driving it stopped answering. The VM is not running: "
        "hosta no longer has it (its host agent restarted, and a simulated host's guests die with its "
        "agent: a host crash). Start it again on hosta."
    )
    assert runnable_copies(vm) == ["hosta:off"]
    assert guest_on(agents["hostb"], vm.name) is None  # the target's copy was discarded


def test_the_worker_names_a_dead_source_host_instead_of_saying_the_vm_keeps_running(
    agents, vsps, admin, migration_worker, wait_for
):
    """Soak bug 2 with the real worker: the source agent killed mid-Copy (and not back yet)."""
    vm = place_vm(agents, vsps, fill_percent=100, memory_mib=64)
    migration = do_request_migration(vm, vsps["hostb"], admin)
    wait_for_state(wait_for, migration, "copy")
    agents["hosta"].kill()

    wait_for_state(wait_for, migration, "aborted", "cancelled", "completed")
    assert migration.state == "aborted"
    assert migration.alert.startswith(  # issue 18.10: the cause, asked once the stream broke off
        "Copy phase failed: the source host hosta's agent is not running (connection refused). "
    ), migration.alert
    assert migration.alert.endswith(
        "The VM stays on hosta, which did not answer: if its host crashed, the VM is down there."
    )


def test_recovery_drops_the_copy_a_target_kept_because_it_missed_the_abort(agents, vsps, admin, settings):
    """Soak bug 3 (seed 5109): pause-target during Frozen left the target's copy "ready" for ever.

    The target cannot be reached while the abort is decided (its VSP's address leads nowhere: a network
    partition; a paused agent would still take the queued requests once resumed), so its discard is not
    answered. Once it is reachable again, the next recovery pass discards the copy; until then the
    migration stays marked ``undo_pending``.
    """
    settings.AGENT_TIMEOUT_S = 1
    vm = place_vm(agents, vsps)
    migration = stale_migration(vm, vsps, admin, Migration.State.FROZEN)
    bring_agents_to_ready(agents, vm, agent_migration_id(migration))
    VSP.objects.filter(name="hostb").update(agent_url=f"http://127.0.0.1:{free_port()}")

    assert recover_migrations(stale_after_s=5) == [migration.pk]

    migration.refresh_from_db()
    assert (migration.state, migration.undo_pending) == ("aborted", True)
    assert guest_on(agents["hostb"], vm.name).migrating  # the copy the soak found orphaned
    VSP.objects.filter(name="hostb").update(agent_url=agents["hostb"].url)  # reachable again
    Migration.objects.filter(pk=migration.pk).update(state_changed_at=timezone.now() - timedelta(seconds=30))

    assert recover_migrations(stale_after_s=5) == []  # nothing left to decide, but the undo is retried

    migration.refresh_from_db()
    assert not migration.undo_pending
    assert guest_on(agents["hostb"], vm.name) is None
    assert runs_on(agents["hosta"], vm.name)
    assert runnable_copies(vm) == ["hosta:on"]


def test_a_recovery_that_loses_the_race_to_another_skips_the_migration(agents, vsps, admin, monkeypatch):
    """Soak bug 4: two recovery passes at once; the second crashed (IllegalTransition aborted -> aborted).

    The interleaving is played in order: the second pass lists the silent migration, then the first pass
    decides it, then the second loads it. The second must skip it and still decide the others.
    """
    from migrations_app import recovery

    vm = place_vm(agents, vsps)
    other_vm = place_vm(agents, vsps)
    raced = stale_migration(vm, vsps, admin, Migration.State.COPY)
    other = stale_migration(other_vm, vsps, admin, Migration.State.INIT)
    load = recovery.load_migration
    first_pass: list[list[int]] = []

    def load_after_the_first_pass_decided(pk):
        if pk == raced.pk and not first_pass:
            monkeypatch.setattr(recovery, "stale_migrations", lambda stale_after_s: [load(raced.pk)])
            first_pass.append(recover_migrations(stale_after_s=5))
            monkeypatch.undo()
            monkeypatch.setattr(recovery, "load_migration", load_after_the_first_pass_decided)
        return load(pk)

    monkeypatch.setattr(recovery, "load_migration", load_after_the_first_pass_decided)

    assert recover_migrations(stale_after_s=5) == [other.pk]  # the second pass: no crash, the other one too
    assert first_pass == [[raced.pk]]
    raced.refresh_from_db()
    assert raced.state == "aborted"
    assert list(raced.events.values_list("to_state", flat=True)) == ["aborted"]  # decided once
    assert runs_on(agents["hosta"], vm.name) and runs_on(agents["hosta"], other_vm.name)


def test_a_migration_beats_its_heartbeat_while_its_first_publish_blocks(agents, vsps, admin, monkeypatch):
    """Soak bug 6: the heartbeat started only after the first progress publish returned (Redis down: never).

    The worker's driving function runs here in a thread, its first publish held until the test lets go:
    meanwhile the heartbeat must move on, so recovery leaves the migration to its worker.
    """
    from django.db import connection

    from migrations_app import engine

    vm = place_vm(agents, vsps)
    migration = Migration.objects.create(
        vm=vm, source=vsps["hosta"], target=vsps["hostb"], requested_by=admin
    )
    publish = engine.publish_progress
    held, let_go = threading.Event(), threading.Event()

    def first_publish_blocks(migration_id):
        if not held.is_set():
            held.set()
            let_go.wait(60)
        publish(migration_id)

    def drive():
        try:
            engine.drive_migration(migration.pk)
        finally:
            connection.close()

    monkeypatch.setattr(engine, "publish_progress", first_publish_blocks)
    worker = threading.Thread(target=drive)
    worker.start()
    try:
        assert held.wait(30)
        migration.refresh_from_db()
        claimed_beat = migration.heartbeat_at

        def beat_moved_on() -> bool:
            migration.refresh_from_db()
            return migration.heartbeat_at > claimed_beat + timedelta(seconds=1)

        assert wait_until(beat_moved_on, timeout=20), "no heartbeat while the first publish blocks"
        assert recover_migrations(stale_after_s=1) == []
    finally:
        let_go.set()
        worker.join(120)
    migration.refresh_from_db()
    assert migration.state == "completed"


def test_a_refused_pre_check_at_init_asks_the_source_before_saying_the_vm_keeps_running(agents, vsps, admin):
    """Soak bug 2 again (CI seed 20261137): the source killed at Init, marked unreachable, the pre-check
    refused, and the alert took the database's On for the truth."""
    from migrations_app.endings import abort_alert
    from migrations_app.engine import MigrationRun
    from migrations_app.errors import MigrationFailed
    from migrations_app.lease import Lease
    from migrations_app.phases import PHASES
    from migrations_app.records import load_migration

    vm = place_vm(agents, vsps)
    migration = stale_migration(vm, vsps, admin, Migration.State.INIT)
    agents["hosta"].kill()
    VSP.objects.filter(name="hosta").update(agent_reachable=False)
    Migration.objects.filter(pk=migration.pk).update(lease_owner="worker:this-test")
    run = MigrationRun(load_migration(migration.pk), Lease(migration.pk, "worker:this-test"))
    try:
        with pytest.raises(MigrationFailed) as failed:
            PHASES[0].run(run)
        alert = abort_alert(run.agents, failed.value)
    finally:
        run.close()

    assert alert == (
        "Init phase failed: agent unreachable on source host hosta. "
        "The VM stays on hosta, which did not answer: if its host crashed, the VM is down there."
    )


def test_recovery_backs_off_its_undo_tries_per_migration(agents, vsps, admin, settings):
    """Soak seed 1 run 93: a target that dropped every discard got ~4 tries a second for 6 minutes,
    from each recovery pass (every second in the soak) and each leftover check. Now one migration's
    tries are claimed one back-off slot at a time, the wait doubling; once the target answers, the
    next slot's try drops the copy."""
    settings.AGENT_TIMEOUT_S = 1
    vm = place_vm(agents, vsps)
    migration = stale_migration(vm, vsps, admin, Migration.State.FROZEN)
    bring_agents_to_ready(agents, vm, agent_migration_id(migration))
    VSP.objects.filter(name="hostb").update(agent_url=f"http://127.0.0.1:{free_port()}")  # nowhere
    assert recover_migrations(stale_after_s=5) == [migration.pk]  # the abort; its own undo fails
    Migration.objects.filter(pk=migration.pk).update(state_changed_at=timezone.now() - timedelta(seconds=30))

    for _ in range(3):  # passes in quick succession: one try, then the back-off holds
        recover_migrations(stale_after_s=5)
    migration.refresh_from_db()
    assert (migration.undo_pending, migration.undo_tries) == (True, 1)
    first_wait = migration.undo_retry_at - timezone.now()
    assert first_wait > timedelta(seconds=1)

    Migration.objects.filter(pk=migration.pk).update(undo_retry_at=timezone.now())  # the slot came
    recover_migrations(stale_after_s=5)
    migration.refresh_from_db()
    assert migration.undo_tries == 2
    assert migration.undo_retry_at - timezone.now() > first_wait  # the wait doubled

    VSP.objects.filter(name="hostb").update(agent_url=agents["hostb"].url)  # reachable again
    recover_migrations(stale_after_s=5)
    migration.refresh_from_db()
    assert (migration.undo_pending, migration.undo_tries) == (True, 2)  # not before its slot
    Migration.objects.filter(pk=migration.pk).update(undo_retry_at=timezone.now())
    recover_migrations(stale_after_s=5)
    migration.refresh_from_db()
    assert not migration.undo_pending
    assert guest_on(agents["hostb"], vm.name) is None
    assert runs_on(agents["hosta"], vm.name)
