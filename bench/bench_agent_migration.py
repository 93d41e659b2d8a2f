"""Benchmark: live-migrate a 1 GiB simulated guest between two real agents over loopback, 1 and N streams.

    .venv/bin/python bench/bench_agent_migration.py [--memory-mib 1024] [--dirty-pages-per-s 25000]
        [--streams 4] [--repeat 1] [--tls] [--keep-logs] [--profile DIR]

Runs, in one go: raw loopback TCP throughput with 1 connection and with N (sender and receiver
processes moving the same number of non-zero bytes with plain blocking sockets, one thread per
connection), then migrations over the plain data plane (policy "off", like the raw figure) with 1
stream and with N: an idle guest (memory filled, nothing written) and a guest writing
``--dirty-pages-per-s`` pages a second, ``--repeat`` times each; with ``--tls`` the same again over
the TLS data plane. Prints each run's total time (start to ready), downtime (the Frozen phase),
rounds, data-plane throughput (bytes on the wire / wall-clock seconds of copy rounds) as a ratio of
raw loopback with the same number of connections, whether the digests were equal, the agents' CPU,
and the machine's load average before and after (it is shared). ``--profile DIR``: both agents
run under cProfile (their event-loop threads), written to ``DIR/loop.prof.bench-src`` and
``.bench-dst`` when they stop (read with ``python -m pstats``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentprotocol import Encryption, GuestSpec  # noqa: E402
from bench import quick  # noqa: E402
from bench.agents import BenchAgent, guest_id_for, migrate  # noqa: E402

RECEIVER = """
import socket, sys, threading
streams, total = int(sys.argv[1]), int(sys.argv[2])
listener = socket.create_server(("127.0.0.1", 0), backlog=streams)
print(listener.getsockname()[1], flush=True)

def receive(connection, left):
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    buffer = memoryview(bytearray(4 << 20))
    while left:
        received = connection.recv_into(buffer[: min(len(buffer), left)])
        if not received:
            break
        left -= received
    connection.sendall(b"k")

threads = []
for index in range(streams):
    connection, _ = listener.accept()
    share = total // streams + (total % streams if index == 0 else 0)
    threads.append(threading.Thread(target=receive, args=(connection, share)))
    threads[-1].start()
for thread in threads:
    thread.join()
