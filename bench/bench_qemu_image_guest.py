"""Benchmark: the OS image guest (its own disk on a shared pool, a network card) migrated back and forth.

    .venv/bin/python bench/bench_qemu_image_guest.py [--migrations 10] [--memory-mib 256] \
        [--dirty-pages-per-s 2000] [--disk-rate 200] [--network bridge|user]

Two real agents run the qemu driver with one pool directory (a shared pool) and every guest booting
from its copy of ``guest-images/guest-os.qcow2`` (``scripts/build_guest_image.sh``). The network is a
bridge in a network namespace this script creates (root), or QEMU's user-mode networking. One guest
boots (its boot time is printed), then moves ``--migrations`` times between the agents as the console
moves it (prepare, start, quiesce once converged, freeze, resume, release), and after each move its
self-check (memory and every disk block it wrote) is requested over its command port. Printed,
min / median / max over the moves:

- QEMU's downtime (its own figure: vCPUs stopped -> migration completed on the source);
- guest paused: the source's stop for the switchover -> the target's resume (QEMU's trace files), which
  also holds both sides hashing the RAM and the control plane's round trips;
- network blackout: the longest gap in the guest's 10 ms heartbeats at the host's listener;
- I/O Quiesce: requests in flight when the vCPUs stopped, time to drain them, time to the flush.

Needs QEMU >= 10, root for ``--network bridge``, and the OS image.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
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
from hostagent.drivers.qemu import DEFAULT_IMAGES  # noqa: E402
from hostagent.drivers.qemu.guestload import request_selfcheck  # noqa: E402
from hostagent.drivers.qemu.network import (  # noqa: E402
    HeartbeatListener,
    create_isolated_network,
    delete_isolated_network,
    network_blackout,
)
from hostagent.drivers.qemu.process import check_qemu  # noqa: E402
from hostagent.drivers.qemu.quiesce import io_quiesce, read_trace, state_changes  # noqa: E402
from hostagent.drivers.qemu.storage import image_writers  # noqa: E402


def workload(agent: BenchAgent, name: str) -> dict[str, Any]:
    return agent.client.get_guest(guest_id_for(name)).workload


def move(
    source: BenchAgent, target: BenchAgent, spec: dict[str, Any], listener: HeartbeatListener, pool: Path
) -> dict[str, Any]:
    name, guest_id = spec["name"], guest_id_for(spec["name"])
    source_trace = Path(workload(source, name)["trace_log"])
    started = time.time()
    moved = migrate(source, target, spec)
    target_trace = Path(workload(target, name)["trace_log"])
    if not wait_until(lambda: bool(state_changes(read_trace(target_trace), "running")), 10):
        raise SystemExit(f"no resume in {target_trace}")
    stopped_at = state_changes(read_trace(source_trace), "finish-migrate")[-1]
    resumed_at = state_changes(read_trace(target_trace), "running")[-1]
    if not wait_until(
        lambda: any(beat.arrived > resumed_at + 1 for beat in listener.heartbeats(guest_id)), 15
    ):
        raise SystemExit("no heartbeats from the target after the switchover")
    blackout = network_blackout(listener.heartbeats(guest_id), stopped_at, resumed_at)
    quiesce = io_quiesce(source_trace, after=started)
    check = asyncio.run(request_selfcheck(Path(workload(target, name)["command_port"]), secrets.token_hex(4)))
    if not check.ok:
        raise SystemExit(f"self-check failed after the move: {check.line}")
    writers = image_writers(pool / f"{guest_id}.qcow2")
    if writers != [workload(target, name)["pid"]]:
        raise SystemExit(f"the image's writers after the move: {writers}")
    return {
        "downtime_ms": moved.ready.downtime_ms,
        "paused_ms": (resumed_at - stopped_at) * 1000,
        "blackout_ms": blackout.gap_ms,
        "lost": blackout.lost,
        "outstanding": quiesce.outstanding if quiesce else None,
        "drain_ms": quiesce.drain_ms if quiesce else None,
        "flushed_ms": quiesce.flushed_ms if quiesce else None,
        "blocks": int(check.fields["blocks"]),
    }


def load_average() -> str:
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def spread(values: list[float]) -> str:
    present = [value for value in values if value is not None]
    if not present:
        return "-"
    return f"{min(present):.1f} / {statistics.median(present):.1f} / {max(present):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--migrations", type=int, default=10)
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--dirty-pages-per-s", type=int, default=2000)
    parser.add_argument("--disk-rate", type=int, default=200, help="guestload's 4 KiB disk writes per second")
    parser.add_argument("--network", choices=("bridge", "user"), default="bridge")
    args = quick.parse_args(parser, {"migrations": 1, "network": "user"})
    print(f"QEMU {check_qemu('qemu-system-x86_64')}, image {DEFAULT_IMAGES / 'guest-os.qcow2'}")
    print(f"load average at start: {load_average()} ({os.cpu_count()} cores)")

    netns = f"mxb-{secrets.token_hex(3)}" if args.network == "bridge" else None
    with tempfile.TemporaryDirectory(prefix="bench-image-") as scratch_dir:
        scratch = Path(scratch_dir)
        pool = scratch / "pool"
        pool.mkdir()
        if netns:
            bridge = create_isolated_network(netns, "br0", "10.77.0.1/24")
            listener = HeartbeatListener(bridge.host_address, 0, netns=netns)
            network = [f"network=bridge:{netns}/br0", "guest_subnet=10.77.0.0/24"]
            network.append(f"heartbeat={bridge.host_address}:{listener.address[1]}")
        else:
            listener = HeartbeatListener("127.0.0.1", 0)
            network = ["network=user", f"heartbeat=10.0.2.2:{listener.address[1]}"]
        options = [f"boot_image={DEFAULT_IMAGES / 'guest-os.qcow2'}", f"pool={pool}", *network]
        options.append(f"disk_rate={args.disk_rate}")
        agents: list[BenchAgent] = []
        try:
            for name in ("vsp1", "vsp2"):
                extra = [f"run_dir={scratch / name}", *options]
                agents.append(
                    BenchAgent(name, scratch, "qemu", *[a for o in extra for a in ("--driver-option", o)])
                )
            spec = {
                "name": f"bench-os-{secrets.token_hex(3)}",
                "memory_mib": args.memory_mib,
                "vcpus": 1,
                "os_type": "Linux",
                "dirty_pages_per_s": args.dirty_pages_per_s,
            }
            started = time.perf_counter()
            agents[0].client.define_guest(
                GuestSpec.model_validate({**spec, "guest_id": guest_id_for(spec["name"]), "running": True})
            )
            if not wait_until(lambda: workload(agents[0], spec["name"])["booted"], 180):
                raise SystemExit("the guest did not boot; see its serial log")
            booted_s = time.perf_counter() - started
            print(
                f"boot: define -> guestload running {booted_s:.1f} s "
                f"(the guest's own uptime at init's end: {workload(agents[0], spec['name'])['boot_s']} s)"
            )
            if not wait_until(lambda: workload(agents[0], spec["name"])["selfchecks_passed"] >= 1, 60):
                raise SystemExit("the guest never passed a check")
            results = []
            for index in range(args.migrations):
                source, target = agents[index % 2], agents[(index + 1) % 2]
                results.append(move(source, target, spec, listener, pool))
                print(f"  move {index + 1}: {results[-1]}")
        finally:
            for agent in agents:
                agent.stop()
            listener.close()
            if netns:
                delete_isolated_network(netns)

    print(
        f"\n{args.migrations} migrations, {args.network} networking, {args.memory_mib} MiB guest writing "
        f"{args.dirty_pages_per_s} pages/s and {args.disk_rate} disk blocks/s; min / median / max"
    )
    for key, label in (
        ("downtime_ms", "QEMU's downtime (ms)"),
        ("paused_ms", "guest paused, stop -> resume (ms)"),
        ("blackout_ms", "network blackout (ms)"),
        ("outstanding", "I/O requests in flight at the stop"),
        ("drain_ms", "I/O drain (ms)"),
        ("flushed_ms", "stop -> drained and flushed (ms)"),
    ):
        print(f"  {label:<36} {spread([result[key] for result in results])}")
    print(f"  heartbeats lost in all               {sum(result['lost'] for result in results)}")
    print("  self-check after every move          ok (memory and every written disk block)")
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
