"""/metrics counts migrations ended by a real worker (real Redis, real host agents): the worker delivers each
outcome event to its followers, among them the metrics' tallies (``api.tallies``), and each end counts
once, however often its outcome is offered.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from migrations_app.actions import do_request_migration
from migrations_app.models import MigrationOutcome
from migrations_app.outcomes import deliver_pending
from tests.migrations_app.guests import place_vm, wait_for_state

pytestmark = pytest.mark.django_db(transaction=True)

COMPLETED = 'matrixoe_migrations_total{failed_phase="",outcome="completed"}'
ABORTED_IN_COPY = 'matrixoe_migrations_total{failed_phase="copy",outcome="aborted"}'


def scrape() -> str:
    return Client(REMOTE_ADDR="127.0.0.1").get("/metrics").content.decode()


def test_migrations_ended_by_a_worker_count_once_each_in_metrics(
    host_agents, fleet, admin, migration_worker, wait_for, settings
):
    settings.METRICS_ALLOWED_IPS = ["127.0.0.1"]
    moving = place_vm(host_agents, fleet, dirty_pages_per_s=200)
    too_slow = place_vm(
        host_agents, fleet, on="hostc", vm_fields={"copy_limit_s": 1}, memory_mib=64, fill_percent=100
    )

    done = do_request_migration(moving, fleet["hostb"], admin)
    failed = do_request_migration(too_slow, fleet["hostb"], admin)
    wait_for_state(wait_for, done, "completed", "aborted", "cancelled")
    wait_for_state(wait_for, failed, "aborted", "completed", "cancelled")
    # The completion's outcome goes out on commit; the abort's once its undo on the agents was tried.
    assert wait_for(lambda: not MigrationOutcome.objects.filter(delivered_at=None).exists(), timeout=20)

    text = scrape()
    assert (done.state, failed.state, failed.failed_phase) == ("completed", "aborted", "copy"), failed.alert
    assert f"{COMPLETED} 1.0" in text
    assert f"{ABORTED_IN_COPY} 1.0" in text
    assert "matrixoe_migration_downtime_seconds_count 1.0" in text
    assert 'matrixoe_migration_phase_duration_seconds_count{phase="frozen"} 1.0' in text
    assert 'matrixoe_migration_phase_duration_seconds_count{phase="copy"} 2.0' in text

    # Offered again (as after a follower's failure, or by a second deliverer): counted no more.
    MigrationOutcome.objects.update(delivered_at=None, attempts=0, retry_at=None)
    assert sorted(deliver_pending(timezone.now() + timedelta(minutes=10))) == sorted([done.pk, failed.pk])

    again = scrape()
    assert f"{COMPLETED} 1.0" in again
    assert f"{ABORTED_IN_COPY} 1.0" in again
    assert 'matrixoe_migration_phase_duration_seconds_count{phase="copy"} 2.0' in again
