"""Fixtures for driving real migrations: real host agents and a Celery worker of the migrations' own.

The worker consumes a private migrations queue (``MIGRATION_QUEUE``) and caps the data-plane bandwidth
(``MIGRATION_BANDWIDTH_MBPS``) so that a guest's Copy phase lasts as long as a test needs: its length is
then set per test by how much of the guest's memory is filled.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import ManagedProcess, free_port, start_process, subprocess_env, wait_until
from tests.factories import make_user, make_vsp

MIGRATOR = ("migrations_app.add_migration", "migrations_app.change_migration", "vms.view_virtualmachine")
BANDWIDTH_MBPS = 40  # 5 MB/s: 1 MiB of filled guest memory is ~0.2 s of Copy


@dataclass
class AgentHost:
    name: str
    url: str
    secret: str
    process: ManagedProcess

    def client(self):
        from vms.agent_client import AgentClient

        return AgentClient(self.url, self.secret)


def start_agent(name: str, tmp_dir) -> AgentHost:
    port = free_port()
    secret = secrets.token_urlsafe(24)
    secret_file = tmp_dir / f"{name}.secret"
    secret_file.write_text(secret)
    process = start_process(
        f"agent-{name}",
        [
            sys.executable,
            "-m",
            "hostagent",
            "--name",
            name,
            "--listen",
            f"127.0.0.1:{port}",
            "--secret-file",
            str(secret_file),
            "--driver",
            "simulated",
        ],
        subprocess_env(),
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            headers = {"Authorization": f"Bearer {secret}"}
            return httpx.get(f"{url}/v1/health", headers=headers, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_until(answers, timeout=30):
        process.stop()
        raise RuntimeError(f"host agent {name} did not start:\n{process.log_tail()}")
    return AgentHost(name, url, secret, process)


@pytest.fixture(scope="module")
def host_agents(tmp_path_factory) -> Iterator[dict[str, AgentHost]]:
    """Three real host agents (simulated driver) on loopback, shared by a module's tests."""
    tmp_dir = tmp_path_factory.mktemp("agents")
    agents = {name: start_agent(name, tmp_dir) for name in ("hosta", "hostb", "hostc")}
    yield agents
    for agent in agents.values():
        agent.process.stop()


def start_migration_worker(queue: str, name: str, **env: str) -> ManagedProcess:
    worker = start_process(
        f"celery-{name}",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "matrixoe",
            "worker",
            "--queues",
            queue,
            "--pool",
            "threads",
            "--concurrency",
            "4",
            "--hostname",
            f"{name}-{time.monotonic_ns()}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        subprocess_env(MIGRATION_QUEUE=queue, MIGRATION_BANDWIDTH_MBPS=str(BANDWIDTH_MBPS), **env),
    )
    if not wait_until(lambda: b"ready." in worker.log_path.read_bytes(), timeout=60):
        worker.stop()
        raise RuntimeError(f"migration worker did not start:\n{worker.log_tail()}")
    return worker


@pytest.fixture(scope="session")
def _session_migration_worker(django_db_setup, redis_url) -> Iterator[tuple[str, ManagedProcess]]:
    from django.conf import settings

    queue = f"{settings.CELERY_TASK_DEFAULT_QUEUE}-migrations"
    worker = start_migration_worker(queue, "migrations")
    yield queue, worker
    worker.stop()


@pytest.fixture
def migration_worker(_session_migration_worker, settings) -> ManagedProcess:
    """A real Celery worker that runs this test's migrations (requests are routed to its queue)."""
    queue, worker = _session_migration_worker
    settings.MIGRATION_QUEUE = queue
    return worker


@pytest.fixture
def killable_migration_worker(django_db_setup, redis_url, settings) -> Iterator[ManagedProcess]:
    """A worker of its own on a queue of its own, for a test that kills it mid-migration."""
    queue = f"{settings.CELERY_TASK_DEFAULT_QUEUE}-doomed-{time.monotonic_ns()}"
    worker = start_migration_worker(queue, "doomed")
    settings.MIGRATION_QUEUE = queue
    yield worker
    worker.stop()


@pytest.fixture
def wait_for() -> Callable[..., bool]:
    return wait_until


@pytest.fixture
def fleet(host_agents):
    return {
        name: make_vsp(name, agent_url=agent.url, agent_secret=agent.secret, memory_mib=4096)
        for name, agent in host_agents.items()
    }


@pytest.fixture
def admin():
    return make_user("alice", permissions=MIGRATOR)
