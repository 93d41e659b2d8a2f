"""The services of the reference deployment on one machine (`make run-cluster`): PostgreSQL, Redis as
a master, a replica and three Sentinels, and HAProxy in front of the web processes.

Each is a process of its own, started from Debian's packages (``scripts/install_cluster_packages.sh``
installs them) through ``devtools.processes``, with its configuration written into the cluster's
directory (mode 0600: it holds passwords). ``scripts/run_console.py --cluster`` starts them, then the
console's own processes; the tests of ``tests/cluster/`` fail them. Nothing from Django or the console
is imported.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import resource
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg
import redis

from devtools.processes import ManagedProcess, start_process, wait_until

MASTER_NAME = "matrixoe"
# Redis and Sentinel rewrite their configurations (passwords inside) and write snapshots: owner only.
PRIVATE = 0o077
MACHINE_POSTGRES = "postgres://postgres@127.0.0.1:5432/postgres"
PACKAGES_HINT = "run `sudo bash scripts/install_cluster_packages.sh` (`make run-cluster` does)"


class ClusterError(RuntimeError):
    """A service of the cluster could not be found or started; the message says what to do."""


def program(name: str, *fallbacks: str) -> str:
    """The path of ``name`` on PATH or at one of ``fallbacks``; ClusterError naming the package if none."""
    for candidate in (shutil.which(name), *fallbacks):
        if candidate and Path(candidate).exists():
            return candidate
    raise ClusterError(f"{name} not found: {PACKAGES_HINT}")


def write_private(path: Path, text: str) -> Path:
    """``text`` into ``path``, readable by its owner only (0600) from the moment it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    return path


def listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# --- Redis: a master, a replica, three Sentinels ------------------------------------------------


@dataclass
class SentinelTimings:
    """How fast the Sentinels fail over (milliseconds): ``down_after_ms`` without an answer marks the
    master down (Redis's default is 30 s; 5 s here), ``failover_timeout_ms`` bounds one failover try."""

    down_after_ms: int = 5000
    failover_timeout_ms: int = 60000

    @classmethod
    def from_environ(cls) -> SentinelTimings:
        """CLUSTER_SENTINEL_DOWN_AFTER_MS / CLUSTER_SENTINEL_FAILOVER_TIMEOUT_MS (the tests shorten them)."""
        defaults = cls()
        return cls(
            int(os.environ.get("CLUSTER_SENTINEL_DOWN_AFTER_MS") or defaults.down_after_ms),
            int(os.environ.get("CLUSTER_SENTINEL_FAILOVER_TIMEOUT_MS") or defaults.failover_timeout_ms),
        )


