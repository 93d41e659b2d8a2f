"""Issue 18 items 2, 3 and 11: a stalled migration says so and ends; a roll forward that cannot reach a
host says so at once; a host that answers again is taken at once.

Real host agents (simulated driver) of each test's own, paused (SIGSTOP), killed (SIGKILL) and started
again on their port as a service manager would; a real Celery worker drives the migrations, and
recovery's pass (``recover_migrations``) runs here as the beat would run it.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from devtools import processes
from migrations_app.actions import do_request_migration
from migrations_app.models import Migration
from migrations_app.tasks import recover_migrations
from tests.conftest import log_path, subprocess_env, wait_until
from tests.factories import grant_role, make_user
from tests.hostagent.conftest import AgentFactory, RunningAgent, session_pki_dir
from tests.migrations_app.conftest import vsps_for
from tests.migrations_app.guests import assert_left_on_source, place_vm, runs_on, wait_for_state
from tests.migrations_app.test_faults import committed_then_worker_gone
from vms.agent_client import AgentClient
from vms.models import VSP, Role

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def own_agents(tmp_path) -> Iterator[tuple[AgentFactory, dict[str, RunningAgent]]]:
    """Two agents of this test's own (hosta, hostb): pausing or killing one disturbs no other test."""
    factory = AgentFactory(tmp_path)
    agents = {name: factory(name) for name in ("hosta", "hostb")}
    yield factory, agents
    factory.stop_all()


@contextmanager
def paused(agent: RunningAgent) -> Iterator[None]:
    """The agent's process group stopped (SIGSTOP: a hung host that keeps its sockets), resumed after."""
    agent.process._signal_group(signal.SIGSTOP)
    try:
        yield
    finally:
        agent.process._signal_group(signal.SIGCONT)


def restart_agent(factory: AgentFactory, old: RunningAgent) -> RunningAgent:
    """Start a killed agent again on its port with its secret, as a service manager would (a simulated
    host's guests died with it)."""
    port = int(old.url.rsplit(":", 1)[1])
    secret_file = factory.secret_dir / f"{old.name}-again.secret"
    secret_file.write_text(old.secret)
    started = processes.start_agent(
        old.name,
        port,
        secret_file,
        log_path=log_path(f"agent-{old.name}-again"),
        env=subprocess_env(),
        pki_dir=session_pki_dir(),
    )
    client = AgentClient(started.url, started.secret, trust=old.trust, timeout_s=30)
    agent = RunningAgent(
        old.name, started.url, started.secret, started.process, client, old.trust, started.fingerprint
    )
    factory.started.append(agent)
    return agent


# --- 18.2: the no-progress limit ------------------------------------------------------------------


@pytest.mark.faults
def test_a_copy_that_stops_moving_warns_then_aborts_with_the_reason(
    own_agents, admin, migration_worker, client
):
    """The issue's reproduction: Copy unlimited (the default), the target agent SIGSTOPped mid-Copy. With a
    no-progress limit of 6 s, the page warns from 3 s while it is still in Copy, then the migration aborts
    naming the limit and the silent host; the guest runs on its source throughout.

    Paused at half of Copy rather than the issue's 85%: loopback's TCP buffers here take up to ~36 MB
    (``tcp_rmem`` max 32 MiB + ``tcp_wmem`` 4 MiB) after the pause, which the issue's 150 s limit dwarfs
    but a test's 6 s does not; half of a 128 MiB guest leaves more than that to send."""
    _, agents = own_agents
    fleet = vsps_for(agents)
    vm = place_vm(agents, fleet, memory_mib=128, fill_percent=100)
    assert vm.copy_limit_s is None
    migration = do_request_migration(vm, fleet["hostb"], admin, policy={"no_progress_s": 6})
    assert migration.policy["no_progress_s"] == 6

    def copied(percent: int) -> bool:
        migration.refresh_from_db()
        return migration.state == "copy" and migration.copy_percent >= percent

    assert wait_until(lambda: copied(50), timeout=60), (migration.state, migration.copy_percent)
    client.force_login(admin)
    general = reverse("vms:vm_general", args=[vm.pk])
    with paused(agents["hostb"]):

        def warned_while_stalled() -> bool:
            migration.refresh_from_db()
            return migration.state == "copy" and migration.warning.startswith("No progress")

        assert wait_until(warned_while_stalled, timeout=30), (migration.state, migration.alert)
        page = client.get(general).content.decode()
        wait_for_state(wait_until, migration, "aborted", "cancelled", "completed", timeout=30)
        assert runs_on(agents["hosta"], vm.name)  # while the target is still frozen

    assert 'data-field="live_warning"' in page
    assert re.search(
        r"No progress in the Copy phase for \d+ s \(nothing moved since \d\d:\d\d:\d\d UTC; the target host "
        r"hostb does not answer\)\. The migration aborts at 6 s without progress",
        page,
    ), page[page.find("live_warning") - 200 :][:800]
    assert (migration.state, migration.failed_phase, migration.failure_kind) == (
        "aborted",
        "copy",
        "no_progress",
    )
    assert re.fullmatch(
        r"Copy phase failed: no progress for (\d+\.\d) s, over its no-progress limit of 6 s \(nothing moved "
        r"since \d\d:\d\d:\d\d UTC; the target host hostb did not answer\)\. The VM keeps running on hosta\.",
        migration.alert,
    ), migration.alert
    assert float(re.search(r"for (\d+\.\d) s", migration.alert)[1]) >= 6  # type: ignore[index]
    assert migration.warning == ""  # the end's alert says it now
    timeline = list(migration.events.values_list("to_state", "message"))
    warnings = [i for i, (state, text) in enumerate(timeline) if state == "copy" and "No progress" in text]
    assert warnings and warnings[0] < len(timeline) - 1 and timeline[-1][0] == "aborted", timeline

    # once thawed, the target drops its copy (recovery retries the undo); the guest never left the source
    def target_dropped_its_copy() -> bool:
        recover_migrations(stale_after_s=30)
        return agents["hostb"].guest(vm.name) is None

    assert wait_until(target_dropped_its_copy, timeout=30, interval=1)
    assert_left_on_source(vm, agents, fleet, migration)


