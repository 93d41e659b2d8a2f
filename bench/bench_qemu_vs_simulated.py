"""Benchmark: the same busy guest migrated by the qemu driver and by the simulated driver, in one run.

    .venv/bin/python bench/bench_qemu_vs_simulated.py [--memory-mib 256] [--dirty-pages-per-s 5000] \
        [--encryption required|off]

Starts two real agents per driver on loopback. The QEMU guest is the test guest (a Linux kernel
running memwriter, writing ``dirty_pages_per_s`` random pages of its memory); the simulated guest
has the same size, all of it filled, and the same write rate. Each is migrated through the agents'
API exactly as the console does (prepare, start, quiesce once converged, freeze, resume, release).
Prints per driver: total time (start -> target ready), downtime, rounds, bytes on the wire,
throughput (as the driver reports it: QEMU's last ``mbps``, the engine's bytes per second of
sending; and bytes on the wire over total time), and whether the digests of both copies
matched, under the data-plane policy ``--encryption`` (QEMU's migration TLS or the simulated
data plane's mutual TLS under "required", the default; plain TCP under "off"); for QEMU also its
version, the guest's boot time and its own memory self-check after the move. Needs QEMU >= 10 and
``scripts/build_test_guest.sh``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentprotocol import GuestSpec  # noqa: E402
from bench import quick  # noqa: E402
from bench.agents import BenchAgent, guest_id_for, migrate  # noqa: E402
from devtools.processes import wait_until  # noqa: E402
from hostagent.drivers.qemu.process import check_qemu  # noqa: E402


def boot(agent: BenchAgent, spec: dict[str, Any]) -> tuple[float, float]:
    """Seconds until the OS is up (memwriter filled its memory), and until its first full self-check."""
    started = time.perf_counter()
    agent.client.define_guest(
        GuestSpec.model_validate({**spec, "guest_id": guest_id_for(spec["name"]), "running": True})
    )
    if not wait_until(lambda: agent.client.get_guest(guest_id_for(spec["name"])).os_status == "up", 90):
        raise SystemExit("the guest did not boot; see its serial log")
    up_s = time.perf_counter() - started
    if spec.get("fill_percent") is None:  # a QEMU guest
        if not wait_until(
            lambda: agent.client.get_guest(guest_id_for(spec["name"])).workload["selfchecks_passed"], 90
        ):
            raise SystemExit("the QEMU guest never completed a self-check; see its serial log")
    return up_s, time.perf_counter() - started


def migrate_guest(
    source: BenchAgent, target: BenchAgent, spec: dict[str, Any], encryption: str
) -> dict[str, Any]:
    moved = migrate(source, target, spec, encryption)
    ready = moved.ready
    return {
        "total_s": moved.total_s,
        "downtime_ms": ready.downtime_ms,
        "rounds": ready.round,
        "bytes_sent": ready.bytes_sent,
        "throughput": ready.throughput_bytes_s or ready.bytes_sent / moved.total_s,
        "digests_equal": bool(ready.source_digest) and ready.source_digest == moved.target_digest,
    }


def self_check_after_move(target: BenchAgent, name: str) -> str:
    def checked() -> bool:
        return target.client.get_guest(guest_id_for(name)).workload["selfchecks_passed"] >= 2

    if not wait_until(checked, 60):
        return "no full self-check within 60 s"
    workload = target.client.get_guest(guest_id_for(name)).workload
    return f"{workload['selfchecks_passed']} passed, {workload['selfchecks_failed']} failed"


def report(label: str, result: dict[str, Any]) -> None:
    print(f"\n{label}")
    print(f"  total time (start -> ready)  {result['total_s']:.2f} s")
    print(f"  downtime                     {result['downtime_ms']} ms")
    print(f"  rounds                       {result['rounds']}")
    print(f"  bytes on the wire            {result['bytes_sent'] / 2**20:.0f} MiB")
    print(f"  throughput, as reported      {result['throughput'] / 1e6:.0f} MB/s")
    print(f"  throughput, bytes / total    {result['bytes_sent'] / result['total_s'] / 1e6:.0f} MB/s")
    print(f"  digests equal                {result['digests_equal']}")


def run_driver(
    scratch: Path, driver: str, spec: dict[str, Any], encryption: str, *options: str
) -> tuple[dict, tuple, BenchAgent]:
    source = BenchAgent(f"{driver}-src", scratch, driver, *options, timeout_s=120)
    target = BenchAgent(f"{driver}-dst", scratch, driver, *options, timeout_s=120)
    try:
        boot_s = boot(source, spec)
        time.sleep(2)  # let the workload dirty memory for a while before moving it
        result = migrate_guest(source, target, spec, encryption)
        result["self_check"] = self_check_after_move(target, spec["name"]) if driver == "qemu" else None
        return result, boot_s, target
    finally:
        source.stop()
        target.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--dirty-pages-per-s", type=int, default=5000)
    parser.add_argument("--encryption", choices=("required", "off"), default="required")
    args = quick.parse_args(parser, {"memory_mib": 128, "dirty_pages_per_s": 500})
    version = check_qemu("qemu-system-x86_64")
    base = {"memory_mib": args.memory_mib, "vcpus": 1, "os_type": "Linux"}
    rate = args.dirty_pages_per_s
    written = f"{rate} pages/s written ({rate * 4096 / 1e6:.0f} MB/s)"
    print(f"guest {args.memory_mib} MiB, {written}; QEMU {version}, TCG; data plane {args.encryption}")
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        qemu_spec = {**base, "name": "bench-qemu", "dirty_pages_per_s": rate}
        qemu, boot_s, _ = run_driver(
            scratch, "qemu", qemu_spec, args.encryption, "--driver-option", f"run_dir={scratch / 'run'}"
        )
        simulated_spec = {**base, "name": "bench-sim", "dirty_pages_per_s": rate, "fill_percent": 100}
        simulated, _, _ = run_driver(scratch, "simulated", simulated_spec, args.encryption)
    up_s, checked_s = boot_s
    report(
        f"qemu driver (OS up in {up_s:.1f} s, first self-check at {checked_s:.1f} s; QEMU's downtime)", qemu
    )
    print(f"  guest self-check on target   {qemu['self_check']}")
    report("simulated driver (downtime = Frozen phase)", simulated)


if __name__ == "__main__":
    main()