@dataclass
class RedisSet:
    """Where the Redis servers and Sentinels of one cluster listen, and their passwords."""

    directory: Path
    master_port: int
    replica_port: int
    sentinel_ports: Sequence[int]
    password: str
    sentinel_password: str
    timings: SentinelTimings = field(default_factory=SentinelTimings)

    def environ(self, password_file: Path, sentinel_password_file: Path) -> dict[str, str]:
        """The console's settings for this set (``matrixoe/settings.py``, "Redis through Sentinel")."""
        return {
            "REDIS_SENTINELS": ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports),
            "REDIS_SENTINEL_MASTER": MASTER_NAME,
            "REDIS_PASSWORD_FILE": str(password_file),
            "REDIS_SENTINEL_PASSWORD_FILE": str(sentinel_password_file),
        }

    def server_config(self, port: int, replica_of: int | None) -> Path:
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            f"dir {self.directory}",
            'logfile ""',
            "set-proc-title no",  # the title would overwrite the environment, where `make run` marks its own
            'save ""',
            "appendonly no",
            f"requirepass {self.password}",
            f"masterauth {self.password}",  # a master demoted by a failover follows the new one with it
            # Stopped, a master waits this long for its replicas to catch up (they do within
            # milliseconds while they run; 10 s by default when they are being stopped too).
            "shutdown-timeout 2",
        ]
        if replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {replica_of}")
        return write_private(self.directory / f"redis-{port}.conf", "\n".join(lines) + "\n")

    def sentinel_config(self, port: int) -> Path:
        name = MASTER_NAME
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {self.directory}",
            'logfile ""',
            "set-proc-title no",
            f"requirepass {self.sentinel_password}",  # clients, and the Sentinels among themselves
            f"sentinel monitor {name} 127.0.0.1 {self.master_port} 2",
            f"sentinel auth-pass {name} {self.password}",
            f"sentinel down-after-milliseconds {name} {self.timings.down_after_ms}",
            f"sentinel failover-timeout {name} {self.timings.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        return write_private(self.directory / f"sentinel-{port}.conf", "\n".join(lines) + "\n")

    def start(self, log_dir: Path, started: list[ManagedProcess]) -> None:
        """Master, replica, then the Sentinels, each appended to ``started`` at once; configurations are
        written afresh (the Sentinels rewrite theirs as they learn), so every start begins with the master
        on ``master_port``. Returns once the master and the replica answer."""
        server = program("redis-server")
        sentinel = program("redis-sentinel")
        for port in (self.master_port, self.replica_port, *self.sentinel_ports):
            if listening(port):
                raise ClusterError(
                    f"port {port} (Redis of the cluster) is in use by a program this run did not start; "
                    "stop it or choose other ports (MATRIXOE_REDIS_PORT, SENTINEL_BASE_PORT)"
                )
        for port, replica_of in ((self.master_port, None), (self.replica_port, self.master_port)):
            config, log = self.server_config(port, replica_of), log_dir / f"redis-{port}.log"
            started.append(start_process(f"redis-{port}", [server, str(config)], log, umask=PRIVATE))
        for port in self.sentinel_ports:
            config, log = self.sentinel_config(port), log_dir / f"sentinel-{port}.log"
            started.append(start_process(f"sentinel-{port}", [sentinel, str(config)], log, umask=PRIVATE))
        for port in (self.master_port, self.replica_port):
            client = redis.Redis(port=port, password=self.password, socket_connect_timeout=0.5)
            if not wait_until(lambda client=client: _answers(client), 20, 0.05):
                raise ClusterError(f"Redis on port {port} did not start; see {log_dir}/redis-{port}.log")

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(
            port=port, password=self.sentinel_password, socket_timeout=2, decode_responses=True
        )

    def ready(self) -> bool:
        """Every Sentinel sees the master with its replica linked and the two other Sentinels (a
        failover needs a quorum of them, and a replica to promote)."""
        try:
            for port in self.sentinel_ports:
                master = self.sentinel(port).sentinel_master(MASTER_NAME)
                replicas = self.sentinel(port).sentinel_slaves(MASTER_NAME)
                linked = [
                    r for r in replicas if r.get("master-link-status") == "ok" and not r.get("is_odown")
                ]
                if master.get("num-other-sentinels", 0) < len(self.sentinel_ports) - 1 or not linked:
                    return False
        except redis.RedisError:
            return False
        return True

    def master_port_now(self) -> int | None:
        """The port of the master as a majority of the Sentinels name it now; None without a majority."""
        votes: dict[int, int] = {}
        for port in self.sentinel_ports:
            try:
                _host, master = self.sentinel(port).sentinel_get_master_addr_by_name(MASTER_NAME)
            except (redis.RedisError, TypeError):
                continue
            votes[int(master)] = votes.get(int(master), 0) + 1
        for master, count in votes.items():
            if count > len(self.sentinel_ports) // 2:
                return master
        return None


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


# --- PostgreSQL: the machine's server, else one of our own -----------------------------------------


def postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def ensure_database(server_url: str, name: str) -> None:
    """CREATE DATABASE ``name`` on the server of ``server_url`` (a maintenance database) unless it exists."""
    with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            connection.execute(f'CREATE DATABASE "{name}"')


