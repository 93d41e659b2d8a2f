"""Shared fixtures: real Redis, a real ASGI server, a real Celery worker, a real Chromium.

Processes started here get the test settings and open the test database
directly (``MATRIXOE_TEST_SUBPROCESS=1``), so tests that use them need
``@pytest.mark.django_db(transaction=True)``: what a test writes must be
committed for another process to see it.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        MATRIXOE_TEST_SUBPROCESS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen
    log_path: Path
    hostname: str = ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole process group: what a crash or an OOM kill looks like."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_process(name: str, args: list[str], env: dict[str, str]) -> ManagedProcess:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}-{os.getpid()}-{time.monotonic_ns()}.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        args, cwd=BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return ManagedProcess(name, process, log_path)


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
    server = start_process(
        "uvicorn",
        [
            sys.executable, "-m", "uvicorn", "matrixoe.asgi:application",
            "--host", "127.0.0.1", "--port", str(port), "--ws", "websockets-sansio",
            "--log-level", "warning", "--no-access-log",
        ],
        subprocess_env(**env),
    )
    base_url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{base_url}/login/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_until(answers, timeout=30):
        server.stop()
        raise RuntimeError(f"console server did not start:\n{server.log_tail()}")
    return server, base_url


@pytest.fixture(scope="session")
def console_server(django_db_setup, django_db_blocker, redis_url) -> Iterator[str]:
    """Base URL of a real uvicorn ASGI server serving the console on the test database."""
    server, base_url = start_console_server()
    yield base_url
    server.stop()


def start_celery_worker(name: str = "worker", concurrency: int = 4) -> ManagedProcess:
    from django.conf import settings

    hostname = f"{name}-{time.monotonic_ns()}@{socket.gethostname()}"
    worker = start_process(
        "celery-" + name,
        [
            sys.executable, "-m", "celery", "-A", "matrixoe", "worker",
            "--queues", settings.CELERY_TASK_DEFAULT_QUEUE, "--pool", "threads",
            "--concurrency", str(concurrency), "--hostname", hostname,
            "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
        ],
        subprocess_env(),
    )
    worker.hostname = hostname
    if not wait_until(lambda: b"ready." in worker.log_path.read_bytes(), timeout=60):
        worker.stop()
        raise RuntimeError(f"celery worker did not start:\n{worker.log_tail()}")
    return worker


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
