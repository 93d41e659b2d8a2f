"""Pre-checks that name the disk and the network: the target must mount every shared pool of the guest's
disks and have each of its cards' networks; a disk on a local pool is mirrored, so the target needs a
local pool with room for its virtual size, and both agents must mirror; a disk that cannot be mirrored
(read-only, a snapshot chain) keeps the guest where it is.

The same words in the checks the dialog shows, the action (and so the API's 409 and the CLI), the
evacuation plan, and Init again (with real agents: nothing is sent to them).
"""

from __future__ import annotations

import pytest

from evacuations.plan import build_plan
from migrations_app.actions import MigrationRefused, do_request_migration
from migrations_app.checks import check_target, check_targets
from migrations_app.models import Migration
from tests.api.conftest import WRITER, ApiClient
from tests.factories import (
    give_disk,
    give_nic,
    make_network,
    make_pool,
    make_user,
    make_vm,
    make_vsp,
)
from vms.models import VSP, StoragePool, VirtualDisk

pytestmark = pytest.mark.django_db

NO_POOL = "vsp3 does not mount pool san-a: db01's disk vda"
NO_NETWORK = "vsp4 has no network prod-net: db01's nic 0"
NO_ROOM = "vsp4 has no local pool with 10 GiB free for db01's disk vdb (pool fast: 5 GiB free)"
GIB = 1 << 30


@pytest.fixture
def hosts():
    """db01 on vsp1 with a disk on shared pool san-a and a card on prod-net. vsp2 has both; vsp3 has a
    directory called san-a that is other storage (another identity); vsp4 has san-a but no prod-net."""
    vsps = {name: make_vsp(name) for name in ("vsp1", "vsp2", "vsp3", "vsp4")}
    san = make_pool(vsps["vsp1"], "san-a", identity="san-a-lun7")
    make_pool(vsps["vsp2"], "san-a", identity="san-a-lun7")
    make_pool(vsps["vsp3"], "san-a", identity="a-local-directory")
    make_pool(vsps["vsp4"], "storage", identity="san-a-lun7")  # the same LUNs, named otherwise there
    for name in ("vsp1", "vsp2", "vsp3"):
        make_network(vsps[name], "prod-net")
    make_network(vsps["vsp4"], "backup-net")
    db01 = make_vm("db01", vsp=vsps["vsp1"])
    give_disk(db01, san)
    give_nic(db01, "prod-net")
    return {**vsps, "db01": db01, "san": san}


def reasons(vm):
    return {check.vsp.name: check.reason for check in check_targets(vm)}


def test_it_names_the_pool_and_the_network_a_target_lacks(hosts):
    assert reasons(hosts["db01"]) == {
        "vsp1": "same host",
        "vsp2": "ok",
        "vsp3": NO_POOL,  # a directory of the same name is not the same storage
        "vsp4": NO_NETWORK,  # its pool of another name is the same storage: the disk is fine there
    }


@pytest.fixture
def local_disk(hosts):
    """db01 also has disk vdb: 10 GiB virtual, 1 GiB written, on vsp1's local pool scratch. vsp4 has a
    local pool with 5 GiB free (room for what is written, not for the virtual size), vsp2 one with 50 GiB;
    every agent mirrors local disks (simulated)."""
    VSP.objects.update(agent_mirrors_local_disks=True, agent_driver="simulated")
    for name in ("vsp1", "vsp2", "vsp3", "vsp4"):
        hosts[name].refresh_from_db()
    local = make_pool(hosts["vsp1"], "scratch", kind=StoragePool.Kind.LOCAL, identity="local-vsp1-x")
    make_pool(hosts["vsp2"], "big", kind=StoragePool.Kind.LOCAL, identity="local-vsp2", free_bytes=50 * GIB)
    make_pool(hosts["vsp4"], "fast", kind=StoragePool.Kind.LOCAL, identity="local-vsp4", free_bytes=5 * GIB)
    make_network(hosts["vsp4"], "prod-net")
    return give_disk(hosts["db01"], local, device="vdb")


