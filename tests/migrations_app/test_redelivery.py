"""A migration task delivered again while it runs changes nothing (issue 18 item 12).

With acks-late, a task's message stays unacknowledged in Redis while the task runs; kombu's Redis
transport hands it out again once the broker's visibility timeout has passed (celery #5935). Here the
timeout is 2 s and the migration lasts several: the second delivery must stand down. Real processes: a
redis-server of the test's own (a worker with a 2 s timeout would hand out the unacknowledged tasks of
every other test run sharing the usual Redis), a Celery worker, two host agents (simulated driver).
"""

from __future__ import annotations

import pytest
from django.conf import settings
from django.db.models import F

from matrixoe.celery import app
from migrations_app.models import Migration
from migrations_app.scheduling import RUN_MIGRATION_TASK
from tests.migrations_app.conftest import worker_on_own_queue
from tests.migrations_app.guests import place_vm, runs_on, wait_for_state
from tests.private_redis import PrivateRedis
from vms.models import Registration

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.faults]

VISIBILITY_TIMEOUT_S = 2
REDELIVERED = b"its task was delivered again"


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def test_it_stands_down_when_the_broker_delivers_a_running_migration_again(
    host_agents, fleet, admin, private_redis, wait_for
):
    broker = {"REDIS_URL": private_redis.url, "CELERY_BROKER_URL": private_redis.url}
    with worker_on_own_queue(
        "redelivery", BROKER_VISIBILITY_TIMEOUT_S=str(VISIBILITY_TIMEOUT_S), **broker
    ) as (queue, worker):
        # 64 MiB written full at 5 MB/s: a Copy of about 13 s, several visibility timeouts long.
        vm = place_vm(host_agents, fleet, memory_mib=64, fill_percent=100)
        migration = Migration.objects.create(
            vm=vm, source=fleet["hosta"], target=fleet["hostb"], requested_by=admin
        )
        with app.connection_for_write(private_redis.url) as connection:
            app.send_task(RUN_MIGRATION_TASK, args=(migration.pk,), queue=queue, connection=connection)

        wait_for_state(wait_for, migration, "copy")
        assert wait_for(lambda: REDELIVERED in worker.log_path.read_bytes(), timeout=30), worker.log_tail()
        migration.refresh_from_db()
        assert migration.state == "copy", "the migration ended before its task was delivered again"
        wait_for_state(wait_for, migration, "completed", "aborted", "cancelled", timeout=90)

    assert migration.state == "completed", migration.alert
    changes = list(migration.events.exclude(from_state=F("to_state")).values_list("from_state", "to_state"))
    assert changes == [
        ("queued", "init"),
        ("init", "copy"),
        ("copy", "io_quiesce"),
        ("io_quiesce", "frozen"),
        ("frozen", "committing"),
        ("committing", "completed"),
    ]
    assert not [note for note in migration.events.values_list("message", flat=True) if "stood down" in note]
    runnable = Registration.objects.filter(vm=vm).exclude(hardware_status="not_runnable")
    assert [copy.vsp.name for copy in runnable.select_related("vsp")] == ["hostb"]
    assert runs_on(host_agents["hostb"], vm.name)
    assert not runs_on(host_agents["hosta"], vm.name)
    assert migration.source_digest and migration.source_digest == migration.target_digest
    assert settings.BROKER_VISIBILITY_TIMEOUT_S > VISIBILITY_TIMEOUT_S  # this process keeps the default
