"""Issue 18.10: alerts name the real cause wherever the console can know it.

QA: a target agent that crashed mid-Copy was reported as "the network failed (ConnectionError)"; an
untrusted agent certificate read "stopped answering" / "agent unreachable" in the dialog, the API and
the CLI (only Refresh Data named the certificate). Each cause here is produced for real: agents killed
(SIGKILL) or restarted empty, the data plane cut by the soak's TCP proxy while both agents run, agents
whose certificate comes from another deployment's CA or does not match the registered pin, and plain
sockets that refuse, stay silent or hang up. Real worker, Redis and host agents (simulated driver); the
CLI as a subprocess against a live console.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator

import pytest
from django.test import Client
from django.urls import reverse

from api.tokens import do_create_token
from devtools.tcp_proxy import CONTROL_ENV, DataPlaneProxy
from migrations_app.actions import do_request_migration
from migrations_app.tasks import recover_migrations
from tests.api.conftest import WRITER, ApiClient, live_console  # noqa: F401  (fixture)
from tests.cli.test_matrixoe_command import matrixoe
from tests.factories import make_user, make_vsp
from tests.hostagent.conftest import AgentFactory
from tests.migrations_app.conftest import route_migrations_to, vsps_for, worker_on_own_queue
from tests.migrations_app.guests import place_vm, runs_on, wait_for_state
from tests.migrations_app.test_soak_findings import Agents
from vms.agent_client import (
    AgentClient,
    AgentNotRunning,
    AgentTimedOut,
    AgentUnreachable,
    AgentUntrusted,
)
from vms.models import VSP

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.faults]

# 64 MiB, all written, at the worker's 5 MB/s: Copy lasts long enough to break it mid-way.
LONG_COPY = {"fill_percent": 100, "memory_mib": 64, "dirty_pages_per_s": 500}
DIALOG_USER = ("migrations_app.add_migration", "vms.view_virtualmachine", "vms.view_vsp")
RESTARTED = re.compile(
    r"^Copy phase failed: the target host hostb's agent (restarted and no longer knows the migration "
    r"\(a crash or a restart\)|stopped \(connection refused\) and has restarted since: it crashed or was "
    r"restarted) "
)
NETWORK_WORDS = re.compile(r"the network failed|ConnectionError|\[Errno")


@pytest.fixture
def fresh_agents(tmp_path) -> Iterator[Agents]:
    """This test's own hosta and hostb (a test kills or restarts them)."""
    factory = AgentFactory(tmp_path)
    yield Agents(factory)
    factory.stop_all()


@pytest.fixture
def fresh_vsps(fresh_agents):
    return vsps_for(fresh_agents)


def migrate_until_copy(fresh_agents, fresh_vsps, admin, wait_for):
    vm = place_vm(fresh_agents, fresh_vsps, **LONG_COPY)
    migration = do_request_migration(vm, fresh_vsps["hostb"], admin)
    assert wait_for(lambda: type(migration).objects.get(pk=migration.pk).bytes_sent > 1 << 20, timeout=60)
    return vm, migration


def test_a_target_agent_killed_mid_copy_is_named_not_the_network(
    fresh_agents,
    fresh_vsps,
    admin,
    migration_worker,
    wait_for,  # noqa: F811
):
    vm, migration = migrate_until_copy(fresh_agents, fresh_vsps, admin, wait_for)
    fresh_agents["hostb"].kill()

    wait_for_state(wait_for, migration, "aborted", "cancelled", "completed")
    assert (migration.state, migration.failed_phase) == ("aborted", "copy")
    assert migration.alert.startswith(
        "Copy phase failed: the target host hostb's agent is not running (connection refused) "
        "(the source host hosta lost the data-plane connection to the target: "
    ), migration.alert
    assert migration.alert.endswith("The VM keeps running on hosta.")
    assert not NETWORK_WORDS.search(migration.alert)
    hostb = VSP.objects.get(name="hostb")
    assert (hostb.agent_reachable, hostb.agent_problem) == (False, "agent not running (connection refused)")
    assert wait_for(lambda: runs_on(fresh_agents["hosta"], vm.name), timeout=30)

    # started again later: once it answers the discard, the alert says it had stopped and restarted
    fresh_agents.restart_empty("hostb")

    def restated() -> bool:
        recover_migrations()
        migration.refresh_from_db()
        return bool(RESTARTED.search(migration.alert))

    assert wait_for(restated, timeout=90), migration.alert
    assert "stopped (connection refused) and has restarted since" in migration.alert
    assert migration.events.filter(message="hostb answered again: its agent had stopped and restarted.")


