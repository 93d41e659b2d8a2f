"""Server time and query count of the General tab and the VM list, with 100 and with 10,000 VMs,
and of the migration history and a migration report, with 100 and with 100,000 migrations
(10 events each: 1,000,000 events).

Each size gets a throwaway SQLite database, or with ``--postgres`` a throwaway PostgreSQL database on the
local server (``BENCH_POSTGRES_SERVER``, default ``postgres://postgres@127.0.0.1:5432``), as production
runs; requests go through Django's test Client (the whole middleware and template stack, no network).
Prints the median of N requests per page, and fails if a page's query count differs between the sizes.

    .venv/bin/python bench/bench_pages.py [--requests 30] [--sizes 100 10000]
        [--history-sizes 100 100000] [--skip-vms] [--skip-history] [--postgres]
    .venv/bin/python bench/bench_pages.py --postgres --sizes 1000 100000 --history-sizes 1000 100000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench import quick  # noqa: E402

POSTGRES_SERVER = os.environ.get("BENCH_POSTGRES_SERVER", "postgres://postgres@127.0.0.1:5432")


def configure_django(database_url: str) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "matrixoe.settings"
    os.environ["DATABASE_URL"] = database_url
    os.environ["ALLOWED_HOSTS"] = "testserver"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    from devtools.local_secrets import use_local_secrets

    use_local_secrets()  # SECRET_KEY and the secrets key from var/, as `make run` uses
    warnings.filterwarnings("ignore", message="No directory at", module="django.core.handlers.base")
    import django

    django.setup()


def fill(vm_count: int) -> None:
    """``vm_count`` guests over 8 VSPs; every tenth has a Not Runnable copy on the next VSP.

    vsp0-vsp5 are in host group "A", vsp6 and vsp7 in "B"; "bench" is a superuser, "member" a viewer
    of group A with the view permissions (what they see is filtered by a join on the memberships).
    """
    from django.contrib.auth.models import Permission, User

    from vms.models import VSP, HostGroup, HostGroupMembership, Registration, VirtualMachine

    group_a, group_b = HostGroup.objects.create(name="A"), HostGroup.objects.create(name="B")

    vsps = VSP.objects.bulk_create(
        VSP(
            name=f"vsp{i}",
            agent_url=f"http://127.0.0.1:{7101 + i}",
            agent_secret="x",  # noqa: S106 - throwaway database
            memory_mib=2**20,
            cpus=64,
            group=group_a if i < 6 else group_b,
        )
        for i in range(8)
    )
    vms = VirtualMachine.objects.bulk_create(
        (
            VirtualMachine(
                name=f"guest-{n:05}",
                kind="vpar" if n % 50 == 0 else "vm",
                os_type="Debian 12",
                os_status=["up", "down", "initializing", "in_efi"][n % 4],
                memory_mib=128 * (1 + n % 32),
                vcpus=1 + n % 4,
            )
            for n in range(vm_count)
        ),
        batch_size=2000,
    )
    registrations = []
    for n, vm in enumerate(vms):
        registrations.append(Registration(vm=vm, vsp=vsps[n % 8], hardware_status="on" if n % 3 else "off"))
        if n % 10 == 0:
            registrations.append(
                Registration(
                    vm=vm,
                    vsp=vsps[(n + 1) % 8],
                    hardware_status="not_runnable",
                    not_runnable_set_by="migrate",
                    not_runnable_reason="guest migrated",
                )
            )
    Registration.objects.bulk_create(registrations, batch_size=2000)
    User.objects.create_superuser("bench", password="bench-password")  # noqa: S106 - throwaway database
    member = User.objects.create_user("member", password="bench-password")  # noqa: S106
    member.user_permissions.add(*Permission.objects.filter(codename__in=["view_vsp", "view_virtualmachine"]))
    HostGroupMembership.objects.create(group=group_a, user=member, role="viewer")


def measure(client, url: str, requests: int) -> tuple[float, int, float]:
    """Median server time in ms, the query count of one request, and the median CPU time in ms.

    The CPU time (``time.process_time``: this process, SQLite included, as it runs in-process) is what
    a quiet machine would take; on a shared machine the wall time adds the waits for a core.
    """
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client.get(url)  # warm caches (templates, permissions) as a running server would have them
    timings, cpu = [], []
    for _ in range(requests):
        started, started_cpu = time.perf_counter(), time.process_time()
        response = client.get(url)
        timings.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
        assert response.status_code == 200, (url, response.status_code)
    with CaptureQueriesContext(connection) as queries:
        client.get(url)
    return statistics.median(timings), len(queries), statistics.median(cpu)


def pages(suffix: str = "", group: str | None = None) -> dict[str, str]:
    """The measured pages; with ``group``, a guest of that host group for the General tab and the last
    page of what a member of it sees."""
    from vms.models import VirtualMachine
    from vms.views import PAGE_SIZE

    guests = VirtualMachine.objects.all()
    if group is not None:
        guests = guests.filter(registrations__vsp__group__name=group).distinct()
    last_page = -(-guests.count() // PAGE_SIZE)
    middle = guests.filter(registrations__hardware_status="not_runnable").order_by("pk")
    vm = middle[middle.count() // 2]
    return {
        f"General tab{suffix}": f"/vms/{vm.pk}/general/",
        f"VM list{suffix}": "/",
        f"VM list, filtered{suffix}": "/?q=guest&kind=vm&os_status=up&hardware_status=on",
        f"VM list, last page{suffix}": f"/?page={last_page}",
        f"VSP list{suffix}": "/vsps/",
    }


EVENTS_PER_MIGRATION = 10
HISTORY_VMS = 500
SAMPLED_EVERY = 100  # one migration in SAMPLED_EVERY keeps 40 rounds of convergence samples


def fill_history(migration_count: int) -> None:
    """``migration_count`` migrations of ``HISTORY_VMS`` guests over 8 VSPs, over the last year, with
    ``EVENTS_PER_MIGRATION`` events each (inserted with executemany: a million rows in under a minute)."""
    from datetime import timedelta

    from django.contrib.auth.models import User
    from django.db import connection, transaction
    from django.utils import timezone

    from migrations_app.models import Migration, MigrationEvent
    from vms.models import VSP, VirtualMachine

    fill(HISTORY_VMS)
    vsps = list(VSP.objects.order_by("pk"))
    vms = list(VirtualMachine.objects.order_by("pk"))
    users = [User.objects.create_user(f"admin{i}") for i in range(5)]
    now = timezone.now()
    outcomes = ["completed"] * 7 + ["aborted", "cancelled", "refused"]
    samples = [[i * 0.5, i + 1, i * 2**24, 2**30 // (i + 1), 2**22, 2**25] for i in range(40)]
    step = timedelta(days=365) / migration_count
    rows = []
    for n in range(migration_count):
        at = now - step * (migration_count - n)
        vm = vms[n % len(vms)]
        state = outcomes[n % len(outcomes)]
        rows.append(
            Migration(
                vm=vm,
                vm_name=vm.name,
                source=vsps[n % 8],
                target=vsps[(n + 1) % 8],
                requested_by=users[n % 5],
                requested_at=at,
                state=state,
                state_changed_at=at + timedelta(seconds=30),
                init_started_at=None if state == "refused" else at + timedelta(seconds=1),
                failed_phase="copy" if state == "aborted" else "",
                downtime_ms=40 + n % 200 if state == "completed" else None,
                bytes_sent=2**30,
                rounds=40,
                round_samples=samples if n % SAMPLED_EVERY == 0 else [],
            )
        )
    with transaction.atomic():
        Migration.objects.bulk_create(rows, batch_size=5000)
    table = MigrationEvent._meta.db_table
    ids = list(Migration.objects.order_by("pk").values_list("pk", "requested_at"))
    columns = "migration_id, at, from_state, to_state, message, actor_id"
    sql = f"INSERT INTO {table} ({columns}) VALUES (%s, %s, %s, %s, %s, %s)"  # noqa: S608 - our own names
    with transaction.atomic(), connection.cursor() as cursor:
        batch = []
        for pk, at in ids:
            for e in range(EVENTS_PER_MIGRATION):
                batch.append(
                    (pk, at + timedelta(seconds=e), "copy", "copy", f"Event {e} of migration {pk}", None)
                )
            if len(batch) >= 50_000:
                cursor.executemany(sql, batch)
                batch = []
        cursor.executemany(sql, batch)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


def history_pages() -> dict[str, str]:
    from migrations_app.models import Migration
    from vms.models import VSP

    sampled = Migration.objects.exclude(round_samples=[]).order_by("pk")
    middle = sampled[sampled.count() // 2]
    vsp = VSP.objects.order_by("pk")[3]
    return {
        "History": "/migrations/history/",
        "History, filtered": f"/migrations/history/?vsp={vsp.pk}&outcome=aborted&user=admin2",
        "History, by VM": "/migrations/history/?vm=guest-00042",
        "Report": f"/migrations/history/{middle.pk}/report/",
        "Report data (JSON)": f"/migrations/history/{middle.pk}/report/data/",
    }


def run_history_size(migration_count: int, requests: int) -> dict[str, tuple[float, int, float]]:
    from django.core.management import call_command
    from django.test import Client

    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    fill_history(migration_count)
    analyze()
    print(f"filled {migration_count} migrations in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    from django.contrib.auth.models import User

    client = Client()
    client.force_login(User.objects.get(username="bench"))  # axes wants a request for login()
    return {name: measure(client, url, requests) for name, url in history_pages().items()}


def analyze() -> None:
    """PostgreSQL: planner statistics for the rows just bulk-loaded, as autovacuum would soon gather
    them; without them it plans the pages as if the tables were empty. SQLite gathers none by itself,
    so none here either (its figures stay comparable with earlier runs)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


