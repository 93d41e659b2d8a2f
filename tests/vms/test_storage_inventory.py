"""Storage pools, networks, disks and network cards in the inventory, and where the pages show them.

The agent side (``GET /v1/resources``, ``--pool``/``--network``) is built on another branch: the tests
marked ``needs_pool_agent`` start a real agent with pools and skip while this checkout's agent has no
``--pool``. The others run against a real agent of today (it answers 404: pools "not known") or feed
``vms.inventory`` the protocol's typed messages (``HostResources``, ``GuestInfo``) as an agent sends them.
"""

from __future__ import annotations

import subprocess
import sys
from functools import cache

import pytest

from agentprotocol import DiskInfo, GuestInfo, HostResources, Network, NicSpec, StoragePool
from tests.factories import (
    GIB,
    VIEW_PERMISSIONS,
    give_disk,
    give_nic,
    make_pool,
    make_user,
    make_vm,
    make_vsp,
)
from tests.hostagent.conftest import AgentFactory
from tests.vms.older_agent import OlderAgent
from vms.inventory import Asked, collect_vsp, copies_to_store, record_asked
from vms.models import VSP, NetworkCard, VirtualDisk

pytestmark = pytest.mark.django_db


def resources(*, networks=("prod-net",)) -> HostResources:
    return HostResources(
        pools=[
            StoragePool(
                name="san-a",
                kind="shared",
                identity="san-a-lun7",
                capacity_bytes=100 * GIB,
                free_bytes=42 * GIB,
                location="/srv/pools/san-a",
            ),
            StoragePool(
                name="scratch", kind="local", identity="local-vsp1-1", capacity_bytes=GIB, free_bytes=GIB
            ),
        ],
        networks=[Network(name=name, kind="bridge", bridge="br0") for name in networks],
    )


def guest(vm, *, disks=True) -> GuestInfo:
    return GuestInfo(
        guest_id=str(vm.guest_id),
        name=vm.name,
        os_type="linux",
        os_status="up",
        hardware_status="on",
        memory_mib=512,
        vcpus=1,
        disks=[
            DiskInfo(
                device="vda",
                pool="san-a",
                volume="db01-vda.qcow2",
                virtual_size_bytes=20 * GIB,
                allocated_bytes=3 * GIB,
            ),
            DiskInfo(device="vdb", pool="san-a", volume="db01-vdb.qcow2", virtual_size_bytes=10 * GIB),
        ]
        if disks
        else [],
        nics=[NicSpec(network="prod-net", mac="52:54:00:aa:bb:01")] if disks else [],
    )


def collect(vsp, vm, *, with_resources=True, disks=True) -> None:
    """What one inventory collection stores when the agent answers with these typed messages."""
    answer = Asked(
        {str(vm.guest_id): guest(vm, disks=disks)}, "", 5, resources=resources() if with_resources else None
    )
    record_asked(vsp, answer, copies_to_store(vsp), periodic=True)


@pytest.fixture
def agents(tmp_path):
    """Real host agents (``tests.hostagent.conftest``), stopped after the test."""
    factory = AgentFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture
def viewer_client(client):
    client.force_login(make_user("olga", VIEW_PERMISSIONS))
    return client


def test_it_stores_pools_networks_disks_and_cards_from_an_agents_answer(viewer_client):
    vsp = make_vsp("vsp1")
    vm = make_vm("db01", vsp=vsp)

    collect(vsp, vm)

    pools = {pool.name: (pool.kind, pool.identity, pool.free_bytes) for pool in vsp.pools.all()}
    assert pools == {"san-a": ("shared", "san-a-lun7", 42 * GIB), "scratch": ("local", "local-vsp1-1", GIB)}
    assert list(vsp.networks.values_list("name", flat=True)) == ["prod-net"]
    disks = list(vm.disks.values_list("device", "pool", "pool_identity", "virtual_size_bytes"))
    assert disks == [("vda", "san-a", "san-a-lun7", 20 * GIB), ("vdb", "san-a", "san-a-lun7", 10 * GIB)]
    assert list(vm.nics.values_list("index", "network", "mac")) == [(0, "prod-net", "52:54:00:aa:bb:01")]

    page = viewer_client.get(f"/vsps/{vsp.pk}/").content.decode()
    assert 'data-pool="san-a"' in page and "42 GiB" in page and 'data-network="prod-net"' in page
    general = viewer_client.get(f"/vms/{vm.pk}/general/").content.decode()
    assert "2 disks, 30 GiB in all" in general
    assert '<dd data-field="networks">prod-net' in general


