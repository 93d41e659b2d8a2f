"""Benchmark: the same busy guest migrated by the qemu driver and by the simulated driver, in one run.

    .venv/bin/python bench/bench_qemu_vs_simulated.py [--memory-mib 256] [--dirty-pages-per-s 5000]

Starts two real agents per driver on loopback. The QEMU guest is the test guest (a Linux kernel
running memwriter, writing ``dirty_pages_per_s`` random pages of its memory); the simulated guest
has the same size, all of it filled, and the same write rate. Each is migrated through the agents'
API exactly as the console does (prepare, start, quiesce once converged, freeze, resume, release).
Prints per driver: total time (start -> target ready), downtime, rounds, bytes on the wire,
throughput (as the driver reports it: QEMU's last ``mbps``, the engine's bytes per second of
sending; and bytes on the wire over total time), and whether the digests of both copies
matched; for QEMU also its version, the guest's boot time and its own memory self-check after
the move. Needs QEMU >= 10 and
``scripts/build_test_guest.sh``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hostagent.drivers.qemu_process import check_qemu  # noqa: E402
from vms.agent_client import AgentClient  # noqa: E402


class Agent:
    def __init__(self, name: str, scratch: Path, *driver_args: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        secret = secrets.token_urlsafe(24)
        secret_file = scratch / f"{name}.secret"
        secret_file.write_text(secret)
        self.log = open(scratch / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hostagent", "--name", name, "--listen", f"127.0.0.1:{port}"]
            + ["--secret-file", str(secret_file), *driver_args],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = AgentClient(f"http://127.0.0.1:{port}", secret, timeout_s=120)
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
            self.process.wait(timeout=30)
        self.log.close()


def wait_for(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def boot(agent: Agent, spec: dict[str, Any]) -> tuple[float, float]:
    """Seconds until the OS is up (memwriter filled its memory), and until its first full self-check."""
    started = time.perf_counter()
    agent.client.define_guest({**spec, "running": True})
    if not wait_for(lambda: agent.client.get_guest(spec["name"])["os_status"] == "up", 90):
        raise SystemExit("the guest did not boot; see its serial log")
    up_s = time.perf_counter() - started
    if spec.get("fill_percent") is None:  # a QEMU guest
        if not wait_for(lambda: agent.client.get_guest(spec["name"])["workload"]["selfchecks_passed"], 90):
            raise SystemExit("the QEMU guest never completed a self-check; see its serial log")
    return up_s, time.perf_counter() - started


def migrate(source: Agent, target: Agent, spec: dict[str, Any]) -> dict[str, Any]:
    migration_id = f"bench-{secrets.token_hex(3)}"
    wanted = {key: spec[key] for key in ("name", "memory_mib", "vcpus", "os_type")}
    started = time.perf_counter()
    endpoint = target.client.prepare_incoming(wanted, migration_id, {})
    source.client.start_outgoing(spec["name"], migration_id, endpoint, {"downtime_ms": 300, "max_rounds": 30})
    for snapshot in source.client.iter_progress(migration_id):
        if snapshot["converged"] or snapshot["state"] not in ("init", "copy"):
            break
    source.client.quiesce(migration_id)
    ready = source.client.freeze(migration_id)
    total_s = time.perf_counter() - started
    if ready["state"] != "ready":
        raise SystemExit(f"migration did not reach ready: {ready}")
    target_digest = target.client.snapshot(migration_id)["target_digest"]
    target.client.resume(migration_id)
    source.client.release(migration_id)
    return {
        "total_s": total_s,
        "downtime_ms": ready["downtime_ms"],
        "rounds": ready["round"],
        "bytes_sent": ready["bytes_sent"],
        "throughput": ready["throughput_bytes_s"] or ready["bytes_sent"] / total_s,
        "digests_equal": bool(ready["source_digest"]) and ready["source_digest"] == target_digest,
    }


def self_check_after_move(target: Agent, name: str) -> str:
    def checked() -> bool:
        return target.client.get_guest(name)["workload"]["selfchecks_passed"] >= 2

    if not wait_for(checked, 60):
        return "no full self-check within 60 s"
    workload = target.client.get_guest(name)["workload"]
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


def run_driver(scratch: Path, driver: str, spec: dict[str, Any], *options: str) -> tuple[dict, tuple, Agent]:
    args = ("--driver", driver, *options)
    source, target = Agent(f"{driver}-src", scratch, *args), Agent(f"{driver}-dst", scratch, *args)
    try:
        boot_s = boot(source, spec)
        time.sleep(2)  # let the workload dirty memory for a while before moving it
        result = migrate(source, target, spec)
        result["self_check"] = self_check_after_move(target, spec["name"]) if driver == "qemu" else None
        return result, boot_s, target
    finally:
        source.stop()
        target.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--dirty-pages-per-s", type=int, default=5000)
    args = parser.parse_args()
    version = check_qemu("qemu-system-x86_64")
    base = {"memory_mib": args.memory_mib, "vcpus": 1, "os_type": "Linux"}
    rate = args.dirty_pages_per_s
    written = f"{rate} pages/s written ({rate * 4096 / 1e6:.0f} MB/s)"
    print(f"guest {args.memory_mib} MiB, {written}; QEMU {version}, TCG")
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        qemu_spec = {**base, "name": "bench-qemu", "dirty_pages_per_s": rate}
        qemu, boot_s, _ = run_driver(
            scratch, "qemu", qemu_spec, "--driver-option", f"run_dir={scratch / 'run'}"
        )
        simulated_spec = {**base, "name": "bench-sim", "dirty_pages_per_s": rate, "fill_percent": 100}
        simulated, _, _ = run_driver(scratch, "simulated", simulated_spec)
    up_s, checked_s = boot_s
    report(
        f"qemu driver (OS up in {up_s:.1f} s, first self-check at {checked_s:.1f} s; QEMU's downtime)", qemu
    )
    print(f"  guest self-check on target   {qemu['self_check']}")
    report("simulated driver (downtime = Frozen phase)", simulated)


if __name__ == "__main__":
    main()
