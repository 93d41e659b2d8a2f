"""The OS image guest on the qemu driver: its own disk on a shared pool, a network card, a real workload.

Two real host agents run the qemu driver, both given one pool directory (``--pool san:shared:DIR``:
a shared pool) and a network ``lan``: a bridge inside a network namespace this module creates (root
is needed; on a machine without it the module falls back to QEMU's user-mode networking and prints
so). Each guest is defined through the API with its boot disk, a copy of
``guest-images/guest-os.qcow2`` (``scripts/build_guest_image.sh``) in the pool, and a virtio network
card on ``lan``. guestload, the image's workload, keeps writing its memory and sequence-numbered disk
blocks and sends a UDP heartbeat every 10 ms to vsp2's agent, which listens (``heartbeat_listen``)
and reports the network blackout of each switchover it takes part in; asked over its command port,
guestload checks all its memory and every block it wrote.

What QEMU guarantees about the single writer is read from the kernel, not from QEMU: the OFD locks
each QEMU holds on the image (``/proc/<pid>/fdinfo``, ``hostagent.drivers.qemu.storage``). Nothing
here is faked. Skipped loudly without QEMU >= 10 or the image (CI builds both).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentprotocol import GuestInfo, GuestSpec, StopRequest
from hostagent.drivers.qemu.guestload import SelfCheck, request_selfcheck
from hostagent.drivers.qemu.network import NetworkError, create_isolated_network, delete_isolated_network
from hostagent.drivers.qemu.quiesce import io_quiesce, read_trace
from hostagent.drivers.qemu.storage import create_volume, image_holders, image_writers
from tests.conftest import free_port, wait_until
from tests.hostagent.conftest import (
    AgentFactory,
    RunningAgent,
    converged_or_ended,
    follow,
    guest_id_for,
    prepare,
    resources,
    start,
    unique,
)
from tests.qemu_guest import OS_IMAGE, needs_os_image, runs_intact, workload
from vms.agent_client import AgentRefused

pytestmark = needs_os_image

GUEST = {"memory_mib": 256, "vcpus": 1, "os_type": "Linux", "dirty_pages_per_s": 2000}


@dataclass
class Lab:
    source: RunningAgent
    target: RunningAgent  # listens to the guests' heartbeats (``heartbeat_listen``)
    pool: Path
    network: str  # "bridge" (a tap on a bridge in a network namespace) or "user" (QEMU's NAT)
    factory: AgentFactory
    args: list[str]  # the agents' arguments, but for run_dir and heartbeat_listen


def agent_args(pool: Path, network: str, options: list[str]) -> list[str]:
    args = ["--pool", f"san:shared:{pool}", "--network", network]
    return args + [argument for option in options for argument in ("--driver-option", option)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    pool = tmp_path_factory.mktemp("shared-pool")
    run_dir = tmp_path_factory.mktemp("qemu-run")
    netns: str | None = f"mxt-{secrets.token_hex(3)}"
    try:
        bridge = create_isolated_network(netns, "br0", "10.77.0.1/24")
        port = free_port()  # a fresh namespace: any port is free there
        network = f"lan:bridge:{netns}/br0"
        options = ["guest_subnet=10.77.0.0/24", f"heartbeat={bridge.host_address}:{port}"]
        listen = f"heartbeat_listen={netns}/{bridge.host_address}:{port}"
    except NetworkError as error:
        print(f"no bridge in a network namespace here ({error}); QEMU's user-mode networking instead")
        netns, port = None, free_port()
        network, options, listen = (
            "lan:user",
            [f"heartbeat=10.0.2.2:{port}"],
            f"heartbeat_listen=127.0.0.1:{port}",
        )
    args = agent_args(pool, network, options)
    factory = AgentFactory(tmp_path_factory.mktemp("qemu-agents"))
    try:
        source = factory("vsp1", *args, "--driver-option", f"run_dir={run_dir / 'vsp1'}", driver="qemu")
        target = factory(
            "vsp2",
            *args,
            "--driver-option",
            f"run_dir={run_dir / 'vsp2'}",
            "--driver-option",
            listen,
            driver="qemu",
        )
        yield Lab(source, target, pool, "bridge" if netns else "user", factory, args)
    finally:
        factory.stop_all()
        if netns:
            delete_isolated_network(netns)


def boot(lab: Lab, agent: RunningAgent) -> GuestInfo:
    """A running image guest on ``agent``, defined through the API with its boot disk (a copy of the OS
    image in the shared pool) and a card on ``lan``, whose checks passed once and who sends heartbeats."""
    name = unique("os")
    guest_id = guest_id_for(name)
    create_volume(OS_IMAGE, lab.pool / f"{guest_id}.qcow2")
    mac = "52:54:00:" + ":".join(f"{byte:02x}" for byte in secrets.token_bytes(3))
    vda = {
        "device": "vda",
        "pool": "san",
        "volume": f"{guest_id}.qcow2",
        "virtual_size_bytes": 1,
        "boot": True,
    }
    spec = {
        "guest_id": guest_id,
        "name": name,
        **GUEST,
        "disks": [vda],
        "nics": [{"network": "lan", "mac": mac}],
    }
    agent.client.define_guest(GuestSpec.model_validate({**spec, "running": True}))

    def up() -> bool:
        now = workload(agent, name)
        return now["selfchecks_passed"] >= 1 and now["heartbeats_sent"] > 10

    assert wait_until(up, timeout=120), Path(workload(agent, name)["serial_log"]).read_text(errors="replace")
    return agent.client.get_guest(guest_id)


def selfcheck(agent: RunningAgent, name: str, tag: str) -> SelfCheck:
    return asyncio.run(request_selfcheck(Path(workload(agent, name)["command_port"]), tag))


def disk_writes_advance(agent: RunningAgent, name: str) -> bool:
    before = workload(agent, name)["disk_writes"]
    return wait_until(lambda: workload(agent, name)["disk_writes"] > before + 50, timeout=30)


def locks_of(volume: Path, pid: int) -> set[int]:
    return {byte for holder in image_holders(volume, [pid]) for byte in holder.lock_bytes}


def move(lab: Lab, source: RunningAgent, target: RunningAgent, guest: GuestInfo) -> dict[str, Any]:
    """Migrate ``guest`` and commit, checking the single writer on the way; figures of the move."""
    volume = lab.pool / f"{guest.guest_id}.qcow2"
    source_pid = workload(source, guest.name)["pid"]
    source_trace = Path(workload(source, guest.name)["trace_log"])
    assert image_writers(volume) == [source_pid]
    migration_id = unique("move")
    started = time.time()

    # 50 MB/s: a few seconds of Copy, long enough to look at the incoming side.
    start(source, target, guest, migration_id, downtime_ms=300, bandwidth_mbps=400)
    follow(source, migration_id, lambda snapshot: snapshot.state != "init")
    target_pid = workload(target, guest.name)["pid"]
    assert image_holders(volume, [target_pid]), "the incoming QEMU opens the same image"
    assert locks_of(volume, target_pid) == set(), "the incoming QEMU holds no lock on the image in Copy"
    assert image_writers(volume) == [source_pid]

    follow(source, migration_id, converged_or_ended)
    source.client.quiesce(migration_id)
    ready = source.client.freeze(migration_id)
    assert ready.state == "ready", ready
    assert image_writers(volume) == [], "after the switchover the source stopped writing; the target waits"
    assert locks_of(volume, target_pid) == set(), "the paused target has not taken the image yet"

    resumed = target.client.resume(migration_id)
    released = source.client.release(migration_id)
    assert image_writers(volume) == [target_pid]
    assert not image_holders(volume, [source_pid]), "the released source's QEMU holds nothing of the image"
    volume_writers = {agent.name: [w.pid for w in resources(agent).writers] for agent in (source, target)}
    assert volume_writers == {source.name: [], target.name: [target_pid]}, "as the agents record it"

    target_trace = Path(workload(target, guest.name)["trace_log"])
    blackout_ms = (resumed if target is lab.target else released).network_blackout_ms
    quiesce = io_quiesce(source_trace, after=started)
    announced = [line for line in read_trace(target_trace) if line.event == "qemu_announce_self_iter"]
    return {"ready": ready, "blackout_ms": blackout_ms, "quiesce": quiesce, "announced": announced}


def test_an_image_guest_moves_with_its_shared_disk_and_network_and_its_self_check_passes_after_each_move(lab):
    vsp1, vsp2 = lab.source, lab.target
    guest = boot(lab, vsp1)
    name = guest.name

    there = move(lab, vsp1, vsp2, guest)
    check = selfcheck(vsp2, name, "after-move-1")
    assert check.ok and int(check.fields["blocks"]) > 0, check.line
    assert disk_writes_advance(vsp2, name)
    assert runs_intact(vsp2, name)

    back = move(lab, vsp2, vsp1, vsp2.client.get_guest(guest.guest_id))
    check = selfcheck(vsp1, name, "after-move-2")
    assert check.ok and int(check.fields["blocks"]) > 0, check.line
    assert disk_writes_advance(vsp1, name)

    for figures in (there, back):
        ready, quiesce, blackout_ms = figures["ready"], figures["quiesce"], figures["blackout_ms"]
        assert quiesce is not None and quiesce.completed_in_drain == quiesce.outstanding, quiesce
        assert quiesce.flushed_ms is not None and quiesce.requests_traced > 0, quiesce
        assert (ready.io_outstanding, ready.io_drain_ms) == (quiesce.outstanding, quiesce.drain_ms), ready
        assert blackout_ms is not None and blackout_ms >= ready.downtime_ms, "silent at least while frozen"
        assert figures["announced"], "the target QEMU announced the guest's MAC after resuming"
        print(
            f"\n{lab.network} networking: downtime {ready.downtime_ms} ms (QEMU's), network "
            f"blackout {blackout_ms} ms, I/O quiesce: {quiesce.outstanding} request(s) outstanding at the "
            f"stop, drained in {quiesce.drain_ms} ms, flushed after {quiesce.flushed_ms} ms"
        )
    assert "I/O quiesce:" in vsp1.log() and "I/O quiesce:" in vsp2.log()
    assert workload(vsp1, name)["selfchecks_failed"] == 0


def test_an_abort_in_copy_leaves_the_image_guest_running_and_writing_on_its_source(lab):
    vsp1, vsp2 = lab.source, lab.target
    guest = boot(lab, vsp1)
    name = guest.name
    volume = lab.pool / f"{guest.guest_id}.qcow2"
    source_pid = workload(vsp1, name)["pid"]
    migration_id = unique("abort")

    # 10 MB/s against a Copy limit of 3 s: 256 MiB cannot make it, the source aborts in Copy.
    start(vsp1, vsp2, guest, migration_id, bandwidth_mbps=80, limits={"copy_s": 3})
    ended = follow(vsp1, migration_id, lambda snapshot: snapshot.state not in ("init", "copy"))[-1]
    vsp2.client.discard(migration_id)

    assert (ended.state, ended.failed_phase) == ("aborted", "copy"), ended
    assert vsp2.guest(name) is None
    assert image_writers(volume) == [source_pid], "the source's QEMU still holds the image for writing"
    assert disk_writes_advance(vsp1, name)
    check = selfcheck(vsp1, name, "after-abort")
    assert check.ok and int(check.fields["blocks"]) > 0, check.line
    assert runs_intact(vsp1, name)

    # The image's init powers off on the ACPI power button (the test guest ignores it).
    stopped = vsp1.client.stop_guest(guest.guest_id, StopRequest(graceful_timeout_s=60))
    assert stopped.stop == "shut_down", stopped
    assert image_holders(volume) == []


def test_a_target_that_does_not_see_the_guests_disk_refuses_the_migration_and_keeps_nothing(
    lab, tmp_path: Path
):
    other_pool = tmp_path / "not-shared"
    other_pool.mkdir()  # also called san on vsp3, but not the same storage
    args = [f"san:shared:{other_pool}" if arg.startswith("san:shared:") else arg for arg in lab.args]
    vsp3 = lab.factory("vsp3", *args, "--driver-option", f"run_dir={tmp_path / 'run'}", driver="qemu")
    name = unique("os")
    guest_id = guest_id_for(name)
    identity = next(pool.identity for pool in resources(lab.source).pools if pool.name == "san")
    vda = {"device": "vda", "pool": "san", "volume": f"{guest_id}.qcow2", "virtual_size_bytes": 1 << 30}
    guest = {"guest_id": guest_id, "name": name, **GUEST, "disks": [{**vda, "pool_identity": identity}]}

    with pytest.raises(AgentRefused) as refused:
        prepare(vsp3, guest, unique("m"))

    assert refused.value.status == 409
    assert f"vsp3 does not mount pool san: {name}'s disk vda" in refused.value.message
    assert vsp3.guest(name) is None


def test_a_new_disk_is_made_by_qemu_img_and_a_bad_definition_makes_nothing(lab):
    vsp1 = lab.source
    name = unique("blank")
    guest_id = guest_id_for(name)
    vdb = {
        "device": "vdb",
        "pool": "san",
        "volume": f"{name}.qcow2",
        "virtual_size_bytes": 1 << 30,
        "create": True,
    }
    info = vsp1.client.define_guest(
        GuestSpec.model_validate({"guest_id": guest_id, "name": name, **GUEST, "disks": [vdb]})
    )

    (disk,) = info.disks
    assert (lab.pool / f"{name}.qcow2").read_bytes()[:4] == b"QFI\xfb", "a qcow2 image"
    assert disk.virtual_size_bytes == 1 << 30 and disk.allocated_bytes < 1 << 20, disk
    before = sorted(path.name for path in lab.pool.iterdir())
    for bad, words in (
        ({**vdb, "create": False}, f"volume {name}.qcow2 in pool san is used by guest {name}"),
        ({**vdb, "volume": "other.qcow2", "bus": "sata"}, "virtio disks only, not sata"),
        ({**vdb, "volume": "other.qcow2", "pool": "nfs"}, "no storage pool nfs"),
    ):
        other = unique("bad")
        with pytest.raises(AgentRefused) as refused:
            vsp1.client.define_guest(
                GuestSpec.model_validate(
                    {"guest_id": guest_id_for(other), "name": other, **GUEST, "disks": [bad]}
                )
            )
        assert words in refused.value.message
        assert vsp1.guest(other) is None
    assert sorted(path.name for path in lab.pool.iterdir()) == before, "nothing created"
    vsp1.client.delete_guest(guest_id)
