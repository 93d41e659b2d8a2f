"""Real QEMU guests moved through the console's own path: request -> Celery worker -> agents -> QEMU.

Two host agents run the qemu driver (QEMU processes under TCG, the Linux test guest from
``scripts/build_test_guest.sh`` whose memwriter keeps writing and checking its memory). A Celery
worker of this module's own drives the migrations, with the data plane capped at 20 MB/s so that
Copy lasts long enough to act in it. Nothing is faked. Skipped loudly without QEMU >= 10.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentprotocol import GuestSpec
from devtools import processes
from migrations_app.actions import do_cancel_migration, do_request_migration
from migrations_app.agents import agent_migration_id
from migrations_app.models import Migration
from tests.conftest import ManagedProcess, log_path, subprocess_env, wait_until
from tests.factories import make_vm, make_vsp
from tests.hostagent.conftest import AgentFactory, RunningAgent, session_pki_dir, unique
from tests.migrations_app.conftest import route_migrations_to, worker_on_own_queue
from tests.migrations_app.guests import wait_for_state
from tests.qemu_guest import guest_named, needs_qemu, runs_intact, workload
from vms.agent_client import AgentClient, UnknownMigration
from vms.models import Registration

pytestmark = [*needs_qemu, pytest.mark.django_db(transaction=True)]

MEMORY_MIB = 256
LINK_MBPS = 160  # 20 MB/s: 256 MiB take ~13 s to copy once
CALM_PAGES_PER_S = 1000  # 4 MB/s written: converges in a few rounds on that link
WILD_PAGES_PER_S = 20_000  # 80 MB/s written: never fits the downtime limit on that link


@pytest.fixture(scope="module")
def qemu_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningAgent]]:
    factory = AgentFactory(tmp_path_factory.mktemp("qemu-agents"))
    run_dir = tmp_path_factory.mktemp("qemu-run")
    agents = {
        name: factory(name, "--driver-option", f"run_dir={run_dir / name}", driver="qemu")
        for name in ("hosta", "hostb")
    }
    yield agents
    factory.stop_all()


@pytest.fixture(scope="module")
def _qemu_worker(django_db_setup, redis_url) -> Iterator[tuple[str, ManagedProcess]]:
    with worker_on_own_queue("qemu", 2, MIGRATION_BANDWIDTH_MBPS=str(LINK_MBPS)) as queue_and_worker:
        yield queue_and_worker


@pytest.fixture
def qemu_worker(_qemu_worker, settings) -> ManagedProcess:
    return route_migrations_to(_qemu_worker, settings)


@pytest.fixture
def host_agents(qemu_agents):
    """The conftest's ``fleet`` registers these QEMU hosts as its VSPs."""
    return qemu_agents


def place_linux_vm(agents, fleet, pages_per_s: int, **vm_fields: Any):
    """A booted Linux guest on hosta whose memwriter has checked its memory once, and its VM row."""
    name = unique("linux")
    vm = make_vm(name, vsp=fleet["hosta"], memory_mib=MEMORY_MIB, os_type="Linux", **vm_fields)
    spec = {
        "guest_id": str(vm.guest_id),
        "name": name,
        "memory_mib": MEMORY_MIB,
        "vcpus": 1,
        "os_type": "Linux",
    }
    agents["hosta"].client.define_guest(
        GuestSpec.model_validate({**spec, "dirty_pages_per_s": pages_per_s, "running": True})
    )
    assert wait_until(lambda: workload(agents["hosta"], name)["selfchecks_passed"] >= 1, timeout=60)
    return vm


def assert_still_on_source(vm, agents, fleet, migration: Migration) -> None:
    assert vm.current_vsp == fleet["hosta"]
    assert "The VM keeps running on hosta." in migration.alert
    assert runs_intact(agents["hosta"], vm.name)
    target_copy = next((g for g in agents["hostb"].client.list_guests() if g.name == vm.name), None)
    assert target_copy is None or target_copy.hardware_status != "on"


def test_it_migrates_a_busy_linux_guest_through_the_console(qemu_agents, fleet, admin, qemu_worker):
    vm = place_linux_vm(qemu_agents, fleet, CALM_PAGES_PER_S)

    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_until, migration, "completed", "aborted", "cancelled", timeout=120)

    assert migration.state == "completed", migration.alert
    assert migration.source_digest and migration.source_digest == migration.target_digest
    assert [row[1] for row in migration.phase_rows()] == [100, 100, 100, 100]
    assert list(migration.events.values_list("to_state", flat=True)) == [
        "queued",
        "init",
        "copy",
        "io_quiesce",
        "frozen",
        "committing",
        "completed",
    ]
    assert vm.current_vsp == fleet["hostb"]
    assert Registration.objects.get(vm=vm, vsp=fleet["hosta"]).hardware_status == "not_runnable"
    assert qemu_agents["hosta"].client.get_guest(str(vm.guest_id)).hardware_status == "not_runnable"
    assert runs_intact(qemu_agents["hostb"], vm.name), "the guest's own memory check after the move"


