"""Benchmark: the QEMU test guest migrated live between two libvirt daemons on this machine, peer to peer.

    sudo .venv/bin/python bench/bench_libvirt_migration.py [--runs 3] [--memory-mib 256] \
        [--dirty-pages-per-s 2000] [--encryption required|off]

Starts two libvirt hosts (``devtools.libvirt_hosts``), boots the test guest on the first and moves
it back and forth ``--runs`` times through ``hostagent.drivers.libvirt.jobs`` (what the driver will
call). Prints the rig's start time (cold: QEMU's capabilities probed; warm: cached), the guest's
boot time, and per run: the caller's total time, libvirt's own job time and its split (Init: until
memory moves; Copy; switchover), the real downtime, rounds, memory moved and the throughput
(memory moved over libvirt's job time), and whether the guest's memory self-check passed on
arrival. Skips (exit 0) when libvirt or root is missing, so ``make bench`` runs anywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import quick  # noqa: E402
from devtools.libvirt_hosts import CACHE_SEED, LibvirtHosts, memwriter_domain_xml  # noqa: E402
from devtools.libvirt_hosts import libvirt_missing as rig_missing  # noqa: E402
from devtools.processes import wait_until  # noqa: E402
from hostagent.drivers.libvirt.connection import host_identity, libvirt_missing, open_connection  # noqa: E402
from hostagent.drivers.libvirt.jobs import MigrationJob, MigrationPolicy  # noqa: E402
from hostagent.drivers.qemu import DEFAULT_IMAGES  # noqa: E402

NAME = "bench"


def migrate(rig: LibvirtHosts, connections: dict, source: str, target: str, policy: MigrationPolicy) -> dict:
    started = time.perf_counter()
    checks_before = rig[target].memory_checks(NAME)[0]
    job = MigrationJob.start(connections[source], NAME, rig[target].uri, policy)
    first_copy = switchover = None
    for snapshot in job.snapshots(interval_s=0.05):
        now = time.perf_counter() - started
        if snapshot.stage == "copy" and first_copy is None:
            first_copy = now
        if snapshot.stage == "switchover" and switchover is None:
            switchover = now
    final = job.snapshot()
    total = time.perf_counter() - started
    if final.stage != "completed":
        raise SystemExit(f"the migration {source} -> {target} ended {final.stage}: {final.error}")
    passed = wait_until(lambda: rig[target].memory_checks(NAME)[0] > checks_before, 60, 0.2)
    return {
        "total_s": total,
        "job_s": final.elapsed_ms / 1000,
        "init_s": first_copy or 0.0,
        "copy_s": (switchover or total) - (first_copy or 0.0),
        "downtime_ms": final.downtime_ms,
        "rounds": final.round,
        "moved_mib": final.memory_processed_bytes / 2**20,
        "mib_s": final.memory_processed_bytes / 2**20 / max(final.elapsed_ms / 1000, 0.001),
        "selfcheck": "ok" if passed and rig[target].memory_checks(NAME)[1] == 0 else "FAILED",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--dirty-pages-per-s", type=int, default=2000)
    parser.add_argument("--encryption", choices=("required", "off"), default="required")
    args = quick.parse_args(parser, {"runs": 1, "memory_mib": 128})
    missing = rig_missing() or libvirt_missing()
    if missing or not (DEFAULT_IMAGES / "vmlinuz").is_file():
        print(f"bench_libvirt_migration: skipped: {missing or 'no test guest (make guest-image)'}")
        return 0
    print(f"load average: {' '.join(f'{value:.2f}' for value in os.getloadavg())}; {os.cpu_count()} cores")
    cold = not CACHE_SEED.is_dir()
    with tempfile.TemporaryDirectory(prefix="lvbench-") as directory:
        rig = LibvirtHosts(Path(directory), ["a", "b"])
        started = time.perf_counter()
        try:
            rig.start()
            warmth = "cold: QEMU probed" if cold else "warm: cached capabilities"
            print(f"two libvirt daemons up in {time.perf_counter() - started:.1f} s ({warmth})")
            rig.install_boot_files(DEFAULT_IMAGES / "vmlinuz", DEFAULT_IMAGES / "initramfs.cpio.gz")
            connections = {name: open_connection(rig[name].uri) for name in ("a", "b")}
            identity = host_identity(connections["a"])
            print(f"libvirt {identity.libvirt_version}, QEMU {identity.hypervisor_version}, TCG")
            started = time.perf_counter()
            xml = memwriter_domain_xml(NAME, args.memory_mib, args.dirty_pages_per_s)
            connections["a"].defineXML(xml).create()
            if not wait_until(lambda: rig["a"].memory_checks(NAME)[0] >= 1, 120, 0.2):
                raise SystemExit(f"the guest did not boot: {rig['a'].serial(NAME)[-500:]}")
            print(f"guest booted to its first memory check in {time.perf_counter() - started:.1f} s")
            print(
                f"{args.memory_mib} MiB guest writing {args.dirty_pages_per_s} pages/s, "
                f"encryption {args.encryption}, {args.runs} runs"
            )
            policy = MigrationPolicy(encryption=args.encryption)
            for run in range(args.runs):
                source, target = ("a", "b") if run % 2 == 0 else ("b", "a")
                figures = migrate(rig, connections, source, target, policy)
                print(
                    f"  {source}->{target}: total {figures['total_s']:.2f} s (libvirt's job "
                    f"{figures['job_s']:.2f} s; init {figures['init_s']:.2f} s, "
                    f"copy {figures['copy_s']:.2f} s), "
                    f"downtime {figures['downtime_ms']} ms, {figures['rounds']} rounds, "
                    f"{figures['moved_mib']:.0f} MiB at {figures['mib_s']:.0f} MiB/s, "
                    f"self-check {figures['selfcheck']}"
                )
        finally:
            rig.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
