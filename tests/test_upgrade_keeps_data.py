"""An upgrade keeps a deployed console's data: a database made by the schema of ``main`` before this
change (evacuations still models of ``migrations_app``, no outcome events, no outcome tallies) is migrated
forward and every row is found where the new code looks for it, and counted where /metrics counts.

The database is really taken back to that schema (Django's own migration executor: the moved models'
tables are never touched, only Django's state and the content types move), rows are written with the
historical models of that time, then the migrations of today run.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from django.utils import timezone

from evacuations.models import Evacuation, EvacuationStep
from migrations_app.models import Migration, MigrationOutcome
from migrations_app.outcomes import deliver_pending
from migrations_app.transitions import transition

# The latest migrations of main when evacuations were still in migrations_app (and no evacuations app).
MAIN = [
    ("vms", "0016_vsp_agent_driver"),
    ("migrations_app", "0010_migration_throttle_pct"),
    ("evacuations", None),
]


def old_models():
    """Migrate the database back to main's schema; its historical models by name."""
    executor = MigrationExecutor(connection)
    executor.migrate(MAIN)
    apps = executor.loader.project_state([node for node in MAIN if node[1]]).apps
    ContentType.objects.clear_cache()
    return {
        name: apps.get_model(label, name)
        for label, name in [
            ("vms", "VSP"),
            ("vms", "VirtualMachine"),
            ("migrations_app", "Migration"),
            ("migrations_app", "Evacuation"),
            ("migrations_app", "EvacuationStep"),
        ]
    }


def scrape() -> str:
    return Client(REMOTE_ADDR="127.0.0.1").get("/metrics").content.decode()


def upgrade():
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    ContentType.objects.clear_cache()


@pytest.mark.django_db(transaction=True)
def test_an_upgrade_keeps_every_evacuation_and_gives_each_ended_migration_its_outcome_event(
    latest_schema, settings
):
    old = old_models()
    assert "migrations_app_evacuation" in connection.introspection.table_names()
    hosta, hostb = (
        old["VSP"].objects.create(
            name=name,
            agent_url="http://127.0.0.1:7101",
            agent_secret="s",  # noqa: S106 - no agent is contacted
            memory_mib=4096,
            cpus=2,
        )
        for name in ("hosta", "hostb")
    )
    ended_at = timezone.now() - timedelta(days=3)
    migrations = {}
    for name, state in (("done01", "completed"), ("failed01", "aborted"), ("moving01", "copy")):
        vm = old["VirtualMachine"].objects.create(name=name, memory_mib=512, vcpus=1)
        migrations[name] = old["Migration"].objects.create(
            vm=vm, vm_name=name, source=hosta, target=hostb, state=state, state_changed_at=ended_at
        )
    admin = User.objects.create_user("ops")
    old_finished = old["Evacuation"].objects.create(
        vsp=hosta,
        requested_by_id=admin.pk,
        requested_by_name="ops",
        state="finished",
        ended_at=ended_at,
        staying=[{"vm": "db01", "reason": "vPars do not migrate"}],
    )
    running = old["Evacuation"].objects.create(vsp=hostb, requested_by_name="ops")
    for position, (evacuation, name) in enumerate(
        [(old_finished, "done01"), (old_finished, "failed01"), (running, "moving01")], start=1
    ):
        old["EvacuationStep"].objects.create(
            evacuation=evacuation,
            position=position,
            vm=migrations[name].vm,
            vm_name=name,
            target=hostb,
            predicted_s=12.5,
            migration=migrations[name],
        )
    view_evacuation = ContentType.objects.get(app_label="migrations_app", model="evacuation")
    admin.user_permissions.add(view_evacuation.permission_set.get(codename="view_evacuation"))

    upgrade()

    finished = Evacuation.objects.get(pk=old_finished.pk)
    assert (finished.vsp.name, finished.state, finished.requested_by, finished.ended_at) == (
        "hosta",
        "finished",
        admin,
        ended_at,
    )
    assert finished.staying == [{"vm": "db01", "reason": "vPars do not migrate"}]
    assert [
        (step.position, step.vm_name, step.migration.state, step.predicted_s) for step in finished.steps.all()
    ] == [
        (1, "done01", "completed", 12.5),
        (2, "failed01", "aborted", 12.5),
    ]
    assert EvacuationStep.objects.count() == 3
    assert Migration.objects.get(vm_name="moving01").evacuation_step.evacuation_id == running.pk
    assert list(finished.vsp.evacuations.values_list("pk", flat=True)) == [old_finished.pk]
    # One outcome event per migration that had ended, already followed by the console of that time.
    assert sorted(
        MigrationOutcome.objects.values_list("migration__vm_name", "outcome", "at", "delivered_at")
    ) == [
        ("done01", "completed", ended_at, ended_at),
        ("failed01", "aborted", ended_at, ended_at),
    ]
    # A permission granted on the old model is still granted.
    assert User.objects.get(pk=admin.pk).has_perm("evacuations.view_evacuation")
    # /metrics counts the migrations that had ended (their outcomes tallied by the upgrade).
    settings.METRICS_ALLOWED_IPS = ["127.0.0.1"]
    completed = 'matrixoe_migrations_total{failed_phase="",outcome="completed"}'
    text = scrape()
    assert f"{completed} 1.0" in text
    assert 'matrixoe_migrations_total{failed_phase="",outcome="aborted"} 1.0' in text

    # The evacuation that was running follows its last migration's outcome like any other.
    Migration.objects.filter(vm_name="moving01").update(state="committing")
    transition(migrations["moving01"].pk, "committing", "completed", message="Completed")
    deliver_pending(timezone.now() + timedelta(minutes=10))
    assert Evacuation.objects.get(pk=running.pk).state == Evacuation.State.FINISHED
    assert f"{completed} 2.0" in scrape()  # counted from the history on, each outcome once
