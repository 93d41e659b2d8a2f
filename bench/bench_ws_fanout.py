"""Websocket fan-out: from a migration progress event to its arrival at N browsers watching one VM.

    .venv/bin/python bench/bench_ws_fanout.py [--clients 1 100 1000] [--events 50] [--deflate]
    .venv/bin/python bench/bench_ws_fanout.py --setups 1:1000 4:4000 --events 30   # processes:watchers

1. Makes a throwaway SQLite database (var/bench-ws-<pid>.sqlite3) with one VM migrating, and a user
   allowed to watch it; a private channel-layer prefix keeps other runs' messages apart.
2. Starts ONE uvicorn process (``--ws websockets-sansio``) serving the console (matrixoe.asgi), or,
   with ``--setups P:N``, P of them (the cluster profile's web processes; each renders its own copy).
3. Connects N logged-in websocket clients (session cookie, same-origin header) to ``/ws/vms/<id>/``,
   spread over the P processes in turn, as the balancer's leastconn spreads long-lived sockets.
4. Latency: for each event, bumps the migration's counters in the database and publishes its facts
   exactly as the worker does (``build_progress_messages`` + ``send_messages``); the server process
   renders them once per class of watchers (``fanout.RenderCache``) and sends each client its copy.
   Records the time until each client has it; waits for all clients before the next event. p50/p99
   over all (client, event) pairs; the clock starts before the database write, so it covers the
   publish, the web's render and the fan-out. (The same script at an older commit, where the worker
   rendered HTML and each socket cut its controls out, measures that design the same way.)
5. Throughput: publishes events back to back for a few seconds and counts the frames the clients
   receive per second (the clients share this process and one core with the publisher, so this is
   a floor for what the server process sustains).

The clients are aiohttp websockets in this process (cheaper per frame than browsers), without
permessage-deflate unless ``--deflate`` (browsers ask for it; the server then compresses per client).
They share the machine's cores with the web processes and Redis: with 4 processes and 4,000 clients
on 2 cores, the figures are what one machine can show of the design, not what 4 machines would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench import quick  # noqa: E402

DB_PATH = BASE_DIR / "var" / f"bench-ws-{os.getpid()}.sqlite3"


def server_log(port: int) -> Path:
    return BASE_DIR / "var" / f"bench-ws-{os.getpid()}-uvicorn-{port}.log"


ENV = {
    "DJANGO_SETTINGS_MODULE": "matrixoe.settings",
    "DATABASE_URL": f"sqlite:///{DB_PATH}",
    "CHANNELS_PREFIX": f"bench-ws-{os.getpid()}",
    "LOG_LEVEL": "WARNING",
}
os.environ.update(ENV)
from devtools.local_secrets import use_local_secrets  # noqa: E402

use_local_secrets()  # SECRET_KEY and the secrets key from var/, as `make run` uses

import aiohttp  # noqa: E402
import django  # noqa: E402

django.setup()

from asgiref.sync import sync_to_async  # noqa: E402
from django.contrib.auth.models import Permission, User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.test import Client  # noqa: E402

from devtools.processes import ManagedProcess, free_port, start_console_server  # noqa: E402
from migrations_app.models import Migration  # noqa: E402
from migrations_app.progress import build_progress_messages, send_messages, vm_group  # noqa: E402
from vms.models import VSP, HostGroup, HostGroupMembership, Registration, VirtualMachine  # noqa: E402

ROUND = re.compile(r'data-round="(\d+)"')


def make_world() -> tuple[int, str]:
    """A migrating VM and a watcher's session cookie."""
    call_command("migrate", verbosity=0)
    group = HostGroup.objects.create(name="bench")
    vsp1, vsp2 = (
        VSP.objects.create(
            name=name,
            group=group,
            agent_url="http://127.0.0.1:9",
            agent_secret="bench",  # noqa: S106 - no agent is contacted
            memory_mib=65536,
            cpus=8,
        )
        for name in ("vsp1", "vsp2")
    )
    vm = VirtualMachine.objects.create(name="web01", memory_mib=1024, os_status="up")
    Registration.objects.create(vm=vm, vsp=vsp1, hardware_status="on")
    Migration.objects.create(vm=vm, source=vsp1, target=vsp2, state="copy", init_percent=100)
    user = User.objects.create_user("watcher", password=None)
    user.user_permissions.add(Permission.objects.get(codename="view_virtualmachine"))
    HostGroupMembership.objects.create(group=group, user=user, role="viewer")
    client = Client()
    client.force_login(user)
    return vm.pk, client.cookies["sessionid"].value


