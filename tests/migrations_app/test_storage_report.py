"""The disks and networks a migrated guest had, and what I/O Quiesce did, in its report and the history."""

from __future__ import annotations

import pytest
from django.urls import reverse

from agentprotocol import ProgressSnapshot
from migrations_app.records import apply_snapshot
from tests.factories import GIB, give_disk, give_nic, make_pool, make_vm, make_vsp
from tests.migrations_app.test_history import admin_client, alice, finished  # noqa: F401  (fixtures)

pytestmark = pytest.mark.django_db


@pytest.fixture
def moved():
    source, target = make_vsp("vsp1"), make_vsp("vsp2")
    vm = make_vm("db01", vsp=source)
    give_disk(vm, make_pool(source, "san-a"), size=20 * GIB)
    give_nic(vm, "prod-net", mac="52:54:00:00:00:07")
    migration = finished(vm, source, target, downtime_ms=180)  # what it had when requested is kept
    vm.disks.all().delete()  # its disks changed since: the report keeps what it had then
    return migration


def test_the_report_lists_the_guests_disks_and_cards_and_the_quiesce_figures(moved, admin_client):  # noqa: F811
    snapshot = ProgressSnapshot(
        seq=9,
        migration_id="m-1",
        role="source",
        guest=str(moved.vm.guest_id),
        state="ready",
        io_outstanding=12,
        io_drain_ms=8.5,
        network_blackout_ms=412.0,
    )
    apply_snapshot(moved, snapshot)
    moved.save()

    html = admin_client.get(reverse("migration_history:report", args=[moved.pk])).content.decode()

    assert "vda: san-a/db01-vda.qcow2 (20 GiB)" in html
    assert "nic 0: prod-net (52:54:00:00:00:07)" in html
    assert "12 requests outstanding, drained in 8.5 ms" in html
    assert "412 ms" in html and "Frozen 180 ms" in html


def test_a_report_without_quiesce_figures_says_nothing_of_them(moved, admin_client):  # noqa: F811
    html = admin_client.get(reverse("migration_history:report", args=[moved.pk])).content.decode()

    assert 'data-field="io_quiesce"' not in html and 'data-field="network_blackout"' not in html


def test_the_history_row_names_the_disks_and_networks(moved, admin_client):  # noqa: F811
    html = admin_client.get(reverse("migration_history:list")).content.decode()

    assert "vda: san-a/db01-vda.qcow2 (20 GiB); nic 0: prod-net (52:54:00:00:00:07)" in html


def test_the_blackout_the_target_measured_after_the_switchover_is_kept(moved, admin_client):  # noqa: F811
    from migrations_app.endings import note_blackout

    after = ProgressSnapshot(
        seq=30,
        migration_id="m-1",
        role="target",
        guest=str(moved.vm.guest_id),
        state="completed",
        network_blackout_ms=95.5,
    )
    note_blackout(moved, after)

    html = admin_client.get(reverse("migration_history:report", args=[moved.pk])).content.decode()
    assert "96 ms" in html and "Frozen 180 ms" in html
