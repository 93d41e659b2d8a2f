"""Start and stop the project's processes on loopback: host agents, the ASGI server, Celery workers.

The tests, the benchmarks and ``scripts/run_console.py`` all start them through here. Every process
runs in a session of its own (stopping it stops its children) and writes to a log file. Nothing from
the console or the agent is imported, so a script may use this before it sets up Django.
"""

from __future__ import annotations

import os
import pwd
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from devtools import pki

BASE_DIR = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; the last answer is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def answers_http(url: str, headers: dict[str, str] | None = None, verify: Any = True) -> bool:
    try:
        return httpx.get(url, headers=headers, timeout=1, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen
    log_path: Path
    hostname: str = ""

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group ended meanwhile

    def terminate(self) -> None:
        """SIGTERM the whole process group, without waiting."""
        if self.running:
            self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the whole process group: what a crash or an OOM kill looks like."""
        if self.running:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout=10)
        else:
            self._signal_group(signal.SIGKILL)  # children left behind by a leader that exited

    def stop(self, timeout: float = 10, hurry: threading.Event | None = None) -> None:
        """SIGTERM, wait up to ``timeout`` s (less once ``hurry`` is set), then SIGKILL the group."""
        self.terminate()
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline and not (hurry and hurry.is_set()):
            try:
                self.process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def start_process(
    name: str,
    args: Sequence[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    *,
    user: str | None = None,
    umask: int = -1,
) -> ManagedProcess:
    """Start ``args`` in the project directory, output appended to ``log_path``; ``env`` defaults to ours.

    ``user``: run it as that user (needs root; e.g. PostgreSQL, which refuses to run as root).
    ``umask``: the child's (e.g. 0o077 for a server that rewrites a configuration holding passwords).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            list(args),
            cwd=BASE_DIR if user is None else "/",
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            group=None if user is None else pwd.getpwnam(user).pw_gid,
            extra_groups=None if user is None else [],
            umask=umask,
        )
    return ManagedProcess(name, process, log_path)


def stop_all(
    processes: Iterable[ManagedProcess], timeout: float = 10, hurry: threading.Event | None = None
) -> None:
    """Signal every process first, then wait for each: they shut down side by side.

    Idempotent, and every process is stopped even if stopping another raised. ``hurry`` (set by a
    second Ctrl-C or SIGTERM) cuts the waiting short: what has not ended by then is SIGKILLed.
    """
    processes = list(processes)
    for process in processes:
        process.terminate()
    errors: list[BaseException] = []
    for process in processes:
        try:
            process.stop(timeout, hurry)
        except Exception as error:  # noqa: PERF203 - one failure must not leave the rest running
            errors.append(error)
    if errors:
        raise errors[0]


# -- host agents -----------------------------------------------------------------


@dataclass
class AgentProcess:
    name: str
    url: str
    secret: str
    process: ManagedProcess
    ca: Path | None = None  # the deployment CA (PEM) its certificate comes from; None: plain HTTP
    fingerprint: str | None = None  # SHA-256 of its certificate (``devtools.pki.fingerprint``)


def write_secret_file(path: Path) -> str:
    """A new random agent secret, written to ``path`` readable by its owner only."""
    secret = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secret)
    path.chmod(0o600)
    return secret


def start_agent(
    name: str,
    port: int,
    secret_file: Path,
    driver: str = "simulated",
    extra_args: Sequence[str] = (),
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    timeout: float = 30,
    pki_dir: Path | None = None,
) -> AgentProcess:
    """``python -m hostagent`` on 127.0.0.1:``port``, returned once it answers its health check.

    ``pki_dir``: the deployment CA's directory (``devtools.pki``): the agent gets a certificate of
    its own from it and serves HTTPS and a mutual-TLS data plane. None: ``--insecure-http``.
    Raises RuntimeError with the end of its log if it exits or does not answer in time.
    """
    secret = secret_file.read_text().strip()
    args = [PYTHON, "-m", "hostagent", "--name", name, "--listen", f"127.0.0.1:{port}"]
    args += ["--secret-file", str(secret_file), "--driver", driver]
    ca = fingerprint = None
    verify: Any = True
    if pki_dir is not None:
        issued = pki.ensure_agent_cert(pki_dir, name)
        args += issued.agent_args()
        ca, fingerprint = issued.ca, issued.fingerprint()
        verify = ssl.create_default_context(cafile=str(ca))
        url = f"https://127.0.0.1:{port}"
    else:
        args.append("--insecure-http")
        url = f"http://127.0.0.1:{port}"
    args += list(extra_args)
    process = start_process(f"agent-{name}", args, log_path, env)
    headers = {"Authorization": f"Bearer {secret}"}
    health = f"{url}/v1/health"
    wait_until(lambda: not process.running or answers_http(health, headers, verify), timeout, 0.05)
    if not process.running or not answers_http(health, headers, verify):
        process.stop()
        raise RuntimeError(f"host agent {name} did not start:\n{process.log_tail()}")
    return AgentProcess(name, url, secret, process, ca, fingerprint)


