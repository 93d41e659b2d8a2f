"""`make run`: start everything the console needs on one machine, then wait.

1. A Redis on REDIS_URL (started without root when none answers).
2. The database schema, an admin and a read-only operator login.
3. Four demo host agents on loopback (simulated guests, or QEMU with --hosts qemu).
4. The demo fleet registered with those agents, its guests defined on them.
5. The ASGI server (pages + websockets), a Celery worker and Celery beat.
Ctrl-C (or SIGTERM) stops them all; the clean-up cannot be interrupted: a second Ctrl-C only
hurries it (what has not ended is killed). SIGTERM never hurries it: a SIGTERM to `make run`'s process
group reaches this process twice (once from the group, once passed on by make), and one SIGTERM must
mean a graceful stop. A host agent that stops only shows as unreachable in
the console; the web server stopping stops everything, a worker or beat that exits is started again
(up to 5 times a minute; a Redis restart no longer ends the worker: see WORKER_OPTIONS). Every
started process carries MATRIXOE_MAKE_RUN=<var dir> in its environment; what an earlier `make run`
left running (it was killed with SIGKILL, say) is found by that and stopped before its replacement
starts, and a port held by anything else is named with what to do.

var/ is its owner's only (0700, files 0600, the umask of every process started here 077), and
secrets are generated once into it and reused: the Django SECRET_KEY, the key that
encrypts agent secrets in the database, the password of the Redis started here, and the first
admin and operator passwords (printed on the first run only). So is the demo's small PKI in
var/pki/ (devtools/pki.py): a CA and one certificate per host agent (keys 0600); the agents serve
HTTPS and a mutual-TLS data plane with them, and each demo VSP registers its agent's fingerprint.

Several consoles can share one Redis: each gets a Celery queue and a Channels prefix
named after its port unless CELERY_QUEUE / CHANNELS_PREFIX say otherwise.
"""

import argparse
import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from devtools.local_secrets import secret_file, token, use_local_secrets  # noqa: E402
from devtools.processes import (  # noqa: E402
    ManagedProcess,
    start_agent,
    start_console_server,
    start_process,
    stop_all,
    write_secret_file,
)

VAR_DIR = Path(os.environ.get("MATRIXOE_VAR_DIR") or BASE_DIR / "var")
SECRETS_DIR = VAR_DIR / "agent-secrets"
PKI_DIR = VAR_DIR / "pki"  # the demo's CA and one certificate per agent (devtools.pki), reused
LOG_DIR = VAR_DIR / "logs"
REDIS_PORT = int(os.environ.get("MATRIXOE_REDIS_PORT", "6380"))
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


# -- stopping: idempotent, uninterruptible, a second Ctrl-C only hurries -------------------------

stopping = False
hurry = threading.Event()


def on_stop_signal(signum: int, frame: object) -> None:
    """First SIGINT/SIGTERM: leave the main flow (KeyboardInterrupt) for the clean-up. A later SIGINT
    (a second Ctrl-C) only sets ``hurry``; a later SIGTERM is the same request again (GNU make passes
    its SIGTERM on to its recipe, which the process group's SIGTERM reached already) and is ignored.
    Neither raises inside the clean-up."""
    global stopping
    if stopping:
        if signum != signal.SIGINT:
            return
        if not hurry.is_set():
            print("\nstopping faster: killing what has not ended yet...", flush=True)
        hurry.set()
        return
    stopping = True
    raise KeyboardInterrupt


def stop_everything(processes: list[ManagedProcess]) -> None:
    global stopping
    stopping = True  # from here on a signal only hurries
    stop_all(processes, timeout=10, hurry=hurry)
    for pid in own_processes():  # a child whose start was cut short by the signal, before it was listed
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- leftovers: processes a previous `make run` (with this var/) started and did not stop --------
# Every process started here inherits MATRIXOE_MAKE_RUN=<var dir>; that, not a name or a port,
# is what makes a process "ours".

MARKER = "MATRIXOE_MAKE_RUN"


