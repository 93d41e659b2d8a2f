"""`make run`: start everything the console needs on one machine, then wait.

1. A Redis on REDIS_URL (started without root when none answers).
2. The database schema, an admin and a read-only operator login.
3. Four demo host agents on loopback (simulated guests, or QEMU with --hosts qemu).
4. The demo fleet registered with those agents, its guests defined on them.
5. The ASGI server (pages + websockets), a Celery worker and Celery beat.
Ctrl-C stops them all. A host agent that stops only shows as unreachable in the console;
the web server, worker or beat stopping stops everything.

Several consoles can share one Redis: each gets a Celery queue and a Channels prefix
named after its port unless CELERY_QUEUE / CHANNELS_PREFIX say otherwise.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from devtools.processes import (  # noqa: E402
    ManagedProcess,
    start_agent,
    start_console_server,
    start_process,
    stop_all,
    write_secret_file,
)

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
        write_secret_file(path)
    return path


def start_agents(driver: str, agents: list[ManagedProcess]) -> None:
    """Start the demo agents, appending each to ``agents`` at once so a failure can stop them."""
    for index, name in enumerate(DEMO_HOSTS):
        log_path = LOG_DIR / f"agent-{name}.log"
        try:
            agent = start_agent(
                name, AGENT_BASE_PORT + index, agent_secret_file(name), driver, log_path=log_path
            )
        except RuntimeError:
            sys.exit(f"host agent {name} did not start; see var/logs/agent-{name}.log")
        agents.append(agent.process)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", choices=("simulated", "qemu"), default="simulated")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    return parser.parse_args()


def main() -> None:
    options = parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "matrixoe.settings")
    os.environ.setdefault("CELERY_QUEUE", f"matrixoe-{options.port}")
    os.environ.setdefault("CHANNELS_PREFIX", f"matrixoe-{options.port}")
    VAR_DIR.mkdir(exist_ok=True)
    subprocess.run([PYTHON, "scripts/ensure_redis.py"], cwd=BASE_DIR, check=True)
    manage("migrate", "--noinput", "-v", "0")
    password = os.environ.setdefault("DEMO_ADMIN_PASSWORD", "matrixoe-demo")
    manage("demo_users")
    signal.signal(signal.SIGTERM, stop_on_signal)
    agents: list[ManagedProcess] = []
    processes: list[ManagedProcess] = []
    try:
        start_agents(options.hosts, agents)
        manage("demo_fleet", "--agents-base-port", str(AGENT_BASE_PORT), "--secrets-dir", str(SECRETS_DIR))
        manage("seed_demo_agents", "--driver", options.hosts)
        processes += start_console(options.port)
        print(f"\nMatrix OE console: http://127.0.0.1:{options.port}/")
        print(f"  log in as admin / {password}   (read-only: operator / {password})")
        print(
            f"  demo host agents: {len(DEMO_HOSTS)} ({options.hosts}); logs in var/logs/. Ctrl-C stops all.\n"
        )
        wait_for_exit(processes, agents)
    except KeyboardInterrupt:
        print("\nstopping...")
    finally:
        stop_all(processes + agents)


def stop_on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def start_console(port: int) -> list[ManagedProcess]:
    celery = [PYTHON, "-m", "celery", "-A", "matrixoe"]
    processes = [
        start_process(
            "worker",
            [*celery, "worker", "--pool", "threads", "--concurrency", "8", "--loglevel", "INFO"],
            LOG_DIR / "worker.log",
        ),
        start_process(
            "beat",
            [*celery, "beat", "--loglevel", "INFO", "--schedule", str(VAR_DIR / "celerybeat-schedule")],
            LOG_DIR / "beat.log",
        ),
    ]
    try:
        processes.append(start_console_server(port, LOG_DIR / "web.log"))
    except RuntimeError:
        stop_all(processes)
        sys.exit("the console did not start; see var/logs/web.log")
    return processes


def wait_for_exit(console: list[ManagedProcess], agents: list[ManagedProcess]) -> None:
    """Return when a console process stops; a stopped agent is only reported (its VSP goes unreachable)."""
    reported: set[str] = set()
    while all(process.running for process in console):
        for agent in agents:
            if not agent.running and agent.name not in reported:
                reported.add(agent.name)
                print(f"{agent.name} stopped; the console shows its VSP unreachable. See var/logs/.")
        time.sleep(0.5)
    print("a console process stopped; see var/logs/. Stopping the others.")


if __name__ == "__main__":
    main()
