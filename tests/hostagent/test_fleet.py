"""A fleet: many simulated VSPs in one real agent process (``python -m hostagent.fleet``), each its own host
to the console: its own port, secret and guests; two of them migrate a guest to each other like any pair."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools import processes
from tests.conftest import log_path, subprocess_env
from tests.hostagent.conftest import (
    RunningAgent,
    define_running_guest,
    guest_id_for,
    session_pki_dir,
    unique,
)
from tests.hostagent.test_migration import commit, migrate_to_ready
from vms.agent_client import AgentClient, AgentError

FLEET_SIZE = 12


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningAgent]]:
    secret_dir = tmp_path_factory.mktemp("fleet-secrets")
    started = processes.start_fleet(
        "fleet",
        FLEET_SIZE,
        secret_dir,
        log_path=log_path("fleet"),
        pki_dir=session_pki_dir(),
        env=subprocess_env(),
    )
    trust = started[0].ca.read_text() if started[0].ca else ""
    members = [
        RunningAgent(
            member.name,
            member.url,
            member.secret,
            member.process,
            AgentClient(member.url, member.secret, trust=trust, timeout_s=30),
            trust,
            member.fingerprint,
        )
        for member in started
    ]
    yield members
    for member in members:
        member.client.close()
    started[0].process.stop()


def test_every_vsp_of_the_fleet_is_its_own_host_with_its_own_secret(fleet):
    names = [member.client.health().name for member in fleet]
    assert names == [f"fleet{index:02d}" for index in range(1, FLEET_SIZE + 1)]
    assert len({member.url for member in fleet}) == FLEET_SIZE
    assert len({member.secret for member in fleet}) == FLEET_SIZE
    first, second = fleet[0], fleet[1]
    answer = httpx.get(
        f"{second.url}/v1/guests",
        headers={"Authorization": f"Bearer {first.secret}"},
        verify=second.verify,
        timeout=10,
    )
    assert answer.status_code == 401


def test_a_guest_defined_on_one_vsp_is_not_on_another(fleet):
    name = unique("fleet-guest")
    define_running_guest(fleet[2], name)
    assert fleet[2].guest(name) is not None
    assert all(member.guest(name) is None for member in fleet if member is not fleet[2])
    with pytest.raises(AgentError):
        fleet[3].client.get_guest(guest_id_for(name))


def test_two_vsps_of_one_fleet_migrate_a_running_guest(fleet):
    source, target = fleet[4], fleet[5]
    name = unique("fleet-move")
    guest = define_running_guest(source, name, dirty_pages_per_s=500)
    migration_id = unique("m-fleet")
    migrate_to_ready(source, target, guest, migration_id)
    commit(source, target, migration_id)
    moved = target.guest(name)
    assert moved is not None and moved.hardware_status == "on"
    assert source.guest(name).hardware_status == "not_runnable"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-secret", "cannot read fleet2's secret"),
        ("short-secret", "fleet1's secret"),
        ("port-taken", "cannot listen on 127.0.0.1:"),
        ("past-65535", "are not all valid ports"),
    ],
)
def test_a_fleet_that_cannot_start_says_why_and_exits(tmp_path: Path, case: str, expected: str):
    first = processes.free_port_range(2)
    (tmp_path / "fleet1.secret").write_text("s" * (8 if case == "short-secret" else 24))
    if case != "missing-secret":
        (tmp_path / "fleet2.secret").write_text("t" * 24)
    if case == "past-65535":
        first = 65535
    args = [sys.executable, "-m", "hostagent.fleet", "--vsps", "2", "--first-port", str(first)]
    args += ["--secret-dir", str(tmp_path), "--insecure-http"]
    with processes.socket.socket() as taken:
        if case == "port-taken":
            taken.bind(("127.0.0.1", first + 1))
            taken.listen()
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert done.returncode != 0
    assert expected in done.stderr