def test_a_target_agent_restarted_mid_copy_is_named_as_restarted(
    fresh_agents, fresh_vsps, admin, migration_worker, wait_for
):
    """Killed and started again at once, as a service manager does: if it is back when the source reports
    the broken data plane, the abort says it restarted; if not yet, the abort says it is not running and
    the alert is restated once it answers the discard (it was down and answers: it restarted)."""
    vm, migration = migrate_until_copy(fresh_agents, fresh_vsps, admin, wait_for)
    fresh_agents.restart_empty("hostb")

    wait_for_state(wait_for, migration, "aborted", "cancelled", "completed")
    assert migration.alert.startswith("Copy phase failed: the target host hostb's agent "), migration.alert

    def restarted() -> bool:
        recover_migrations()  # recovery's pass retries the target's discard (the worker's tries came early)
        migration.refresh_from_db()
        return bool(RESTARTED.search(migration.alert))

    assert wait_for(restarted, timeout=90), migration.alert
    assert "(the source host hosta lost the data-plane connection to the target: " in migration.alert
    assert not NETWORK_WORDS.search(migration.alert)
    assert wait_for(lambda: runs_on(fresh_agents["hosta"], vm.name), timeout=30)


@pytest.fixture
def data_plane_proxy(monkeypatch) -> Iterator[DataPlaneProxy]:
    proxy = DataPlaneProxy()
    monkeypatch.setenv(CONTROL_ENV, f"127.0.0.1:{proxy.start()}")
    yield proxy
    proxy.stop()


def test_a_data_plane_cut_while_both_agents_run_blames_the_link(
    fresh_agents,
    fresh_vsps,
    admin,
    wait_for,
    settings,
    data_plane_proxy,  # noqa: F811
):
    """Both agents answer after the cut: the alert says the link failed, not that an agent is down."""
    env = {"MIGRATION_DATA_ENDPOINT_HOOK": "devtools.tcp_proxy:route_via_proxy"}
    env[CONTROL_ENV] = f"127.0.0.1:{data_plane_proxy.control_port}"
    with worker_on_own_queue("causes-proxy", 2, **env) as queue_and_worker:
        route_migrations_to(queue_and_worker, settings)
        vm, migration = migrate_until_copy(fresh_agents, fresh_vsps, admin, wait_for)
        assert data_plane_proxy.cut(hold_s=30) >= 1
        wait_for_state(wait_for, migration, "aborted", "cancelled", "completed")

    assert migration.alert.startswith(
        "Copy phase failed: the data-plane link from hosta to hostb failed while both agents kept running "
        "(the source host hosta lost the data-plane connection to the target: "
    ), migration.alert
    assert not NETWORK_WORDS.search(migration.alert)
    assert VSP.objects.get(name="hostb").agent_reachable  # it answered: not marked down
    assert wait_for(lambda: runs_on(fresh_agents["hosta"], vm.name), timeout=30)


# --- certificates: named in the alert, the dialog, the API and the CLI ---------------------------------


@pytest.fixture
def strangers(tmp_path, host_agents) -> Iterator[dict]:
    """Two targets the console does not trust: one with a certificate from another deployment's CA
    (registered with ours), one whose registered pin is not its certificate's."""
    factory = AgentFactory(tmp_path)
    other_ca = factory("hostx", pki_dir=tmp_path / "other-pki")
    pinned = factory("hosty")
    trusted = host_agents["hosta"].trust
    yield {
        "hostx": (make_vsp("hostx", agent_url=other_ca.url, agent_secret=other_ca.secret,
                           agent_certificate=trusted, memory_mib=4096), other_ca.fingerprint),
        "hosty": (make_vsp("hosty", agent_url=pinned.url, agent_secret=pinned.secret,
                           agent_certificate=":".join(["AB"] * 32), memory_mib=4096), pinned.fingerprint),
    }  # fmt: skip
    factory.stop_all()