# -- the console: ASGI server and Celery ---------------------------------------------


def free_port_range(count: int, attempts: int = 50) -> int:
    """The first of ``count`` consecutive loopback ports that were all free just now (a fleet's ports).

    Raises RuntimeError if ``attempts`` random ranges between 20000 and 60000 each had a taken port.
    """
    import random

    for _ in range(attempts):
        first = random.randrange(20000, 60000 - count)
        sockets: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found on 127.0.0.1")


def fleet_names(prefix: str, count: int) -> list[str]:
    """The fleet's VSP names, as ``hostagent.fleet.member_names`` makes them (``prefix`` + padded number)."""
    width = len(str(count))
    return [f"{prefix}{index:0{width}d}" for index in range(1, count + 1)]


def start_fleet(
    prefix: str,
    count: int,
    secret_dir: Path,
    *,
    log_path: Path,
    pki_dir: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> list[AgentProcess]:
    """``python -m hostagent.fleet``: ``count`` simulated VSPs in one process, each on its own port with
    its own secret (written to ``secret_dir``), returned once the last one answers its health check.

    Every returned ``AgentProcess`` shares the one ``ManagedProcess``: stopping any stops the fleet.
    ``pki_dir``: the deployment CA's directory (one certificate, named ``prefix``, for every VSP);
    None: ``--insecure-http``. Raises RuntimeError with the end of its log if it does not answer in time.
    """
    first = free_port_range(count)
    names = fleet_names(prefix, count)
    secrets_by_name = {name: write_secret_file(secret_dir / f"{name}.secret") for name in names}
    args = [PYTHON, "-m", "hostagent.fleet", "--vsps", str(count), "--prefix", prefix]
    args += ["--first-port", str(first), "--secret-dir", str(secret_dir)]
    ca = fingerprint = None
    verify: Any = True
    scheme = "http"
    if pki_dir is not None:
        issued = pki.ensure_agent_cert(pki_dir, prefix)
        args += issued.agent_args()
        ca, fingerprint, scheme = issued.ca, issued.fingerprint(), "https"
        verify = ssl.create_default_context(cafile=str(ca))
    else:
        args.append("--insecure-http")
    process = start_process(f"fleet-{prefix}", args, log_path, env)
    last = names[-1]
    health = f"{scheme}://127.0.0.1:{first + count - 1}/v1/health"
    headers = {"Authorization": f"Bearer {secrets_by_name[last]}"}
    wait_until(lambda: not process.running or answers_http(health, headers, verify), timeout, 0.1)
    if not process.running or not answers_http(health, headers, verify):
        process.stop()
        raise RuntimeError(f"fleet {prefix} did not start:\n{process.log_tail()}")
    return [
        AgentProcess(
            name, f"{scheme}://127.0.0.1:{first + index}", secrets_by_name[name], process, ca, fingerprint
        )
        for index, name in enumerate(names)
    ]


def start_console_server(
    port: int, log_path: Path, *uvicorn_args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> ManagedProcess:
    """uvicorn serving ``matrixoe.asgi``, returned once its login page answers."""
    args = [PYTHON, "-m", "uvicorn", "matrixoe.asgi:application", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--ws", "websockets-sansio", "--no-access-log", "--no-proxy-headers"]
    args += uvicorn_args  # the console believes forwarded headers from TRUSTED_PROXIES only (matrixoe.asgi)
    server = start_process("uvicorn", args, log_path, env)
    login = f"http://127.0.0.1:{port}/login/"
    if not wait_until(lambda: not server.running or answers_http(login), timeout) or not server.running:
        server.stop()
        raise RuntimeError(f"console server did not start:\n{server.log_tail()}")
    return server


def start_celery_worker(
    name: str,
    log_path: Path,
    *,
    queue: str | None = None,
    concurrency: int = 4,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    extra_args: Sequence[str] = (),
) -> ManagedProcess:
    """A Celery worker (threads pool) of ``matrixoe`` on ``queue``, returned once it is ready.

    ``extra_args``: more ``celery worker`` flags (a benchmark's ``--include``)."""
    hostname = f"{name}-{time.monotonic_ns()}@{socket.gethostname()}"
    args = [PYTHON, "-m", "celery", "-A", "matrixoe", "worker", "--pool", "threads"]
    args += ["--concurrency", str(concurrency), "--hostname", hostname, "--loglevel", "INFO"]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    if queue:
        args += ["--queues", queue]
    args += list(extra_args)
    logged_before = log_path.stat().st_size if log_path.exists() else 0  # the log may be appended to
    worker = start_process(f"celery-{name}", args, log_path, env)
    worker.hostname = hostname

    def ready() -> bool:
        return not worker.running or b"ready." in log_path.read_bytes()[logged_before:]

    if not wait_until(ready, timeout, 0.05):
        worker.stop()
        raise RuntimeError(f"celery worker {name} did not start:\n{worker.log_tail()}")
    if not worker.running:
        raise RuntimeError(f"celery worker {name} exited:\n{worker.log_tail()}")
    return worker
