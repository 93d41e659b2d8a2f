"""Storage pools, networks and guests' disks on real agents (simulated driver): what ``GET /v1/resources``
reports, definitions refused with nothing created, the pre-checks of an incoming migration, and a
migration of a guest writing its disk on a shared pool: one writer at a time, I/O Quiesce measured.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
from typing import Any

import httpx
import pytest

from hostagent.hostconfig import parse_pool
from tests.conftest import wait_until
from tests.hostagent.conftest import (
    AgentFactory,
    RunningAgent,
    converged_or_ended,
    follow,
    guest_id_for,
    prepare,
    raw_post,
    resources,
    start,
    unique,
)
from vms.agent_client import AgentRefused

GIB = 1 << 30


def put_guest(agent: RunningAgent, name: str, **fields: Any) -> httpx.Response:
    """``PUT /v1/guests/{id}`` with the body as given (bad values reach the agent)."""
    guest_id = guest_id_for(name)
    body = {"guest_id": guest_id, "name": name, "memory_mib": 16, "dirty_pages_per_s": 50, **fields}
    headers = {"Authorization": f"Bearer {agent.secret}"}
    return httpx.put(
        f"{agent.url}/v1/guests/{guest_id}", json=body, headers=headers, verify=agent.verify, timeout=30
    )


def disk(volume: str, pool: str = "san", device: str = "vda", size: int = 64 << 20, **more: Any) -> dict:
    return {"device": device, "pool": pool, "volume": volume, "virtual_size_bytes": size, **more}


def nic(mac: str = "52:54:00:00:00:01", network: str = "prod") -> dict:
    return {"network": network, "mac": mac}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory):
    """vsp1 and vsp2 mount one shared directory (pool ``san``) and each a local one; vsp3 mounts a
    directory also called ``san`` that is not the same storage, and has no network ``prod``."""
    shared = tmp_path_factory.mktemp("san")
    other = tmp_path_factory.mktemp("other-san")
    factory = AgentFactory(tmp_path_factory.mktemp("agents"))
    agents = {}
    for name, san in (("vsp1", shared), ("vsp2", shared), ("vsp3", other)):
        local = tmp_path_factory.mktemp(f"{name}-local")
        args = ["--pool", f"san:shared:{san}", "--pool", f"scratch:local:{local}"]
        args += ["--network", "prod:simulated"] if name != "vsp3" else ["--network", "test:simulated"]
        agents[name] = factory(name, *args)
    yield agents, shared, other
    factory.stop_all()


def test_it_reports_pools_with_free_space_networks_and_one_identity_per_shared_storage(hosts):
    agents, shared, _ = hosts
    seen = {name: resources(agent) for name, agent in agents.items()}
    san = {name: next(pool for pool in found.pools if pool.name == "san") for name, found in seen.items()}
    scratch = {
        name: next(pool for pool in found.pools if pool.name == "scratch") for name, found in seen.items()
    }

    assert san["vsp1"].identity == san["vsp2"].identity, "the same directory is the same storage"
    assert san["vsp3"].identity != san["vsp1"].identity, "a directory of the same name is not"
    assert scratch["vsp1"].identity != scratch["vsp2"].identity and scratch["vsp1"].kind == "local"
    assert 0 < san["vsp1"].free_bytes <= san["vsp1"].capacity_bytes
    assert san["vsp1"].location == str(shared.resolve())
    assert [network.name for network in seen["vsp1"].networks] == ["prod"]
    assert [network.name for network in seen["vsp3"].networks] == ["test"]
    headers = {"Authorization": f"Bearer {agents['vsp1'].secret}"}
    scraped = httpx.get(f"{agents['vsp1'].url}/metrics", headers=headers, verify=agents["vsp1"].verify).text
    assert 'matrixoe_agent_pool_free_bytes{kind="shared",pool="san"}' in scraped


def test_it_creates_a_sparse_disk_reports_it_and_who_writes_it(hosts):
    agents, shared, _ = hosts
    vsp1 = agents["vsp1"]
    name, volume = unique("db"), unique("vol")
    answer = put_guest(vsp1, name, disks=[disk(volume, create=True)], nics=[nic("52:54:00:aa:00:01")])
    assert answer.status_code == 200, answer.text
    info = vsp1.client.get_guest(guest_id_for(name))
    (vda,) = info.disks
    assert vda.virtual_size_bytes == 64 << 20 and vda.allocated_bytes < 64 << 20, "a sparse file"
    assert vda.pool_identity == next(p.identity for p in resources(vsp1).pools if p.name == "san")
    assert [card.mac for card in info.nics] == ["52:54:00:aa:00:01"]
    assert (shared / volume).stat().st_size == 64 << 20
    assert not [w for w in resources(vsp1).writers if w.volume == volume], "not running: nobody writes"

    vsp1.client.start_guest(info.guest_id)
    assert wait_until(lambda: vsp1.client.get_guest(info.guest_id).workload["disk_writes"] > 10, timeout=10)
    writers = [w for w in resources(vsp1).writers if w.volume == volume]
    assert [(w.guest_id, w.pool_identity) for w in writers] == [(info.guest_id, vda.pool_identity)]
    assert vsp1.client.get_guest(info.guest_id).disks[0].allocated_bytes > 0
    vsp1.client.stop_guest(info.guest_id)


@pytest.fixture(scope="module")
def taken(hosts) -> str:
    """A volume of pool ``san`` that a guest of vsp1 uses, and MAC 52:54:00:bb:00:01 it has."""
    vsp1 = hosts[0]["vsp1"]
    volume = unique("taken")
    answer = put_guest(
        vsp1, unique("owner"), disks=[disk(volume, create=True)], nics=[nic("52:54:00:bb:00:01")]
    )
    assert answer.status_code == 200, answer.text
    return volume


BAD_DEFINITIONS = {
    "no such pool": ({"disks": [disk("new", pool="nfs-b", create=True)]}, 400, "no storage pool nfs-b"),
    "no room in the pool": ({"disks": [disk("new", size=1 << 60, create=True)]}, 409, "no room in pool san"),
    "no such network": ({"nics": [nic(network="dmz")]}, 400, "no network dmz"),
    "a MAC another guest has": ({"nics": [nic("52:54:00:bb:00:01")]}, 409, "MAC 52:54:00:bb:00:01 is used"),
    "a MAC twice": ({"nics": [nic(), nic()]}, 400, "two network cards use MAC"),
    "a path outside the pool": ({"disks": [disk("../etc", create=True)]}, 400, "must be 1-64 letters"),
    "a link out of the pool": ({"disks": [disk("escape")]}, 400, "lies outside pool san"),
    "a volume that is not there": ({"disks": [disk("missing")]}, 400, "no volume missing in pool san"),
    "a volume another guest uses": ({"disks": [disk("TAKEN")]}, 409, "is used by guest owner-"),
    "a volume that exists, to create": ({"disks": [disk("orphan", create=True)]}, 409, "exists in pool san"),
}


@pytest.mark.parametrize("kind", BAD_DEFINITIONS)
def test_it_refuses_a_bad_definition_with_a_clear_error_and_creates_nothing(hosts, taken, kind, tmp_path):
    agents, shared, _ = hosts
    vsp1 = agents["vsp1"]
    (tmp_path / "secret").write_text("not the guest's")
    (shared / "escape").unlink(missing_ok=True)
    (shared / "escape").symlink_to(tmp_path / "secret")
    (shared / "orphan").write_bytes(b"")  # an image nobody uses
    fields, status, words = BAD_DEFINITIONS[kind]
    for spec_disk in fields.get("disks", []):
        spec_disk["volume"] = spec_disk["volume"].replace("TAKEN", taken)
    before = sorted(path.name for path in shared.iterdir())
    name = unique("bad")
    fields = {**fields, "disks": [*fields.get("disks", [])], "nics": [*fields.get("nics", [])]}
    fields["disks"].append(disk(unique("fresh"), device="vdz", create=True))  # would be created if accepted

    answer = put_guest(vsp1, name, **fields)

    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]
    assert sorted(path.name for path in shared.iterdir()) == before, "no volume created"
    assert vsp1.guest(name) is None, "no guest defined"


def running_guest_with_disk(agent: RunningAgent, **more: Any) -> tuple[str, str]:
    name, volume = unique("db"), unique("vol")
    fields = {"dirty_pages_per_s": 200, "io_latency_ms": 300, "running": True, **more}
    answer = put_guest(agent, name, disks=[disk(volume, create=True)], nics=[nic(unique_mac())], **fields)
    assert answer.status_code == 200, answer.text
    return name, volume


def unique_mac() -> str:
    return "52:54:00:" + ":".join(f"{byte:02x}" for byte in secrets.token_bytes(3))


@pytest.mark.parametrize(
    ("target_name", "refusal"),
    [("vsp3", "vsp3 does not mount pool san: {name}'s disk vda"), ("vsp2", "local disks cannot move yet")],
)
def test_a_target_without_the_pool_or_a_local_disk_is_refused_at_prepare_with_nothing_made(
    hosts, target_name, refusal
):
    agents, _, _ = hosts
    vsp1, target = agents["vsp1"], agents[target_name]
    pool = "san" if target_name == "vsp3" else "scratch"
    name = unique("db")
    answer = put_guest(vsp1, name, disks=[disk(unique("vol"), pool=pool, create=True)])
    assert answer.status_code == 200, answer.text
    guest = vsp1.client.get_guest(guest_id_for(name))

    with pytest.raises(AgentRefused) as refused:
        prepare(target, guest, unique("move"), "off")

    assert refused.value.status == 409 and refusal.format(name=name) in str(refused.value)
    assert target.guest(name) is None


def test_a_target_without_the_network_is_refused_at_prepare(hosts):
    agents, _, _ = hosts
    vsp1, vsp3 = agents["vsp1"], agents["vsp3"]
    name = unique("web")
    assert put_guest(vsp1, name, nics=[nic(unique_mac())]).status_code == 200
    guest = vsp1.client.get_guest(guest_id_for(name))

    with pytest.raises(AgentRefused) as refused:
        prepare(vsp3, guest, unique("move"), "off")

    assert f"vsp3 has no network prod: {name}'s nic 0" in str(refused.value)
    assert vsp3.guest(name) is None


def test_a_guest_writing_its_shared_disk_moves_with_one_writer_at_a_time_and_io_quiesce_measured(hosts):
    agents, shared, _ = hosts
    vsp1, vsp2 = agents["vsp1"], agents["vsp2"]
    name, volume = running_guest_with_disk(vsp1)
    guest_id = guest_id_for(name)
    assert wait_until(lambda: vsp1.client.get_guest(guest_id).workload["disk_writes"] > 5, timeout=10)
    writers_seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def writing(agent) -> int:
        return sum(w.volume == volume for w in resources(agent).writers)

    def watch_writers() -> None:  # both hosts' own records, as the soak's invariant reads them
        # One host after the other is no snapshot: a loaded machine once answered vsp1's "writer" from
        # before the freeze and vsp2's from after the resume. The source is asked on both sides of the
        # target: it writes in between only if it said so both times (it never writes again once it stopped).
        while not stop.is_set():
            before, target, after = writing(vsp1), writing(vsp2), writing(vsp1)
            writers_seen.append((min(before, after), target))

    watcher = threading.Thread(target=watch_writers)
    watcher.start()
    try:
        migration_id = unique("move")
        start(vsp1, vsp2, vsp1.client.get_guest(guest_id), migration_id, "off", downtime_ms=300)
        follow(vsp1, migration_id, converged_or_ended)
        quiesced = vsp1.client.quiesce(migration_id)
        assert vsp1.client.freeze(migration_id).state == "ready"
        vsp2.client.resume(migration_id)
        vsp1.client.release(migration_id)
        moved = vsp2.client.get_guest(guest_id)
        assert wait_until(lambda: vsp2.client.get_guest(guest_id).workload["disk_writes"] > 5, timeout=10)
    finally:
        stop.set()
        watcher.join()

    assert quiesced.io_outstanding is not None and quiesced.io_outstanding > 0, quiesced
    assert quiesced.io_drain_ms is not None and quiesced.io_drain_ms > 0, quiesced
    assert all(sum(counts) <= 1 for counts in writers_seen), "two writers at once"
    assert (1, 0) in writers_seen and writers_seen[-1] == (0, 1), "the source wrote, then only the target"
    assert moved.disks[0].pool == "san" and moved.disks[0].volume == volume
    assert moved.nics and moved.hardware_status == "on"
    assert raw_post(vsp1, f"/v1/guests/{guest_id}/start", {}).status_code == 409, "source is Not Runnable"
    assert (shared / volume).exists()


def test_a_cancel_in_io_quiesce_leaves_the_guest_writing_its_disk_on_the_source(hosts):
    agents, _, _ = hosts
    vsp1, vsp2 = agents["vsp1"], agents["vsp2"]
    name, volume = running_guest_with_disk(vsp1, io_latency_ms=2000)  # I/O Quiesce lasts ~2 s
    guest_id = guest_id_for(name)
    migration_id = unique("move")
    start(vsp1, vsp2, vsp1.client.get_guest(guest_id), migration_id, "off", downtime_ms=300)
    follow(vsp1, migration_id, converged_or_ended)
    quiescing = threading.Thread(target=lambda: vsp1.client.quiesce(migration_id))
    quiescing.start()
    follow(vsp1, migration_id, lambda snapshot: snapshot.state != "copy")

    cancelled = vsp1.client.cancel(migration_id)
    vsp2.client.discard(migration_id)
    quiescing.join()

    assert (cancelled.state, cancelled.failed_phase) == ("cancelled", "quiesce"), cancelled
    assert cancelled.io_outstanding and cancelled.io_outstanding > 0, "it had I/O in flight"
    before = vsp1.client.get_guest(guest_id).workload["disk_writes"]
    assert wait_until(lambda: vsp1.client.get_guest(guest_id).workload["disk_writes"] > before, timeout=15)
    assert [(w.guest_id, w.volume) for w in resources(vsp1).writers if w.volume == volume] == [
        (guest_id, volume)
    ]
    assert not [w for w in resources(vsp2).writers if w.volume == volume]
    assert vsp2.guest(name) is None


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--pool", "san:nfs:/tmp"], "the kind must be shared or local"),
        (["--pool", "san:shared:/no/such/dir"], "is not a directory"),
        (["--pool", "san/a:shared:/tmp"], "the name must be"),
        (["--pool", "san:shared:/tmp", "--pool", "san:local:/tmp"], "pool san is given twice"),
        (["--network", "lan:bridge"], "a bridge network needs NAME:bridge:[<netns>/]<bridge>"),
        (["--network", "lan:vlan"], "the kind must be bridge, user or simulated"),
    ],
)
def test_an_agent_with_a_bad_pool_or_network_refuses_to_start_saying_which(args, words, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    command = [sys.executable, "-m", "hostagent", "--name", "vsp9", "--secret-file", str(secret)]
    done = subprocess.run([*command, "--insecure-http", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and words in done.stderr, done.stderr


def test_a_pool_without_an_identity_gets_one_from_its_marker_the_same_for_every_host(tmp_path):
    first, again = parse_pool(f"san:shared:{tmp_path}", "vsp1"), parse_pool(f"a:shared:{tmp_path}", "vsp2")
    given = parse_pool(f"san:shared:{tmp_path}:san-a-export", "vsp1")
    local = parse_pool(f"scratch:local:{tmp_path}", "vsp1")

    assert first.identity == again.identity == (tmp_path / ".matrixoe-pool").read_text().strip()
    assert given.identity == "san-a-export"
    assert local.identity == f"local-vsp1-{first.identity}"