def start_server(port: int, deflate: bool) -> ManagedProcess:
    deflate_arg = ["--ws-per-message-deflate", str(deflate).lower()]
    return start_console_server(
        port, server_log(port), "--log-level", "warning", *deflate_arg, env=os.environ.copy()
    )


def bump_counters(migration_id: int, seq: int) -> None:
    Migration.objects.filter(pk=migration_id).update(
        rounds=seq, copy_percent=seq % 100, bytes_sent=seq * 2**20
    )


def publish_sync(migration_id: int, seq: int):
    bump_counters(migration_id, seq)
    return build_progress_messages(migration_id)


class Watchers:
    """N websocket clients; each arrival of round ``seq`` is timed."""

    def __init__(self) -> None:
        self.arrivals: dict[int, list[float]] = {}
        self.frames = 0
        self.waiters: dict[int, tuple[int, asyncio.Future]] = {}

    def on_frame(self, html: str) -> None:
        now = time.perf_counter()
        self.frames += 1
        match = ROUND.search(html)
        if not match:
            return
        seq = int(match.group(1))
        times = self.arrivals.setdefault(seq, [])
        times.append(now)
        waiter = self.waiters.get(seq)
        if waiter and len(times) >= waiter[0] and not waiter[1].done():
            waiter[1].set_result(None)

    def wait_for(self, seq: int, count: int) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.waiters[seq] = (count, future)
        if len(self.arrivals.get(seq, [])) >= count:
            future.set_result(None)
        return future


async def watch(session: aiohttp.ClientSession, url: str, origin: str, watchers: Watchers, ready) -> None:
    async with session.ws_connect(url, headers={"Origin": origin}, compress=15 if DEFLATE else 0) as ws:
        await ws.receive()  # the current state, sent first on connect
        ready()
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                watchers.on_frame(message.data)


async def connect_all(n: int, ports: list[int], vm_id: int, cookie: str, watchers: Watchers):
    """``n`` watchers, the i-th on ``ports[i % len(ports)]`` (each process its own origin)."""
    jar = aiohttp.CookieJar(unsafe=True)
    connector = aiohttp.TCPConnector(limit=0)  # one connection per watcher, no pool limit
    session = aiohttp.ClientSession(connector=connector, cookie_jar=jar, cookies={"sessionid": cookie})
    connected = asyncio.Semaphore(0)
    tasks = []
    for start in range(0, n, 50):  # in batches, like browsers arriving
        batch = [
            asyncio.create_task(
                watch(
                    session,
                    f"ws://127.0.0.1:{ports[index % len(ports)]}/ws/vms/{vm_id}/",
                    f"http://127.0.0.1:{ports[index % len(ports)]}",
                    watchers,
                    connected.release,
                )
            )
            for index in range(start, start + min(50, n - start))
        ]
        tasks += batch
        for _ in batch:
            await asyncio.wait_for(connected.acquire(), timeout=60)
    return session, tasks


