"""Benchmark: the simulated local-disk mirror's throughput as a ratio of raw loopback TCP (1 connection).

Runs, in one go: raw loopback TCP (``bench_agent_migration.best_raw_loopback_bytes_s``), then two
real agents, each with a local pool in a temporary directory, and a guest with a 1 GiB local disk
holding 512 MiB of random data (the rest a hole), writing it (its I/O load), mirrored
(``local_disks="mirror"``) under the encryption policies off and required. For each: the disk's
first pass and catch-up until ``disk_mirror_ready`` (s), the mirror's own throughput figure
(``disk_throughput_bytes_s``) and its ratio to raw loopback, and whether the switchover found both
copies equal (the migration reached "ready": the target checked the digests). The pools are on
tmpfs (``/dev/shm``, or ``MIRROR_POOL_DIR``): on a disk, the page cache's writeback caps it instead.

    .venv/bin/python bench/bench_disk_mirror.py

Not measured here (issue 20): the QEMU mirror, a 4 GiB disk, the guest's write latency in
write-blocking mode, downtime and network blackout with a mirror.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentprotocol import DiskSpec, GuestSpec, IncomingRequest, MigrationParams, OutgoingRequest  # noqa: E402
from bench.agents import BenchAgent, guest_id_for  # noqa: E402
from bench.bench_agent_migration import best_raw_loopback_bytes_s  # noqa: E402

MIB = 1 << 20
DISK = 1 << 30
DATA = 512 * MIB
POOL_DIR = os.environ.get("MIRROR_POOL_DIR", "/dev/shm")  # noqa: S108 - tmpfs, a directory of our own in it


def mirror_once(
    source: BenchAgent, target: BenchAgent, pool: Path, encryption: str
) -> tuple[float, int, str]:
    """Define and start a guest with a local disk of ``DATA`` random bytes, mirror it; (seconds to
    ``disk_mirror_ready``, the mirror's throughput figure in bytes/s, the final state)."""
    name = f"mirror-{encryption}-{os.getpid()}"
    volume = f"{name}.img"
    disk = {"device": "vda", "pool": "local", "volume": volume, "virtual_size_bytes": DISK, "create": True}
    spec = GuestSpec.model_validate(
        {"guest_id": guest_id_for(name), "name": name, "memory_mib": 64, "io_latency_ms": 20, "disks": [disk]}
    )
    source.client.define_guest(spec)
    with open(pool / volume, "r+b") as image:
        for _ in range(DATA // (16 * MIB)):
            image.write(os.urandom(16 * MIB))
    source.client.start_guest(spec.guest_id)
    guest = source.client.get_guest(spec.guest_id)
    disks = [
        DiskSpec.model_validate({**d.model_dump(exclude={"allocated_bytes", "backing"}), "create": False})
        for d in guest.disks
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
    ready_at, figure = None, 0
    for snapshot in source.client.iter_progress(migration_id):
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
    return (ready_at or time.perf_counter()) - started, figure, ended.state


def main() -> None:
    raw = best_raw_loopback_bytes_s(1 << 30, 1)
    print(f"raw loopback TCP, 1 connection: {raw / 1e6:.0f} MB/s")
    # The pools on tmpfs: on the VM's disk, writing 512 MiB twice was throttled by the page cache's writeback.
    with tempfile.TemporaryDirectory(prefix="matrixoe-bench-mirror-", dir=POOL_DIR) as scratch_dir:
        scratch = Path(scratch_dir)
        pools = {name: scratch / f"{name}-pool" for name in ("vsp1", "vsp2")}
        agents = {}
        for name, pool in pools.items():
            pool.mkdir()
            agents[name] = BenchAgent(name, scratch, "simulated", "--pool", f"local:local:{pool}")
        try:
            for encryption in ("off", "required"):
                seconds, figure, state = mirror_once(
                    agents["vsp1"], agents["vsp2"], pools["vsp1"], encryption
                )
                print(
                    f"mirror, encryption {encryption}: {DATA // MIB} MiB of a 1 GiB disk ready in "
                    f"{seconds:.2f} s, "
                    f"{figure / 1e6:.0f} MB/s = {figure / raw:.2f} of raw loopback; switchover: {state}"
                )
        finally:
            for agent in agents.values():
                agent.stop()


if __name__ == "__main__":
    main()
