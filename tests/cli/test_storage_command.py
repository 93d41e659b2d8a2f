"""The ``matrixoe`` command on storage and networks, against a live console (real server, worker, Redis,
host agents): a refusal naming the pool, a VM's disks and cards, a VSP's pools, words made inert."""

from __future__ import annotations

import pytest

from api.tokens import do_create_token
from tests.api.conftest import WRITER
from tests.cli.test_matrixoe_command import matrixoe
from tests.factories import give_disk, give_nic, make_network, make_pool, make_user
from tests.migrations_app.guests import place_vm

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def logged_in(tmp_path, live_console):
    token = do_create_token(make_user("alice", permissions=WRITER), "cli")[1]
    assert matrixoe(tmp_path, "login", live_console, "--token", token).returncode == 0
    return tmp_path


def test_it_refuses_a_target_without_the_pool_naming_the_disk(host_agents, fleet, logged_in):
    vm = place_vm(host_agents, fleet)
    give_disk(vm, make_pool(fleet["hosta"], "san-a"))
    make_pool(fleet["hostb"], "san-a", identity="another-directory")
    make_network(fleet["hosta"], "prod-net\x1b[2J")  # a name with a terminal control in it

    refused = matrixoe(logged_in, "migrate", vm.name, "--to", "hostb")
    pools = matrixoe(logged_in, "pools", "hosta")

    assert refused.returncode == 1
    assert f"{vm.name} cannot migrate to hostb: hostb does not mount pool san-a: {vm.name}'s disk vda." in (
        refused.stderr
    )
    assert pools.returncode == 0
    assert "san-a" in pools.stdout and "50 GiB" in pools.stdout
    assert "prod-net\\x1b[2J" in pools.stdout and "\x1b[2J" not in pools.stdout  # shown, not obeyed


def test_status_lists_the_disks_and_the_cards(host_agents, fleet, logged_in):
    vm = place_vm(host_agents, fleet)
    give_disk(vm, make_pool(fleet["hosta"], "san-a"))
    give_nic(vm, "prod-net", mac="52:54:00:00:00:99")

    shown = matrixoe(logged_in, "status", vm.name)

    assert shown.returncode == 0, shown.stderr
    assert "vda" in shown.stdout and f"{vm.name}-vda.qcow2" in shown.stdout and "10 GiB" in shown.stdout
    assert "nic 0" in shown.stdout and "52:54:00:00:00:99" in shown.stdout


def test_define_refuses_in_words_and_defines_a_plain_vm(host_agents, fleet, tmp_path, live_console):
    token = do_create_token(make_user("ada", permissions=(*WRITER, "vms.add_virtualmachine")), "cli")[1]
    assert matrixoe(tmp_path, "login", live_console, "--token", token).returncode == 0
    make_pool(fleet["hostb"], "san-a", free_bytes=1 << 30)

    refused = matrixoe(tmp_path, "define", "db09", "--vsp", "hostb", "--disk", "san-a:2G", "--nic", "dmz")
    made = matrixoe(tmp_path, "define", "db10", "--vsp", "hosta", "--memory", "32")

    assert refused.returncode == 1
    assert "Disk vda: pool san-a on hostb has 1 GiB free; the new volumes there need 2 GiB." in refused.stderr
    assert "Network card 0: hostb has no network 'dmz' (its networks: none)." in refused.stderr
    assert made.returncode == 0, made.stderr
    assert "db10 defined on hosta." in made.stdout
    assert host_agents["hosta"].guest("db10") is not None


def test_status_names_no_pool_or_network_of_another_host_group(tmp_path, live_console):
    """A Lab user sees web01 through its Not Runnable copy on his host; it runs on a Production host,
    whose pool and network the command does not name (the API gives null, the command the pages' words)."""
    from tests.factories import make_host_group, make_not_runnable_copy, make_vm, make_vsp
    from vms.models import Role

    prod, lab = make_host_group("Prod"), make_host_group("Lab")
    web = make_vm("web01", make_vsp("vsp-p1", group=prod))
    make_not_runnable_copy(web, make_vsp("vsp-l1", group=lab))
    give_disk(web, make_pool(web.current_vsp, "prod-san"))
    give_nic(web, "prod-dmz", mac="52:54:00:00:00:42")
    token = do_create_token(make_user("lab-op", WRITER, role=Role.OPERATOR, group=lab), "cli")[1]
    assert matrixoe(tmp_path, "login", live_console, "--token", token).returncode == 0

    shown = matrixoe(tmp_path, "status", "web01")

    assert shown.returncode == 0, shown.stderr
    assert "prod-san" not in shown.stdout and "prod-dmz" not in shown.stdout and "vsp-p1" not in shown.stdout
    assert "a pool of another host group" in shown.stdout and "web01-vda.qcow2" in shown.stdout
    assert "a network of another host group" in shown.stdout and "52:54:00:00:00:42" in shown.stdout