def environ_of(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def own_processes() -> list[int]:
    """Pids (not ours, not our children's) carrying this var dir's MATRIXOE_MAKE_RUN marker."""
    tag = f"{MARKER}={VAR_DIR}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if tag in environ_of(int(entry.name)).split(b"\0"):
            found.append(int(entry.name))
    return found


def stop_leftovers() -> None:
    """Stop what an earlier `make run` left running (SIGTERM, then SIGKILL after 10 s).

    Exits with what to do when another `make run` with this var/ is still running.
    """
    leftovers = own_processes()
    for pid in leftovers:
        if "run_console.py" in command_line(pid):
            sys.exit(
                f"another make run (pid {pid}) is running with {VAR_DIR}. Stop it first (Ctrl-C in its "
                f"terminal, or kill {pid}), or give this one its own MATRIXOE_VAR_DIR, PORT and "
                "AGENT_BASE_PORT."
            )
    if not leftovers:
        return
    print(f"stopping {len(leftovers)} process(es) left running by an earlier make run: {leftovers}")
    for signum, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in own_processes():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        if wait_for(lambda: not own_processes(), wait_s):
            return


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def require_free_port(port: int, what: str, variable: str) -> None:
    if not wait_for(lambda: port_is_free(port), 5.0):
        sys.exit(
            f"port {port} (for {what}) is in use by a program this make run did not start. Stop it "
            f"(`ss -ltnp 'sport = :{port}'` shows which), or use other ports: {variable}=... make run"
        )


def wait_for(predicate, timeout: float) -> bool:  # noqa: ANN001 - a small local helper
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def start_agents(driver: str, agents: list[ManagedProcess]) -> None:
    """Start the demo agents, appending each to ``agents`` at once so a failure can stop them."""
    for index, name in enumerate(DEMO_HOSTS):
        port = AGENT_BASE_PORT + index
        require_free_port(port, f"host agent {name}", "AGENT_BASE_PORT")
        log_path = LOG_DIR / f"agent-{name}.log"
        try:
            agent = start_agent(
                name, port, agent_secret_file(name), driver, log_path=log_path, pki_dir=PKI_DIR
            )
        except RuntimeError:
            sys.exit(f"host agent {name} did not start; see {log_path}")
        agents.append(agent.process)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", choices=("simulated", "qemu"), default="simulated")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    return parser.parse_args()


PRIVATE_UMASK = 0o077  # files 0600, directories 0700: what this run and every process it starts creates


def keep_var_private() -> None:
    """var/ and everything in it readable by its owner only, now and later.

    It holds the SQLite database (live session keys, password hashes, encrypted agent secrets) with its
    -wal and -shm files, the secrets, the PKI's keys and the logs. The umask is inherited by every
    process started here (Redis, the agents, the web server, the worker, beat), so the files they
    create later are private too; what an earlier run (before this rule) left readable is narrowed.
    """
    os.umask(PRIVATE_UMASK)
    VAR_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in [VAR_DIR, *VAR_DIR.rglob("*")]:
        with contextlib.suppress(FileNotFoundError):  # a leftover process may remove a file meanwhile
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077:
                path.chmod(stat.S_IMODE(mode) & 0o700)


def use_local_redis() -> None:
    """Unless REDIS_URL (or REDIS_URL_FILE) is given: our own Redis on loopback, password required.

    The URL with the password is kept in var/redis-url (0600) and passed as REDIS_URL_FILE, so the
    password appears in no command line and no environment listing of other users' processes.
    """
    if os.environ.get("REDIS_URL") or os.environ.get("REDIS_URL_FILE"):
        return
    password = secret_file(VAR_DIR / "redis-password", token)
    url_file = VAR_DIR / "redis-url"
    url_file.unlink(missing_ok=True)
    secret_file(url_file, lambda: f"redis://:{password}@127.0.0.1:{REDIS_PORT}/0")
    os.environ["REDIS_URL_FILE"] = str(url_file)


def main() -> None:
    options = parse_args()
    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "matrixoe.settings")
    os.environ.setdefault("CELERY_QUEUE", f"matrixoe-{options.port}")
    os.environ.setdefault("CHANNELS_PREFIX", f"matrixoe-{options.port}")
    os.environ.setdefault("MATRIXOE_VAR_DIR", str(VAR_DIR))
    keep_var_private()
    stop_leftovers()
    os.environ[MARKER] = str(VAR_DIR)
    use_local_secrets()
    use_local_redis()
    agents: list[ManagedProcess] = []
    processes: list[ManagedProcess] = []
    redis_pid_file = VAR_DIR / "redis.pid"
    redis_was_running = redis_pid_file.exists()
    try:
        subprocess.run([PYTHON, "scripts/ensure_redis.py"], cwd=BASE_DIR, check=True)
        manage("migrate", "--noinput", "-v", "0")
        manage("demo_users", "--secrets-dir", str(VAR_DIR))
        start_agents(options.hosts, agents)
        manage(
            "demo_fleet",
            *("--agents-base-port", str(AGENT_BASE_PORT), "--secrets-dir", str(SECRETS_DIR)),
            *("--pki-dir", str(PKI_DIR), "--data-plane", "required"),
        )
        manage("seed_demo_agents", "--driver", options.hosts)
        start_console(options.port, processes)
        print(f"\nMatrix OE console: http://127.0.0.1:{options.port}/")
        print(f"  logins: see above (first run) or {VAR_DIR}/admin-password and operator-password")
        hosts = f"{len(DEMO_HOSTS)} ({options.hosts})"
        print(f"  demo host agents: {hosts}; logs in {LOG_DIR}. Ctrl-C stops all.\n", flush=True)
        wait_for_exit(processes, agents)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
    except subprocess.CalledProcessError as error:
        print(f"\n{' '.join(map(str, error.cmd[1:3]))} failed (exit status {error.returncode})", flush=True)
    finally:
        stop_everything(processes + agents)
        if not redis_was_running:
            stop_own_redis(redis_pid_file)
        print("stopped.", flush=True)


