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
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
WORK_DIR = Path(tempfile.mkdtemp(prefix="bench-click-to-init-"))
RUN_ID = secrets.token_hex(4)
os.environ.update(
    DJANGO_SETTINGS_MODULE="matrixoe.settings",
    DATABASE_URL=os.environ.get("BENCH_DATABASE_URL", f"sqlite:///{WORK_DIR / 'bench.sqlite3'}"),
    CELERY_QUEUE=f"bench-{RUN_ID}",
    CHANNELS_PREFIX=f"bench-{RUN_ID}",
    ALLOWED_HOSTS="testserver,127.0.0.1",
    LOG_LEVEL="WARNING",
)
sys.path.insert(0, str(BASE_DIR))


def spawn(name: str, args: list[str]) -> subprocess.Popen:
    log = open(WORK_DIR / f"{name}.log", "wb")
    return subprocess.Popen(
        args, cwd=BASE_DIR, env=os.environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_until(predicate, timeout: float, interval: float = 0.001) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def start_agent(name: str, port: int) -> tuple[subprocess.Popen, str]:
    import httpx

    secret = secrets.token_urlsafe(24)
    secret_file = WORK_DIR / f"{name}.secret"
    secret_file.write_text(secret)
    process = spawn(
        f"agent-{name}",
        [
            sys.executable,
            "-m",
            "hostagent",
            "--name",
            name,
            "--listen",
            f"127.0.0.1:{port}",
            "--secret-file",
            str(secret_file),
            "--driver",
            "simulated",
        ],
    )

    def answers() -> bool:
        try:
            return (
                httpx.get(
                    f"http://127.0.0.1:{port}/v1/health",
                    headers={"Authorization": f"Bearer {secret}"},
                    timeout=1,
                ).status_code
                == 200
            )
        except httpx.HTTPError:
            return False

    if not wait_until(answers, timeout=20, interval=0.1):
        raise SystemExit(f"agent {name} did not start; see {WORK_DIR}")
    return process, secret


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    subprocess.run([sys.executable, "scripts/ensure_redis.py"], cwd=BASE_DIR, check=True)
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v", "0"], cwd=BASE_DIR, check=True, env=os.environ
    )
    processes: list[subprocess.Popen] = []
    try:
        ports = [free_port(), free_port()]
        agents = [start_agent(name, port) for name, port in zip(("bench-a", "bench-b"), ports, strict=True)]
        processes += [process for process, _ in agents]
        worker = spawn(
            "worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "matrixoe",
                "worker",
                "--queues",
                os.environ["CELERY_QUEUE"],
                "--pool",
                "threads",
                "--concurrency",
                "4",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
        )
        processes.append(worker)
        if not wait_until(lambda: b"ready." in (WORK_DIR / "worker.log").read_bytes(), 60, 0.1):
            raise SystemExit(f"worker did not start; see {WORK_DIR}")
        latencies = measure(runs, ports, [secret for _, secret in agents])
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(WORK_DIR, ignore_errors=True)
    report(latencies)


def measure(runs: int, ports: list[int], agent_secrets: list[str]) -> list[tuple[float, float]]:
    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.test import Client

    from vms.agent_client import AgentClient
    from vms.models import VSP, Registration, VirtualMachine

    vsps = [
        VSP.objects.create(
            name=f"bench-{letter}",
            agent_url=f"http://127.0.0.1:{port}",
            agent_secret=secret,
            memory_mib=8192,
            cpus=8,
        )
        for letter, port, secret in zip("ab", ports, agent_secrets, strict=True)
    ]
    vm = VirtualMachine.objects.create(name="bench-guest", os_status="up", memory_mib=64, vcpus=1)
    Registration.objects.create(vm=vm, vsp=vsps[0], hardware_status=Registration.HardwareStatus.ON)
    AgentClient(vsps[0].agent_url, vsps[0].agent_secret).define_guest(
        {"name": vm.name, "memory_mib": 64, "vcpus": 1, "dirty_pages_per_s": 200, "running": True}
    )
    User.objects.create_superuser("bench", password="bench-password")  # noqa: S106 - throwaway database
    client = Client()
    client.login(username="bench", password="bench-password")  # noqa: S106
    return [migrate_once(client, vm, vsps[(run + 1) % 2]) for run in range(runs)]


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

    if not wait_until(lambda: reread().init_started_at is not None, timeout=30):
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
