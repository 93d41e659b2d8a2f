"""The demo fleet with storage: every demo VM gets a disk on the shared pool and a network card, and
vsp1 lacks cache-net so cache01's dialog refuses it; with agents older than pools the demo still runs,
without disks, and says so. Real host agents (simulated driver), as ``make run`` starts them."""

from __future__ import annotations

import pytest

from migrations_app.checks import check_targets
from tests.hostagent.conftest import AgentFactory
from tests.vms.older_agent import OlderAgent
from tests.vms.test_storage_inventory import agent_has_pools
from vms.demo import HOSTS, create_demo_fleet, seed_demo_agents
from vms.demo_storage import agent_storage_options
from vms.inventory import collect_all_inventory
from vms.models import VSP, VirtualDisk, VirtualMachine

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def demo_agents(tmp_path):
    """``start(options_for_host)``: the demo fleet in the database, its four VSPs on real agents."""
    factory = AgentFactory(tmp_path)
    proxies: list[OlderAgent] = []

    def start(options=lambda name: [], *, older=False):
        """``older``: each agent as those older than pools answer (``tests.vms.older_agent``)."""
        create_demo_fleet(agents_base_port=7101, secrets_dir=tmp_path / "secrets")
        for host in HOSTS:
            agent = factory(host.name, *options(host.name), tls=not older)
            url, trust = agent.url, agent.trust
            if older:
                proxies.append(OlderAgent(agent.url))
                url, trust = proxies[-1].url, ""
            VSP.objects.filter(name=host.name).update(agent_url=url, agent_certificate=trust)
            vsp = VSP.objects.get(name=host.name)
            vsp.agent_secret = agent.secret
            vsp.save(update_fields=["agent_secret"])

    yield start
    for proxy in proxies:
        proxy.close()
    factory.stop_all()


def test_with_agents_older_than_pools_the_demo_runs_without_disks_and_says_so(demo_agents, tmp_path):
    demo_agents(older=True)

    lines = seed_demo_agents("simulated", tmp_path / "pool")
    answered = collect_all_inventory()

    assert all(answered.values())
    assert "vsp1: web01 (512 MiB, running, no pools known on its agent)" in lines
    assert not VirtualDisk.objects.exists()
    assert not VSP.objects.filter(resources_collected_at__isnull=False).exists()


@pytest.mark.skipif(not agent_has_pools(), reason="this checkout's agent has no --pool yet (agent branch)")
def test_every_demo_vm_gets_a_shared_disk_and_a_card_and_cache01_cannot_go_to_vsp1(demo_agents, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    demo_agents(lambda name: agent_storage_options(name, pool))

    seed_demo_agents("simulated", pool)
    collect_all_inventory()

    runnable = VirtualMachine.objects.filter(registrations__hardware_status__in=["on", "off"]).distinct()
    for vm in runnable:
        assert list(vm.disks.values_list("device", "pool")) == [("vda", "san-a")], vm.name
        assert vm.nics.count() == 1, vm.name
    cache01 = VirtualMachine.objects.get(name="cache01")
    assert {check.vsp.name: check.reason for check in check_targets(cache01)}["vsp1"] == (
        "vsp1 has no network cache-net: cache01's nic 0"
    )