def test_it_cancels_during_copy_and_the_guest_runs_on(qemu_agents, fleet, admin, qemu_worker):
    vm = place_linux_vm(qemu_agents, fleet, CALM_PAGES_PER_S)
    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_until, migration, "copy", "aborted", timeout=60)

    do_cancel_migration(migration, admin)
    wait_for_state(wait_until, migration, "cancelled", "aborted", "completed")

    assert (migration.state, migration.failed_phase) == ("cancelled", "copy"), migration.alert
    assert_still_on_source(vm, qemu_agents, fleet, migration)


def test_it_alerts_when_the_target_qemu_dies_during_copy(qemu_agents, fleet, admin, qemu_worker):
    vm = place_linux_vm(qemu_agents, fleet, CALM_PAGES_PER_S)
    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_until, migration, "copy", "aborted", timeout=60)
    assert wait_until(lambda: workload(qemu_agents["hostb"], vm.name).get("pid"), timeout=10)

    os.kill(workload(qemu_agents["hostb"], vm.name)["pid"], signal.SIGKILL)
    wait_for_state(wait_until, migration, "aborted", "cancelled", "completed")

    assert (migration.state, migration.failed_phase) == ("aborted", "copy"), migration.alert
    assert_still_on_source(vm, qemu_agents, fleet, migration)


def test_it_aborts_a_guest_that_cannot_converge_at_its_copy_limit(qemu_agents, fleet, admin, qemu_worker):
    vm = place_linux_vm(qemu_agents, fleet, WILD_PAGES_PER_S, copy_limit_s=20)

    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_until, migration, "aborted", "cancelled", "completed", timeout=90)

    assert (migration.state, migration.failed_phase) == ("aborted", "copy"), migration.alert
    assert "time limit of 20 s" in migration.alert
    assert migration.rounds >= 2, "QEMU went round after round without converging"
    assert_still_on_source(vm, qemu_agents, fleet, migration)


def restart_agent(
    factory: AgentFactory, old: RunningAgent, *extra_args: str, driver: str = "qemu"
) -> RunningAgent:
    """Start the agent again on its port with its secret and ``extra_args`` (its run directory, its
    libvirt URI...), as a service manager would."""
    port = int(old.url.rsplit(":", 1)[1])
    secret_file = factory.secret_dir / f"{old.name}-again.secret"
    secret_file.write_text(old.secret)
    started = processes.start_agent(
        old.name,
        port,
        secret_file,
        driver,
        extra_args,
        log_path=log_path(f"agent-{old.name}-again"),
        env=subprocess_env(),
        pki_dir=session_pki_dir() if old.trust else None,
    )
    client = AgentClient(started.url, started.secret, trust=old.trust, timeout_s=30)
    agent = RunningAgent(
        old.name, started.url, started.secret, started.process, client, old.trust, started.fingerprint
    )
    factory.started.append(agent)
    return agent


class RestartableHosts:
    """Two QEMU hosts of one test's own (hosta, hostb), each with a fixed run directory, so that a test
    can ``kill -9`` an agent alone and start it again on its port, as a service manager would."""

    def __init__(self, factory: AgentFactory, run_dir: Path) -> None:
        self.factory = factory
        self.args = {name: ("--driver-option", f"run_dir={run_dir / name}") for name in ("hosta", "hostb")}
        self.agents = {name: factory(name, *args, driver="qemu") for name, args in self.args.items()}
        self.vsps = {
            name: make_vsp(
                name,
                agent_url=agent.url,
                agent_secret=agent.secret,
                agent_certificate=agent.trust,
                memory_mib=4096,
            )
            for name, agent in self.agents.items()
        }

    def kill_and_restart(self, name: str) -> RunningAgent:
        """SIGKILL the agent's own process (not its process group: its guests run on), then restart it."""
        agent_process = self.agents[name].process.process
        os.kill(agent_process.pid, signal.SIGKILL)
        agent_process.wait(timeout=10)
        self.agents[name] = restart_agent(self.factory, self.agents[name], *self.args[name])
        return self.agents[name]


@pytest.fixture
def restartable_hosts(tmp_path, tmp_path_factory) -> Iterator[RestartableHosts]:
    factory = AgentFactory(tmp_path)
    try:
        yield RestartableHosts(factory, tmp_path_factory.mktemp("qr"))  # short: unix socket paths
    finally:
        factory.stop_all()


def migrating_in_copy(hosts: RestartableHosts, admin) -> tuple[Any, Migration]:
    """A booted Linux guest on hosta, its migration to hostb requested and some of its Copy done."""
    vm = place_linux_vm(hosts.agents, hosts.vsps, CALM_PAGES_PER_S)
    migration = do_request_migration(vm, hosts.vsps["hostb"], admin)
    wait_for_state(wait_until, migration, "copy", "aborted", timeout=60)
    assert wait_until(lambda: refreshed(migration).copy_percent > 0, timeout=30), migration.alert
    return vm, migration


