"""The OS image guest on the qemu driver: its own disk on a shared pool, a network card, a real workload.

Two real host agents run the qemu driver with the options that make every guest boot from its own
copy of ``guest-images/guest-os.qcow2`` (``scripts/build_guest_image.sh``) in one pool directory
both agents are given: a shared pool. Each guest has a virtio network card on a bridge inside a
network namespace this module creates (root is needed; on a machine without it the module falls back
to QEMU's user-mode networking and prints so). guestload, the image's workload, keeps writing its
memory and sequence-numbered disk blocks and sends a UDP heartbeat every 10 ms to a listener on the
bridge; asked over its command port, it checks all its memory and every block it wrote.

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

from hostagent.drivers.qemu.guestload import SelfCheck, request_selfcheck
from hostagent.drivers.qemu.network import (
    HeartbeatListener,
    NetworkError,
    create_isolated_network,
    delete_isolated_network,
    network_blackout,
)
from hostagent.drivers.qemu.quiesce import io_quiesce, read_trace, state_changes
from hostagent.drivers.qemu.storage import image_holders, image_writers
from tests.conftest import wait_until
from tests.hostagent.conftest import (
    AgentFactory,
    RunningAgent,
    converged_or_ended,
    follow,
    guest_id_for,
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
    target: RunningAgent
    pool: Path
    listener: HeartbeatListener
    network: str  # "bridge" (a tap on a bridge in a network namespace) or "user" (QEMU's NAT)
    factory: AgentFactory
    options: list[str]  # the agents' --driver-option values, but for run_dir


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    pool = tmp_path_factory.mktemp("shared-pool")
    run_dir = tmp_path_factory.mktemp("qemu-run")
    netns: str | None = f"mxt-{secrets.token_hex(3)}"
    try:
        bridge = create_isolated_network(netns, "br0", "10.77.0.1/24")
        listener = HeartbeatListener(bridge.host_address, 0, netns=netns)
        network = ["network=bridge:" + f"{netns}/br0", "guest_subnet=10.77.0.0/24"]
        network.append(f"heartbeat={bridge.host_address}:{listener.address[1]}")
    except NetworkError as error:
        print(f"no bridge in a network namespace here ({error}); QEMU's user-mode networking instead")
        netns = None
        listener = HeartbeatListener("127.0.0.1", 0)
        network = ["network=user", f"heartbeat=10.0.2.2:{listener.address[1]}"]
    options = [f"boot_image={OS_IMAGE}", f"pool={pool}", *network]
    factory = AgentFactory(tmp_path_factory.mktemp("qemu-agents"))
    try:
        source, target = (
            factory(
                name,
                "--driver-option",
                f"run_dir={run_dir / name}",
                *[argument for option in options for argument in ("--driver-option", option)],
                driver="qemu",
            )
            for name in ("vsp1", "vsp2")
        )
        yield Lab(source, target, pool, listener, "bridge" if netns else "user", factory, options)
    finally:
        factory.stop_all()
        listener.close()
        if netns:
            delete_isolated_network(netns)


def boot(lab: Lab, agent: RunningAgent) -> dict[str, Any]:
    """A running image guest on ``agent`` whose checks passed once and whose heartbeats arrive."""
    name = unique("os")
    guest_id = guest_id_for(name)
    agent.client.define_guest({"guest_id": guest_id, "name": name, **GUEST, "running": True})

    def up() -> bool:
        return workload(agent, name)["selfchecks_passed"] >= 1 and len(lab.listener.heartbeats(guest_id)) > 10

    assert wait_until(up, timeout=120), Path(workload(agent, name)["serial_log"]).read_text(errors="replace")
    return agent.client.get_guest(guest_id)


def selfcheck(agent: RunningAgent, name: str, tag: str) -> SelfCheck:
    return asyncio.run(request_selfcheck(Path(workload(agent, name)["command_port"]), tag))


def disk_writes_advance(agent: RunningAgent, name: str) -> bool:
    before = workload(agent, name)["disk_writes"]
    return wait_until(lambda: workload(agent, name)["disk_writes"] > before + 50, timeout=30)


def locks_of(volume: Path, pid: int) -> set[int]:
    return {byte for holder in image_holders(volume, [pid]) for byte in holder.lock_bytes}


def move(lab: Lab, source: RunningAgent, target: RunningAgent, guest: dict[str, Any]) -> dict[str, Any]:
    """Migrate ``guest`` and commit, checking the single writer on the way; figures of the move."""
    volume = lab.pool / f"{guest['guest_id']}.qcow2"
    source_pid = workload(source, guest["name"])["pid"]
    source_trace = Path(workload(source, guest["name"])["trace_log"])
    assert image_writers(volume) == [source_pid]
    migration_id = unique("move")
    started = time.time()

    # 50 MB/s: a few seconds of Copy, long enough to look at the incoming side.
    start(source, target, guest, migration_id, downtime_ms=300, bandwidth_mbps=400)
    follow(source, migration_id, lambda snapshot: snapshot["state"] != "init")
    target_pid = workload(target, guest["name"])["pid"]
    assert image_holders(volume, [target_pid]), "the incoming QEMU opens the same image"
    assert locks_of(volume, target_pid) == set(), "the incoming QEMU holds no lock on the image in Copy"
    assert image_writers(volume) == [source_pid]

    follow(source, migration_id, converged_or_ended)
    source.client.quiesce(migration_id)
    ready = source.client.freeze(migration_id)
    assert ready["state"] == "ready", ready
    assert image_writers(volume) == [], "after the switchover the source stopped writing; the target waits"
    assert locks_of(volume, target_pid) == set(), "the paused target has not taken the image yet"

    target.client.resume(migration_id)
    source.client.release(migration_id)
    assert image_writers(volume) == [target_pid]
    assert not image_holders(volume, [source_pid]), "the released source's QEMU holds nothing of the image"

    target_trace = Path(workload(target, guest["name"])["trace_log"])
    stopped_at = state_changes(read_trace(source_trace), "finish-migrate")[-1]
    assert wait_until(lambda: len(lab.listener.heartbeats(guest["guest_id"])) > 0, timeout=5)
    assert wait_until(lambda: bool(state_changes(read_trace(target_trace), "running")), timeout=5)
    resumed_at = state_changes(read_trace(target_trace), "running")[-1]
    assert wait_until(
        lambda: any(beat.arrived > resumed_at + 1 for beat in lab.listener.heartbeats(guest["guest_id"])),
        timeout=10,
    ), "heartbeats come from the target after the switchover"
    blackout = network_blackout(lab.listener.heartbeats(guest["guest_id"]), stopped_at, resumed_at)
    quiesce = io_quiesce(source_trace, after=started)
    announced = [line for line in read_trace(target_trace) if line.event == "qemu_announce_self_iter"]
    return {"ready": ready, "blackout": blackout, "quiesce": quiesce, "announced": announced}


def test_an_image_guest_moves_with_its_shared_disk_and_network_and_its_self_check_passes_after_each_move(lab):
    vsp1, vsp2 = lab.source, lab.target
    guest = boot(lab, vsp1)
    name = guest["name"]

    there = move(lab, vsp1, vsp2, guest)
    check = selfcheck(vsp2, name, "after-move-1")
    assert check.ok and int(check.fields["blocks"]) > 0, check.line
    assert disk_writes_advance(vsp2, name)
    assert runs_intact(vsp2, name)

    back = move(lab, vsp2, vsp1, vsp2.client.get_guest(guest["guest_id"]))
    check = selfcheck(vsp1, name, "after-move-2")
    assert check.ok and int(check.fields["blocks"]) > 0, check.line
    assert disk_writes_advance(vsp1, name)

    for figures in (there, back):
        blackout, quiesce = figures["blackout"], figures["quiesce"]
        assert blackout.first_from_target is not None and blackout.repeated == 0, blackout
        assert quiesce is not None and quiesce.completed_in_drain == quiesce.outstanding, quiesce
        assert quiesce.flushed_ms is not None and quiesce.requests_traced > 0, quiesce
        assert figures["announced"], "the target QEMU announced the guest's MAC after resuming"
        print(
            f"\n{lab.network} networking: downtime {figures['ready']['downtime_ms']} ms (QEMU's), network "
            f"blackout {blackout.gap_ms} ms ({blackout.lost} heartbeats lost), I/O quiesce: "
            f"{quiesce.outstanding} request(s) outstanding at the stop, drained in {quiesce.drain_ms} ms, "
            f"flushed after {quiesce.flushed_ms} ms"
        )
    assert "I/O quiesce:" in vsp1.log() and "I/O quiesce:" in vsp2.log()
    assert workload(vsp1, name)["selfchecks_failed"] == 0


def test_an_abort_in_copy_leaves_the_image_guest_running_and_writing_on_its_source(lab):
    vsp1, vsp2 = lab.source, lab.target
    guest = boot(lab, vsp1)
    name = guest["name"]
    volume = lab.pool / f"{guest['guest_id']}.qcow2"
    source_pid = workload(vsp1, name)["pid"]
    migration_id = unique("abort")

    # 10 MB/s against a Copy limit of 3 s: 256 MiB cannot make it, the source aborts in Copy.
    start(vsp1, vsp2, guest, migration_id, bandwidth_mbps=80, limits={"copy_s": 3})
    ended = follow(vsp1, migration_id, lambda snapshot: snapshot["state"] not in ("init", "copy"))[-1]
    vsp2.client.discard(migration_id)

    assert (ended["state"], ended["failed_phase"]) == ("aborted", "copy"), ended
    assert vsp2.guest(name) is None
    assert image_writers(volume) == [source_pid], "the source's QEMU still holds the image for writing"
    assert disk_writes_advance(vsp1, name)
    check = selfcheck(vsp1, name, "after-abort")
    assert check.ok and int(check.fields["blocks"]) > 0, check.line
    assert runs_intact(vsp1, name)

    # The image's init powers off on the ACPI power button (the test guest ignores it).
    stopped = vsp1.client.stop_guest(guest["guest_id"], graceful_timeout_s=60)
    assert stopped["stop"] == "shut_down", stopped
    assert image_holders(volume) == []


def test_a_target_that_does_not_see_the_guests_disk_refuses_the_migration_and_keeps_nothing(
    lab, tmp_path: Path
):
    other_pool = tmp_path / "not-shared"
    other_pool.mkdir()
    options = [option if not option.startswith("pool=") else f"pool={other_pool}" for option in lab.options]
    vsp3 = lab.factory(
        "vsp3",
        "--driver-option",
        f"run_dir={tmp_path / 'run'}",
        *[argument for option in options for argument in ("--driver-option", option)],
        driver="qemu",
    )
    name = unique("os")
    guest = {"guest_id": guest_id_for(name), "name": name, **GUEST}

    with pytest.raises(AgentRefused) as refused:
        vsp3.client.prepare_incoming(
            {key: guest[key] for key in ("guest_id", "name", "memory_mib", "vcpus", "os_type")}, unique("m")
        )

    assert refused.value.status == 409
    assert f"does not see the disk of {name!r}" in refused.value.message
    assert str(other_pool / f"{guest['guest_id']}.qcow2") in refused.value.message
    assert vsp3.guest(name) is None