def test_the_storage_and_network_tabs_list_each_disk_and_card(viewer_client):
    vsp = make_vsp("vsp1")
    vm = make_vm("db01", vsp=vsp)
    collect(vsp, vm)

    storage = viewer_client.get(f"/vms/{vm.pk}/storage/").content.decode()
    network = viewer_client.get(f"/vms/{vm.pk}/network/").content.decode()

    assert 'data-device="vda"' in storage and "db01-vda.qcow2" in storage and "20 GiB" in storage
    assert "3 GiB" in storage  # vda's allocated bytes
    assert 'data-nic="0"' in network and "52:54:00:aa:bb:01" in network and "br0" in network


def test_a_pool_gone_from_the_answer_is_gone_from_the_inventory():
    vsp = make_vsp("vsp1")
    vm = make_vm("db01", vsp=vsp)
    collect(vsp, vm)
    answer = Asked({str(vm.guest_id): guest(vm)}, "", 5, resources=HostResources())

    record_asked(vsp, answer, copies_to_store(vsp), periodic=True)

    assert not vsp.pools.exists() and not vsp.networks.exists()


def test_an_older_agents_answer_keeps_the_disks_the_console_knew():
    vsp = make_vsp("vsp1")
    vm = make_vm("db01", vsp=vsp)
    collect(vsp, vm)

    collect(vsp, vm, with_resources=False, disks=False)  # 404 for /v1/resources, no disks in its list

    assert VirtualDisk.objects.filter(vm=vm).count() == 2 and NetworkCard.objects.filter(vm=vm).count() == 1


def test_a_reported_mac_another_vm_holds_is_not_stored_twice():
    vsp = make_vsp("vsp1")
    other = make_vm("web01", vsp=vsp)
    give_nic(other, mac="52:54:00:aa:bb:01")
    vm = make_vm("db01", vsp=vsp)

    collect(vsp, vm)

    assert list(NetworkCard.objects.filter(mac="52:54:00:aa:bb:01").values_list("vm__name", flat=True)) == [
        "web01"
    ]


@pytest.mark.django_db(transaction=True)
def test_an_agent_older_than_pools_answers_404_and_the_pages_say_not_known(agents, client, request):
    """An agent older than pools (``older_agent``: ``GET /v1/resources`` is 404). Collection goes on;
    pools are "not known"."""
    agent = agents("old1", tls=False)
    older = OlderAgent(agent.url)
    request.addfinalizer(older.close)
    vsp = make_vsp("old1", agent_url=older.url, agent_secret=agent.secret)
    vm = make_vm("db01", vsp=vsp)
    give_disk(vm, make_pool(make_vsp("other"), "san-a"))
    VSP.objects.filter(pk=vsp.pk).update(resources_collected_at=None)

    assert collect_vsp(vsp.pk) is True

    vsp.refresh_from_db()
    assert vsp.resources_collected_at is None and vsp.agent_reachable
    assert vm.disks.count() == 1  # not wiped by an agent that reports none
    client.force_login(make_user("olga", VIEW_PERMISSIONS))
    page = client.get(f"/vsps/{vsp.pk}/").content.decode()
    assert "Not known: its agent does not report storage pools and networks (an older agent)." in page


@cache
def agent_has_pools() -> bool:
    """Whether this checkout's agent takes ``--pool`` (the agent side of issue 19)."""
    helped = subprocess.run([sys.executable, "-m", "hostagent", "--help"], capture_output=True, text=True)
    return "--pool" in helped.stdout


@pytest.mark.skipif(not agent_has_pools(), reason="this checkout's agent has no --pool yet (agent branch)")
@pytest.mark.django_db(transaction=True)
def test_a_real_agent_with_a_shared_pool_and_a_network_is_collected(agents, tmp_path):
    pool = tmp_path / "san-a"
    pool.mkdir()
    agent = agents("vsp1", "--pool", f"san-a:shared:{pool}:san-a-lun7", "--network", "prod-net:simulated")
    vsp = make_vsp("vsp1", agent_url=agent.url, agent_secret=agent.secret, agent_certificate=agent.trust)

    assert collect_vsp(vsp.pk) is True

    vsp.refresh_from_db()
    assert vsp.resources_collected_at is not None
    assert list(vsp.pools.values_list("name", "kind", "identity")) == [("san-a", "shared", "san-a-lun7")]
    assert list(vsp.networks.values_list("name", flat=True)) == ["prod-net"]


def test_what_a_migrations_target_is_told_carries_the_disks_with_their_pools_identity_and_the_cards():
    from vms.agent_messages import guest_spec

    vsp = make_vsp("vsp1")
    vm = make_vm("db01", vsp=vsp)
    collect(vsp, vm)

    spec = guest_spec(vm)

    assert [(d.device, d.pool, d.pool_identity, d.volume, d.create) for d in spec.disks] == [
        ("vda", "san-a", "san-a-lun7", "db01-vda.qcow2", False),
        ("vdb", "san-a", "san-a-lun7", "db01-vdb.qcow2", False),
    ]
    assert [(nic.network, nic.mac) for nic in spec.nics] == [("prod-net", "52:54:00:aa:bb:01")]