@pytest.mark.faults
def test_a_source_agent_killed_mid_copy_re_adopts_its_running_guest_and_the_migration_aborts(
    restartable_hosts, admin, qemu_worker
):
    """Issue 10, item 2: ``kill -9`` of the source's agent (not its guests) during Copy, restarted at once.

    The migration aborts; the guest never stopped: the same QEMU (pid) runs on the source, its vCPUs
    running and its memory checks passing, and the restarted agent lists it and knows no migration.
    """
    hosts = restartable_hosts
    vm, migration = migrating_in_copy(hosts, admin)
    qemu_pid = workload(hosts.agents["hosta"], vm.name)["pid"]

    source = hosts.kill_and_restart("hosta")

    wait_for_state(wait_until, migration, "aborted", "cancelled", "completed", timeout=90)
    assert (migration.state, migration.failed_phase) == ("aborted", "copy"), migration.alert
    guest = guest_named(source, vm.name)
    assert guest.hardware_status == "on" and guest.migrating is None
    assert guest.workload["pid"] == qemu_pid, "the same QEMU, re-adopted, not a new boot"
    assert guest.workload["vcpus_running"] is True  # QMP query-status: running
    assert runs_intact(source, vm.name)
    with pytest.raises(UnknownMigration):
        source.client.snapshot(agent_migration_id(migration))
    vm.refresh_from_db()
    assert vm.current_vsp == hosts.vsps["hosta"]
    target_copy = next((g for g in hosts.agents["hostb"].client.list_guests() if g.name == vm.name), None)
    assert target_copy is None or target_copy.hardware_status != "on"


@pytest.mark.faults
def test_a_target_agent_killed_mid_copy_discards_the_incoming_copy_on_restart(
    restartable_hosts, admin, qemu_worker
):
    """The target's agent killed during Copy and restarted: its incoming copy is gone for good (QEMU may
    end by itself when the stream breaks; the restarted agent discards whatever its record names), it
    knows no migration, and the guest runs on at the source."""
    hosts = restartable_hosts
    vm, migration = migrating_in_copy(hosts, admin)
    incoming_pid = workload(hosts.agents["hostb"], vm.name)["pid"]

    target = hosts.kill_and_restart("hostb")

    wait_for_state(wait_until, migration, "aborted", "cancelled", "completed", timeout=90)
    assert (migration.state, migration.failed_phase) == ("aborted", "copy"), migration.alert
    assert [g for g in target.client.list_guests() if g.name == vm.name] == []
    assert wait_until(lambda: not Path(f"/proc/{incoming_pid}").exists(), timeout=15), "incoming QEMU left"
    with pytest.raises(UnknownMigration):
        target.client.snapshot(agent_migration_id(migration))
    vm.refresh_from_db()
    assert vm.current_vsp == hosts.vsps["hosta"]
    assert runs_intact(hosts.agents["hosta"], vm.name)


def refreshed(migration: Migration) -> Migration:
    migration.refresh_from_db()
    return migration


def test_a_qemu_guests_warning_offers_no_throttle_qemu_cannot_turn_on(qemu_agents, fleet, admin, qemu_worker):
    """QEMU refuses to enable auto-converge during a migration (its agent answers 409), so the warning
    before the limit offers only what it can do: raise the allowed downtime or switch over now."""
    from migrations_app.progress import get_migration_display, render_vm_fragments
    from migrations_app.steering import outlook

    vm = place_linux_vm(qemu_agents, fleet, WILD_PAGES_PER_S, copy_limit_s=60)
    migration = do_request_migration(vm, fleet["hostb"], admin)
    seen: list[Any] = []

    def warned() -> bool:
        migration.refresh_from_db()
        seen[:] = [outlook(migration), migration.state]
        return (seen[0] is not None and seen[0].warning != "") or migration.state not in (
            "queued",
            "init",
            "copy",
        )

    assert wait_until(warned, timeout=60) and seen[0] is not None, seen
    fleet["hosta"].refresh_from_db()
    assert fleet["hosta"].agent_driver == "qemu"  # learnt when the migration started
    assert {rescue.action for rescue in seen[0].rescues} == {"raise_downtime", "switchover"}
    html = render_vm_fragments(get_migration_display(vm), oob=False)
    assert "Throttle the guest" not in html and 'value="auto_converge"' not in html
    assert 'data-field="rescue_button">Switch over now<' in html
    assert 'data-field="rescue_cost">about ' in html

    do_cancel_migration(migration, admin)
    wait_for_state(wait_until, migration, "cancelled", "aborted", "completed")
    assert_still_on_source(vm, qemu_agents, fleet, migration)
