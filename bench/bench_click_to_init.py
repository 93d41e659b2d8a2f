"""Latency from the Migrate click to the Init phase starting in a Celery worker.

Runs a private stack on loopback: a throwaway SQLite database, a real Celery worker (threads pool) on a
private queue of the shared Redis, and two real host agents with one small simulated guest. Each run
POSTs the migrate form through Django's test client (the view, the pre-checks, the row lock, the
commit and the enqueue), then waits until the worker has recorded INIT (``init_started_at``); the guest
then finishes migrating and the next run takes it back the other way.

    .venv/bin/python bench/bench_click_to_init.py [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quick  # noqa: E402
from isolated import BASE_DIR, isolated_console  # noqa: E402

WORK_DIR = isolated_console("bench-click-to-init-", ALLOWED_HOSTS="testserver,127.0.0.1")

from devtools.local_secrets import use_local_secrets  # noqa: E402
from devtools.processes import (  # noqa: E402
    AgentProcess,
    ManagedProcess,
    free_port,
    start_agent,
    start_celery_worker,
    stop_all,
    wait_until,
    write_secret_file,
)

use_local_secrets()  # SECRET_KEY and the secrets key from var/, as `make run` uses


def start_bench_agent(name: str) -> AgentProcess:
    secret_file = WORK_DIR / f"{name}.secret"
    write_secret_file(secret_file)
    log_path = WORK_DIR / f"agent-{name}.log"
    return start_agent(name, free_port(), secret_file, log_path=log_path, pki_dir=WORK_DIR / "pki")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    runs = quick.parse_args(parser, {"runs": 1}).runs
    subprocess.run([sys.executable, "scripts/ensure_redis.py"], cwd=BASE_DIR, check=True)
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v", "0"], cwd=BASE_DIR, check=True, env=os.environ
    )
    processes: list[ManagedProcess] = []
    try:
        agents = [start_bench_agent(name) for name in ("bench-a", "bench-b")]
        processes += [agent.process for agent in agents]
        worker_log = WORK_DIR / "worker.log"
        processes.append(start_celery_worker("worker", worker_log, queue=os.environ["CELERY_QUEUE"]))
        latencies = measure(runs, agents)
    finally:
        stop_all(processes)
        shutil.rmtree(WORK_DIR, ignore_errors=True)
    report(latencies)


def measure(runs: int, agents: list[AgentProcess]) -> list[tuple[float, float]]:
    vsps, vm, user = bench_fleet(agents)
    from django.test import Client

    client = Client()
    client.force_login(user)  # django-axes wants a request for login(); the session is the same
    return [migrate_once(client, vm, vsps[(run + 1) % 2]) for run in range(runs)]


def bench_fleet(agents: list[AgentProcess]):
    """Django set up; a VSP per agent, a running 64 MiB guest on the first, and a superuser "bench".

    Returns (vsps, vm, user). Also used by ``bench_api_create_to_init``.
    """
    import django

    django.setup()
    from django.contrib.auth.models import User

    from vms.agent_client import AgentClient
    from vms.agent_messages import guest_spec
    from vms.models import VSP, Registration, VirtualMachine

    vsps = [
        VSP.objects.create(
            name=f"bench-{letter}",
            agent_url=agent.url,
            agent_secret=agent.secret,
            agent_certificate=agent.fingerprint or "",
            memory_mib=8192,
            cpus=8,
        )
        for letter, agent in zip("ab", agents, strict=True)
    ]
    vm = VirtualMachine.objects.create(name="bench-guest", os_status="up", memory_mib=64, vcpus=1)
    Registration.objects.create(vm=vm, vsp=vsps[0], hardware_status=Registration.HardwareStatus.ON)
    AgentClient.for_vsp(vsps[0]).define_guest(guest_spec(vm, dirty_pages_per_s=200, running=True))
    user = User.objects.create_superuser("bench", password="bench-password")  # noqa: S106 - throwaway database
    return vsps, vm, user


def migrate_once(client, vm, target) -> tuple[float, float]:
    """One click; returns milliseconds until the worker recorded Init and until the POST was answered."""
    from django.urls import reverse

    from migrations_app.models import Migration

    clicked = time.time()
    response = client.post(reverse("migrations_app:migrate", args=[vm.pk]), {"target": target.pk})
    answered = time.time()
    assert response.status_code in (200, 302), response.content[:500]
    migration = Migration.objects.filter(vm=vm).latest("pk")

    def reread() -> Migration:
        migration.refresh_from_db()
        return migration

    if not wait_until(lambda: reread().init_started_at is not None, timeout=30, interval=0.001):
        raise SystemExit("the worker did not start Init within 30 s")
    latency = ((migration.init_started_at.timestamp() - clicked) * 1000, (answered - clicked) * 1000)
    if not wait_until(lambda: reread().is_terminal, timeout=60, interval=0.02):
        raise SystemExit(f"migration {migration.pk} did not finish: {migration.state}")
    if migration.state != Migration.State.COMPLETED:
        raise SystemExit(f"migration {migration.pk} ended {migration.state}: {migration.alert}")
    return latency


def report(samples: list[tuple[float, float]]) -> None:
    database = "PostgreSQL" if "postgres" in os.environ["DATABASE_URL"] else "SQLite"
    print(f"click -> Init started, {len(samples)} runs ({database}; POST via Django test client, real worker")
    print("and real agents; each run migrates a 64 MiB guest and waits for it to complete):")
    print("  Init started:  " + summary([init for init, _ in samples]) + "   (aim < 200 ms)")
    print("  POST answered: " + summary([post for _, post in samples]))


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"median {statistics.median(ordered):6.1f} ms   p95 {p95:6.1f} ms   "
        f"min {ordered[0]:6.1f} ms   max {ordered[-1]:6.1f} ms"
    )


if __name__ == "__main__":
    main()
