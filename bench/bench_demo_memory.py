"""Benchmark: resident memory of the whole `make run` stack after every demo guest migrated twice.

    .venv/bin/python bench/bench_demo_memory.py [--settle-s 5] [--quick] [--keep]

Starts ``scripts/run_console.py`` (what ``make run`` runs) as a subprocess on free ports, with its
own var directory (SQLite file, secrets, logs, PKI), its own Redis on a free port (started by
``make run`` itself, as on a fresh machine; not counted), Celery queue and Channels prefix, so it runs
beside a developer's console: four demo host agents with the demo fleet, the ASGI server, a Celery
worker and Celery beat. Then every running demo guest is live-migrated twice through the agents' API,
the way the console drives it and under the id the console gave it (to the partner host and back:
vsp1 <-> vsp2, vsp3 <-> vsp4; the console's licence/enable policy would refuse some of these hosts, the
agents do not care), and the resident memory (VmRSS and RssAnon from /proc/PID/status, MiB) of every
process of the stack is printed with the total, and where each agent's anonymous memory lives
(/proc/PID/smaps: the guests' own maps, the malloc heap and the per-thread malloc arenas).

``--quick``: one guest there and back, 1 s settling (the CI's check that the bench runs). On a failure
the scratch directory with run_console.py's log is kept and named.
"""

from __future__ import annotations

import argparse
import os
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

from bench.agents import migrate  # noqa: E402
from devtools.processes import answers_http, free_port, wait_until  # noqa: E402
from vms.agent_client import AgentClient  # noqa: E402

HOSTS = ("vsp1", "vsp2", "vsp3", "vsp4")
PARTNER = {"vsp1": "vsp2", "vsp2": "vsp1", "vsp3": "vsp4", "vsp4": "vsp3"}
GIB = 2**30


def free_port_block(count: int) -> int:
    """A base port with ``count`` free ports after it (run_console.py numbers agents from it)."""
    for _ in range(200):
        base = free_port()
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise SystemExit("no block of free ports")


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from the parent pids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(children.get(current, []))
    return found


def describe(pid: int) -> str:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [word.decode(errors="replace") for word in args if word]
    if "--name" in words:
        return f"agent {words[words.index('--name') + 1]}"
    for marker, label in (("uvicorn", "web (uvicorn)"), ("worker", "celery worker"), ("beat", "celery beat")):
        if marker in words:
            return label
    if any(word.endswith("run_console.py") for word in words):
        return "run_console.py (launcher)"
    return " ".join(words)[:60]


def resident(pids: list[int]) -> list[tuple[str, int, int, int]]:
    rows = []
    for pid in pids:
        try:
            rows.append((describe(pid), pid, status_kib(pid, "VmRSS"), status_kib(pid, "RssAnon")))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return rows


def print_resident(title: str, rows: list[tuple[str, int, int, int]]) -> int:
    print(f"\n{title}")
    print(f"  {'process':28} {'pid':>7} {'VmRSS MiB':>10} {'RssAnon MiB':>12}")
    for label, pid, rss, anon in sorted(rows):
        print(f"  {label:28} {pid:>7} {rss / 1024:>10.0f} {anon / 1024:>12.0f}")
    total = sum(row[2] for row in rows)
    total_anon = sum(row[3] for row in rows)
    print(f"  {'total':28} {'':>7} {total / 1024:>10.0f} {total_anon / 1024:>12.0f}")
    verdict = "under" if total * 1024 < 2 * GIB else "OVER"
    print(f"  total resident {total * 1024 / GIB:.2f} GiB ({verdict} 2 GiB)")
    return total


ARENA_SIZE = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit: each thread arena is one such aligned map


def anonymous_maps(pid: int) -> dict[str, int]:
    """Where a process's anonymous resident memory lives (KiB, from /proc/PID/smaps): the malloc heap
    (``[heap]``), glibc's per-thread malloc arenas (anonymous maps at a 64 MiB boundary, at most 64
    MiB), maps larger than that (a simulated guest's memory and digest table), and the rest (thread
    stacks, small mmaps, Python's arenas)."""
    kinds = {"heap": 0, "thread arenas": 0, "large maps": 0, "other": 0}
    kind = "other"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            start, end = (int(edge, 16) for edge in fields[0].split("-"))
            path = fields[5] if len(fields) > 5 else ""
            if path == "[heap]":
                kind = "heap"
            elif path:
                kind = "file"
            elif end - start > ARENA_SIZE:
                kind = "large maps"
            elif start % ARENA_SIZE == 0:
                kind = "thread arenas"
            else:
                kind = "other"
        elif fields[0] == "Anonymous:" and kind != "file":
            kinds[kind] += int(fields[1])
    return kinds


