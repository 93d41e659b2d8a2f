"""A guest defined from the console with a disk on a shared pool and a network card migrates between two
real agents that both mount the pool: real worker, Redis and agents (simulated driver). Runs once this
checkout's agent has pools (the agent side of issue 19, another branch)."""

from __future__ import annotations

import pytest

from migrations_app.actions import do_request_migration
from migrations_app.checks import check_targets
from tests.factories import make_user
from tests.hostagent.conftest import AgentFactory
from tests.migrations_app.conftest import MIGRATOR, collected_vsps_for
from tests.migrations_app.guests import runs_on, wait_for_state
from tests.vms.test_storage_inventory import agent_has_pools
from vms.define import Definition, DiskRequest, NicRequest, do_define_vm
from vms.inventory import collect_vsp
from vms.models import Role

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not agent_has_pools(), reason="this checkout's agent has no --pool yet (agent branch)"
    ),
]


@pytest.fixture
def shared_hosts(tmp_path):
    """hosta and hostb mounting one directory as shared pool san-a, both with network prod-net; hostc
    has the network but not the pool."""
    factory = AgentFactory(tmp_path)
    pool = tmp_path / "san-a"
    pool.mkdir()
    shared = ("--pool", f"san-a:shared:{pool}:san-a-lun7")
    network = ("--network", "prod-net:simulated")
    agents = {"hosta": factory("hosta", *shared, *network), "hostb": factory("hostb", *shared, *network)}
    agents["hostc"] = factory("hostc", *network)
    yield agents, collected_vsps_for(agents)
    factory.stop_all()


def test_a_defined_guest_with_a_shared_disk_migrates_and_keeps_its_disk_and_card(
    shared_hosts, migration_worker, wait_for
):
    agents, vsps = shared_hosts
    admin = make_user("ada", (*MIGRATOR, "vms.add_virtualmachine", "vms.view_vsp"), role=Role.ADMINISTRATOR)
    definition = Definition(
        "db01",
        vsps["hosta"],
        32,
        disks=[DiskRequest("san-a", size_bytes=1 << 30)],
        nics=[NicRequest("prod-net")],
        running=True,
    )
    vm = do_define_vm(definition, admin)
    collect_vsp(vsps["hosta"].pk)
    mac = vm.nics.get().mac

    assert {c.vsp.name: c.reason for c in check_targets(vm)}["hostc"] == (
        "hostc does not mount pool san-a: db01's disk vda"
    )
    migration = do_request_migration(vm, vsps["hostb"], admin)
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled")

    assert migration.state == "completed", migration.alert
    assert vm.current_vsp == vsps["hostb"] and runs_on(agents["hostb"], "db01")
    assert migration.guest_devices == {
        "disks": [
            {"device": "vda", "pool": "san-a", "volume": "db01-vda.qcow2", "virtual_size_bytes": 1 << 30}
        ],
        "nics": [{"network": "prod-net", "mac": mac}],
    }
    assert migration.io_outstanding is not None and migration.io_drain_ms is not None
    collect_vsp(vsps["hostb"].pk)
    assert list(vm.disks.values_list("device", "pool", "pool_identity")) == [("vda", "san-a", "san-a-lun7")]
    assert list(vm.nics.values_list("network", "mac")) == [("prod-net", mac)]
