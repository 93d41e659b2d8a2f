"""Defining a VM from the console (page and API): disks as new volumes or images in the VSP's pools,
network cards on its networks. A bad definition is refused in words and nothing is created, neither
in the console nor on the host (the refusals below are decided before the agent is asked: their VSP's
agent address answers nothing, so a call would fail in other words)."""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from api.tokens import do_create_token
from tests.api.conftest import ApiClient
from tests.factories import (
    GIB,
    VIEW_PERMISSIONS,
    give_disk,
    give_nic,
    make_network,
    make_pool,
    make_user,
    make_vm,
    make_vsp,
)
from tests.hostagent.conftest import AgentFactory
from tests.vms.test_storage_inventory import agent_has_pools
from vms.define import Definition, DiskRequest, NicRequest, do_define_vm
from vms.inventory import collect_vsp
from vms.models import Role, VirtualMachine

pytestmark = pytest.mark.django_db

DEFINER = (*VIEW_PERMISSIONS, "vms.add_virtualmachine")


@pytest.fixture
def admin():
    return make_user("ada", DEFINER, role=Role.ADMINISTRATOR)


@pytest.fixture
def vsp1():
    """A VSP whose agent nobody answers for, with shared pool san-a (4 GiB free) and network prod-net."""
    vsp = make_vsp("vsp1", agent_url="http://127.0.0.1:9")
    make_pool(vsp, "san-a", identity="san-a-lun7", free_bytes=4 * GIB)
    make_network(vsp, "prod-net")
    return vsp


def define(vsp, admin, *, disks=(), nics=(), name="db02"):
    return do_define_vm(Definition(name, vsp, 512, disks=list(disks), nics=list(nics)), admin)


BOUNDS = "a new volume's size is from 1 MiB to 1 PiB (1048576 to 1125899906842624 bytes)"
BAD = {
    "pool missing": (
        {"disks": [DiskRequest("san-b", size_bytes=GIB)]},
        "Disk vda: vsp1 has no pool 'san-b' (its pools: san-a).",
    ),
    "no room": (
        {"disks": [DiskRequest("san-a", size_bytes=3 * GIB), DiskRequest("san-a", size_bytes=2 * GIB)]},
        "Disk vdb: pool san-a on vsp1 has 4 GiB free; the new volumes there need 5 GiB.",
    ),
    "network missing": (
        {"nics": [NicRequest("dmz")]},
        "Network card 0: vsp1 has no network 'dmz' (its networks: prod-net).",
    ),
    "path outside pools": (
        {"disks": [DiskRequest("san-a", image="/etc/passwd")]},
        "Disk vda: '/etc/passwd' is a path outside every pool: give the name of a volume in pool san-a "
        "(letters, digits, '.', '_', '-'; no '/').",
    ),
    "parent directory": (
        {"disks": [DiskRequest("san-a", image="../san-b/db.qcow2")]},
        "Disk vda: '../san-b/db.qcow2' is a path outside every pool: give the name of a volume in pool "
        "san-a (letters, digits, '.', '_', '-'; no '/').",
    ),
    "disk of 0 bytes": (
        {"disks": [DiskRequest("san-a", size_bytes=0)]},
        f"Disk vda: {BOUNDS}, not 0 B.",
    ),
    "negative disk": (
        {"disks": [DiskRequest("san-a", size_bytes=-GIB)]},
        f"Disk vda: {BOUNDS}, not -1 GiB.",
    ),
    "absurd disk": (
        {"disks": [DiskRequest("san-a", size_bytes=3 << 50)]},
        f"Disk vda: {BOUNDS}, not 3 PiB.",
    ),
    "bad mac": (
        {"nics": [NicRequest("prod-net", mac="01:00:5e:00:00:01")]},
        "Network card 0: '01:00:5e:00:00:01' is not a unicast MAC address such as 52:54:00:12:34:56.",
    ),
}