def print_agent_maps(pids: list[int]) -> None:
    print(f"  {'agent anonymous memory, MiB':28} {'heap':>7} {'arenas':>7} {'large':>7} {'other':>7}")
    for pid in pids:
        try:
            label = describe(pid)
            if not label.startswith("agent "):
                continue
            kinds = anonymous_maps(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        print(
            f"  {label:28} {kinds['heap'] / 1024:>7.0f} {kinds['thread arenas'] / 1024:>7.0f} "
            f"{kinds['large maps'] / 1024:>7.0f} {kinds['other'] / 1024:>7.0f}"
        )


def agents_of(var_dir: Path, base_port: int) -> dict[str, AgentClient]:
    """Clients of `make run`'s agents: HTTPS with var/pki's CA (plain HTTP if it has none)."""
    secrets_dir = var_dir / "agent-secrets"
    ca = var_dir / "pki" / "ca.pem"
    scheme, trust = ("https", ca.read_text()) if ca.exists() else ("http", "")
    return {
        name: AgentClient(
            f"{scheme}://127.0.0.1:{base_port + index}",
            (secrets_dir / f"{name}.secret").read_text().strip(),
            trust=trust,
            timeout_s=60,
        )
        for index, name in enumerate(HOSTS)
    }


class Agent:  # what bench.agents.migrate needs: a .client
    def __init__(self, client: AgentClient) -> None:
        self.client = client


def migrate_all_twice(clients: dict[str, AgentClient], limit: int | None = None) -> list[str]:
    """Every running guest (the first ``limit`` ones) to its partner host and back; a line per guest."""
    lines = []
    running = [
        (host, guest)
        for host in HOSTS
        for guest in clients[host].list_guests()
        if guest.hardware_status == "on" and not guest.migrating
    ][:limit]
    for host, guest in running:
        spec = guest.model_dump(include={"guest_id", "name", "memory_mib", "vcpus", "os_type"})
        written_mib = guest.workload["resident_mib"]
        there, back = Agent(clients[PARTNER[host]]), Agent(clients[host])
        first = migrate(Agent(clients[host]), there, spec)
        second = migrate(there, back, spec)
        for moved in (first, second):
            if moved.ready.source_digest != moved.target_digest:
                raise SystemExit(f"{guest.name}: digests differ: {moved.ready}")
        lines.append(
            f"  {guest.name:10} {guest.memory_mib:>5} MiB  {host} -> {PARTNER[host]} -> {host}: "
            f"{first.total_s:.1f} s, {second.total_s:.1f} s, "
            f"{(first.ready.bytes_sent + second.ready.bytes_sent) / 2**20:.0f} MiB sent "
            f"({written_mib} MiB written; rounds {first.ready.round}, {second.ready.round})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settle-s", type=float, default=5.0, help="wait before reading memory")
    parser.add_argument("--quick", action="store_true", help="one guest, 1 s settling: does the bench run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory and its logs")
    parser.add_argument("--project", type=Path, default=ROOT, help="run this checkout's stack")
    args = parser.parse_args()
    settle_s = 1.0 if args.quick else args.settle_s
    # `timeout` and Ctrl-C alike: the finally below stops the processes started here.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    scratch = Path(tempfile.mkdtemp(prefix="bench-demo-memory-"))
    var_dir = scratch / "var"
    port, base_port = free_port(), free_port_block(len(HOSTS))
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("REDIS_URL", "SECRET", "DATABASE_URL", "DJANGO_", "MATRIXOE_", "DEMO_"))
    }
    environment.update(
        PORT=str(port),
        AGENT_BASE_PORT=str(base_port),
        MATRIXOE_VAR_DIR=str(var_dir),
        MATRIXOE_REDIS_PORT=str(free_port()),  # its own Redis: one on 6380 belongs to a `make run`
        CELERY_QUEUE=f"bench-demo-memory-{port}",
        CHANNELS_PREFIX=f"bench-demo-memory-{port}",
        PYTHONUNBUFFERED="1",
    )
    log_path = scratch / "run_console.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed in finally)
    launcher = subprocess.Popen(
        [sys.executable, "scripts/run_console.py", "--port", str(port)],
        cwd=args.project,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    succeeded = False
    try:
        started = time.perf_counter()
        if not wait_until(
            lambda: launcher.poll() is not None or answers_http(f"http://127.0.0.1:{port}/login/"), 180, 0.5
        ):
            raise SystemExit(f"the console did not start within 180 s; see {log_path}")
        if launcher.poll() is not None:
            raise SystemExit(f"run_console.py exited (status {launcher.returncode}); see {log_path}")
        print(f"`make run` stack up in {time.perf_counter() - started:.0f} s (console on port {port})")
        time.sleep(settle_s)
        pids = descendants(launcher.pid)
        before = print_resident("resident memory, demo fleet booted", resident(pids))
        print_agent_maps(pids)
        clients = agents_of(var_dir, base_port)
        print(
            "\nmigrating every running demo guest twice:"
            if not args.quick
            else "\nmigrating one guest twice:"
        )
        lines = migrate_all_twice(clients, limit=1 if args.quick else None)
        for line in lines:
            print(line)
        time.sleep(settle_s)
        pids = descendants(launcher.pid)
        after = print_resident(
            f"resident memory after {2 * len(lines)} migrations (every guest back on its first host)",
            resident(pids),
        )
        print_agent_maps(pids)
        load = Path("/proc/loadavg").read_text().strip()
        print(f"\nchange: {(after - before) / 1024:+.0f} MiB; load {load}")
        for client in clients.values():
            client.close()
        succeeded = True
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGINT)
            try:
                launcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
        log.close()
        if args.keep or not succeeded:
            print(f"scratch directory and logs kept in {scratch} (run_console.py's output: {log_path})")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
