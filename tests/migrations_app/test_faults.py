"""Faults: a worker killed mid-copy and recovered, a worker gone after the commit, agents that misbehave.

Agents that misbehave are fakes (``FakeAgent`` and its subclasses): a real agent cannot be made to send
nonsense, to stay in Init for ever, or to hang on exactly one cancel. Each fake says what it plays.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from django.db import transaction
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from agentprotocol import GuestSpec, IncomingRequest, MigrationParams, OutgoingRequest
from migrations_app.actions import do_cancel_migration, do_request_migration
from migrations_app.agents import agent_migration_id
from migrations_app.models import Migration
from migrations_app.outcomes import deliver_pending
from migrations_app.records import flip_registrations
from migrations_app.tasks import recover_migrations
from tests.conftest import wait_until
from tests.factories import make_vm, make_vsp
from tests.hostagent.conftest import AgentFactory
from tests.migrations_app.guests import assert_left_on_source, guest_on, place_vm, runs_on, wait_for_state
from vms.models import VSP

pytestmark = pytest.mark.django_db(transaction=True)


def heartbeat_older_than(migration: Migration, seconds: float) -> bool:
    migration.refresh_from_db()
    return migration.heartbeat_at is not None and migration.heartbeat_at < timezone.now() - timedelta(
        seconds=seconds
    )


@pytest.mark.faults
def test_it_recovers_a_migration_whose_worker_was_killed_mid_copy(
    host_agents, fleet, admin, killable_migration_worker, wait_for
):
    vm = place_vm(host_agents, fleet, memory_mib=64, fill_percent=100)
    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_for, migration, "copy")

    killable_migration_worker.kill()
    assert wait_for(lambda: heartbeat_older_than(migration, 1.5), timeout=15)
    assert migration.state == "copy"  # nobody decided yet: the agents keep copying on their own

    assert recover_migrations(stale_after_s=1) == [migration.pk]

    migration.refresh_from_db()
    assert migration.state == "aborted"
    assert migration.failed_phase == "copy"
    assert migration.alert == (
        "Copy phase failed: the control-plane worker driving it stopped answering. "
        "The VM keeps running on hosta."
    )
    assert_left_on_source(vm, host_agents, fleet, migration)
    assert recover_migrations(stale_after_s=1) == []  # decided once, by the database


class FakeAgent(BaseHTTPRequestHandler):
    """The HTTP plumbing of the fake agents below."""

    def send_body(self, data: bytes, content_type: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def reply(self, body: dict[str, Any]) -> None:
        self.send_body(json.dumps(body).encode())

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serving(handler: type[FakeAgent]) -> Iterator[str]:
    """Serve ``handler`` on a free loopback port; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class MalformedAgent(FakeAgent):
    """Answers every request with 200 and a body that is not JSON."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_body(b"<html>this is not an agent</html>")

    do_POST = do_GET  # noqa: N815


def test_it_aborts_cleanly_when_the_target_agent_answers_nonsense(
    host_agents, fleet, admin, migration_worker, wait_for
):
    vm = place_vm(host_agents, fleet)
    with serving(MalformedAgent) as url:
        nonsense = make_vsp("nonsense", agent_url=url, agent_secret="s" * 8, memory_mib=4096)
        migration = do_request_migration(vm, nonsense, admin)
        wait_for_state(wait_for, migration, "aborted", "cancelled", "completed")

    assert migration.state == "aborted"
    assert migration.failed_phase == "init"
    assert migration.failure_kind == "internal"
    assert migration.alert == (
        "Init phase failed: the target host nonsense sent a reply that makes no sense. "
        "The VM keeps running on hosta."
    )
    assert vm.current_vsp == fleet["hosta"]
    assert runs_on(host_agents["hosta"], vm.name)


def bring_agents_to_ready(host_agents, vm, migration_id: str) -> None:
    """Play the part of a worker up to the commit point, then vanish: both agents wait in "ready"."""
    source, target = host_agents["hosta"].client, host_agents["hostb"].client
    guest = GuestSpec(guest_id=str(vm.guest_id), name=vm.name, memory_mib=vm.memory_mib, vcpus=1)
    endpoint = target.prepare_incoming(IncomingRequest(migration_id=migration_id, guest=guest)).endpoint()
    params = MigrationParams(downtime_ms=300)
    source.start_outgoing(
        OutgoingRequest(migration_id=migration_id, guest=guest.guest_id, target=endpoint, params=params)
    )
    for snapshot in source.iter_progress(migration_id):
        if snapshot.converged:
            break
    source.quiesce(migration_id)
    assert source.freeze(migration_id).state == "ready"


def committed_then_worker_gone(agents, fleet, admin) -> tuple[Migration, object]:
    """Both agents wait in "ready" and the commit's flip is recorded, its worker gone (silent a minute)."""
    vm = place_vm(agents, fleet)
    a_minute_ago = timezone.now() - timedelta(minutes=1)
    migration = Migration.objects.create(
        vm=vm,
        source=fleet["hosta"],
        target=fleet["hostb"],
        requested_by=admin,
        state=Migration.State.COMMITTING,
        heartbeat_at=a_minute_ago,
        state_changed_at=a_minute_ago,
    )
    bring_agents_to_ready(agents, vm, agent_migration_id(migration))
    with transaction.atomic():
        flip_registrations(migration)
    return migration, vm