async def measure(
    n: int, events: int, ports: list[int], vm_id: int, cookie: str, migration_id: int, seq0: int
):
    watchers = Watchers()
    session, tasks = await connect_all(n, ports, vm_id, cookie, watchers)
    latencies: list[float] = []
    missed = 0
    seq = seq0
    for event in range(events + 2):  # the first two warm up (template and query caches), not counted
        seq += 1
        arrived = watchers.wait_for(seq, n)
        started = time.perf_counter()
        messages = await sync_to_async(publish_sync)(migration_id, seq)
        await send_messages({vm_group(vm_id): messages[vm_group(vm_id)]})
        try:
            await asyncio.wait_for(arrived, timeout=15)
        except TimeoutError:
            missed += n - len(watchers.arrivals.get(seq, []))
        if event >= 2:
            latencies += [(t - started) * 1000 for t in watchers.arrivals.get(seq, [])]
        await asyncio.sleep(0.02)
    rate = await sustained_rate(watchers, migration_id, vm_id, seq, n)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await session.close()
    return latencies, missed, rate, seq + 10_000


async def sustained_rate(watchers: Watchers, migration_id: int, vm_id: int, seq: int, n: int) -> float:
    """Publish back to back (at most ~2 s of frames queued) and count frames received per second."""
    messages = await sync_to_async(publish_sync)(migration_id, seq)
    message = messages[vm_group(vm_id)]
    frames_before, started = watchers.frames, time.perf_counter()
    duration, sent = 4.0, 0
    while time.perf_counter() - started < duration:
        # Keep the backlog bounded so the channel layer's capacity (messages per process) is never hit.
        if (sent * n - (watchers.frames - frames_before)) < 2 * n + 500:
            await send_messages({vm_group(vm_id): message})
            sent += 1
        await asyncio.sleep(0.001 if n > 10 else 0.0005)
    received = watchers.frames - frames_before
    return received / (time.perf_counter() - started)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


DEFLATE = False


def main() -> None:
    global DEFLATE
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument(
        "--setups",
        nargs="+",
        metavar="P:N",
        help="instead of --clients: P web processes with N watchers spread over them, e.g. 1:1000 4:4000",
    )
    parser.add_argument("--events", type=int, default=40)
    parser.add_argument("--deflate", action="store_true", help="clients ask for permessage-deflate")
    options = quick.parse_args(parser, {"clients": [1, 10], "events": 5})
    DEFLATE = options.deflate
    setups = parse_setups(options.setups) if options.setups else [(1, n) for n in options.clients]
    subprocess.run([sys.executable, str(BASE_DIR / "scripts" / "ensure_redis.py")], check=True)
    vm_id, cookie = make_world()
    migration_id = Migration.objects.get().pk
    deflate = "on" if DEFLATE else "off"
    servers: list[tuple[ManagedProcess, int]] = []
    print(f"uvicorn processes (--ws websockets-sansio, deflate {deflate}), {os.cpu_count()} cores")
    print("processes  clients  events   p50 ms   p99 ms   max ms  missed  frames/s")
    try:
        seq = 0
        for processes, n in setups:
            while len(servers) < processes:
                port = free_port()
                servers.append((start_server(port, deflate=options.deflate), port))
            ports = [port for _, port in servers[:processes]]
            events = max(10, min(options.events, 4000 // n)) if n > 100 else options.events
            latencies, missed, rate, seq = asyncio.run(
                measure(n, events, ports, vm_id, cookie, migration_id, seq)
            )
            p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
            print(
                f"{processes:>9} {n:>8} {events:>7} {p50:>8.1f} {p99:>8.1f} {max(latencies):>8.1f}"
                f" {missed:>7} {rate:>9.0f}"
            )
    finally:
        for server, port in servers:
            server.stop()
            server_log(port).unlink(missing_ok=True)
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{DB_PATH}{suffix}").unlink(missing_ok=True)


def parse_setups(values: list[str]) -> list[tuple[int, int]]:
    """``["1:1000", "4:4000"]`` -> ``[(1, 1000), (4, 4000)]``; SystemExit on a malformed one."""
    setups = []
    for value in values:
        processes, _, clients = value.partition(":")
        if not (processes.isdigit() and clients.isdigit() and int(processes) > 0 and int(clients) > 0):
            raise SystemExit(f"--setups wants PROCESSES:WATCHERS (both positive integers), not {value!r}")
        setups.append((int(processes), int(clients)))
    return setups


if __name__ == "__main__":
    main()
