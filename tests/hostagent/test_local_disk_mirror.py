"""Live storage migration of a guest whose disk is on a local pool (``local_disks="mirror"``), on real
agents (simulated driver): the target allocates a volume in its own local pool, the source mirrors the
disk over the authenticated data plane while the guest writes it, and the two copies are equal at the
switchover; no room refuses with nothing made; a cancel mid-mirror leaves the source as it was.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentprotocol import IncomingRequest, OutgoingRequest, PhaseLimits, PreparedIncoming
from tests.conftest import wait_until
from tests.hostagent.conftest import (
    AgentFactory,
    RunningAgent,
    follow,
    guest_id_for,
    mount_small_tmpfs,
    outgoing,
    raw_post,
    resources,
    unique,
    wanted_spec,
)
from vms.agent_client import AgentRefused

MIB = 1 << 20
PREFILL_AT = 16 * MIB  # beyond the blocks the guest's workload writes during a test (from offset 0)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory):
    """vsp1 has local pool ``scratch``, vsp2 local pool ``fast`` (another name: the target picks its
    own), vsp3 a local pool on /dev/shm (a file system smaller than /tmp)."""
    factory = AgentFactory(tmp_path_factory.mktemp("agents"))
    pools = {name: tmp_path_factory.mktemp(f"{name}-local") for name in ("vsp1", "vsp2")}
    small = Path("/dev/shm")  # noqa: S108 - a smaller file system than /tmp; the directory is removed after
    shm = small / f"matrixoe-test-{secrets.token_hex(4)}"
    shm.mkdir()
    pools["vsp3"] = shm
    agents = {
        "vsp1": factory("vsp1", "--pool", f"scratch:local:{pools['vsp1']}", "--network", "prod:simulated"),
        "vsp2": factory("vsp2", "--pool", f"fast:local:{pools['vsp2']}", "--network", "prod:simulated"),
        "vsp3": factory("vsp3", "--pool", f"tiny:local:{shm}", "--network", "prod:simulated"),
    }
    yield agents, pools
    factory.stop_all()
    for path in shm.iterdir():
        path.unlink()
    shm.rmdir()


def define_on_local_disk(
    agent: RunningAgent, pool_dir: Path, size: int, prefill: bytes = b"", at: int = PREFILL_AT
) -> tuple[str, str]:
    """A guest with one disk of ``size`` bytes on the local pool ``scratch``, ``prefill`` written into it
    at ``PREFILL_AT`` (an image's data), then started: its workload writes the disk."""
    name, volume = unique("db"), unique("vol")
    body = {
        "guest_id": guest_id_for(name),
        "name": name,
        "memory_mib": 16,
        "dirty_pages_per_s": 200,
        "io_latency_ms": 20,
        "disks": [
            {"device": "vda", "pool": "scratch", "volume": volume, "virtual_size_bytes": size, "create": True}
        ],
        "nics": [
            {"network": "prod", "mac": "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))}
        ],
    }
    headers = {"Authorization": f"Bearer {agent.secret}"}
    answer = httpx.put(
        f"{agent.url}/v1/guests/{body['guest_id']}",
        json=body,
        headers=headers,
        verify=agent.verify,
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    if prefill:
        with open(pool_dir / volume, "r+b") as image:
            image.seek(at)
            image.write(prefill)
    agent.client.start_guest(guest_id_for(name))
    return name, volume


def prepare_mirror(
    target: RunningAgent, source: RunningAgent, name: str, migration_id: str
) -> PreparedIncoming:
    guest = source.client.get_guest(guest_id_for(name))
    request = IncomingRequest(
        migration_id=migration_id, guest=wanted_spec(guest), limits=PhaseLimits(), local_disks="mirror"
    )
    return target.client.prepare_incoming(request)


def start_mirror(
    source: RunningAgent, target: RunningAgent, name: str, migration_id: str, **params: Any
) -> None:
    prepared = prepare_mirror(target, source, name, migration_id)
    request: OutgoingRequest = outgoing(guest_id_for(name), migration_id, prepared.endpoint(), **params)
    source.client.start_outgoing(request.model_copy(update={"local_disks": "mirror"}))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk_writes(agent: RunningAgent, name: str) -> int:
    return agent.client.get_guest(guest_id_for(name)).workload["disk_writes"]


def test_a_guest_writing_its_local_disk_moves_with_the_mirror_and_both_copies_are_equal(hosts):
    agents, pools = hosts
    vsp1, vsp2 = agents["vsp1"], agents["vsp2"]
    image = secrets.token_bytes(8 * MIB)
    name, volume = define_on_local_disk(vsp1, pools["vsp1"], 64 * MIB, image)
    assert wait_until(lambda: disk_writes(vsp1, name) > 5, timeout=10)
    writers_seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def watch_writers() -> None:  # both hosts' own records, as the soak's invariant reads them
        while not stop.is_set():
            writers_seen.append(
                tuple(sum(w.volume == volume for w in resources(a).writers) for a in (vsp1, vsp2))
            )  # type: ignore[arg-type]

    watcher = threading.Thread(target=watch_writers)
    watcher.start()
    try:
        migration_id = unique("move")
        start_mirror(vsp1, vsp2, name, migration_id, downtime_ms=300, bandwidth_mbps=64)  # ~1 s of disk
        writes_at_start = disk_writes(vsp1, name)
        seen = follow(vsp1, migration_id, lambda s: s.converged or s.state not in ("init", "copy"))
        assert seen[-1].converged, seen[-1]
        vsp1.client.quiesce(migration_id)
        frozen = vsp1.client.freeze(migration_id)
        assert frozen.state == "ready", frozen
        writes_during = disk_writes(vsp1, name) - writes_at_start
        copy = pools["vsp2"] / volume
        source_digest, target_digest = sha256(pools["vsp1"] / volume), sha256(copy)
        vsp2.client.resume(migration_id)
        released = vsp1.client.release(migration_id)
        assert wait_until(lambda: disk_writes(vsp2, name) > 5, timeout=10)
    finally:
        stop.set()
        watcher.join()

    assert writes_during > 0, "the guest wrote its disk during the mirror"
    assert source_digest == target_digest, "the target's disk equals the source's at the switchover"
    assert copy.stat().st_blocks * 512 < 64 * MIB, "zero blocks were not sent: the copy is sparse"
    during_disk = [s for s in seen if s.disk_bytes_sent > 0 and s.bytes_sent == 0]
    assert during_disk, "Copy showed the disk's bytes before the memory's"
    last = frozen
    assert last.disk_bytes_total >= len(image) and last.disk_bytes_sent >= len(image), last
    assert last.disk_mirror_ready and last.disk_bytes_remaining == 0 and last.bytes_sent > 0, last
    assert any(0 < s.percent["copy"] < 100 and s.bytes_sent == 0 for s in seen), (
        "the percentage counts the disk"
    )
    moved = vsp2.client.get_guest(guest_id_for(name))
    assert (moved.disks[0].pool, moved.disks[0].volume) == ("fast", volume)
    assert all(sum(counts) <= 1 for counts in writers_seen), "two writers at once"
    assert writers_seen[-1] == (0, 1), "only the target writes now"
    assert released.disks_deleted == ["vda"], released
    assert not (pools["vsp1"] / volume).exists(), "the source's volume goes once the target runs the guest"


def test_a_target_without_room_for_the_disks_virtual_size_is_refused_with_nothing_made(hosts):
    agents, pools = hosts
    vsp1, vsp3 = agents["vsp1"], agents["vsp3"]
    stat = os.statvfs(pools["vsp3"])
    size = stat.f_bavail * stat.f_frsize + (1 << 30)  # 1 GiB more than vsp3's pool has; sparse on vsp1
    name, _ = define_on_local_disk(vsp1, pools["vsp1"], size)
    before = sorted(path.name for path in pools["vsp3"].iterdir())

    with pytest.raises(AgentRefused) as refused:
        prepare_mirror(vsp3, vsp1, name, unique("move"))

    assert refused.value.status == 409
    assert f"no local pool on vsp3 has room for {name}'s disk vda ({size} bytes virtual)" in str(
        refused.value
    )
    assert sorted(path.name for path in pools["vsp3"].iterdir()) == before, "no volume created"
    assert vsp3.guest(name) is None
    assert vsp1.client.get_guest(guest_id_for(name)).migrating is None


def test_a_cancel_mid_mirror_leaves_the_guest_writing_on_the_source_and_removes_the_targets_volume(hosts):
    agents, pools = hosts
    vsp1, vsp2 = agents["vsp1"], agents["vsp2"]
    image = secrets.token_bytes(16 * MIB)
    name, volume = define_on_local_disk(vsp1, pools["vsp1"], 64 * MIB, image)
    migration_id = unique("move")
    start_mirror(vsp1, vsp2, name, migration_id, bandwidth_mbps=16)  # 2 MB/s: the mirror lasts ~8 s
    assert (pools["vsp2"] / volume).exists(), "the target allocated the volume"
    follow(vsp1, migration_id, lambda s: s.disk_bytes_sent > 0 or s.state not in ("init", "copy"))

    cancelled = vsp1.client.cancel(migration_id)
    vsp2.client.discard(migration_id)

    assert cancelled.state == "cancelled" and not cancelled.disk_mirror_ready, cancelled
    assert 0 < cancelled.disk_bytes_sent < len(image), "cancelled in the middle of the mirror"
    before = disk_writes(vsp1, name)
    assert wait_until(lambda: disk_writes(vsp1, name) > before, timeout=15), "the guest writes on the source"
    with open(pools["vsp1"] / volume, "rb") as source:
        source.seek(PREFILL_AT)
        assert source.read(len(image)) == image, "the source's data untouched by the attempt"
    assert not (pools["vsp2"] / volume).exists(), "the target's new volume is deleted"
    assert vsp2.guest(name) is None
    assert [w.guest_id for w in resources(vsp1).writers if w.volume == volume] == [guest_id_for(name)]


def test_an_unknown_local_disks_value_is_refused_and_nothing_is_allocated(hosts):
    agents, pools = hosts
    vsp1, vsp2 = agents["vsp1"], agents["vsp2"]
    name, volume = define_on_local_disk(vsp1, pools["vsp1"], 64 * MIB)
    spec = wanted_spec(vsp1.client.get_guest(guest_id_for(name))).model_dump(mode="json")
    body = {"migration_id": unique("move"), "guest": spec, "local_disks": "copy"}

    answer = raw_post(vsp2, "/v1/migrations/incoming", body)

    assert answer.status_code == 400 and "local_disks" in answer.text, answer.text
    assert not (pools["vsp2"] / volume).exists() and vsp2.guest(name) is None


@pytest.fixture
def small_pool(agent_factory: AgentFactory, tmp_path: Path):
    """vsp4 with local pool ``tiny``: a 32 MiB tmpfs of its own (a real file system that fills up).
    Mounting needs root; without it the test is skipped (it says so)."""
    mount_point = tmp_path / "tiny"
    mount_small_tmpfs(mount_point, 32)
    try:
        yield (
            agent_factory("vsp4", "--pool", f"tiny:local:{mount_point}", "--network", "prod:simulated"),
            mount_point,
        )
    finally:
        agent_factory.stop_all()
        subprocess.run(["umount", str(mount_point)], check=False)  # noqa: S607


def test_a_target_pool_filling_up_during_the_mirror_aborts_saying_so_and_the_source_runs_on(
    hosts, small_pool
):
    agents, pools = hosts
    vsp1, (vsp4, tiny) = agents["vsp1"], small_pool
    image = secrets.token_bytes(16 * MIB)
    name, volume = define_on_local_disk(vsp1, pools["vsp1"], 24 * MIB, image, at=4 * MIB)
    migration_id = unique("move")
    prepared = prepare_mirror(vsp4, vsp1, name, migration_id)  # 24 MiB fit in 32 MiB
    (tiny / "other-guest").write_bytes(bytes(20 * MIB))  # then another user of the pool takes 20 MiB
    request = outgoing(guest_id_for(name), migration_id, prepared.endpoint())
    vsp1.client.start_outgoing(request.model_copy(update={"local_disks": "mirror"}))

    ended = follow(vsp1, migration_id, lambda s: s.state not in ("init", "copy"))[-1]

    assert (ended.state, ended.failed_side) == ("aborted", "target"), ended
    assert "vsp4's pool tiny ran out of space at " in (ended.error or "") and "of 24 MiB" in ended.error, (
        ended
    )
    assert f"{name}'s disk vda" in ended.error
    before = disk_writes(vsp1, name)
    assert wait_until(lambda: disk_writes(vsp1, name) > before, timeout=15), "the guest writes on the source"
    with open(pools["vsp1"] / volume, "rb") as source:
        source.seek(4 * MIB)
        assert source.read(len(image)) == image, "the source's data untouched by the attempt"
    assert wait_until(lambda: not (tiny / volume).exists(), timeout=10), "the target's new volume is deleted"
    assert vsp4.guest(name) is None


def test_a_target_killed_mid_mirror_removes_the_volume_it_allocated_when_it_starts_again(
    hosts, agent_factory, tmp_path
):
    agents, pools = hosts
    vsp1 = agents["vsp1"]
    pool = tmp_path / "vsp5-local"
    pool.mkdir()
    args = ("--pool", f"fast:local:{pool}", "--network", "prod:simulated")
    vsp5 = agent_factory("vsp5", *args)
    image = secrets.token_bytes(16 * MIB)
    name, volume = define_on_local_disk(vsp1, pools["vsp1"], 64 * MIB, image)
    migration_id = unique("move")
    start_mirror(vsp1, vsp5, name, migration_id, bandwidth_mbps=16)  # 2 MB/s: the mirror lasts ~8 s
    follow(vsp1, migration_id, lambda s: s.disk_bytes_sent > 0 or s.state not in ("init", "copy"))

    vsp5.kill()
    ended = follow(vsp1, migration_id, lambda s: s.state not in ("init", "copy"))[-1]
    assert (pool / volume).exists(), "the killed agent left its half copy behind"
    agent_factory("vsp5", *args)

    assert ended.state == "aborted" and ended.failure_kind == "unreachable", ended
    assert not (pool / volume).exists(), "the restarted agent removed the volume of the unknown migration"
    assert not list(pool.glob(".*matrixoe-mirror")), "and its marker"
    before = disk_writes(vsp1, name)
    assert wait_until(lambda: disk_writes(vsp1, name) > before, timeout=15), "the guest writes on the source"
    with open(pools["vsp1"] / volume, "rb") as source:
        source.seek(PREFILL_AT)
        assert source.read(len(image)) == image, "the source's data untouched by the attempt"
