"""The figures the OS image guest's migrations are judged by, computed from what QEMU, the kernel and the
guest leave behind: the network blackout from heartbeat arrivals, I/O Quiesce's drain from QEMU's
trace, the image's writer from the kernel's OFD locks, guestload's self-check answers.

No QEMU runs here (``test_qemu_image_guest.py`` has the real thing); the inputs are written as QEMU,
the kernel and guestload write them, and the locks are real locks taken on a real file.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest

from hostagent.drivers.qemu.guestload import parse_selfcheck, workload_report
from hostagent.drivers.qemu.network import Heartbeat, network_blackout
from hostagent.drivers.qemu.quiesce import io_quiesce, read_trace, state_changes
from hostagent.drivers.qemu.storage import image_holders, image_writers


def beats(times_ms: list[float], first_seq: int = 1) -> list[Heartbeat]:
    return [
        Heartbeat(1000 + at / 1000, "g", first_seq + index, 0, ("10.77.0.20", 4000))
        for index, at in enumerate(times_ms)
    ]


def test_the_blackout_is_the_longest_silence_around_the_switchover_and_names_the_first_beat_from_the_target():
    arrivals = [0, 10, 20, 30, 40, 350, 360, 370]  # ms; the source stopped at 45, the target resumed at 340
    blackout = network_blackout(beats(arrivals), stopped_at=1000.045, resumed_at=1000.340)

    assert blackout.gap_ms == 310.0
    assert (blackout.last_before, blackout.first_after) == (1000.040, 1000.350)
    assert blackout.first_from_target == 1000.350
    assert (blackout.lost, blackout.repeated, blackout.received) == (0, 0, 8)


def test_the_blackout_counts_lost_and_repeated_heartbeats():
    arrivals = beats([0, 10, 20]) + beats([300, 310], first_seq=6) + beats([320], first_seq=7)
    blackout = network_blackout(arrivals, stopped_at=1000.025, resumed_at=1000.290)

    assert (blackout.lost, blackout.repeated) == (2, 1)  # 4 and 5 never came; 7 came twice


def test_a_blackout_needs_heartbeats_around_the_switchover():
    with pytest.raises(ValueError, match="only 1 heartbeat"):
        network_blackout(beats([0, 10, 5000]), stopped_at=1000.012, resumed_at=1000.100, margin_s=0.005)


TRACE = """\
qemu-system-x86_64: some warning without a timestamp
4242@1796655759.200000:virtio_blk_handle_write vdev 0x5 req 0xa1 sector 8 nsectors 8
4242@1796655759.200100:virtio_blk_req_complete vdev 0x5 req 0xa1 status 0
4242@1796655759.280000:virtio_blk_handle_write vdev 0x5 req 0xa2 sector 16 nsectors 8
4242@1796655759.281000:virtio_blk_handle_write vdev 0x5 req 0xa3 sector 24 nsectors 8
4242@1796655759.282810:runstate_set current_run_state 9 (running) new_state 7 (finish-migrate)
4242@1796655759.283810:virtio_blk_req_complete vdev 0x5 req 0xa2 status 0
4242@1796655759.284310:virtio_blk_req_complete vdev 0x5 req 0xa3 status 0
4242@1796655759.294921:vm_stop_flush_all ret 0
4242@1796655759.323470:runstate_set current_run_state 7 (finish-migrate) new_state 5 (postmigrate)
"""


def test_io_quiesce_counts_the_requests_in_flight_at_the_stop_and_times_their_drain_and_the_flush(tmp_path):
    trace = tmp_path / "guest.boot.trace"
    trace.write_text(TRACE)

    quiesce = io_quiesce(trace)

    assert quiesce is not None
    assert (quiesce.outstanding, quiesce.completed_in_drain, quiesce.requests_traced) == (2, 2, 3)
    assert quiesce.drain_ms == pytest.approx(1.5)
    assert quiesce.flushed_ms == pytest.approx(12.111)
    assert state_changes(read_trace(trace), "finish-migrate") == [pytest.approx(1796655759.28281)]


def test_io_quiesce_is_none_when_the_source_never_stopped_for_a_switchover(tmp_path):
    trace = tmp_path / "aborted.trace"
    trace.write_text(TRACE.split("4242@1796655759.282810")[0])
    assert io_quiesce(trace) is None
    assert io_quiesce(tmp_path / "missing.trace") is None


def ofd_lock(fd: int, byte: int, kind: int = fcntl.F_RDLCK, command: int = fcntl.F_OFD_SETLK) -> None:
    """An OFD lock on one byte, as QEMU takes them (struct flock: type, whence, start, len, pid)."""
    fcntl.fcntl(fd, command, struct.pack("hhqqi", kind, os.SEEK_SET, byte, 1, 0))


def test_the_writer_of_an_image_is_whoever_holds_qemus_write_permission_byte(tmp_path: Path):
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"\0" * 4096)
    reader = os.open(image, os.O_RDWR)  # read-write, as an incoming QEMU opens it, and no lock yet
    writer = os.open(image, os.O_RDWR)
    try:
        ofd_lock(writer, 100)
        ofd_lock(writer, 101)  # "I hold the write permission"
        ofd_lock(writer, 201)  # "I do not share it"
        holders = {holder.fd: holder for holder in image_holders(image, [os.getpid()])}

        assert holders[reader].opened_for_writing and not holders[reader].writes
        assert holders[writer].writes and holders[writer].excludes_other_writers
        assert image_writers(image, [os.getpid()]) == [os.getpid()]

        ofd_lock(writer, 101, fcntl.F_UNLCK)  # what QEMU does when it inactivates the image
        assert image_writers(image, [os.getpid()]) == []
    finally:
        os.close(reader)
        os.close(writer)
    assert image_holders(image, [os.getpid()]) == []


SERIAL = b"""\
guest-os: booted in 4.21 s
guestload: start mib=160 rate=2000 disk=/dev/vda3 blocks=4096 disk_rate=200 depth=4 hb=10.77.0.1:5000/10ms
guestload: filled 160 MiB in 812 ms
guestload: alive t=1 writes=2000 checks=0 disk_writes=200 disk_inflight=2 disk_errors=0 heartbeats=100
guestload: check ok round=1 pages=40960 blocks=190
guestload: selfcheck ok tag=after-move-1 pages=40960 blocks=371 drained=2 drain_us=180
guestload: alive t=2 writes=4000 checks=1 disk_writes=400 disk_inflight=1 disk_errors=0 heartbeats=200
guestload: selfcheck FAIL tag=x mem_bad=0 first_page=-1 disk_bad=3 lost=3 torn=0 unacked=0 first_block=17
"""


def test_guestloads_console_says_how_it_runs_and_what_each_self_check_found():
    report = workload_report(SERIAL)

    assert report["booted"] and report["boot_s"] == 4.21
    assert (report["alive_lines"], report["pages_written"], report["disk_writes"]) == (2, 4000, 400)
    assert report["heartbeats_sent"] == 200
    assert (report["selfchecks_passed"], report["selfchecks_failed"]) == (2, 1)
    assert report["requested_checks"] == [{"tag": "after-move-1", "ok": True}, {"tag": "x", "ok": False}]
    failed = parse_selfcheck(SERIAL.decode().splitlines()[-1])
    assert (
        failed is not None
        and not failed.ok
        and failed.fields["lost"] == "3"
        and failed.fields["first_block"] == "17"
    )
    assert parse_selfcheck("guestload: alive t=1") is None
