"""The qemu driver under real host agents: real QEMU processes (TCG) running a real Linux guest.

The guest (``scripts/build_test_guest.sh``) boots Debian's cloud kernel into memwriter, which keeps
writing its memory at a set rate and checks all of it every couple of seconds, printing ``alive`` and
``selfcheck ok|FAIL`` on its serial console; the driver reports those lines under ``workload``.
Nothing here is faked. Skipped (loudly) without QEMU >= 10 or the guest image; CI installs both.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from hostagent.protocol import PHASES
from tests.conftest import wait_until
from tests.hostagent.conftest import (
    AgentFactory,
    RunningAgent,
    converged_or_ended,
    follow,
    guest_id_for,
    unique,
)
from tests.hostagent.conftest import start as start_with_policy
from tests.qemu_guest import needs_qemu, runs_intact, workload

pytestmark = needs_qemu


def start(*args: Any, **params: Any) -> dict[str, Any]:
    """The QEMU driver cannot encrypt its migration stream yet: its pairs run with the policy off."""
    return start_with_policy(*args, encryption="off", **params)


GUEST = {"memory_mib": 256, "vcpus": 1, "os_type": "Linux"}
BUSY_PAGES_PER_S = 5000  # 20 MB/s of writes into 160 MiB
SLOW_LINK_MBPS = 160  # 20 MB/s: the first pass of 256 MiB takes ~13 s, time to act during Copy


@pytest.fixture(scope="module")
def qemu_hosts(tmp_path_factory: pytest.TempPathFactory):
    factory = AgentFactory(tmp_path_factory.mktemp("qemu-agents"))
    run_dir = tmp_path_factory.mktemp("qemu-run")
    hosts = [
        factory(name, "--driver-option", f"run_dir={run_dir / name}", driver="qemu")
        for name in ("vsp1", "vsp2")
    ]
    yield hosts
    factory.stop_all()


def boot_busy_guest(agent: RunningAgent, pages_per_s: int = BUSY_PAGES_PER_S) -> dict[str, Any]:
    name = unique("linux")
    guest = agent.client.define_guest(
        {
            "guest_id": guest_id_for(name),
            "name": name,
            **GUEST,
            "dirty_pages_per_s": pages_per_s,
            "running": True,
        }
    )
    assert wait_until(lambda: workload(agent, guest["name"])["selfchecks_passed"] >= 1, timeout=60), Path(
        workload(agent, guest["name"])["serial_log"]
    ).read_text(errors="replace")[-2000:]
    return agent.client.get_guest(guest["guest_id"])


def copying(snapshot: dict[str, Any]) -> bool:
    """In Copy with some memory sent (or already ended): never true while the state is still Init."""
    in_copy = snapshot["state"] == "copy" and snapshot["percent"]["copy"] > 0
    return in_copy or snapshot["state"] not in ("init", "copy")


def assert_phases_in_order_without_going_back(snapshots: list[dict[str, Any]]) -> None:
    phases_seen = [snapshot["phase"] for snapshot in snapshots if snapshot["phase"]]
    order = [PHASES.index(phase) for phase in phases_seen]
    assert order == sorted(order), phases_seen
    for earlier, later in zip(snapshots, snapshots[1:], strict=False):
        for phase in PHASES:
            assert later["percent"][phase] >= earlier["percent"][phase], (phase, earlier, later)


def test_it_migrates_a_busy_linux_guest_that_passes_its_own_memory_check_on_the_target(qemu_hosts):
    vsp1, vsp2 = qemu_hosts
    guest = boot_busy_guest(vsp1)
    migration_id = unique("move")

    start(vsp1, vsp2, guest, migration_id, downtime_ms=300)
    snapshots = follow(vsp1, migration_id, converged_or_ended)
    vsp1.client.quiesce(migration_id)
    ready = vsp1.client.freeze(migration_id)
    snapshots += follow(vsp1, migration_id, lambda snapshot: snapshot["state"] == "ready")

    assert ready["state"] == "ready", ready
    assert (
        ready["source_digest"]
        and ready["source_digest"] == vsp2.client.snapshot(migration_id)["target_digest"]
    )
    assert vsp2.client.get_guest(guest["guest_id"])["os_status"] == "down", "the target must wait, paused"
    vsp2.client.resume(migration_id)
    vsp1.client.release(migration_id)

    assert_phases_in_order_without_going_back(snapshots)
    assert snapshots[-1]["percent"] == {"init": 100, "copy": 100, "quiesce": 100, "frozen": 100}
    assert ready["downtime_ms"] is not None and ready["bytes_sent"] > 0
    assert runs_intact(vsp2, guest["name"])
    serial = Path(workload(vsp2, guest["name"])["serial_log"]).read_text(errors="replace")
    assert "memwriter: selfcheck ok" in serial and "memwriter: alive" in serial and "FAIL" not in serial
    source_copy = vsp1.client.get_guest(guest["guest_id"])
    assert (source_copy["hardware_status"], source_copy["os_status"]) == ("not_runnable", "down")


def test_it_migrates_a_busy_guest_over_two_multifd_channels_and_its_self_check_passes_on_the_target(
    qemu_hosts,
):
    vsp1, vsp2 = qemu_hosts
    guest = boot_busy_guest(vsp1)
    migration_id = unique("multifd")
    wanted = {key: guest[key] for key in ("guest_id", "name", "memory_mib", "vcpus", "os_type")}
    # The pair's stream policy: 2, so both QEMUs get multifd with 2 channels before they start.
    endpoint = vsp2.client.prepare_incoming(wanted, migration_id, {}, "off", 2)
    vsp1.client.start_outgoing(guest["guest_id"], migration_id, endpoint, {"downtime_ms": 300}, "off", 2)
    follow(vsp1, migration_id, converged_or_ended)
    vsp1.client.quiesce(migration_id)
    ready = vsp1.client.freeze(migration_id)

    assert ready["state"] == "ready", ready
    assert ready["streams"] == 2 and vsp2.client.snapshot(migration_id)["streams"] == 2
    assert ready["source_digest"] == vsp2.client.snapshot(migration_id)["target_digest"]
    assert "relaying data connection 3 of 3 (main channel + 2 multifd channels)" in vsp2.log()
    vsp2.client.resume(migration_id)
    vsp1.client.release(migration_id)
    assert runs_intact(vsp2, guest["name"])
    serial = Path(workload(vsp2, guest["name"])["serial_log"]).read_text(errors="replace")
    assert "memwriter: selfcheck ok" in serial and "FAIL" not in serial


def test_it_cancels_during_copy_and_the_guest_keeps_running_on_the_source(qemu_hosts):
    vsp1, vsp2 = qemu_hosts
    guest = boot_busy_guest(vsp1)
    migration_id = unique("cancel")

    start(vsp1, vsp2, guest, migration_id, bandwidth_mbps=SLOW_LINK_MBPS)
    follow(vsp1, migration_id, copying)
    cancelled = vsp1.client.cancel(migration_id)
    vsp2.client.discard(migration_id)

    assert (cancelled["state"], cancelled["failed_phase"]) == ("cancelled", "copy"), cancelled
    assert runs_intact(vsp1, guest["name"])
    assert vsp2.guest(guest["name"]) is None


def test_it_aborts_when_the_target_qemu_dies_during_copy_and_the_guest_keeps_running(qemu_hosts):
    vsp1, vsp2 = qemu_hosts
    guest = boot_busy_guest(vsp1)
    migration_id = unique("crash")

    start(vsp1, vsp2, guest, migration_id, bandwidth_mbps=SLOW_LINK_MBPS)
    follow(vsp1, migration_id, copying)
    os.kill(workload(vsp2, guest["name"])["pid"], signal.SIGKILL)
    aborted = follow(vsp1, migration_id, lambda snapshot: snapshot["state"] not in ("init", "copy"))[-1]

    assert (aborted["state"], aborted["failed_phase"]) == ("aborted", "copy"), aborted
    assert aborted["error"]
    assert runs_intact(vsp1, guest["name"])
    vsp2.client.discard(migration_id)
    assert vsp2.guest(guest["name"]) is None


def test_it_aborts_a_guest_that_cannot_converge_under_a_tight_downtime_limit(qemu_hosts):
    vsp1, vsp2 = qemu_hosts
    guest = boot_busy_guest(vsp1, pages_per_s=20_000)
    migration_id = unique("stuck")

    # 80 MB/s of writes against a 50 MB/s link: each round leaves as much dirty as the last.
    start(
        vsp1,
        vsp2,
        guest,
        migration_id,
        downtime_ms=1,
        bandwidth_mbps=400,
        max_rounds=10_000,
        limits={"copy_s": 10},
    )
    ended = follow(vsp1, migration_id, lambda snapshot: snapshot["state"] not in ("init", "copy"))

    assert (ended[-1]["state"], ended[-1]["failed_phase"]) == ("aborted", "copy"), ended[-1]
    assert "copy phase ran over" in ended[-1]["error"]
    assert max(snapshot["round"] for snapshot in ended) >= 2, "QEMU kept sending rounds of dirty pages"
    assert runs_intact(vsp1, guest["name"])
    vsp2.client.discard(migration_id)


def test_it_refuses_a_target_prepared_with_another_memory_size(qemu_hosts):
    vsp1, vsp2 = qemu_hosts
    guest = boot_busy_guest(vsp1)
    migration_id = unique("size")

    start(vsp1, vsp2, {**guest, "memory_mib": 128}, migration_id)
    ended = follow(vsp1, migration_id, lambda snapshot: snapshot["state"] not in ("init", "copy"))[-1]

    assert (ended["state"], ended["failed_phase"]) == ("aborted", "init"), ended
    assert "prepared with 128 MiB but the guest has 256 MiB" in ended["error"]
    assert runs_intact(vsp1, guest["name"])
    vsp2.client.discard(migration_id)


def test_it_presses_the_acpi_power_button_then_quits_qemu_when_the_timeout_runs_out(qemu_hosts):
    """A graceful stop of a real QEMU guest: ``system_powerdown`` (the ACPI power button), then QEMU quits
    once the Graceful Stop Timeout runs out.

    The test guest does not honour the power button: its init is a busybox shell running memwriter, with
    no acpid (nor anything else) listening to the button's input event, and the kernel alone does not
    power off on it. So the path tested here is the timeout, then the forced quit; the driver's clean
    path (QEMU exits by itself when the guest powers off) is the same ``power_down`` wait returning True.
    """
    vsp1, _ = qemu_hosts
    guest = boot_busy_guest(vsp1, pages_per_s=100)
    pid = workload(vsp1, guest["name"])["pid"]

    stopped = vsp1.client.stop_guest(guest["guest_id"], graceful_timeout_s=3)

    assert (stopped["stop"], stopped["hardware_status"], stopped["os_status"]) == ("timed_out", "off", "down")
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert vsp1.client.start_guest(guest["guest_id"])["hardware_status"] == "on"
    forced = vsp1.client.stop_guest(guest["guest_id"])
    assert (forced["stop"], forced["hardware_status"]) == ("forced", "off")
