"""`make run`: start everything the console needs on one machine, then wait.

1. A Redis on REDIS_URL (started without root when none answers).
2. The database schema, an admin and a read-only operator login.
3. Three demo host agents on loopback (simulated guests, or QEMU with --hosts qemu).
4. The demo fleet registered with those agents, its guests defined on them.
5. The ASGI server (pages + websockets), a Celery worker and Celery beat.
Ctrl-C stops them all.
"""

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"
SECRETS_DIR = VAR_DIR / "agent-secrets"
LOG_DIR = VAR_DIR / "logs"
DEMO_HOSTS = ("vsp1", "vsp2", "vsp3", "vsp4")
AGENT_BASE_PORT = int(os.environ.get("AGENT_BASE_PORT", "7101"))
PYTHON = sys.executable


def manage(*args: str) -> None:
    subprocess.run([PYTHON, "manage.py", *args], cwd=BASE_DIR, check=True)


def agent_secret_file(name: str) -> Path:
    SECRETS_DIR.mkdir(parents=True, exist_ok=True)
    path = SECRETS_DIR / f"{name}.secret"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path


def spawn(name: str, args: list[str]) -> subprocess.Popen:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = open(LOG_DIR / f"{name}.log", "ab")
    return subprocess.Popen(args, cwd=BASE_DIR, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_http(url: str, timeout: float = 30, headers: dict | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1, headers=headers).status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def start_agents(driver: str, agents: list[subprocess.Popen]) -> None:
    """Start the demo agents, appending each to ``agents`` at once so a failure can stop them."""
    for index, name in enumerate(DEMO_HOSTS):
        port = AGENT_BASE_PORT + index
        secret_file = agent_secret_file(name)
        agents.append(
            spawn(
                f"agent-{name}",
                [PYTHON, "-m", "hostagent", "--name", name, "--listen", f"127.0.0.1:{port}",
                 "--secret-file", str(secret_file), "--driver", driver],
            )
        )
        headers = {"Authorization": f"Bearer {secret_file.read_text().strip()}"}
        if not wait_for_http(f"http://127.0.0.1:{port}/v1/health", headers=headers):
            sys.exit(f"host agent {name} did not start; see var/logs/agent-{name}.log")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", choices=("simulated", "qemu"), default="simulated")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    return parser.parse_args()


def main() -> None:
    options = parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "matrixoe.settings")
    VAR_DIR.mkdir(exist_ok=True)
    subprocess.run([PYTHON, "scripts/ensure_redis.py"], cwd=BASE_DIR, check=True)
    manage("migrate", "--noinput", "-v", "0")
    password = os.environ.setdefault("DEMO_ADMIN_PASSWORD", "matrixoe-demo")
    manage("demo_users")
    signal.signal(signal.SIGTERM, stop_on_signal)
    processes: list[subprocess.Popen] = []
    try:
        start_agents(options.hosts, processes)
        manage("demo_fleet", "--agents-base-port", str(AGENT_BASE_PORT), "--secrets-dir", str(SECRETS_DIR))
        manage("seed_demo_agents", "--driver", options.hosts)
        processes += start_console(options.port)
        print(f"\nMatrix OE console: http://127.0.0.1:{options.port}/")
        print(f"  log in as admin / {password}   (read-only: operator / {password})")
        print(f"  demo host agents: {len(DEMO_HOSTS)} ({options.hosts}); logs in var/logs/. Ctrl-C stops all.\n")
        wait_for_exit(processes)
    except KeyboardInterrupt:
        print("\nstopping...")
    finally:
        stop(processes)


def stop_on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def start_console(port: int) -> list[subprocess.Popen]:
    processes = [
        spawn("web", [PYTHON, "-m", "uvicorn", "matrixoe.asgi:application", "--host", "127.0.0.1",
                      "--port", str(port), "--ws", "websockets-sansio", "--no-access-log"]),
        spawn("worker", [PYTHON, "-m", "celery", "-A", "matrixoe", "worker", "--pool", "threads",
                         "--concurrency", "8", "--loglevel", "INFO"]),
        spawn("beat", [PYTHON, "-m", "celery", "-A", "matrixoe", "beat", "--loglevel", "INFO",
                       "--schedule", str(VAR_DIR / "celerybeat-schedule")]),
    ]
    if not wait_for_http(f"http://127.0.0.1:{port}/login/"):
        stop(processes)
        sys.exit("the console did not start; see var/logs/web.log")
    return processes


def wait_for_exit(processes: list[subprocess.Popen]) -> None:
    while all(process.poll() is None for process in processes):
        time.sleep(0.5)
    print("a console process stopped; see var/logs/. Stopping the others.")


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