def postgres_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` (Debian's ``postgresql`` package)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda path: int(path.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise ClusterError(f"PostgreSQL not found: {PACKAGES_HINT}")


@dataclass
class OwnPostgres:
    """A PostgreSQL server of the cluster's own, for a machine without one on 127.0.0.1:5432.

    Its data directory is created once with ``initdb`` (superuser ``postgres``, password auth) and
    kept. PostgreSQL refuses to run as root: started by root, it runs as the ``postgres`` user the
    Debian package creates, with its data under that user's home (``/var/lib/postgresql``), since the
    console's var/ is its owner's only.
    """

    directory: Path
    port: int
    password: str

    @property
    def as_user(self) -> str | None:
        return "postgres" if os.geteuid() == 0 else None

    @property
    def data_dir(self) -> Path:
        if self.as_user:
            home = Path(pwd.getpwnam(self.as_user).pw_dir)
            tag = hashlib.sha256(str(self.directory.resolve()).encode()).hexdigest()[:12]
            return home / f"matrixoe-cluster-{tag}"
        return self.directory / "postgres"

    def url(self, database: str) -> str:
        return f"postgres://postgres:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{database}"

    def init(self, log_path: Path) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        bin_dir = postgres_bin_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        password_file = write_private(self.data_dir.parent / f".{self.data_dir.name}.pw", self.password)
        if self.as_user:
            owner = pwd.getpwnam(self.as_user)
            os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
            os.chown(password_file, owner.pw_uid, owner.pw_gid)
        args = [str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=scram-sha-256"]
        args += [f"--pwfile={password_file}", "--encoding=UTF8", "--locale=C"]
        process = start_process("initdb", args, log_path, user=self.as_user)
        status = process.process.wait(timeout=120)
        password_file.unlink(missing_ok=True)
        if status != 0:
            raise ClusterError(f"initdb failed; see {log_path}")

    def start(self, log_dir: Path, started: list[ManagedProcess]) -> None:
        if listening(self.port):
            raise ClusterError(
                f"port {self.port} (the cluster's PostgreSQL) is in use; set CLUSTER_POSTGRES_PORT"
            )
        self.init(log_dir / "initdb.log")
        args = [str(postgres_bin_dir() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        args += ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="]
        process = start_process("postgres", args, log_dir / "postgres.log", user=self.as_user)
        started.append(process)
        maintenance = self.url("postgres")
        if not wait_until(lambda: not process.running or postgres_answers(maintenance), 60, 0.2):
            raise ClusterError(f"PostgreSQL did not start; see {log_dir / 'postgres.log'}")
        if not process.running:
            raise ClusterError(f"PostgreSQL exited; see {log_dir / 'postgres.log'}")


# --- HAProxy in front of the web processes -----------------------------------------------------------


def haproxy_config(path: Path, port: int, web_ports: Sequence[int]) -> Path:
    """A balancer on 127.0.0.1:``port`` over the web processes; websockets pass (``timeout tunnel``).

    ``leastconn``: a websocket stays for as long as a page is open, so the process with the fewest
    goes first (``http-server-close``: plain requests do not count). A process is out after two failed
    checks a second apart (``fall 2``); a connection refused meanwhile is retried on another one
    (``option redispatch``, ``retries``). The client's own X-Forwarded-For is dropped and replaced by
    the address the balancer sees.
    """
    servers = [
        f"    server web{index + 1} 127.0.0.1:{web_port} check" for index, web_port in enumerate(web_ports)
    ]
    # Two descriptors per connection (client and server side): as many as the hard limit allows.
    maxconn = max(256, min(20000, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 100) // 2))
    text = f"""global
    log stdout format raw local0 notice
    maxconn {maxconn}

defaults
    mode http
    log global
    option dontlognull
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout tunnel 1h
    retries 3
    option redispatch 1
    # A page's requests hold no web process between them, so a process's connections are its sockets.
    option http-server-close

frontend console
    bind 127.0.0.1:{port}
    http-request del-header X-Forwarded-For
    option forwardfor
    default_backend web

backend web
    balance leastconn
    option httpchk
    http-check send meth GET uri /login/
    http-check expect status 200
    default-server inter 1s fall 2 rise 2
{chr(10).join(servers)}
"""
    return write_private(path, text)


def start_haproxy(config: Path, log_path: Path, port: int) -> ManagedProcess:
    """``haproxy -db`` (in the foreground) with ``config``; returned once it answers on ``port``."""
    process = start_process(
        "balancer", [program("haproxy", "/usr/sbin/haproxy"), "-db", "-f", str(config)], log_path
    )
    if not wait_until(lambda: not process.running or listening(port), 20, 0.05) or not process.running:
        process.stop()
        raise ClusterError(f"HAProxy did not start:\n{process.log_tail()}")
    return process
