"""Benchmark: CPU seconds the two agents spend to migrate a 1 GiB guest (a figure load barely moves).

    .venv/bin/python bench/bench_data_plane_cpu.py [--memory-mib 1024] [--dirty-pages-per-s 25000] [--runs 2]

Wall-clock throughput on a shared 2-core machine swings with other people's work; the CPU time
the source and the target agent processes use (user + system, from /proc/PID/stat) for the same
migration does much less. Runs the same idle and busy migrations as ``bench_agent_migration.py``
(every page non-zero) and prints, per run, the wall time, the data-plane throughput, each
agent's CPU seconds and the digests' equality. Run it from an older checkout (copy this file
there) to compare before and after a change.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentprotocol import GuestSpec  # noqa: E402
from bench import quick  # noqa: E402
from bench.agents import BenchAgent, guest_id_for, migrate  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(agent: BenchAgent) -> float:
    """User + system CPU seconds of the agent process so far."""
    fields = Path(f"/proc/{agent.process.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def run(source: BenchAgent, target: BenchAgent, name: str, memory_mib: int, rate: int) -> str:
    spec = {"name": name, "memory_mib": memory_mib, "vcpus": 2, "os_type": "linux"}
    guest_id = guest_id_for(name)
    source.client.define_guest(
        GuestSpec.model_validate(
            {**spec, "guest_id": guest_id, "dirty_pages_per_s": rate, "fill_percent": 100, "running": True}
        )
    )
    time.sleep(0.5)
    before = cpu_s(source), cpu_s(target)
    try:
        moved = migrate(source, target, spec)
    except SystemExit:
        source.client.stop_guest(guest_id)  # a busy guest left running would skew the next runs
        raise
    source_cpu, target_cpu = cpu_s(source) - before[0], cpu_s(target) - before[1]
    ready = moved.ready
    target.client.stop_guest(guest_id)
    target.client.delete_guest(guest_id)
    return (
        f"{rate:>6} pages/s  {moved.total_s:6.2f} s  {ready.throughput_bytes_s / 1e6:6.0f} MB/s  "
        f"rounds {ready.round:>3}  {ready.bytes_sent / 2**20:6.0f} MiB  "
        f"CPU source {source_cpu:5.2f} s, target {target_cpu:5.2f} s  "
        f"digests equal {ready.source_digest == moved.target_digest}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--dirty-pages-per-s", type=int, default=25_000)
    parser.add_argument("--runs", type=int, default=2)
    args = quick.parse_args(parser, {"memory_mib": 64, "dirty_pages_per_s": 2_000, "runs": 1})
    # `timeout` and Ctrl-C alike: the finally below stops the processes started here.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    load = Path("/proc/loadavg").read_text().strip()
    print(f"{ROOT}: guest {args.memory_mib} MiB, all pages non-zero; load {load}")
    scratch = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    source, target = BenchAgent("cpu-src", scratch), BenchAgent("cpu-dst", scratch)
    try:
        for index in range(args.runs):
            for position, rate in enumerate((0, args.dirty_pages_per_s)):
                try:
                    name = f"cpu-{index}-{position}-{rate}"
                    print(run(source, target, name, args.memory_mib, rate), flush=True)
                except SystemExit as error:
                    print(f"{rate:>6} pages/s  {error}", flush=True)
    finally:
        source.stop()
        target.stop()
        shutil.rmtree(scratch)
    print(f"load after: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
