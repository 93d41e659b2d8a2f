"""Benchmark: the local-disk mirror's throughput as a ratio of raw loopback TCP (1 connection), for
the simulated driver and for QEMU's (``blockdev-mirror`` to the target's NBD export).

Runs, in one go: raw loopback TCP (``bench_agent_migration.best_raw_loopback_bytes_s``), then, per
driver, two real agents, each with a local pool in a temporary directory, mirroring
(``local_disks="mirror"``) under the encryption policies off and required:

- simulated: a guest with a 1 GiB local disk holding 512 MiB of random data (the rest a hole), writing
  it (its I/O load);
- qemu: the test guest (``scripts/build_test_guest.sh``, 128 MiB) with a second disk, raw, 1 GiB,
  holding ``--qemu-data-mib`` (256) MiB of random data (the rest a hole), which the guest does not
  touch: QEMU's mirror on an idle disk. Skipped (said so) without QEMU >= 10 or the test guest.

For each: the disk's copy until ``disk_mirror_ready`` (s: from the start of the outgoing migration,
and the mirror's own part after Init), the mirror's throughput figure (``disk_throughput_bytes_s``:
for QEMU the bytes the target acknowledged on the NBD connections, TLS included) and its ratio to
raw loopback, and whether the migration reached "ready" (simulated: the target checked the disks'
digests; QEMU: every mirror job completed at the switchover). The pools are on tmpfs (``/dev/shm``,
or ``MIRROR_POOL_DIR``): on a disk, the page cache's writeback caps it instead.

    .venv/bin/python bench/bench_disk_mirror.py [--drivers simulated,qemu] [--qemu-data-mib 256]

Not measured here (issue 20): a 4 GiB disk, the guest's write latency in write-blocking mode,
downtime and network blackout with a mirror.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentprotocol import DiskSpec, GuestSpec, IncomingRequest, MigrationParams, OutgoingRequest  # noqa: E402
from bench.agents import BenchAgent, guest_id_for  # noqa: E402
from bench.bench_agent_migration import best_raw_loopback_bytes_s  # noqa: E402
from hostagent.drivers.qemu import DEFAULT_IMAGES  # noqa: E402
from hostagent.drivers.qemu.process import QemuTooOld, check_qemu  # noqa: E402

MIB = 1 << 20
DISK = 1 << 30
DATA = 512 * MIB
POOL_DIR = os.environ.get("MIRROR_POOL_DIR", "/dev/shm")  # noqa: S108 - tmpfs, a directory of our own in it


def start_mirror(
    source: BenchAgent, target: BenchAgent, spec: GuestSpec, guest_disks: list, name: str, encryption: str
) -> tuple[str, float]:
    """Prepare ``target`` for ``spec`` with the source's ``guest_disks`` (its ``GuestInfo.disks``: the
    existing volumes, mirrored) and start the source; (the migration id, when the start was asked:
    ``time.perf_counter()`` s)."""
    disks = [
        DiskSpec.model_validate({**d.model_dump(exclude={"allocated_bytes", "backing"}), "create": False})
        for d in guest_disks
    ]
    migration_id = f"m-{name}"
    prepared = target.client.prepare_incoming(
        IncomingRequest(
            migration_id=migration_id,
            guest=spec.model_copy(update={"disks": disks, "running": False}),
            encryption=encryption,  # type: ignore[arg-type]
            local_disks="mirror",
        )
    )
    started = time.perf_counter()
    source.client.start_outgoing(
        OutgoingRequest(
            migration_id=migration_id,
            guest=spec.guest_id,
            target=prepared.endpoint(),
            params=MigrationParams(),
            encryption=encryption,  # type: ignore[arg-type]
            local_disks="mirror",
        )
    )
    return migration_id, started


def follow_to_the_end(
    source: BenchAgent, target: BenchAgent, migration_id: str
) -> tuple[float | None, float, int, str]:
    """Follow the source until Copy converged, then quiesce, freeze and (when ready) switch over;
    (when Copy began or None, when every mirror was ready or else the end: ``time.perf_counter()`` s,
    the mirror's throughput figure then in bytes/s, the state the freeze ended in)."""
    copy_at = ready_at = None
    figure = 0
    for snapshot in source.client.iter_progress(migration_id):
        if snapshot.state == "copy" and copy_at is None:
            copy_at = time.perf_counter()
        if snapshot.disk_mirror_ready and ready_at is None:
            ready_at = time.perf_counter()
            figure = snapshot.disk_throughput_bytes_s
        if snapshot.converged or snapshot.state not in ("init", "copy"):
            break
    source.client.quiesce(migration_id)
    ended = source.client.freeze(migration_id)
    if ended.state == "ready":
        target.client.resume(migration_id)
        source.client.release(migration_id)
    return copy_at, ready_at or time.perf_counter(), figure, ended.state


def mirror_once(
    source: BenchAgent, target: BenchAgent, pool: Path, encryption: str, data: int = DATA
) -> tuple[float, int, str]:
    """Define and start a guest with a local disk of ``data`` random bytes, mirror it; (seconds to
    ``disk_mirror_ready``, the mirror's throughput figure in bytes/s, the final state)."""
    name = f"mirror-{encryption}-{os.getpid()}"
    volume = f"{name}.img"
    disk = {"device": "vda", "pool": "local", "volume": volume, "virtual_size_bytes": DISK, "create": True}
    spec = GuestSpec.model_validate(
        {"guest_id": guest_id_for(name), "name": name, "memory_mib": 64, "io_latency_ms": 20, "disks": [disk]}
    )
    source.client.define_guest(spec)
    with open(pool / volume, "r+b") as image:
        for _ in range(data // (16 * MIB)):
            image.write(os.urandom(16 * MIB))
    source.client.start_guest(spec.guest_id)
    guest = source.client.get_guest(spec.guest_id)
    migration_id, started = start_mirror(source, target, spec, guest.disks, name, encryption)
    _, ready_at, figure, state = follow_to_the_end(source, target, migration_id)
    return ready_at - started, figure, state


def qemu_mirror_once(
    source: BenchAgent, target: BenchAgent, pool: Path, encryption: str, data: int
) -> tuple[float, float, int, str]:
    """The test guest with a raw 1 GiB disk on the local pool holding ``data`` random bytes, mirrored
    and migrated; (s from the start to ``disk_mirror_ready``, s of that in Copy, the mirror's
    throughput figure in bytes/s, the final state)."""
    name = f"qmirror-{encryption}-{os.getpid()}"
    volume = f"{name}.raw"
    with open(pool / volume, "wb") as image:
        for _ in range(data // (16 * MIB)):
            image.write(os.urandom(16 * MIB))
        image.truncate(DISK)
    disk = {"device": "vdb", "pool": "local", "volume": volume, "virtual_size_bytes": DISK, "format": "raw"}
    spec = GuestSpec.model_validate(
        {"guest_id": guest_id_for(name), "name": name, "memory_mib": 128, "disks": [disk], "running": True}
    )
    guest = source.client.define_guest(spec)
    migration_id, started = start_mirror(source, target, spec, guest.disks, name, encryption)
    copy_at, ready_at, figure, state = follow_to_the_end(source, target, migration_id)
    return ready_at - started, ready_at - (copy_at or started), figure, state


def qemu_missing() -> str | None:
    try:
        check_qemu("qemu-system-x86_64")
    except QemuTooOld as error:
        return str(error)
    if not (DEFAULT_IMAGES / "vmlinuz").is_file():
        return "no test guest in guest-images/ (scripts/build_test_guest.sh)"
    return None


def bench_driver(driver: str, raw: float, scratch: Path, data: int, qemu_data: int) -> None:
    pools = {name: scratch / f"{driver}-{name}-pool" for name in ("vsp1", "vsp2")}
    agents = {}
    for name, pool in pools.items():
        pool.mkdir()
        agents[name] = BenchAgent(f"{driver}-{name}", scratch, driver, "--pool", f"local:local:{pool}")
    try:
        for encryption in ("off", "required"):
            if driver == "simulated":
                source, target = agents["vsp1"], agents["vsp2"]
                seconds, figure, state = mirror_once(source, target, pools["vsp1"], encryption, data)
                print(
                    f"simulated mirror, encryption {encryption}: {data // MIB} MiB of a 1 GiB disk ready in "
                    f"{seconds:.2f} s, "
                    f"{figure / 1e6:.0f} MB/s = {figure / raw:.2f} of raw loopback; switchover: {state}"
                )
                continue
            seconds, in_copy, figure, state = qemu_mirror_once(
                agents["vsp1"], agents["vsp2"], pools["vsp1"], encryption, qemu_data
            )
            print(
                f"qemu mirror, encryption {encryption}: {qemu_data // MIB} MiB of a 1 GiB disk ready in "
                f"{seconds:.2f} s ({in_copy:.2f} s of it mirroring, the rest Init: connections, NBD and TLS "
                f"handshakes), {figure / 1e6:.0f} MB/s on the wire = {figure / raw:.2f} of raw loopback, "
                f"{qemu_data / in_copy / 1e6:.0f} MB/s of data; switchover: {state}"
            )
    finally:
        for agent in agents.values():
            agent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drivers", default="simulated,qemu", help="comma-separated: simulated, qemu")
    parser.add_argument("--qemu-data-mib", type=int, default=256, help="random data on the QEMU guest's disk")
    parser.add_argument("--quick", action="store_true", help="16-32 MiB of data: seconds long, no figures")
    args = parser.parse_args()
    drivers = [driver.strip() for driver in args.drivers.split(",") if driver.strip()]
    data, qemu_data = (32 * MIB, 16 * MIB) if args.quick else (DATA, args.qemu_data_mib * MIB)
    raw = best_raw_loopback_bytes_s(64 * MIB if args.quick else 1 << 30, 1)
    print(f"raw loopback TCP, 1 connection: {raw / 1e6:.0f} MB/s")
    # The pools on tmpfs: on the VM's disk, writing 512 MiB twice was throttled by the page cache's writeback.
    with tempfile.TemporaryDirectory(prefix="matrixoe-bench-mirror-", dir=POOL_DIR) as scratch_dir:
        for driver in drivers:
            missing = qemu_missing() if driver == "qemu" else None
            if missing:
                print(f"qemu mirror: skipped ({missing})")
                continue
            bench_driver(driver, raw, Path(scratch_dir), data, qemu_data)
    print(f"load average: {os.getloadavg()[0]:.1f} (2 cores shared with other work)")


if __name__ == "__main__":
    main()