@pytest.mark.faults
def test_a_stall_warning_is_withdrawn_when_bytes_move_again(own_agents, admin, migration_worker):
    """Only stalled, not stuck: the target paused until the page warns, then resumed well before the
    limit (12 s): the warning is withdrawn with a timeline event, and the migration completes."""
    _, agents = own_agents
    fleet = vsps_for(agents)
    vm = place_vm(agents, fleet, memory_mib=128, fill_percent=100)
    migration = do_request_migration(vm, fleet["hostb"], admin, policy={"no_progress_s": 12})

    def in_copy_with(percent: int = 0, warned: bool = False) -> bool:
        migration.refresh_from_db()
        shown = migration.warning.startswith("No progress")
        return migration.state == "copy" and migration.copy_percent >= percent and shown == warned

    assert wait_until(lambda: in_copy_with(percent=50), timeout=60), (migration.state, migration.copy_percent)
    with paused(agents["hostb"]):
        assert wait_until(lambda: in_copy_with(warned=True), timeout=40), (migration.state, migration.alert)
    assert wait_until(lambda: in_copy_with(warned=False), timeout=10), (migration.state, migration.alert)

    wait_for_state(wait_until, migration, "completed", "aborted", "cancelled", timeout=120)
    assert migration.state == "completed", migration.alert
    messages = list(migration.events.filter(to_state="copy").values_list("message", flat=True))
    assert any(text.startswith("No progress in the Copy phase") for text in messages), messages
    assert any(text.startswith("Progress again after") for text in messages), messages
    assert runs_on(agents["hostb"], vm.name)


# --- 18.3: a roll forward that cannot reach the source ---------------------------------------------


@pytest.mark.faults
def test_a_source_lost_in_committing_completes_with_its_release_pending_until_it_answers(
    own_agents, admin, client
):
    """The issue's reproduction: the source agent killed once the migration reached Committing. The roll
    forward (recovery's here: its worker is gone too) runs the guest on the target, then says at once that
    the source's release is pending, naming the host, marks it unreachable, and completes; the page shows
    that truth, not "Switching over". Once the agent is back, the next recovery pass finishes the release."""
    factory, agents = own_agents
    fleet = vsps_for(agents)
    migration, vm = committed_then_worker_gone(agents, fleet, admin)
    agents["hosta"].kill()

    assert recover_migrations(stale_after_s=5) == [migration.pk]

    migration.refresh_from_db()
    assert (migration.state, migration.release_pending) == ("completed", True)
    assert runs_on(agents["hostb"], vm.name)
    assert vm.current_vsp == fleet["hostb"]
    assert migration.alert.startswith(
        f"the source host hosta did not answer after the commit: {vm.name} runs on hostb, but the release "
        "of its old copy on hosta is pending"
    ), migration.alert
    assert not VSP.objects.get(pk=fleet["hosta"].pk).agent_reachable
    client.force_login(admin)
    page = client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()
    assert "Switching over" not in page
    assert "completed to VSP hostb" in page and "release of its old copy on hosta is pending" in page
    recover_migrations(stale_after_s=5)  # still gone: nothing changes
    assert Migration.objects.get(pk=migration.pk).release_pending

    restart_agent(factory, agents["hosta"])
    Migration.objects.filter(pk=migration.pk).update(undo_retry_at=None)  # its back-off (5 s) over
    recover_migrations(stale_after_s=5)

    migration.refresh_from_db()
    assert (migration.state, migration.release_pending, migration.alert) == ("completed", False, "")
    assert migration.events.filter(message="hosta answered again: its copy was released; nothing is pending")
    assert VSP.objects.get(pk=fleet["hosta"].pk).agent_reachable
    page = client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()
    assert "is pending" not in page and "completed to VSP hostb" in page