def run_size(vm_count: int, requests: int) -> dict[str, tuple[float, int, float]]:
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test import Client

    call_command("migrate", verbosity=0)
    fill(vm_count)
    analyze()
    client, member = Client(), Client()
    client.force_login(User.objects.get(username="bench"))  # axes wants a request for login()
    member.force_login(User.objects.get(username="member"))
    results = {name: measure(client, url, requests) for name, url in pages().items()}
    results |= {name: measure(member, url, requests) for name, url in pages(" (member)", "A").items()}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--history-sizes", type=int, nargs="+", default=[100, 100_000])
    parser.add_argument("--skip-vms", action="store_true")
    parser.add_argument("--skip-history", action="store_true")
    parser.add_argument("--postgres", action="store_true", help="throwaway PostgreSQL databases, not SQLite")
    options = quick.parse_args(parser, {"requests": 2, "sizes": [20, 40], "history_sizes": [100, 200]})
    failed = False
    with tempfile.TemporaryDirectory() as scratch:
        postgres = options.postgres
        configure_django(f"{POSTGRES_SERVER}/postgres" if postgres else f"sqlite:///{scratch}/bench.sqlite3")
        engine = "PostgreSQL" if postgres else "SQLite"
        if not options.skip_vms:
            results = run_sizes(scratch, "vms", options.sizes, run_size, options.requests, postgres)
            failed |= not report(results, options.sizes, "VMs", options.requests, engine)
        if not options.skip_history:
            sizes = options.history_sizes
            results = run_sizes(scratch, "history", sizes, run_history_size, options.requests, postgres)
            failed |= not report(results, sizes, "migrations", options.requests, engine)
    return 1 if failed else 0