def test_a_local_disk_needs_a_local_pool_with_room_for_its_virtual_size_on_the_target(hosts, local_disk):
    hosts["db01"].refresh_from_db()

    assert reasons(hosts["db01"]) == {
        "vsp1": "same host",
        "vsp2": "ok",  # the shared disk on its san-a, the local one mirrored into its pool big
        "vsp3": NO_POOL,
        "vsp4": NO_ROOM,
    }


def test_the_api_answers_409_for_no_room_at_the_virtual_size_and_nothing_is_sent(hosts, local_disk):
    from api.tokens import do_create_token

    api = ApiClient(do_create_token(make_user("alice", permissions=WRITER), "t")[1])

    response = api.post("/migrations", {"vm": "db01", "target": "vsp4"})

    assert response.status_code == 409
    assert response.json()["detail"] == f"db01 cannot migrate to vsp4: {NO_ROOM}."
    assert not Migration.objects.filter(vm=hosts["db01"]).exclude(state="refused").exists()


def test_the_evacuation_plan_counts_the_local_disks_copy_in_its_time(hosts, local_disk):
    from django.utils import timezone

    from migrations_app.estimates import DirtyRate
    from migrations_app.models import LinkProbe

    now = timezone.now()
    LinkProbe.objects.create(source=hosts["vsp1"], target=hosts["vsp2"], rate_bytes_s=100e6, measured_at=now)
    idle = DirtyRate(0.0, hosts["db01"].memory_mib << 20, None, None, now)

    plan = build_plan(hosts["vsp1"], rates={hosts["db01"].pk: idle})

    [step] = plan.steps
    assert step.target == hosts["vsp2"]
    assert step.predicted_s is not None and step.predicted_s > GIB / 100e6  # vdb's 1 GiB of data first
    assert any(line.startswith("Copies 1 GiB of disk first: about 11 s") for line in step.reasons), (
        step.reasons
    )


def test_a_local_disk_that_cannot_be_mirrored_is_refused_for_every_target_with_the_reason(hosts, local_disk):
    where = "db01's disk vdb on local pool scratch of vsp1"
    cases = [
        ({"read_only": True}, f"{where} is read-only: a read-only local disk is not mirrored"),
        (
            {"backing": ["base.qcow2"]},
            f"{where} has a snapshot chain (backing base.qcow2): a local disk with snapshots is not mirrored",
        ),
    ]
    for change, reason in cases:
        VirtualDisk.objects.filter(pk=local_disk.pk).update(**change)
        assert set(reasons(hosts["db01"]).values()) == {reason}, change
        VirtualDisk.objects.filter(pk=local_disk.pk).update(read_only=False, backing=[])

    VSP.objects.filter(pk=hosts["vsp1"].pk).update(agent_mirrors_local_disks=False, agent_driver="libvirt")
    assert set(reasons(hosts["db01"]).values()) == {
        "db01's disk vdb is on local pool scratch of vsp1: vsp1 cannot mirror local disks (its agent, driver "
        "libvirt, does not)"
    }
    VSP.objects.filter(pk=hosts["vsp1"].pk).update(agent_mirrors_local_disks=True)
    VSP.objects.filter(pk=hosts["vsp2"].pk).update(agent_mirrors_local_disks=False, agent_driver="libvirt")
    assert reasons(hosts["db01"])["vsp2"] == (
        "vsp2 cannot mirror local disks (its agent, driver libvirt, does not): db01's disk vdb"
    )


def test_a_target_whose_agent_reports_no_pools_is_refused_in_words(hosts):
    older = make_vsp("vsp5")  # its agent never reported pools (older than them: 404)

    assert reasons(hosts["db01"])["vsp5"] == (
        "vsp5 cannot be checked: its agent does not report storage pools and networks (an older agent): "
        "db01's disk vda"
    )
    plain = make_vm("plain", vsp=hosts["vsp1"])  # a guest without disks or cards goes there
    assert reasons(plain)["vsp5"] == "ok"
    assert older.resources_collected_at is None