"""


def best_raw_loopback_bytes_s(total: int, streams: int, tries: int = 3) -> float:
    """The best of a few runs: the machine is shared, a single run can be unlucky."""
    return max(raw_loopback_bytes_s(total, streams) for _ in range(tries))


def raw_loopback_bytes_s(total: int, streams: int) -> float:
    """Same bytes, same machine, no agent, over ``streams`` connections: the data plane's ceiling."""
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, str(streams), str(total)], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(receiver.stdout.readline())
        payload = memoryview(os.urandom(4 << 20))
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]

        def send(sock: socket.socket, share: int) -> None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sent = 0
            while sent < share:
                chunk = payload[: min(len(payload), share - sent)]
                sock.sendall(chunk)
                sent += len(chunk)
            sock.recv(1)

        shares = [total // streams + (total % streams if index == 0 else 0) for index in range(streams)]
        threads = [threading.Thread(target=send, args=pair) for pair in zip(sockets, shares, strict=True)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        for sock in sockets:
            sock.close()
        return total / elapsed
    finally:
        receiver.wait(timeout=30)


def migrate_guest(
    source: BenchAgent,
    target: BenchAgent,
    name: str,
    memory_mib: int,
    dirty_pages_per_s: int,
    encryption: Encryption = "required",
    streams: int = 1,
) -> dict:
    spec = {"name": name, "memory_mib": memory_mib, "vcpus": 2, "os_type": "linux"}
    source.client.define_guest(
        GuestSpec.model_validate(
            {
                **spec,
                "guest_id": guest_id_for(name),
                "dirty_pages_per_s": dirty_pages_per_s,
                "fill_percent": 100,
                "running": True,
            }
        )
    )
    before = cpu_s(source), cpu_s(target)
    moved = migrate(source, target, spec, encryption, streams)
    ready = moved.ready
    return {
        "cpu_source_s": cpu_s(source) - before[0],
        "cpu_target_s": cpu_s(target) - before[1],
        "total_s": moved.total_s,
        "to_converged_s": moved.to_converged_s,
        "downtime_ms": ready.downtime_ms,
        "rounds": ready.round,
        "bytes_sent": ready.bytes_sent,
        "throughput": ready.throughput_bytes_s,
        "digests_equal": ready.source_digest == ready.target_digest == moved.target_digest,
        "streams": ready.streams,
    }


def cpu_s(agent: BenchAgent) -> float:
    """User + system CPU seconds of the agent process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{agent.process.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(label: str, result: dict, raw: float) -> None:
    print(f"\n{label}")
    converged = f"(to converged {result['to_converged_s']:.2f} s)"
    print(f"  total time (start -> ready) {result['total_s']:.2f} s   {converged}")
    print(f"  downtime (Frozen)          {result['downtime_ms']} ms")
    print(f"  rounds                     {result['rounds']}   streams {result['streams']}")
    print(f"  bytes on the wire          {result['bytes_sent'] / 2**20:.0f} MiB")
    throughput = result["throughput"]
    print(f"  data-plane throughput      {throughput / 1e6:.0f} MB/s   ratio to raw {throughput / raw:.2f}")
    print(f"  digests equal              {result['digests_equal']}")
    cpu = f"source {result['cpu_source_s']:.2f} s, target {result['cpu_target_s']:.2f} s"
    print(f"  agents' CPU (user+system)  {cpu}")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--dirty-pages-per-s", type=int, default=25_000)
    parser.add_argument("--streams", type=int, default=4, help="N, the multi-stream count (2..16)")
    parser.add_argument("--repeat", type=int, default=1, help="migrations per stream count and workload")
    parser.add_argument("--tls", action="store_true", help="also run over the TLS data plane")
    parser.add_argument("--keep-logs", action="store_true", help="keep the agents' logs")
    parser.add_argument("--profile", type=Path, help="cProfile both agents' event loops into this directory")
    args = quick.parse_args(parser, {"memory_mib": 64, "dirty_pages_per_s": 2_000, "streams": 2})
    total, counts = args.memory_mib * 2**20, (1, args.streams)
    print(
        f"guest {args.memory_mib} MiB, all pages non-zero; busy runs write {args.dirty_pages_per_s} pages/s"
    )
    print(load())
    raw = {count: best_raw_loopback_bytes_s(total, count) for count in counts}
    for count in counts:
        print(
            f"raw loopback TCP, {count} connection(s), blocking sockets, 2 processes: "
            f"{raw[count] / 1e6:.0f} MB/s"
        )
    scratch = Path(tempfile.mkdtemp(prefix="bench-agents-"))
    env = None
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HOSTAGENT_PROFILE": str(args.profile.resolve() / "loop.prof")}
    source, target = BenchAgent("bench-src", scratch, env=env), BenchAgent("bench-dst", scratch, env=env)
    policies = ("off", "required") if args.tls else ("off",)
    rows: list[tuple[str, int, int, list[dict]]] = []
    try:
        for policy in policies:
            for rate in (0, args.dirty_pages_per_s):
                for count in counts:
                    results = []
                    for attempt in range(args.repeat):
                        name = f"bench-{policy}-{rate}-{count}-{attempt}"
                        try:
                            result = migrate_guest(source, target, name, args.memory_mib, rate, policy, count)
                        except SystemExit as failure:  # e.g. not converged within the round limit
                            print(f"\n{name}: {failure}")
                            continue
                        plane = "plain" if policy == "off" else "TLS"
                        workload = "idle" if not rate else f"{rate} pages/s"
                        report(
                            f"{workload}, {plane} data plane, {count} stream(s), run {attempt + 1}",
                            result,
                            raw[count],
                        )
                        results.append(result)
                    rows.append((policy, rate, count, results))
    finally:
        source.stop()
        target.stop()
        if args.keep_logs:
            print(f"\nagent logs in {scratch}")
        else:
            shutil.rmtree(scratch)
    after = {count: best_raw_loopback_bytes_s(total, count, tries=2) for count in counts}
    print(f"\n{load()}")
    print("\nsummary (throughput as a ratio of raw loopback with the same number of connections):")
    for count in counts:
        print(
            f"  raw loopback TCP, {count:2d} connection(s)   {raw[count] / 1e6:6.0f} MB/s   "
            f"(after the migrations: {after[count] / 1e6:.0f} MB/s)"
        )
    for policy, rate, count, results in rows:
        plane = "plain" if policy == "off" else "TLS  "
        workload = "idle        " if not rate else f"{rate:6d} pages/s"
        if not results:
            print(f"  {policy} data plane, {rate} pages/s, {count} stream(s): no migration reached ready")
            continue
        speeds = [result["throughput"] for result in results]
        equal = all(result["digests_equal"] for result in results)
        print(
            f"  {plane} data plane, {workload}, {count:2d} stream(s)   {max(speeds) / 1e6:6.0f} MB/s   "
            f"ratio {max(speeds) / raw[count]:.2f}   downtime {max(r['downtime_ms'] for r in results)} ms   "
            f"rounds {max(r['rounds'] for r in results)}   digests equal {equal}"
        )
    for policy, rate in sorted({(policy, rate) for policy, rate, _, _ in rows}):
        by_count = {
            count: max(r["throughput"] for r in results)
            for p, q, count, results in rows
            if (p, q) == (policy, rate) and results
        }
        if len(by_count) == 2:
            print(
                f"  {policy}, {rate} pages/s: {args.streams} streams / 1 stream = "
                f"{by_count[args.streams] / by_count[1]:.2f}"
            )


if __name__ == "__main__":
    main()
