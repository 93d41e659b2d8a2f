"""Latency from ``POST /api/v1/migrations`` to the Init phase starting, beside the page's click -> Init.

The same private stack as ``bench_click_to_init.py`` (throwaway SQLite, a real Celery worker on a private
queue, two real host agents, one small simulated guest); runs alternate between the Migrate dialog's
POST and the API's POST (token auth, ``Idempotency-Key``), both through Django's test client, so the two
columns differ only by the request path: view + form vs. ninja + schema + token lookup.

    .venv/bin/python bench/bench_api_create_to_init.py [--runs 20]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_click_to_init as base  # noqa: E402  (sets up the environment of the private stack)
import quick  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20, help="runs per path (page and API)")
    runs = quick.parse_args(parser, {"runs": 1}).runs
    subprocess.run([sys.executable, "scripts/ensure_redis.py"], cwd=base.BASE_DIR, check=True)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=base.BASE_DIR, check=True)
    processes = []
    try:
        agents = [base.start_bench_agent(name) for name in ("bench-a", "bench-b")]
        processes += [agent.process for agent in agents]
        worker_log = base.WORK_DIR / "worker.log"
        processes.append(
            base.start_celery_worker("worker", worker_log, queue=base.os.environ["CELERY_QUEUE"])
        )
        page, api = measure(runs, agents)
    finally:
        base.stop_all(processes)
        base.shutil.rmtree(base.WORK_DIR, ignore_errors=True)
    print(f"create -> Init started, {runs} runs each (SQLite; Django test client, real worker and agents):")
    print("  page click -> Init:   " + base.summary([init for init, _ in page]))
    print("  API create -> Init:   " + base.summary([init for init, _ in api]))
    print("  page POST answered:   " + base.summary([post for _, post in page]))
    print("  API POST answered:    " + base.summary([post for _, post in api]))


def measure(runs: int, agents) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    vsps, vm, user = base.bench_fleet(agents)
    from django.test import Client

    from api.tokens import do_create_token

    page_client = Client()
    page_client.force_login(user)  # django-axes wants a request for login(); the session is the same
    token = do_create_token(user, "bench")[1]
    # One client each, kept: a new one re-reads the middleware (WhiteNoise's file scan).
    api_client = Client()
    page, api = [], []
    for run in range(2 * runs):
        target = vsps[(run + 1) % 2]
        if run % 2:
            api.append(api_once(api_client, token, vm, target))
        else:
            page.append(base.migrate_once(page_client, vm, target))
    return page, api


def api_once(client, token: str, vm, target) -> tuple[float, float]:
    """One API create; milliseconds until the worker recorded Init and until the POST was answered."""
    from migrations_app.models import Migration

    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": str(uuid.uuid4())}
    sent = time.time()
    response = client.post(
        "/api/v1/migrations",
        {"vm": vm.name, "target": target.name},
        content_type="application/json",
        headers=headers,
    )
    answered = time.time()
    assert response.status_code == 201, response.content[:500]
    migration = Migration.objects.get(pk=response.json()["id"])

    def reread() -> Migration:
        migration.refresh_from_db()
        return migration

    if not base.wait_until(lambda: reread().init_started_at is not None, timeout=30, interval=0.001):
        raise SystemExit("the worker did not start Init within 30 s")
    latency = ((migration.init_started_at.timestamp() - sent) * 1000, (answered - sent) * 1000)
    if not base.wait_until(lambda: reread().is_terminal, timeout=60, interval=0.02):
        raise SystemExit(f"migration {migration.pk} did not finish: {migration.state}")
    if migration.state != Migration.State.COMPLETED:
        raise SystemExit(f"migration {migration.pk} ended {migration.state}: {migration.alert}")
    return latency


if __name__ == "__main__":
    main()