NAME_WORDS = "Name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit."
BAD |= {  # QA: a name refused with a new disk gave a 500 (its volume is named after it)
    f"bad name {name!r} with a new disk": (
        {"name": name, "disks": [DiskRequest("san-a", size_bytes=GIB)], "nics": [NicRequest("prod-net")]},
        NAME_WORDS,
    )
    for name in ("qa 3<b>", "<script>alert(1)</script>", "my vm", "-lead", "x" * 65)
}
BAD["size and image"] = (
    {"disks": [DiskRequest("san-a", size_bytes=GIB, image="base.qcow2")]},
    "Disk vda: give either a size (a new volume) or an image (a volume already in pool san-a), not both.",
)


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_definition_is_refused_in_words_and_nothing_is_created(vsp1, admin, case):
    fields, words = BAD[case]
    before = VirtualMachine.objects.count()

    with pytest.raises(ValidationError) as refused:
        define(vsp1, admin, **fields)

    assert refused.value.messages == [words]
    assert VirtualMachine.objects.count() == before


def test_a_duplicate_mac_and_a_volume_in_use_name_their_holder(vsp1, admin):
    web01 = make_vm("web01", vsp=vsp1)
    give_nic(web01, mac="52:54:00:12:34:56")
    give_disk(web01, vsp1.pools.get())

    with pytest.raises(ValidationError) as refused:
        define(
            vsp1,
            admin,
            disks=[DiskRequest("san-a", image="web01-vda.qcow2")],
            nics=[NicRequest("prod-net", mac="52:54:00:12:34:56")],
        )

    assert refused.value.messages == [
        "Disk vda: volume web01-vda.qcow2 in pool san-a is in use by web01's disk vda.",
        "Network card 0: MAC 52:54:00:12:34:56 is already used by web01's nic 0.",
    ]
    assert not VirtualMachine.objects.filter(name="db02").exists()


def test_disks_and_cards_on_a_vsp_whose_pools_are_not_known_are_refused(admin):
    older = make_vsp("vsp9", agent_url="http://127.0.0.1:9")

    with pytest.raises(ValidationError) as refused:
        define(older, admin, nics=[NicRequest("prod-net")])

    assert refused.value.messages == [
        "vsp9's storage pools and networks are not known: its agent does not report storage pools and "
        "networks (an older agent)."
    ]


def test_only_an_administrator_of_the_vsps_host_group_may_define(vsp1):
    operator = make_user("otto", DEFINER, role=Role.OPERATOR)

    with pytest.raises(PermissionDenied, match="not an administrator of its host group"):
        define(vsp1, operator)
    assert not VirtualMachine.objects.filter(name="db02").exists()


def test_the_page_lists_every_problem_and_keeps_nothing(vsp1, admin, client):
    client.force_login(admin)
    form = {"name": "db02", "memory_mib": "512", "vcpus": "1", "disk0_pool": "san-a", "disk0_image": "/etc"}
    form |= {"nic0_network": "prod-net", "nic0_mac": "zz"}

    response = client.post(f"/vms/define/?vsp={vsp1.pk}", form)

    page = response.content.decode()
    assert response.status_code == 400
    assert "Nothing was defined:" in page and "is a path outside every pool" in page
    assert "is not a unicast MAC address" in page
    assert not VirtualMachine.objects.filter(name="db02").exists()


@pytest.mark.parametrize(("pool", "typed"), [("san-a", "0"), ("san-a", "2000000"), ("", "0")])
def test_the_page_refuses_a_disk_size_of_zero_negative_or_absurd_with_the_bounds(
    vsp1, admin, client, typed, pool
):
    """QA: a disk row with size 0 was taken (without a pool it was dropped silently: a VM with no disk)."""
    client.force_login(admin)
    form = {"name": "db02", "memory_mib": "512", "vcpus": "1", "disk0_pool": pool, "disk0_size_gib": typed}

    response = client.post(f"/vms/define/?vsp={vsp1.pk}", form)

    page = response.content.decode()
    assert response.status_code == 400
    if pool:
        assert "a new volume&#x27;s size is from 1 MiB to 1 PiB" in page, page
    else:
        assert "Disk vda: choose a pool (its pools: san-a)." in page, page
    assert not VirtualMachine.objects.filter(name="db02").exists()
    shown = client.get(f"/vms/define/?vsp={vsp1.pk}").content.decode()
    assert 'name="disk0_size_gib" min="0.001" max="1048576" step="0.001"' in shown


def test_the_api_refuses_a_disk_size_of_zero_in_words(vsp1, admin):
    api = ApiClient(do_create_token(admin, "t")[1])

    refused = api.post(
        "/vms",
        {"name": "db03", "vsp": "vsp1", "memory_mib": 256, "disks": [{"pool": "san-a", "size_bytes": 0}]},
    )

    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        "Bad input: disks.0.size_bytes: A new volume's size is from 1 MiB to 1 PiB (1048576 to "
        "1125899906842624 bytes), not 0 B."
    )
    assert not VirtualMachine.objects.filter(name="db03").exists()