def stop_own_redis(pid_file: Path) -> None:
    """Stop the Redis this run started (``scripts/ensure_redis.py`` wrote its pid); leave any other alone."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    pid_file.unlink(missing_ok=True)


CELERY = [PYTHON, "-m", "celery", "-A", "matrixoe"]
# Without gossip and mingle: neither is used here, and gossip's stop on a broker restart used a closed
# connection and ended the worker ('NoneType' object has no attribute 'hostname', celery/kombu#582; the
# same error from restoring unacknowledged tasks is matrixoe/celery_consumer.py's).
WORKER_OPTIONS = ["--without-gossip", "--without-mingle"]
# Started again if they exit anyway, as a host's service manager would.
RESTARTABLE = {
    "worker": [
        *CELERY,
        "worker",
        *WORKER_OPTIONS,
        "--pool",
        "threads",
        "--concurrency",
        "8",
        "--loglevel",
        "INFO",
    ],
    "beat": [*CELERY, "beat", "--loglevel", "INFO", "--schedule", str(VAR_DIR / "celerybeat-schedule")],
}
RESTART_DELAY_S = 1.0
MAX_RESTARTS = 5  # per process and per RESTART_WINDOW_S: one that keeps exiting stops everything
RESTART_WINDOW_S = 60.0


def start_console(port: int, processes: list[ManagedProcess]) -> None:
    """Worker, beat and web server, each appended to ``processes`` at once so a failure can stop them."""
    for name, args in RESTARTABLE.items():
        processes.append(start_process(name, args, LOG_DIR / f"{name}.log"))
    require_free_port(port, "the web server", "PORT")
    try:
        server = start_console_server(port, LOG_DIR / "web.log")
    except RuntimeError:
        sys.exit(f"the console did not start; see {LOG_DIR / 'web.log'}")
    processes.append(server)


def wait_for_exit(console: list[ManagedProcess], agents: list[ManagedProcess]) -> None:
    """Return when the web server stops, or a worker or beat keeps exiting.

    A worker or beat that exits is started again after ``RESTART_DELAY_S`` (in place in ``console``, so
    the clean-up stops the new one), up to ``MAX_RESTARTS`` in ``RESTART_WINDOW_S``. A stopped agent is
    only reported (its VSP goes unreachable).
    """
    reported: set[str] = set()
    restarts: dict[str, list[float]] = {name: [] for name in RESTARTABLE}
    while True:
        for agent in agents:
            if not agent.running and agent.name not in reported:
                reported.add(agent.name)
                print(f"{agent.name} stopped; the console shows its VSP unreachable. See var/logs/.")
        for index, process in enumerate(console):
            if process.running:
                continue
            recent = [at for at in restarts.get(process.name, []) if time.monotonic() - at < RESTART_WINDOW_S]
            if process.name not in RESTARTABLE or len(recent) >= MAX_RESTARTS:
                print(f"{process.name} stopped; see var/logs/. Stopping the others.", flush=True)
                return
            status = process.process.returncode
            print(f"{process.name} exited (status {status}); starting it again. See var/logs/.", flush=True)
            time.sleep(RESTART_DELAY_S)
            restarts[process.name] = [*recent, time.monotonic()]
            console[index] = start_process(
                process.name, RESTARTABLE[process.name], LOG_DIR / f"{process.name}.log"
            )
        time.sleep(0.5)


if __name__ == "__main__":
    main()
