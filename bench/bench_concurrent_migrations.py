"""Concurrent migrations across a fleet: 20 at once between 40 hosts, with 2 workers beside 1 worker.

Issue 22's figure "20 concurrent migrations across 40 hosts with 2 workers": click to Init p95, the
control plane's database queries and Redis commands per migration. One run measures both designs, in
turn, on the same stack:

- **40 VSPs, each its own host** (``python -m hostagent.fleet``, two fleet processes of 20, HTTPS): VSP
  1-20 each run one simulated guest (``--memory-mib`` 32, writing ``--dirty-pages`` pages/s), VSP 21-40
  are empty. A batch queues every guest's migration, one call after another as fast as they go
  (``actions.do_request_migration``, as 20 admins clicking together), to the empty partner; the next
  batch takes them back.
- **The control plane**: PostgreSQL (a throwaway database on the local server; ``BENCH_DATABASE_URL``
  overrides; SQLite only if no PostgreSQL answers, and the report says so), a private Redis (its
  ``INFO commandstats`` gives the commands), and Celery workers (threads pool): one with a thread per
  migration, then two with half as many each (the same slots, two processes). Each worker counts its
  own queries (``bench/query_counter.py``, loaded with ``--include``); the queueing here is counted too.

Click to Init: from the call that queues it (the click) to the worker's ``init_started_at``. Per
migration: all queries (queueing plus workers) and all Redis commands during the batch, divided by the
batch's migrations.

    .venv/bin/python bench/bench_concurrent_migrations.py [--migrations 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quick  # noqa: E402
from isolated import BASE_DIR, isolated_console  # noqa: E402

PG_SERVER = os.environ.get("BENCH_POSTGRES_SERVER", "postgres://postgres@127.0.0.1:5432")


def throwaway_postgres() -> tuple[str | None, str | None]:
    """(database URL, name) of a new empty PostgreSQL database, or (None, None) if none answers."""
    try:
        import psycopg

        name = f"bench_conc_{secrets.token_hex(4)}"
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"{PG_SERVER}/{name}", name
    except Exception:  # noqa: BLE001 - any failure means: no PostgreSQL for this bench
        return None, None


def drop_postgres(name: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=3) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


PG_URL, PG_NAME = (
    (os.environ["BENCH_DATABASE_URL"], None) if os.environ.get("BENCH_DATABASE_URL") else throwaway_postgres()
)
if PG_URL:
    os.environ["BENCH_DATABASE_URL"] = PG_URL
sys.path.insert(0, str(BASE_DIR))
from devtools.processes import free_port  # noqa: E402

REDIS_PORT = free_port()
WORK_DIR = isolated_console("bench-concurrent-", REDIS_URL=f"redis://127.0.0.1:{REDIS_PORT}/0")
os.environ["MATRIXOE_VAR_DIR"] = str(WORK_DIR)
os.environ.pop("REDIS_URL_FILE", None)

from devtools.local_secrets import use_local_secrets  # noqa: E402
from devtools.processes import (  # noqa: E402
    AgentProcess,
    ManagedProcess,
    start_celery_worker,
    start_fleet,
    stop_all,
    wait_until,
)

use_local_secrets()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--migrations", type=int, default=20, help="migrations at once (hosts: twice that)")
    parser.add_argument("--rounds", type=int, default=2, help="batches per design")
    parser.add_argument("--memory-mib", type=int, default=32)
    parser.add_argument("--dirty-pages", type=int, default=200, help="each guest's writes, pages/s")
    args = quick.parse_args(parser, {"migrations": 2, "rounds": 1, "memory_mib": 8})
    subprocess.run([sys.executable, "scripts/ensure_redis.py"], cwd=BASE_DIR, check=True)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=BASE_DIR, check=True)
    fleets: list[ManagedProcess] = []
    results = []
    try:
        members = []
        for half in ("conca", "concb"):
            started = start_fleet(
                half,
                args.migrations,
                WORK_DIR / "secrets",
                log_path=WORK_DIR / f"{half}.log",
                pki_dir=WORK_DIR / "pki",
            )
            members += started
            fleets.append(started[0].process)
        vms, vsps = populate(members, args)
        slots = max(args.migrations, 2)
        for workers in (1, 2):
            threads = slots // workers
            design = f"{workers} worker{'s' if workers > 1 else ''} x {threads} threads"
            running = start_workers(workers, threads)
            try:
                for _ in range(args.rounds):
                    results.append((design, batch(vms, vsps, args.migrations)))
            finally:
                stop_all(running)
    finally:
        stop_all(fleets)
        stop_redis()
        if PG_NAME:
            drop_postgres(PG_NAME)
    report(args, results)
    shutil.rmtree(WORK_DIR, ignore_errors=True)


def populate(members: list[AgentProcess], args: argparse.Namespace):
    """Django set up; a VSP per fleet member (first half: one running guest each); an admin. (vms, vsps)"""
    import django

    django.setup()
    from vms.agent_client import AgentClient
    from vms.agent_messages import guest_spec
    from vms.models import VSP, Registration, VirtualMachine

    ca = members[0].ca.read_text() if members[0].ca else ""
    vsps = [
        VSP.objects.create(
            name=member.name,
            agent_url=member.url,
            agent_secret=member.secret,
            agent_certificate=ca,
            memory_mib=65536,
            cpus=16,
        )
        for member in members
    ]
    vms = []
    for number, vsp in enumerate(vsps[: args.migrations]):
        vm = VirtualMachine.objects.create(
            name=f"conc{number:02d}", os_status="up", memory_mib=args.memory_mib, vcpus=1
        )
        Registration.objects.create(vm=vm, vsp=vsp, hardware_status=Registration.HardwareStatus.ON)
        with AgentClient.for_vsp(vsp) as client:
            client.define_guest(guest_spec(vm, dirty_pages_per_s=args.dirty_pages, running=True))
        vms.append(vm)
    from django.contrib.auth.models import User

    User.objects.create_superuser("bench", password="bench-password")  # noqa: S106 - throwaway database
    return vms, vsps


def start_workers(count: int, threads: int) -> list[ManagedProcess]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent), QUERY_COUNT_DIR=str(WORK_DIR))
    for old in WORK_DIR.glob("queries-*"):
        old.unlink()
    return [
        start_celery_worker(
            f"conc{number}",
            WORK_DIR / f"worker{number}.log",
            queue=os.environ["CELERY_QUEUE"],
            concurrency=threads,
            env=env,
            extra_args=["--include", "query_counter"],
        )
        for number in range(count)
    ]


def worker_queries() -> int:
    return sum(int(path.read_text() or 0) for path in WORK_DIR.glob("queries-*"))


def redis_commands() -> int:
    import redis

    stats = redis.Redis(port=REDIS_PORT).info("commandstats")
    return sum(int(value["calls"]) for value in stats.values())


def batch(vms, vsps, count: int) -> dict:
    """Queue every guest's migration to its partner at once; wait for all to end. The batch's figures."""
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from migrations_app.actions import do_request_migration
    from migrations_app.models import Migration
    from vms.models import Registration

    admin = User.objects.get(username="bench")
    queries_before, redis_before = worker_queries(), redis_commands()
    started = time.monotonic()
    clicked: dict[int, float] = {}
    with CaptureQueriesContext(connection) as queued:
        for vm in vms:
            here = Registration.objects.exclude(hardware_status="not_runnable").get(vm=vm).vsp
            partner = vsps[(vsps.index(here) + count) % (2 * count)]
            click = time.time()
            clicked[do_request_migration(vm, partner, admin).pk] = click
    ids = list(clicked)

    def ended() -> bool:
        return not Migration.objects.filter(pk__in=ids).exclude(state__in=Migration.TERMINAL_STATES).exists()

    if not wait_until(ended, timeout=600, interval=0.2):
        raise SystemExit("the batch did not end within 600 s")
    wall = time.monotonic() - started
    time.sleep(1.5)  # the last tasks' post-run counts are written
    rows = list(Migration.objects.filter(pk__in=ids))
    failed = [f"{row.pk} {row.state}: {row.alert}" for row in rows if row.state != Migration.State.COMPLETED]
    to_init = [
        (row.init_started_at.timestamp() - clicked[row.pk]) * 1000 for row in rows if row.init_started_at
    ]
    return {
        "wall_s": wall,
        "to_init_ms": to_init,
        "failed": failed,
        "queries": (len(queued.captured_queries) + worker_queries() - queries_before) / len(ids),
        "redis": (redis_commands() - redis_before) / len(ids),
    }


def stop_redis() -> None:
    pid_file = WORK_DIR / "redis.pid"
    if pid_file.exists():
        subprocess.run(["kill", pid_file.read_text().strip()], check=False)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def report(args: argparse.Namespace, results: list[tuple[str, dict]]) -> None:
    from django.conf import settings

    engine = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    print(
        f"{args.migrations} migrations at once between {2 * args.migrations} hosts (2 fleet processes), "
        f"guests {args.memory_mib} MiB writing {args.dirty_pages} pages/s; database {engine}, private Redis; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"  {'design':<24} {'batch':>7} {'to Init p50':>12} {'p95':>8} {'max':>8} "
        f"{'queries/mig':>12} {'Redis cmds/mig':>15}  failed"
    )
    for design, result in results:
        to_init = result["to_init_ms"] or [float("nan")]
        print(
            f"  {design:<24} {result['wall_s']:6.1f}s {statistics.median(to_init):10.0f}ms "
            f"{percentile(to_init, 0.95):6.0f}ms {max(to_init):6.0f}ms {result['queries']:12.0f} "
            f"{result['redis']:15.0f}  {len(result['failed'])}"
        )
        for line in result["failed"][:3]:
            print(f"      {line}")


if __name__ == "__main__":
    main()