def run_sizes(
    scratch: str, kind: str, sizes: list[int], run, requests: int, postgres: bool = False
) -> dict[int, dict]:
    """``run(size, requests)`` on a database of its own per size (a file, or a PostgreSQL database made
    and dropped here)."""
    from django.db import connection

    results = {}
    for size in sizes:
        connection.close()
        name = f"bench_{kind}_{size}_{os.getpid()}"
        if postgres:
            postgres_database(name, create=True)
            connection.settings_dict["NAME"] = name
        else:
            connection.settings_dict["NAME"] = str(Path(scratch) / f"{name}.sqlite3")
        try:
            results[size] = run(size, requests)
        finally:
            connection.close()
            if postgres:
                postgres_database(name, create=False)
    return results


def postgres_database(name: str, create: bool) -> None:
    """Create (or drop) the database ``name`` on the bench's PostgreSQL server."""
    import psycopg

    with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE DATABASE {name}" if create else f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def cell(wall_ms: float, queries: int, cpu_ms: float) -> str:
    return f"{wall_ms:.1f} ms (CPU {cpu_ms:.1f}), {queries} queries"


def report(
    results: dict[int, dict[str, tuple[float, int, float]]],
    sizes: list[int],
    unit: str,
    requests: int,
    engine: str = "SQLite",
) -> bool:
    cpu_note = "CPU time in brackets" if engine == "SQLite" else "CPU time of Django only in brackets"
    print(
        f"Server time (median of {requests} requests, Django test Client, {engine}; {cpu_note}),"
        f" query count; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'page':<30}" + "".join(f"{f'{size} {unit}':>36}" for size in sizes))
    for name in results[sizes[0]]:
        cells = "".join(f"{cell(*results[size][name]):>36}" for size in sizes)
        print(f"{name:<30}{cells}")
    uneven = [name for name in results[sizes[0]] if len({results[s][name][1] for s in sizes}) > 1]
    if uneven:
        print(f"FAIL: query count depends on the number of {unit} for: {', '.join(uneven)}")
        return False
    print(f"OK: every page makes the same number of queries at every number of {unit}.")
    return True


if __name__ == "__main__":
    sys.exit(main())
