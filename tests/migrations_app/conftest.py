"""Fixtures for driving real migrations: real host agents and a Celery worker of the migrations' own.

The worker consumes a private migrations queue (``MIGRATION_QUEUE``) and caps the data-plane bandwidth
(``MIGRATION_BANDWIDTH_MBPS``) so that a guest's Copy phase lasts as long as a test needs: its length is
then set per test by how much of the guest's memory is filled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.conftest import ManagedProcess, start_celery_worker, start_console_server, wait_until
from tests.factories import MIGRATION_ADMIN_PERMISSIONS, make_user, make_vsp
from tests.hostagent.conftest import AgentFactory, RunningAgent

MIGRATOR = ("migrations_app.add_migration", "migrations_app.change_migration", "vms.view_virtualmachine")
BANDWIDTH_MBPS = 40  # 5 MB/s: 1 MiB of filled guest memory is ~0.2 s of Copy


@pytest.fixture(scope="module")
def host_agents(tmp_path_factory) -> Iterator[dict[str, RunningAgent]]:
    """Three real host agents (simulated driver) on loopback, shared by a module's tests."""
    factory = AgentFactory(tmp_path_factory.mktemp("agents"))
    yield {name: factory(name) for name in ("hosta", "hostb", "hostc")}
    factory.stop_all()


def start_migration_worker(queue: str, name: str, concurrency: int = 4, **env: str) -> ManagedProcess:
    """A worker on ``queue``, its data plane capped at ``BANDWIDTH_MBPS`` unless ``env`` says otherwise."""
    env = {"MIGRATION_QUEUE": queue, "MIGRATION_BANDWIDTH_MBPS": str(BANDWIDTH_MBPS), **env}
    return start_celery_worker(name, concurrency, queue, **env)


@contextmanager
def worker_on_own_queue(name: str, concurrency: int = 4, **env: str) -> Iterator[tuple[str, ManagedProcess]]:
    """A migration worker on a queue of its own (``-{name}-...``); yields the queue and the worker."""
    from django.conf import settings

    queue = f"{settings.CELERY_TASK_DEFAULT_QUEUE}-{name}-{time.monotonic_ns()}"
    worker = start_migration_worker(queue, name, concurrency, **env)
    try:
        yield queue, worker
    finally:
        worker.stop()


def route_migrations_to(queue_and_worker: tuple[str, ManagedProcess], settings: Any) -> ManagedProcess:
    """Send this test's migrations to that worker's queue (``settings`` is pytest-django's fixture)."""
    queue, worker = queue_and_worker
    settings.MIGRATION_QUEUE = queue
    return worker


@pytest.fixture(scope="session")
def _session_migration_worker(django_db_setup, redis_url) -> Iterator[tuple[str, ManagedProcess]]:
    with worker_on_own_queue("migrations") as queue_and_worker:
        yield queue_and_worker


@pytest.fixture
def migration_worker(_session_migration_worker, settings) -> ManagedProcess:
    """A real Celery worker that runs this test's migrations (requests are routed to its queue)."""
    return route_migrations_to(_session_migration_worker, settings)


@pytest.fixture
def killable_migration_worker(django_db_setup, redis_url, settings) -> Iterator[ManagedProcess]:
    """A worker of its own on a queue of its own, for a test that kills it mid-migration."""
    with worker_on_own_queue("doomed") as queue_and_worker:
        yield route_migrations_to(queue_and_worker, settings)


@pytest.fixture
def migrating_console(django_db_setup, redis_url, migration_worker, settings) -> Iterator[str]:
    """The console (uvicorn), sending migrations to the bandwidth-capped worker so phases last long enough
    to watch; yields its base URL."""
    server, base_url = start_console_server(MIGRATION_QUEUE=settings.MIGRATION_QUEUE)
    yield base_url
    server.stop()


@pytest.fixture
def wait_for() -> Callable[..., bool]:
    return wait_until


def vsps_for(agents: dict[str, RunningAgent]) -> dict[str, Any]:
    """A VSP (4 GiB) registered for each running agent, by the agent's name."""
    return {
        name: make_vsp(
            name,
            agent_url=agent.url,
            agent_secret=agent.secret,
            agent_certificate=agent.trust,
            memory_mib=4096,
        )
        for name, agent in agents.items()
    }


def collected_vsps_for(agents: dict[str, RunningAgent]) -> dict[str, Any]:
    """``vsps_for(agents)``, each collected once by the inventory (its pools, networks and guests read
    from its agent, as an admin's first Refresh Data does) and read back."""
    from vms.inventory import collect_vsp

    vsps = vsps_for(agents)
    for vsp in vsps.values():
        assert collect_vsp(vsp.pk)
        vsp.refresh_from_db()
    return vsps


@pytest.fixture
def fleet(host_agents):
    return vsps_for(host_agents)


@pytest.fixture
def admin():
    return make_user("alice", permissions=MIGRATOR)


@pytest.fixture
def migration_admin_client(client):
    """A client logged in as "admin", who may view VMs and VSPs and request and cancel migrations."""
    client.force_login(make_user("admin", MIGRATION_ADMIN_PERMISSIONS))
    return client


@pytest.fixture
def viewer_client(client):
    """A client logged in as "viewer", who may only view VMs and VSPs."""
    client.force_login(make_user("viewer", ("vms.view_virtualmachine", "vms.view_vsp")))
    return client