def test_an_untrusted_certificate_is_named_in_the_alert_dialog_api_and_cli(
    host_agents,
    fleet,
    admin,
    migration_worker,
    wait_for,
    strangers,
    tmp_path,
    live_console,  # noqa: F811
):
    migrations = {}
    for name, (target, _fingerprint) in strangers.items():  # both asked before any dialog probes them
        migrations[name] = do_request_migration(place_vm(host_agents, fleet), target, admin)
    page = Client()
    page.force_login(make_user("dialog", DIALOG_USER))
    api = ApiClient(do_create_token(make_user("api", WRITER), "t")[1])
    token = api.headers["Authorization"].removeprefix("Bearer ")
    assert matrixoe(tmp_path, "login", live_console, "--token", token).returncode == 0
    wide = {"COLUMNS": "400"}  # a fingerprint is 95 characters: no table wraps it

    for name, (target, fingerprint) in strangers.items():
        assert fingerprint, name
        untrusted = (
            f"presented a TLS certificate the console does not trust (SHA-256 fingerprint {fingerprint})"
        )
        migration = wait_for_state(wait_for, migrations[name], "aborted", "cancelled", "completed")
        # Init names the certificate whether its own call found it, or the pre-check it repeats found the
        # host already marked by an earlier call (under load, either may come first).
        assert migration.alert in (
            f"Init phase failed: the target host {name} {untrusted}. The VM keeps running on hosta.",
            f"Init phase failed: agent unreachable: TLS certificate not trusted (SHA-256 fingerprint "
            f"{fingerprint}). The VM keeps running on hosta.",
        ), migration.alert
        target.refresh_from_db()
        problem = f"TLS certificate not trusted (SHA-256 fingerprint {fingerprint})"
        assert (target.agent_reachable, target.agent_problem) == (False, problem)

        # the dialog probes every target as it opens, and says why this one is refused
        dialog = reverse("migrations_app:migrate", args=[place_vm(host_agents, fleet).pk])
        html = page.get(dialog).content.decode()
        row = html[html.index(f'data-vsp="{name}"') :].split("</tr>")[0]
        assert f">Agent unreachable: {problem}<" in row, row
        # the API's VSP and the VM's alert; the CLI's VSP list and the VM's General tab
        listed = {vsp["name"]: vsp for vsp in api.get("/vsps", limit=100).json()["items"]}
        assert listed[name]["agent_problem"] == problem
        assert fingerprint in api.get(f"/vms/{migration.vm.name}").json()["alert"]["alert"]
        assert problem in matrixoe(tmp_path, "vsps", env=wide).stdout
        status = matrixoe(tmp_path, "status", migration.vm.name, env=wide).stdout.replace("\n", " ")
        assert fingerprint in status and "TLS certificate" in status, status


# --- the client's errors, by cause ------------------------------------------------------------------------


@pytest.fixture
def silent_and_hanging_up() -> Iterator[tuple[int, int]]:
    """Two listeners on loopback: one accepts and never answers, one accepts and closes at once."""
    silent, hangup = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve(server: socket.socket, close: bool) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            if close:
                conn.close()
            else:
                held.append(conn)

    for server, close in ((silent, False), (hangup, True)):
        threading.Thread(target=serve, args=(server, close), daemon=True).start()
    yield silent.getsockname()[1], hangup.getsockname()[1]
    for item in (silent, hangup, *held):
        item.close()


def test_the_agent_client_says_refused_silent_and_hung_up_apart(silent_and_hanging_up):
    from migrations_app.alerts import unreachable_cause

    silent, hangup = silent_and_hanging_up
    closed = socket.create_server(("127.0.0.1", 0))
    refused = closed.getsockname()[1]
    closed.close()

    def error_of(port: int) -> AgentUnreachable:
        with AgentClient(f"http://127.0.0.1:{port}", "s3cret", timeout_s=1) as agent:
            with pytest.raises(AgentUnreachable) as raised:
                agent.health()
        return raised.value

    who = "the target host vspz"
    assert isinstance(error_of(refused), AgentNotRunning)
    assert unreachable_cause(who, error_of(refused)) == f"{who}'s agent is not running (connection refused)"
    assert isinstance(error_of(silent), AgentTimedOut)
    assert unreachable_cause(who, error_of(silent)) == f"{who} stopped answering (no answer in 1 s)"
    hung_up = error_of(hangup)
    assert type(hung_up) is AgentUnreachable and not isinstance(hung_up, AgentUntrusted)
    assert unreachable_cause(who, hung_up) == f"{who} stopped answering (the connection broke off)"