def test_the_action_refuses_with_the_same_words_and_keeps_the_refusal(hosts):
    admin = make_user("alice", permissions=WRITER)

    with pytest.raises(MigrationRefused) as refused:
        do_request_migration(hosts["db01"], hosts["vsp3"], admin)

    assert str(refused.value.message) == f"db01 cannot migrate to vsp3: {NO_POOL}."
    kept = Migration.objects.get(vm=hosts["db01"])
    assert (kept.state, kept.alert) == ("refused", f"db01 cannot migrate to vsp3: {NO_POOL}.")


def test_the_api_answers_409_naming_the_network(hosts):
    from api.tokens import do_create_token

    api = ApiClient(do_create_token(make_user("alice", permissions=WRITER), "t")[1])

    response = api.post("/migrations", {"vm": "db01", "target": "vsp4"})

    assert response.status_code == 409
    assert response.json()["detail"] == f"db01 cannot migrate to vsp4: {NO_NETWORK}."
    assert not Migration.objects.filter(vm=hosts["db01"]).exclude(state="refused").exists()


def test_the_evacuation_plan_sends_the_guest_only_where_its_storage_and_network_are(hosts):
    plan = build_plan(hosts["vsp1"])

    assert [(step.vm.name, step.target.name) for step in plan.steps] == [("db01", "vsp2")]

    chosen = build_plan(hosts["vsp1"], chosen_targets={hosts["db01"].pk: hosts["vsp4"].pk})
    assert chosen.problems == [f"db01 cannot go to vsp4: {NO_NETWORK}"]


def test_the_plan_keeps_a_guest_no_target_can_take_with_the_reason(hosts):
    StoragePool.objects.filter(vsp=hosts["vsp2"]).delete()  # vsp2 no longer mounts san-a

    plan = build_plan(hosts["vsp1"])

    assert plan.steps == []
    assert [(stay.vm_name, stay.reason) for stay in plan.staying] == [
        ("db01", "vsp2 does not mount pool san-a: db01's disk vda")
    ]


@pytest.mark.django_db(transaction=True)
def test_init_refuses_when_the_pool_went_away_since_the_click_and_sends_nothing(host_agents, fleet):
    """Real agents: the migration was accepted, then hostb stopped mounting san-a; Init asks hostb's agent
    for its pools again (an agent older than pools answers 404: the last known ones stand), refuses with
    the disk's name, and neither agent was asked to prepare or start anything."""
    from migrations_app.engine import MigrationRun
    from migrations_app.errors import MigrationFailed
    from migrations_app.lease import Lease
    from migrations_app.phases import PHASES
    from migrations_app.records import load_migration
    from tests.migrations_app.guests import guest_on, place_vm, runs_on

    vm = place_vm(host_agents, fleet)
    give_disk(vm, make_pool(fleet["hosta"], "san-a"))
    make_pool(fleet["hostb"], "san-a")
    assert check_target(vm, fleet["hostb"]) is None  # what the click was told
    migration = Migration.objects.create(  # requested, its worker now at Init (no worker is involved)
        vm=vm, source=fleet["hosta"], target=fleet["hostb"], state="init", lease_owner="worker:this-test"
    )
    StoragePool.objects.filter(vsp=fleet["hostb"]).delete()  # gone before Init

    run = MigrationRun(load_migration(migration.pk), Lease(migration.pk, "worker:this-test"))
    try:
        with pytest.raises(MigrationFailed) as failed:
            PHASES[0].run(run)
    finally:
        run.close()

    assert failed.value.reason == f"hostb does not mount pool san-a: {vm.name}'s disk vda"
    assert guest_on(host_agents["hostb"], vm.name) is None  # nothing prepared on the target
    assert runs_on(host_agents["hosta"], vm.name)  # and the guest runs on, untouched