@pytest.mark.faults
def test_it_rolls_forward_a_migration_whose_worker_died_after_the_commit(host_agents, fleet, admin, settings):
    migration, vm = committed_then_worker_gone(host_agents, fleet, admin)

    assert recover_migrations(stale_after_s=5) == [migration.pk]

    migration.refresh_from_db()
    assert migration.state == "completed"
    assert vm.current_vsp == fleet["hostb"]
    assert runs_on(host_agents["hostb"], vm.name)
    assert not runs_on(host_agents["hosta"], vm.name)
    # Finished by recovery, counted once in /metrics (its outcome followed), even by a later pass.
    settings.METRICS_ALLOWED_IPS = ["127.0.0.1"]
    completed = 'matrixoe_migrations_total{failed_phase="",outcome="completed"} 1.0'
    assert completed in Client(REMOTE_ADDR="127.0.0.1").get("/metrics").content.decode()
    assert recover_migrations(stale_after_s=5) == []
    assert deliver_pending(timezone.now() + timedelta(minutes=10)) == []
    assert completed in Client(REMOTE_ADDR="127.0.0.1").get("/metrics").content.decode()


class StallingSourceAgent(FakeAgent):
    """A source agent whose migrations never leave Init, yet that keeps reporting and obeys cancel.

    The worker's own time-limit backstop and a cancel during Init are tested against it (the target is
    a real agent).
    """

    migrations: ClassVar[dict[str, dict[str, Any]]] = {}

    def do_GET(self) -> None:  # noqa: N802
        if self.path.endswith("/progress"):
            self.stream(self.path.split("/")[3])
        elif self.path.startswith("/v1/guests/"):  # asked by the alert: the guest runs here
            guest_id = self.path.split("/")[3]
            self.reply(
                {
                    "guest_id": guest_id,
                    "name": "stalled",
                    "os_type": "linux",
                    "os_status": "up",
                    "hardware_status": "on",
                    "memory_mib": 16,
                    "vcpus": 1,
                }
            )
        else:
            self.reply({"guests": []})

    def do_POST(self) -> None:  # noqa: N802
        parts = self.path.split("/")
        if self.path == "/v1/migrations/outgoing":
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.migrations[body["migration_id"]] = {"guest": body["guest"], "state": "init", "seq": 1}
            self.reply(self.snapshot(body["migration_id"]))
        else:
            migration = self.migrations[parts[3]]
            migration.update(state="cancelled", seq=migration["seq"] + 1)
            self.reply(self.snapshot(parts[3]))

    def snapshot(self, migration_id: str) -> dict[str, Any]:
        migration = self.migrations[migration_id]
        return {
            "migration_id": migration_id,
            "role": "source",
            "guest": migration["guest"],
            "state": migration["state"],
            "phase": "init",
            "percent": {"init": 10, "copy": 0, "quiesce": 0, "frozen": 0},
            "bytes_sent": 0,
            "bytes_remaining": 0,
            "round": 0,
            "converged": False,
            "seq": migration["seq"],
        }

    repeat_unchanged = True  # False: a silent stream, a snapshot only when something changed

    def stream(self, migration_id: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        sent = None
        while True:
            snapshot = self.snapshot(migration_id)
            if self.repeat_unchanged or snapshot["seq"] != sent:
                self.wfile.write(json.dumps(snapshot).encode() + b"\n")
                self.wfile.flush()
                sent = snapshot["seq"]
            if snapshot["state"] != "init":
                return
            time.sleep(0.2 if self.repeat_unchanged else 0.05)


class SlowToCancelSource(StallingSourceAgent):
    """A source whose first cancel hangs (a busy host) and whose progress stream is silent until it ends."""

    migrations: ClassVar[dict[str, dict[str, Any]]] = {}
    repeat_unchanged = False
    events: ClassVar[list[str]] = []  # what happened, in order: "cancel", "cancelled", "first returned"

    def do_POST(self) -> None:  # noqa: N802
        if self.path.endswith("/cancel"):
            self.events.append("cancel")
            if self.events.count("cancel") == 1:
                time.sleep(8)  # the first attempt never answers in time (and is not applied)
                self.events.append("first returned")
                return
            if "cancelled" not in self.events:
                self.events.append("cancelled")
        super().do_POST()


@contextmanager
def stalling_vsp(handler: type[StallingSourceAgent], name: str) -> Iterator[Any]:
    with serving(handler) as url:
        yield make_vsp(name, agent_url=url, agent_secret="s" * 8)


def test_the_worker_ends_a_phase_the_agent_lets_run_over_its_limit(
    host_agents, fleet, admin, migration_worker, wait_for
):
    with stalling_vsp(StallingSourceAgent, "stall") as source:
        vm = make_vm("stuck", vsp=source, memory_mib=16, init_limit_s=1)
        migration = do_request_migration(vm, fleet["hostb"], admin)
        wait_for_state(wait_for, migration, "aborted", "cancelled", "completed")

    assert (migration.state, migration.failed_phase) == ("aborted", "init")
    assert migration.failure_kind == "time_limit"
    assert re.fullmatch(
        r"Init phase failed: it ran over its time limit of 1 s \(stopped after \d+\.\d s\)\. "
        r"The VM keeps running on stall\.",
        migration.alert,
    ), migration.alert
    assert vm.current_vsp == source
    assert guest_on(host_agents["hostb"], "stuck") is None  # the prepared copy was discarded


@pytest.mark.parametrize(
    ("handler", "vsp_name"),
    [
        pytest.param(StallingSourceAgent, "stall", id="source-takes-the-cancel"),
        pytest.param(SlowToCancelSource, "busy", id="first-cancel-hangs"),
    ],
)
def test_it_cancels_during_init(host_agents, fleet, admin, migration_worker, wait_for, handler, vsp_name):
    SlowToCancelSource.events.clear()
    with stalling_vsp(handler, vsp_name) as source:
        vm = make_vm("hesitant", vsp=source, memory_mib=16, init_limit_s=60)
        migration = do_request_migration(vm, fleet["hostb"], admin)
        wait_for_state(wait_for, migration, "init")

        do_cancel_migration(migration, admin)
        wait_for_state(wait_for, migration, "cancelled", "aborted", "completed", timeout=20)
        # recorded first, then the target is told to discard: wait for that
        assert wait_for(lambda: guest_on(host_agents["hostb"], "hesitant") is None, timeout=10)

    assert (migration.state, migration.failed_phase, migration.failure_kind) == (
        "cancelled",
        "init",
        "cancelled",
    )
    assert migration.cancel_requested_by == admin
    assert migration.alert == f"Cancelled by alice during the Init phase. The VM keeps running on {vsp_name}."
    assert vm.current_vsp == source
    if handler is SlowToCancelSource:
        # the hung first attempt was not waited on: a second one stopped the source before it returned
        events = SlowToCancelSource.events
        assert events[:3] == ["cancel", "cancel", "cancelled"], events


@contextmanager
def paused(agent) -> Iterator[None]:
    """The agent's process group stopped (SIGSTOP: a hung host that keeps its sockets), resumed after."""
    agent.process._signal_group(signal.SIGSTOP)
    try:
        yield
    finally:
        agent.process._signal_group(signal.SIGCONT)


@pytest.mark.faults
def test_it_keeps_the_init_limit_when_the_target_agent_freezes(
    host_agents, fleet, admin, migration_worker, wait_for
):
    """Init limited to 2 s, the target agent SIGSTOPped for 12 s (longer than the agent client's 10 s
    time-out): the abort is recorded while the target is still frozen, naming it and the real time."""
    vm = place_vm(host_agents, fleet, vm_fields={"init_limit_s": 2})
    with paused(host_agents["hostb"]):
        migration = do_request_migration(vm, fleet["hostb"], admin)
        frozen_until = time.monotonic() + 12
        wait_for_state(wait_for, migration, "aborted", "cancelled", "completed", timeout=11)
        recorded_while_frozen = time.monotonic() < frozen_until
        time.sleep(max(0.0, frozen_until - time.monotonic()))

    assert recorded_while_frozen
    assert (migration.state, migration.failed_phase, migration.failure_kind) == (
        "aborted",
        "init",
        "time_limit",
    )
    assert re.fullmatch(
        r"Init phase failed: it ran over its time limit of 2 s \(stopped after (\d+\.\d) s; "
        r"the target host hostb did not answer\)\. The VM keeps running on hosta\.",
        migration.alert,
    ), migration.alert
    assert float(re.search(r"after (\d+\.\d) s", migration.alert)[1]) >= 2  # type: ignore[index]
    # once thawed, the target is told to discard what it prepared; the guest runs on the source
    assert wait_for(lambda: guest_on(host_agents["hostb"], vm.name) is None, timeout=30)
    assert_left_on_source(vm, host_agents, fleet, migration)


@pytest.mark.faults
def test_a_dead_target_is_marked_unreachable_at_once_and_named(
    host_agents, fleet, admin, migration_worker, wait_for, tmp_path
):
    """Issue 10: after its agent stopped, a VSP stayed "reachable" until the next inventory (30 s) and
    the alert said "the target host stopped answering" without naming it."""
    factory = AgentFactory(tmp_path)
    doomed = factory("hostd")
    try:
        hostd = make_vsp(
            "hostd",
            agent_url=doomed.url,
            agent_secret=doomed.secret,
            agent_certificate=doomed.trust,
            memory_mib=4096,
        )
        doomed.kill()
        assert VSP.objects.get(pk=hostd.pk).agent_reachable  # nobody asked it since
        vm = place_vm(host_agents, fleet)

        migration = do_request_migration(vm, hostd, admin)
        wait_for_state(wait_for, migration, "aborted", "cancelled", "completed")
    finally:
        factory.stop_all()

    assert (migration.failed_phase, migration.failure_kind) == ("init", "unreachable")
    # Issue 18.10: the cause the console can know (connection refused: its agent is not running)
    assert migration.alert == (
        "Init phase failed: the target host hostd's agent is not running (connection refused). "
        "The VM keeps running on hosta."
    )
    hostd.refresh_from_db()
    # at once, not after INVENTORY_UNREACHABLE_AFTER inventory collections
    assert (hostd.agent_reachable, hostd.unreachable_since is not None) == (False, True)
    assert hostd.agent_problem == "agent not running (connection refused)"
    assert_left_on_source(vm, host_agents, fleet, migration)


def test_the_migrate_dialog_checks_reachability_when_it_opens(
    host_agents, fleet, migration_admin_client, tmp_path
):
    """A VSP whose agent died since the last inventory is shown unreachable when the dialog opens."""
    factory = AgentFactory(tmp_path)
    doomed = factory("hoste")
    hoste = make_vsp(
        "hoste",
        agent_url=doomed.url,
        agent_secret=doomed.secret,
        agent_certificate=doomed.trust,
        memory_mib=4096,
    )
    doomed.kill()
    factory.stop_all()
    VSP.objects.filter(pk=fleet["hostb"].pk).update(agent_reachable=False)  # stale: it answers
    vm = place_vm(host_agents, fleet)

    html = migration_admin_client.get(reverse("migrations_app:migrate", args=[vm.pk])).content.decode()

    rows = {name: html[html.index(f'data-vsp="{name}"') :].split("</tr>")[0] for name in ("hoste", "hostb")}
    assert ">Agent unreachable: agent not running (connection refused)<" in rows["hoste"]
    assert ">Ready<" in rows["hostb"], rows["hostb"]
    assert dict(
        VSP.objects.filter(pk__in=[hoste.pk, fleet["hostb"].pk]).values_list("name", "agent_reachable")
    ) == {
        "hoste": False,
        "hostb": True,
    }


@pytest.mark.faults
def test_recovery_undoes_what_an_abort_could_not_reach(host_agents, fleet, admin):
    """Soak finding (``SEED=5109``): the target paused during Frozen outlasted the abort's few discard
    attempts, and its prepared copy stayed "migrating" for ever. Played here: both agents wait in
    "ready" for a migration the database already says ABORTED; the next recovery pass undoes it."""
    vm = place_vm(host_agents, fleet)
    migration = Migration.objects.create(
        vm=vm,
        source=fleet["hosta"],
        target=fleet["hostb"],
        requested_by=admin,
        state=Migration.State.ABORTED,
        failed_phase=Migration.State.FROZEN,
        alert="Frozen phase failed: the target host hostb stopped answering. The VM keeps running on hosta.",
    )
    agent_id = agent_migration_id(migration)
    bring_agents_to_ready(host_agents, vm, agent_id)
    assert guest_on(host_agents["hostb"], vm.name).migrating == agent_id

    assert recover_migrations(stale_after_s=5) == []  # nothing to decide: it is ABORTED already

    assert guest_on(host_agents["hostb"], vm.name) is None
    assert runs_on(host_agents["hosta"], vm.name)
    written = guest_on(host_agents["hosta"], vm.name).workload["pages_written"]
    assert wait_until(lambda: guest_on(host_agents["hosta"], vm.name).workload["pages_written"] > written)


@pytest.mark.faults
def test_an_alert_that_said_the_source_did_not_answer_is_restated_once_it_answers(
    host_agents, fleet, admin, client
):
    """QA (QEMU, kill the source agent): the restarted agent re-adopted and resumed the guest, and the
    alert still said "if its host crashed, the VM is down there". Played here: the abort could not
    reach the source (undo pending, both agents wait in "ready"); recovery's retry reaches it."""
    vm = place_vm(host_agents, fleet)
    unanswered = "The VM stays on hosta, which did not answer: if its host crashed, the VM is down there."
    migration = Migration.objects.create(
        vm=vm,
        source=fleet["hosta"],
        target=fleet["hostb"],
        requested_by=admin,
        state=Migration.State.ABORTED,
        state_changed_at=timezone.now() - timedelta(seconds=30),
        failed_phase=Migration.State.FROZEN,
        undo_pending=True,
        alert=f"Frozen phase failed: the source host hosta stopped answering. {unanswered}",
    )
    bring_agents_to_ready(host_agents, vm, agent_migration_id(migration))

    recover_migrations(stale_after_s=5)

    migration.refresh_from_db()
    assert runs_on(host_agents["hosta"], vm.name)
    assert migration.alert == (
        "Frozen phase failed: the source host hosta stopped answering. "
        "The VM keeps running on hosta (its host agent answered again after the abort)."
    )
    assert migration.events.filter(message="hosta answered again: the VM keeps running on hosta.").exists()
    client.force_login(admin)
    page = client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()
    assert "keeps running on hosta (its host agent answered again" in page and "down there" not in page