@pytest.mark.faults
def test_an_administrator_of_the_source_may_forget_a_release_that_never_comes(own_agents, admin, client):
    """A source that never comes back: the release stays pending (with its alert) until an administrator
    of the source's host group forgets it; an operator may not, and a second try is a 409."""
    operator = make_user(
        "oper", ("migrations_app.view_migration", "migrations_app.change_migration"), role=Role.OPERATOR
    )
    _, agents = own_agents
    fleet = vsps_for(agents)
    migration, _ = committed_then_worker_gone(agents, fleet, admin)
    agents["hosta"].kill()
    recover_migrations(stale_after_s=5)
    assert Migration.objects.get(pk=migration.pk).release_pending
    url = reverse("migration_history:forget_release", args=[migration.pk])
    report = reverse("migration_history:report", args=[migration.pk])

    client.force_login(operator)
    assert "forget-release" not in client.get(report).content.decode()
    assert client.post(url).status_code == 403
    assert Migration.objects.get(pk=migration.pk).release_pending

    boss = make_user("boss", ("migrations_app.view_migration", "migrations_app.change_migration"))
    grant_role(boss, fleet["hosta"].group, Role.ADMINISTRATOR)
    client.force_login(boss)
    assert "Forget the copy on hosta" in client.get(report).content.decode()
    assert client.post(url).status_code == 302

    migration.refresh_from_db()
    assert (migration.state, migration.release_pending, migration.alert) == ("completed", False, "")
    event = migration.events.last()
    assert (event.actor, event.message.startswith("The pending release on hosta was forgotten")) == (
        boss,
        True,
    )
    assert client.post(url).status_code == 409


@pytest.mark.faults
def test_a_target_lost_in_committing_is_named_at_once_and_decided_when_it_returns(own_agents, admin, client):
    """The target killed after the commit, before its resume: the migration stays Committing (nothing is
    released) with a warning naming the host and the pending resume, the host marked unreachable; once
    it answers again (restarted empty: a simulated host's guests die with its agent), the source, never
    released, runs the guest on and the migration is kept there."""
    factory, agents = own_agents
    fleet = vsps_for(agents)
    migration, vm = committed_then_worker_gone(agents, fleet, admin)
    agents["hostb"].kill()

    recover_migrations(stale_after_s=5)

    migration.refresh_from_db()
    assert migration.state == "committing"
    assert migration.warning.startswith(
        f"the target host hostb does not answer after the commit: {vm.name} is committed to hostb and its "
        "resume there is pending"
    ), migration.warning
    assert migration.events.filter(message=migration.warning).count() == 1
    assert not VSP.objects.get(pk=fleet["hostb"].pk).agent_reachable
    client.force_login(admin)
    page = client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()
    assert 'data-field="live_warning"' in page and "resume there is pending" in page

    restart_agent(factory, agents["hostb"])
    Migration.objects.filter(pk=migration.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=1))
    recover_migrations(stale_after_s=5)

    migration.refresh_from_db()
    assert (migration.state, migration.failed_phase, migration.warning) == ("aborted", "committing", "")
    assert runs_on(agents["hosta"], vm.name)
    assert vm.current_vsp == fleet["hosta"]
    assert VSP.objects.get(pk=fleet["hostb"].pk).agent_reachable


# --- 18.11: an answer marks a host reachable at once -----------------------------------------------


@pytest.mark.faults
def test_a_target_that_restarted_is_taken_at_once(own_agents, admin, migration_worker):
    """The issue's reproduction: the target agent killed mid-Copy (its VSP marked unreachable by the
    abort's failed discard), started again: a request at once is not refused as unreachable (the request
    asks a host marked unreachable before refusing it), and it completes."""
    factory, agents = own_agents
    fleet = vsps_for(agents)
    vm = place_vm(agents, fleet, memory_mib=32, fill_percent=100)
    first = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_until, first, "copy")
    agents["hostb"].kill()
    wait_for_state(wait_until, first, "aborted", "cancelled", "completed")
    assert first.state == "aborted"
    # the abort's undo finds the target dead: marked unreachable at once
    assert wait_until(lambda: not VSP.objects.get(pk=fleet["hostb"].pk).agent_reachable)

    restart_agent(factory, agents["hostb"])
    again = do_request_migration(vm, VSP.objects.get(pk=fleet["hostb"].pk), admin)

    assert VSP.objects.get(pk=fleet["hostb"].pk).agent_reachable
    wait_for_state(wait_until, again, "completed", "aborted", "cancelled")
    assert again.state == "completed", again.alert
