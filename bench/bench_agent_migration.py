"""Benchmark: live-migrate a 1 GiB simulated guest between two real agents over loopback.

    .venv/bin/python bench/bench_agent_migration.py [--memory-mib 1024] [--dirty-pages-per-s 25000]

Runs, in one go: raw loopback TCP throughput (a sender and a receiver process
moving the same number of non-zero bytes with plain blocking sockets), then a
migration of an idle guest (memory filled, nothing written), then one of a
guest writing pages at a steady rate. Prints total time (start to ready),
downtime (the Frozen phase), rounds, data-plane throughput (bytes on the wire /
wall-clock seconds of copy rounds) and its ratio to raw loopback.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vms.agent_client import AgentClient  # noqa: E402

RECEIVER = """
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
connection, _ = listener.accept()
connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
buffer = memoryview(bytearray(4 << 20))
left = int(sys.argv[1])
while left:
    received = connection.recv_into(buffer[: min(len(buffer), left)])
    if not received:
        break
    left -= received
connection.sendall(b"k")
"""


def best_raw_loopback_bytes_s(total: int, tries: int = 3) -> float:
    """The best of a few runs: the machine is shared, a single run can be unlucky."""
    return max(raw_loopback_bytes_s(total) for _ in range(tries))


def raw_loopback_bytes_s(total: int) -> float:
    """Same bytes, same machine, no agent: the ceiling for the data plane."""
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, str(total)], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(receiver.stdout.readline())
        payload = memoryview(os.urandom(4 << 20))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            started = time.perf_counter()
            sent = 0
            while sent < total:
                chunk = payload[: min(len(payload), total - sent)]
                sock.sendall(chunk)
                sent += len(chunk)
            sock.recv(1)
            return total / (time.perf_counter() - started)
    finally:
        receiver.wait(timeout=30)


class Agent:
    def __init__(self, name: str, secret_dir: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        secret = secrets.token_urlsafe(24)
        secret_file = secret_dir / f"{name}.secret"
        secret_file.write_text(secret)
        self.log = open(secret_dir / f"{name}.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hostagent", "--name", name, "--listen", f"127.0.0.1:{port}"]
            + ["--secret-file", str(secret_file)],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = AgentClient(f"http://127.0.0.1:{port}", secret, timeout_s=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.health()
                return
            except Exception:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        self.log.close()


def migrate(source: Agent, target: Agent, name: str, memory_mib: int, dirty_pages_per_s: int) -> dict:
    spec = {"name": name, "memory_mib": memory_mib, "vcpus": 2, "os_type": "linux"}
    source.client.define_guest(
        {**spec, "dirty_pages_per_s": dirty_pages_per_s, "fill_percent": 100, "running": True}
    )
    migration_id = f"bench-{secrets.token_hex(3)}"
    started = time.perf_counter()
    endpoint = target.client.prepare_incoming(spec, migration_id, {})
    source.client.start_outgoing(name, migration_id, endpoint, {"downtime_ms": 300, "max_rounds": 30})
    converged_at = None
    for snapshot in source.client.iter_progress(migration_id):
        if snapshot["converged"] or snapshot["state"] not in ("init", "copy"):
            converged_at = time.perf_counter()
            break
    source.client.quiesce(migration_id)
    ready = source.client.freeze(migration_id)
    total_s = time.perf_counter() - started
    if ready["state"] != "ready":
        raise SystemExit(f"migration did not reach ready: {ready}")
    target.client.resume(migration_id)
    source.client.release(migration_id)
    return {
        "total_s": total_s,
        "to_converged_s": (converged_at or time.perf_counter()) - started,
        "downtime_ms": ready["downtime_ms"],
        "rounds": ready["round"],
        "bytes_sent": ready["bytes_sent"],
        "throughput": ready["throughput_bytes_s"],
        "digests_equal": ready["source_digest"] == ready["target_digest"],
    }


def report(label: str, result: dict, raw: float) -> None:
    print(f"\n{label}")
    converged = f"(to converged {result['to_converged_s']:.2f} s)"
    print(f"  total time (start -> ready) {result['total_s']:.2f} s   {converged}")
    print(f"  downtime (Frozen)          {result['downtime_ms']} ms")
    print(f"  rounds                     {result['rounds']}")
    print(f"  bytes on the wire          {result['bytes_sent'] / 2**20:.0f} MiB")
    throughput = result["throughput"]
    print(f"  data-plane throughput      {throughput / 1e6:.0f} MB/s   ratio to raw {throughput / raw:.2f}")
    print(f"  digests equal              {result['digests_equal']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--dirty-pages-per-s", type=int, default=25_000)
    parser.add_argument("--keep-logs", action="store_true", help="keep the agents' logs")
    args = parser.parse_args()
    total = args.memory_mib * 2**20
    print(
        f"guest {args.memory_mib} MiB, all pages non-zero; busy run writes {args.dirty_pages_per_s} pages/s"
    )
    raw = best_raw_loopback_bytes_s(total)
    print(f"raw loopback TCP (blocking sockets, 2 processes): {raw / 1e6:.0f} MB/s")
    scratch = Path(tempfile.mkdtemp(prefix="bench-agents-"))
    source, target = Agent("bench-src", scratch), Agent("bench-dst", scratch)
    try:
        report("idle guest", migrate(source, target, "bench-idle", args.memory_mib, 0), raw)
        dirty_mb_s = args.dirty_pages_per_s * 4096 / 1e6
        busy = migrate(source, target, "bench-busy", args.memory_mib, args.dirty_pages_per_s)
        report(f"busy guest ({dirty_mb_s:.0f} MB/s dirtied)", busy, raw)
    finally:
        source.stop()
        target.stop()
        if args.keep_logs:
            print(f"\nagent logs in {scratch}")
        else:
            shutil.rmtree(scratch)
    after = best_raw_loopback_bytes_s(total, tries=2)
    print(
        f"\nraw loopback again after the migrations: {after / 1e6:.0f} MB/s (a check on the machine's noise)"
    )


if __name__ == "__main__":
    main()
