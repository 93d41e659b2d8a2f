"""The forecast models each source's switchover as its driver does it (``Link.pre_pause_rounds``).

Before, the console forecast every source as QEMU (no rounds before the pause), though a simulated
source sends up to ``SIMULATED_PRE_PAUSE_ROUNDS`` more rounds while the freeze would take more than
half the allowed downtime (``bench/bench_forecast.py`` already modelled that): the dialog promised a
simulated guest a longer freeze than it got. The console now learns each agent's driver from its health
answer when the migrate dialog opens and at its first inventory collection (``VSP.agent_driver``).
"""

from __future__ import annotations

import pytest
from django.utils import timezone

from migrations_app import estimates, forecast, migration_policy
from migrations_app.models import Migration
from tests.factories import make_migration, make_vm, make_vsp
from tests.migrations_app.guests import place_vm
from tests.migrations_app.test_policies import HTMX
from vms.models import VSP

MIB = 1024 * 1024


@pytest.mark.django_db(transaction=True)
def test_opening_the_dialog_records_each_agents_driver(host_agents, fleet, migration_admin_client):
    vm = place_vm(host_agents, fleet, dirty_pages_per_s=0, memory_mib=8)
    VSP.objects.update(agent_driver="")

    dialog = migration_admin_client.get(f"/migrations/vms/{vm.pk}/migrate/", headers=HTMX)

    assert dialog.status_code == 200
    drivers = dict(
        VSP.objects.filter(pk__in=[vsp.pk for vsp in fleet.values()]).values_list("name", "agent_driver")
    )
    assert drivers == {name: "simulated" for name in fleet}, drivers


@pytest.mark.django_db(transaction=True)
def test_one_inventory_collection_records_each_agents_driver(host_agents, fleet):
    """A VSP whose dialog was never opened is modelled with its own driver in evacuation plans too."""
    from vms.inventory import collect_vsp

    VSP.objects.update(agent_driver="")

    for vsp in fleet.values():
        assert collect_vsp(vsp.pk)

    drivers = dict(
        VSP.objects.filter(pk__in=[vsp.pk for vsp in fleet.values()]).values_list("name", "agent_driver")
    )
    assert drivers == {name: "simulated" for name in fleet}, drivers


@pytest.mark.django_db
def test_a_simulated_source_is_forecast_with_its_rounds_before_the_pause_and_qemu_without():
    source, target = make_vsp("src", agent_driver="simulated"), make_vsp("dst")
    vm = make_vm("busy", vsp=source, memory_mib=1024)
    make_migration(vm, source, target, state=Migration.State.COMPLETED, throughput_bytes_s=100_000_000)
    memory = 1024 * MIB
    writes = estimates.DirtyRate(30_000_000.0, memory, memory, 256 * MIB, timezone.now())
    policy = migration_policy.effective({})

    assert estimates.model_link(source, 1.0).pre_pause_rounds == forecast.SIMULATED_PRE_PAUSE_ROUNDS
    simulated = estimates.forecast_to(vm, target, policy, writes)
    VSP.objects.filter(pk=source.pk).update(agent_driver="qemu")
    vm = type(vm).objects.get(pk=vm.pk)
    qemu = estimates.forecast_to(vm, target, policy, writes)

    assert estimates.model_link(VSP.objects.get(pk=source.pk), 1.0).pre_pause_rounds == 0
    assert simulated.verdict is qemu.verdict is forecast.Verdict.CONVERGES
    assert simulated.downtime_ms is not None and qemu.downtime_ms is not None
    assert simulated.downtime_ms < qemu.downtime_ms  # the extra rounds shrink what is left to freeze
    assert simulated.total_s is not None and qemu.total_s is not None and simulated.total_s >= qemu.total_s
