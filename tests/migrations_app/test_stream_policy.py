"""The data plane's stream policy per VSP pair: how many parallel connections a migration between them uses.

Real agents, a real Celery worker, real Redis.
"""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse

from migrations_app.actions import do_request_migration
from migrations_app.agents import agent_migration_id
from tests.factories import make_admin
from tests.migrations_app.guests import place_vm, runs_on, wait_for_state
from vms.models import PairEncryption

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_engine_migrates_over_the_pairs_stream_count(
    host_agents, fleet, admin, migration_worker, wait_for
):
    PairEncryption.objects.create(vsp_a=fleet["hostc"], vsp_b=fleet["hosta"], streams=3)
    assert PairEncryption.streams_between(fleet["hosta"], fleet["hostc"]) == 3
    vm = place_vm(host_agents, fleet, memory_mib=32, fill_percent=50)
    migration = do_request_migration(vm, fleet["hostc"], admin)
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled")
    assert migration.state == "completed", migration.alert
    assert runs_on(host_agents["hostc"], vm.name)
    assert host_agents["hostc"].client.snapshot(agent_migration_id(migration)).streams == 3


def test_the_migrate_dialog_shows_each_targets_stream_policy_beside_its_encryption(host_agents, fleet):
    PairEncryption.objects.create(vsp_a=fleet["hosta"], vsp_b=fleet["hostb"], streams=4)
    vm = place_vm(host_agents, fleet)
    client = Client()
    client.force_login(make_admin("root"))
    html = client.get(reverse("migrations_app:migrate", args=[vm.pk])).content.decode()

    def encryption_cell(name: str) -> str:
        row = html[html.index(f'data-vsp="{name}"') :]
        cell = row[row.index('data-field="encryption"') :]
        return cell[: cell.index("</td>")]

    assert "4 streams" in encryption_cell("hostb") and "Encrypted (mutual TLS)" in encryption_cell("hostb")
    assert "streams: automatic" in encryption_cell("hostc")


@pytest.mark.parametrize("streams", [0, 17])
def test_an_absurd_stream_count_is_refused_in_the_admin_and_nothing_is_saved(fleet, streams):
    client = Client()
    client.force_login(make_admin("root"))
    add = reverse("admin:vms_pairencryption_add")
    pair = {"vsp_a": fleet["hosta"].pk, "vsp_b": fleet["hostb"].pk}
    form = {**pair, "encryption": "required", "streams": streams}
    page = client.post(add, form).content.decode()
    assert "Ensure this value is" in page
    assert not PairEncryption.objects.exists()
    with pytest.raises(ValidationError):
        PairEncryption(vsp_a=fleet["hosta"], vsp_b=fleet["hostb"], streams=streams).full_clean()