def test_the_define_page_is_refused_to_a_viewer(vsp1, client):
    client.force_login(make_user("olga", VIEW_PERMISSIONS))

    assert client.get(f"/vms/define/?vsp={vsp1.pk}").status_code == 403


# -- with a real agent --------------------------------------------------------------------------------


@pytest.fixture
def agent_vsp(tmp_path):
    """A VSP with a real agent: with pool san-a and network prod-net when this checkout's agent takes
    ``--pool`` (collected from it); else an agent older than pools, its pools given to the console by
    hand (that agent ignores disks and cards: the console records what it asked)."""
    factory = AgentFactory(tmp_path)
    pool = tmp_path / "san-a"
    pool.mkdir()
    options = ("--pool", f"san-a:shared:{pool}:san-a-lun7", "--network", "prod-net:simulated")
    agent = factory("vsp1", *(options if agent_has_pools() else ()))
    vsp = make_vsp("vsp1", agent_url=agent.url, agent_secret=agent.secret, agent_certificate=agent.trust)
    if agent_has_pools():
        assert collect_vsp(vsp.pk)
    else:
        make_pool(vsp, "san-a", identity="san-a-lun7", free_bytes=40 * GIB)
        make_network(vsp, "prod-net", kind="simulated", bridge="")
    vsp.refresh_from_db()
    yield vsp, agent
    factory.stop_all()


@pytest.mark.django_db(transaction=True)
def test_it_defines_a_vm_with_a_new_volume_and_a_generated_mac(agent_vsp, admin):
    vsp, agent = agent_vsp

    vm = define(vsp, admin, disks=[DiskRequest("san-a", size_bytes=GIB)], nics=[NicRequest("prod-net")])

    assert list(vm.registrations.values_list("vsp__name", "hardware_status")) == [("vsp1", "off")]
    assert list(vm.disks.values_list("device", "pool", "volume")) == [("vda", "san-a", "db02-vda.qcow2")]
    mac = vm.nics.get().mac
    assert mac.startswith("52:54:00:")
    assert agent.guest("db02") is not None  # the agent knows it by the same id
    assert agent.guest("db02").guest_id == str(vm.guest_id)


@pytest.mark.django_db(transaction=True)
def test_the_api_defines_and_refuses_with_409(agent_vsp, admin):
    vsp, agent = agent_vsp
    api = ApiClient(do_create_token(admin, "t")[1])

    refused = api.post("/vms", {"name": "db03", "vsp": "vsp1", "memory_mib": 256, "nics": [{"network": "x"}]})
    made = api.post(
        "/vms",
        {
            "name": "db03",
            "vsp": "vsp1",
            "memory_mib": 256,
            "disks": [{"pool": "san-a", "size_bytes": GIB}],
            "nics": [{"network": "prod-net", "mac": "52:54:00:00:00:33"}],
        },
    )

    assert refused.status_code == 409
    assert refused.json()["detail"] == "Network card 0: vsp1 has no network 'x' (its networks: prod-net)."
    assert made.status_code == 201, made.content
    body = made.json()
    assert [disk["volume"] for disk in body["disks"]] == ["db03-vda.qcow2"]
    assert [(nic["index"], nic["network"], nic["mac"]) for nic in body["nics"]] == [
        (0, "prod-net", "52:54:00:00:00:33")
    ]
    assert agent.guest("db03") is not None


@pytest.mark.skipif(not agent_has_pools(), reason="this checkout's agent has no --pool yet (agent branch)")
@pytest.mark.django_db(transaction=True)
def test_an_image_the_agent_does_not_find_is_its_refusal_and_nothing_is_created(agent_vsp, admin):
    vsp, agent = agent_vsp

    with pytest.raises(ValidationError) as refused:
        define(vsp, admin, disks=[DiskRequest("san-a", image="missing.qcow2")])

    assert refused.value.messages[0].startswith("vsp1 refused db02: ")
    assert "missing.qcow2" in refused.value.messages[0]
    assert not VirtualMachine.objects.filter(name="db02").exists()
    assert agent.guest("db02") is None
