"""Shared fixtures: real Redis, a real ASGI server, a real Celery worker, a real Chromium.

Processes started here get the test settings and open the test database
directly (``MATRIXOE_TEST_SUBPROCESS=1``), so tests that use them need
``@pytest.mark.django_db(transaction=True)``: what a test writes must be
committed for another process to see it.
"""

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devtools import processes
from devtools.processes import ManagedProcess, free_port, wait_until

__all__ = ["ManagedProcess", "free_port", "wait_until"]  # re-exported: test modules import them from here

BASE_DIR = Path(__file__).resolve().parent.parent
LOG_DIR = BASE_DIR / "var" / "test-logs"
ARTIFACT_DIR = BASE_DIR / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


# --- skips become failures where every part must run (CI) --------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("MATRIXOE_NO_SKIPS") == "1" and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, but MATRIXOE_NO_SKIPS=1 requires every test to run: {report.longrepr}"


# --- helpers -------------------------------------------------------------------


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        MATRIXOE_TEST_SUBPROCESS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def log_path(name: str) -> Path:
    """A log file of this test run's own for a process it starts."""
    return LOG_DIR / f"{name}-{os.getpid()}-{time.monotonic_ns()}.log"


def run_in_thread(function: Callable, *args, **kwargs):
    """Run ``function`` in a helper thread and return its result.

    ``async_to_sync`` and the ORM refuse to run inside a sync Playwright test's
    thread (it holds a running event loop), so tests call them through here.
    """
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = function(*args, **kwargs)
        except BaseException as error:  # re-raised in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


# --- logged-in clients ------------------------------------------------------------


@pytest.fixture
def admin_client(client):
    """A client logged in as the superuser "admin" (``make_admin``; replaces pytest-django's own)."""
    from tests.factories import make_admin

    client.force_login(make_admin())
    return client


@pytest.fixture
def vm_admin_client(client):
    """A client logged in as "vm-admin": not a superuser, only the inventory's view and change permissions."""
    from tests.factories import make_vm_admin

    client.force_login(make_vm_admin())
    return client


@pytest.fixture
def latest_schema(transactional_db):
    """For a test that migrates the database back to an old schema: the latest schema before it (an
    earlier test may have left an old one) and again after it, so the tests that follow find every
    table and column."""
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    def migrate_to_latest() -> None:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())

    migrate_to_latest()
    yield
    migrate_to_latest()


# --- services --------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis that answers on REDIS_URL, started by the project's script if none does."""
    subprocess.run([sys.executable, str(BASE_DIR / "scripts" / "ensure_redis.py")], check=True)
    from django.conf import settings

    return settings.REDIS_URL


def start_console_server(**env: str) -> tuple[ManagedProcess, str]:
    """A uvicorn subprocess serving the console; ``env`` adds environment variables (settings)."""
    port = free_port()
    server = processes.start_console_server(
        port, log_path("uvicorn"), "--log-level", "warning", env=subprocess_env(**env)
    )
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def console_server(django_db_setup, django_db_blocker, redis_url) -> Iterator[str]:
    """Base URL of a real uvicorn ASGI server serving the console on the test database."""
    server, base_url = start_console_server()
    yield base_url
    server.stop()


def start_celery_worker(
    name: str = "worker", concurrency: int = 4, queue: str | None = None, **env: str
) -> ManagedProcess:
    """A Celery worker subprocess on ``queue`` (the test run's own by default); ``env`` adds settings."""
    from django.conf import settings

    return processes.start_celery_worker(
        name,
        log_path(f"celery-{name}"),
        queue=queue or settings.CELERY_TASK_DEFAULT_QUEUE,
        concurrency=concurrency,
        env=subprocess_env(**env),
    )


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, redis_url) -> Iterator[ManagedProcess]:
    """A real Celery worker subprocess on the test run's private queue."""
    worker = start_celery_worker()
    yield worker
    worker.stop()


@pytest.fixture
def celery_worker_factory(django_db_setup, redis_url) -> Iterator[Callable[..., ManagedProcess]]:
    """Start extra workers (e.g. to kill one mid-migration); all are stopped at the end."""
    started: list[ManagedProcess] = []

    def factory(name: str = "extra-worker", concurrency: int = 2) -> ManagedProcess:
        worker = start_celery_worker(name, concurrency)
        started.append(worker)
        return worker

    yield factory
    for worker in started:
        worker.stop()


# --- browser ---------------------------------------------------------------------


@contextmanager
def chromium_browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM}: `apt-get install chromium` (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def browser():
    """A real Chromium (Debian's package) driven by Playwright, one per test."""
    with chromium_browser() as launched:
        yield launched


@pytest.fixture
def browser_page(browser):
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def log_in(page, base_url: str, username: str, password: str) -> None:
    page.goto(f"{base_url}/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_load_state("networkidle")
    assert "/login/" not in page.url, f"login as {username} failed"


@pytest.fixture
def artifact_dir() -> Path:
    ARTIFACT_DIR.mkdir(exist_ok=True)
    return ARTIFACT_DIR
